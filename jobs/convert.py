"""`ray job submit` entry point for the converters: parse -> convert on the cluster (Ray Data).

    ray job submit --working-dir . -- python jobs/convert.py imagenet \
        --input s3://bucket/fall11_whole/ --synsets s3://bucket/words.txt --output s3://bucket/shards/in22k/

Same flags as `ovsam-ray convert <format>`, with --ray-address defaulting to auto (the cluster the
job runs on). Exit codes: 0 converted (skipped images are counted in _convert.json); 2 the
conversion could not start or go on, with a one-line reason in the job's log. Submit the same
command again after a failure or `ray job stop`: finished shards are kept and skipped.
"""

import argparse
import logging
import sys

from ovsam_ray.cli import STOP_ERRORS, report_stop
from ovsam_ray.cli.convert import convert_parser, run_convert_cli

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = convert_parser(parser, ray_address="auto").parse_args()
    try:
        code = run_convert_cli(args)
    except STOP_ERRORS as e:
        code = report_stop(e, "convert job stopped: ")
    sys.exit(code)
