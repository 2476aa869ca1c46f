"""SAM2CLIP distillation as a Ray job.

    ray job submit --working-dir . -- python jobs/train_distill.py \
        --storage-path s3://bucket/runs --name sam2clip-rn50x16 --num-workers 8 --use-gpu \
        --dataset 's3://bucket/sa1b-1pct/{000000..000099}.tar' \
        --teacher vit_h --teacher-checkpoint s3://bucket/weights/sam_vit_h_4b8939.pth \
        --clip s3://bucket/weights/RN50x16.pt --preset ovsam_rn50x16 --max-steps 40000

With precomputed teacher features (``ovsam-ray train dump-teacher``) add
``|teacher_features=s3://bucket/sa1b-teacher`` to the dataset. The same --storage-path/--name
submitted again resumes from the run's latest checkpoint.
"""

import logging
import sys

from ovsam_ray.training.cli import distill_config_from_args, distill_parser
from ovsam_ray.training.distill import run_distill

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = distill_config_from_args(distill_parser().parse_args())
    result = run_distill(cfg)
    print(f"metrics: {result.metrics}\ncheckpoint: {result.checkpoint}")
    sys.exit(0 if result.error is None else 1)
