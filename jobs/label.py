"""`ray job submit` entry point for the label job: parse -> config -> run_label().

    ray job submit --working-dir . -- python jobs/label.py \
        --input s3://bucket/shards/ --output s3://bucket/labels/ --weights s3://bucket/weights/ \
        --num-gpus 1 --concurrency 1,8 --batch-size 8

Same flags as `ovsam-ray label`; exits non-zero when failures exceed --max-error-fraction.
"""

import argparse
import logging
import sys

from ovsam_ray.cli_jobs import add_label_args, run_label_cli

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_label_args(parser)
    sys.exit(run_label_cli(parser.parse_args()))
