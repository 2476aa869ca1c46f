"""`ray job submit` entry point for the label job: parse -> config -> run_label().

    ray job submit --working-dir . -- python jobs/label.py \
        --input s3://bucket/shards/ --output s3://bucket/labels/ --weights s3://bucket/weights/ \
        --num-gpus 1 --concurrency 1,8 --batch-size 8

Same flags and exit codes as `ovsam-ray label`:
  0  every shard committed, errors within --max-error-fraction;
  1  committed, but error rows above --max-error-fraction (or a damaged shard, unless it is 1);
  2  the job could not start or go on, with a one-line reason in the job's log: a bad flag or
     --s3-endpoint, storage unreachable through all retries, a full disk or read-only output
     while writing parts, Parquet files or markers, an output that is not writable,
     holds a different run, or is in use by another live job (its _lease.json);
  3  incomplete: some shards were NOT committed (unreadable, or their commit failed), whatever
     --max-error-fraction says; rerun the same command to finish them (committed shards are
     skipped).
  143  stopped by SIGTERM (`ray job stop`; 130: Ctrl-C): committed shards kept, lease released;
     submit the same command again to resume.
"""

import argparse
import sys

from ovsam_ray.cli import STOP_ERRORS, configure_logging, report_stop
from ovsam_ray.cli.label import label_parser, run_label_cli

if __name__ == "__main__":
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = label_parser(parser).parse_args()
    try:
        code = run_label_cli(args)
    except STOP_ERRORS as e:
        code = report_stop(e, "label job stopped: ")
    sys.exit(code)
