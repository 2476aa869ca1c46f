"""``ovsam-ray demo``: the README's first command, on one machine with a local Ray.

Generates named-shape images, trains the tiny model (stages 0-2 of the miniature recipe,
skipped with ``quick``), labels held-out images through the real label job with ground-truth
boxes and one interior point per object as prompts, and scores them with the one scorer
(:mod:`ovsam_ray.evaluation.table1`): mean IoU and accuracy over the seen (trained) and the unseen
(held-out) shapes, and the box-fill baseline.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from ovsam_ray.data.gt_prompts import rewrite_shard_prompts
from ovsam_ray.data.synthetic import generate_shards, shape_vocabulary_names
from ovsam_ray.errors import ConfigError
from ovsam_ray.evaluation.table1 import ClassLookup, evaluate_label_output, table1_markdown
from ovsam_ray.inference import ModelConfig

log = logging.getLogger("ovsam_ray.demo")


@dataclass
class DemoConfig:
    """``ovsam-ray demo``; ``images_per_shard`` and ``time_budget_s`` are set by tests only."""

    work_dir: str = field(default="demo_out", metadata={"help": "folder for the data, weights and labels"})
    quick: bool = field(default=False, metadata={"help": "skip training: random weights, about a minute"})
    # 426 objects, 323 of the six seen shapes (seed 1000): accuracy to about +-2 points
    num_images: int = field(
        default=176,
        metadata={"help": "held-out images to label and score (176: 426 objects, 323 of the seen shapes)"},
    )
    images_per_shard: int = field(default=16, metadata={"cli": False})
    seed: int = field(default=0, metadata={"help": "seed of the data and the training"})
    # training runs fixed step counts; this only caps the time
    time_budget_s: float | None = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.images_per_shard < 1:
            raise ConfigError("num_images and images_per_shard must be >= 1")


@dataclass(frozen=True)
class DemoDataConfig:
    """``ovsam-ray demo-data``: synthetic named-shape shards (:func:`generate_shards`)."""

    output: str = field(metadata={"help": "folder or s3:// prefix for the shards"})
    num_images: int = field(default=64, metadata={"help": "images to generate"})
    images_per_shard: int = field(default=16, metadata={"help": "images per shard"})
    seed: int = field(default=0, metadata={"help": "seed of the images"})
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3-compatible endpoint URL (else AWS_ENDPOINT_URL)"}
    )


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

    from ovsam_ray.pipeline.label_job import LabelConfig, run_label

    os.makedirs(cfg.work_dir, exist_ok=True)
    work = os.path.abspath(cfg.work_dir)
    eval_dir = os.path.join(work, "eval_shards")
    shards = generate_shards(
        eval_dir, num_images=cfg.num_images, images_per_shard=cfg.images_per_shard, seed=cfg.seed + 1000
    )
    for url in shards:
        add_point_prompts(url)
    quick = cfg.quick
    if quick:
        model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab=_write_vocab(os.path.join(work, "vocab.txt")))
        banner = "QUICK DEMO: random weights (untrained); masks and labels are meaningless"
    else:
        from ovsam_ray.training.tiny_recipe import run_tiny_recipe

        weights = run_tiny_recipe(os.path.join(work, "train"), seed=cfg.seed, time_budget_s=cfg.time_budget_s)
        model = ModelConfig(preset="ovsam_tiny", weights=weights, train_vocab="shapes")
        banner = "DEMO: tiny OV-SAM trained on this machine"

    if not ray.is_initialized():  # after training: Ray's idle processes would take CPU from it
        ray.init(num_cpus=min(2, os.cpu_count() or 1), include_dashboard=False)
    labels_dir = os.path.join(work, "labels")
    summary = run_label(LabelConfig(input=eval_dir, output=labels_dir, model=model, batch_size=4, overwrite=True))
    result = _evaluate(labels_dir, shards, model)
    result["random_init"] = quick
    with open(os.path.join(work, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("=" * 72)
    print(banner)
    print(
        f"labelled {summary.images} images ({summary.images_error} errors), {summary.masks} masks "
        f"in {summary.wall_time_s:.1f}s -> {labels_dir}"
    )
    print(metrics_report(result["metrics"], quick=quick), end="")
    print(f"metrics.json: {os.path.join(work, 'metrics.json')}")
    print(
        "read the labels:\n"
        "  import pandas as pd; from pycocotools import mask as M\n"
        f"  df = pd.read_parquet('{labels_dir}')\n"
        "  row = df[df.instances.map(len) > 0].iloc[0]; inst = row.instances[0]\n"
        "  m = M.decode({'size': list(inst['rle']['size']), 'counts': inst['rle']['counts']})"
    )
    print("=" * 72)
    return 0 if summary.images_error == 0 else 1


#: Under the quick demo's table: why its "base" columns are empty.
QUICK_NOTE = (
    "(--quick: random weights and a plain vocabulary file, which marks no shape as seen in training, "
    "so every object counts as novel and the base columns are empty; the numbers are chance level. "
    "Without --quick the demo trains the model and reports its seen and unseen shapes.)"
)


def metrics_report(metrics: dict, *, quick: bool) -> str:
    """The demo's table, then one line per class split (trained model) or what the quick demo's
    table shows (random weights)."""
    text = table1_markdown(metrics)
    if quick:
        return text + QUICK_NOTE + "\n"
    splits = (("", "all"), ("_base", "seen"), ("_novel", "unseen"))
    return text + "".join(_split_line(metrics, split, name) + "\n" for split, name in splits)


def _split_line(metrics: dict, split: str, name: str) -> str:
    """One line per class split: box and point mIoU, the box-fill baseline and both accuracies."""
    box, point = metrics.get("box", {}), metrics.get("point", {})

    def num(entry: dict, key: str, percent: bool = False) -> str:
        v = entry.get(key + split)
        return "-" if v is None else (f"{100 * v:.1f}%" if percent else f"{v:.3f}")

    return (
        f"{name} classes ({box.get('objects' + split, 0)} objects): box mIoU {num(box, 'miou')} "
        f"(box-fill {num(box, 'box_fill_miou')}), point mIoU {num(point, 'miou')}, "
        f"box accuracy {num(box, 'accuracy', True)}, point accuracy {num(point, 'accuracy', True)}"
    )


def _evaluate(labels_dir: str, shards: list[str], model: ModelConfig) -> dict:
    """The label output scored by the one scorer, with the seen flags the label job used."""
    from ovsam_ray.evaluation.run_eval import eval_vocabulary

    return evaluate_label_output(labels_dir, shards, ClassLookup(eval_vocabulary(model)))
