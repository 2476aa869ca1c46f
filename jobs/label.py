"""`ray job submit` entry point for the label job: parse -> config -> run_label().

    ray job submit --working-dir . -- python jobs/label.py \
        --input s3://bucket/shards/ --output s3://bucket/labels/ --weights s3://bucket/weights/ \
        --num-gpus 1 --concurrency 1,8 --batch-size 8

Same flags as `ovsam-ray label`; exits 1 when failures exceed --max-error-fraction and 2, with a
one-line reason in the job's log, when the job cannot go on (storage unreachable through all
retries, an output folder holding a different run, a bad flag), as `ovsam-ray label` does.
"""

import argparse
import logging
import sys

from ovsam_ray.cli_jobs import add_label_args, run_label_cli

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_label_args(parser)
    args = parser.parse_args()
    try:
        code = run_label_cli(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        logging.getLogger("ovsam_ray").error("label job stopped: %s", e)
        code = 2
    sys.exit(code)
