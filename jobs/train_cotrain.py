"""CLIP2SAM co-training as a Ray job.

    ray job submit --working-dir . -- python jobs/train_cotrain.py \
        --recipe clip2sam_coco_rn50x16 --storage-path s3://bucket/runs --name clip2sam-coco \
        --dataset 's3://bucket/coco/{000000..000117}.tar|vocab=coco_ov' --epoch-images 107761 \
        --weights s3://bucket/weights

Add ``--dataset 's3://bucket/in22k/|kind=image|ratio=0.25|vocab=in22k.txt'`` for an ImageNet-22k
mixture; ``--print-config`` prints the resolved config (recipe + flags, steps) and exits.

Submitting the same --storage-path/--name again resumes from the run's latest checkpoint.
"""

import sys

from ovsam_ray.cli import configure_logging
from ovsam_ray.cli.train import cotrain_config_from_args, cotrain_parser, print_config
from ovsam_ray.training.cotrain import run_cotrain

if __name__ == "__main__":
    configure_logging()
    args = cotrain_parser().parse_args()
    cfg = cotrain_config_from_args(args)
    if args.print_config:
        print_config(cfg)
        sys.exit(0)
    result = run_cotrain(cfg)
    print(f"metrics: {result.metrics}\ncheckpoint: {result.checkpoint}")
    sys.exit(0 if result.error is None else 1)
