"""``ovsam-ray demo``: the README's first command, on one machine with a local Ray.

Generates named-shape images, trains the tiny model (stages 0-2 of the miniature recipe,
skipped with ``quick``), labels held-out images through the real label job with ground-truth
boxes and one interior point per object as prompts, and reports mean IoU and accuracy.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ovsam_ray.data.synthetic import generate_shards, shape_vocabulary_names
from ovsam_ray.evaluation.prompts import rewrite_shard_prompts

log = logging.getLogger("ovsam_ray.demo")


@dataclass
class DemoConfig:
    work_dir: str = "demo_out"
    quick: bool = False
    num_images: int = 160  # ~420 objects, ~315 of the six seen shapes: accuracy to about +-2 points
    images_per_shard: int = 16
    seed: int = 0
    time_budget_s: float | None = None  # training runs fixed step counts; this only caps the time

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.images_per_shard < 1:
            raise ValueError("num_images and images_per_shard must be >= 1")


def add_point_prompts(shard_url: str) -> None:
    """Rewrite a synthetic shard so each image's JSON has its ground-truth boxes and one interior
    point per object (``points``) with the object's box as its CLIP box (``point_boxes``)."""
    rewrite_shard_prompts(shard_url, shard_url, mode="both")


def _write_vocab(path: str) -> str:
    with open(path, "w") as f:
        f.write("\n".join(shape_vocabulary_names()) + "\n")
    return path


def run_demo(cfg: DemoConfig) -> int:
    """Run the demo; returns the process exit status."""
    import ray

    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.pipeline.label_job import LabelConfig, run_label

    os.makedirs(cfg.work_dir, exist_ok=True)
    work = os.path.abspath(cfg.work_dir)
    eval_dir = os.path.join(work, "eval_shards")
    shards = generate_shards(eval_dir, num_images=cfg.num_images, images_per_shard=cfg.images_per_shard,
                             seed=cfg.seed + 1000)
    for url in shards:
        add_point_prompts(url)
    quick = cfg.quick
    seen = None
    if quick:
        model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab=_write_vocab(os.path.join(work, "vocab.txt")))
        banner = "QUICK DEMO: random weights (untrained); masks and labels are meaningless"
    else:
        from ovsam_ray.training.recipe import HELD_OUT, run_tiny_recipe

        weights = run_tiny_recipe(os.path.join(work, "train"), seed=cfg.seed, time_budget_s=cfg.time_budget_s)
        seen = set(shape_vocabulary_names()) - set(HELD_OUT)
        model = ModelConfig(preset="ovsam_tiny", weights=weights, train_vocab="shapes")
        banner = "DEMO: tiny OV-SAM trained on this machine"

    if not ray.is_initialized():  # after training: Ray's idle processes would take CPU from it
        ray.init(num_cpus=min(2, os.cpu_count() or 1), include_dashboard=False)
    labels_dir = os.path.join(work, "labels")
    summary = run_label(LabelConfig(input=eval_dir, output=labels_dir, model=model, batch_size=4, overwrite=True))
    metrics = _evaluate(labels_dir, shards, seen)
    metrics["random_init"] = quick
    with open(os.path.join(work, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print("=" * 72)
    print(banner)
    print(f"labelled {summary.images} images ({summary.images_error} errors), {summary.masks} masks "
          f"in {summary.wall_time_s:.1f}s -> {labels_dir}")
    overall = {k: v for k, v in metrics.items() if not k.endswith(("_seen", "_unseen"))}
    print("metrics: " + ", ".join(f"{k}={v:.3f}" for k, v in overall.items() if isinstance(v, float)))
    for split in ("seen", "unseen") if seen is not None else ():
        part = {k[: -len(split) - 1]: v for k, v in metrics.items() if k.endswith("_" + split)}
        print(f"{split} classes ({part.get('num_objects', 0)} objects): "
              + ", ".join(f"{k}={v:.3f}" for k, v in part.items() if isinstance(v, float)))
    print(f"metrics.json: {os.path.join(work, 'metrics.json')}")
    print("read the labels:\n"
          "  import pandas as pd; from pycocotools import mask as M\n"
          f"  df = pd.read_parquet('{labels_dir}')\n"
          "  inst = df.instances[0][0]; m = M.decode({'size': list(inst['rle']['size']), "
          "'counts': inst['rle']['counts']})")
    print("=" * 72)
    return 0 if summary.images_error == 0 else 1


def _evaluate(labels_dir: str, shards: list[str], seen: set[str] | None = None) -> dict:
    from ovsam_ray.evaluation.interactive import evaluate_label_output

    return evaluate_label_output(labels_dir, shards, seen)
