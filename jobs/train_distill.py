"""SAM2CLIP distillation as a Ray job.

    ray job submit --working-dir . -- python jobs/train_distill.py \
        --recipe sam2clip_vith_rn50x16 --storage-path s3://bucket/runs --name sam2clip-rn50x16 \
        --dataset 's3://bucket/sa1b-1pct/{000000..000009}.tar' \
        --teacher-checkpoint s3://bucket/weights/sam_vit_h_4b8939.pth --clip s3://bucket/weights/RN50x16.pt

With precomputed teacher features (``ovsam-ray train dump-teacher``) add
``|teacher_features=s3://bucket/sa1b-teacher`` to the dataset. The same --storage-path/--name
submitted again resumes from the run's latest checkpoint.
"""

import sys

from ovsam_ray.cli import configure_logging
from ovsam_ray.cli.train import distill_config_from_args, distill_parser, print_config
from ovsam_ray.training.distill import run_distill

if __name__ == "__main__":
    configure_logging()
    args = distill_parser().parse_args()
    cfg = distill_config_from_args(args)
    if args.print_config:
        print_config(cfg)
        sys.exit(0)
    result = run_distill(cfg)
    print(f"metrics: {result.metrics}\ncheckpoint: {result.checkpoint}")
    sys.exit(0 if result.error is None else 1)
