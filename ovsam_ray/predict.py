"""``ovsam-ray predict``: one image, its prompts (or ``--grid N``: everything, from an N x N point
grid through ``OVSAMAutomaticMaskGenerator``), a checkpoint -> masks and labels as JSON.

The quickest way to try a checkpoint, and how outputs are compared against the reference
implementation (``--save-logits``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ovsam_ray import storage
from ovsam_ray.data.decode import parse_prompts_json, read_image
from ovsam_ray.errors import ConfigError
from ovsam_ray.inference import ModelConfig, build_predictor
from ovsam_ray.labels.records import prediction_to_instances
from ovsam_ray.model.automatic_mask_generator import OVSAMAutomaticMaskGenerator
from ovsam_ray.model.predictor import ImagePrompts

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """``prompts`` (a prompts JSON) or ``grid`` (points per side of a segment-everything grid),
    not both; ``grid_options``: further keyword arguments of ``OVSAMAutomaticMaskGenerator``
    (thresholds; its defaults otherwise). ``overlay``: drawn by the command (``show.write_overlay``)
    from what :func:`run_predict` returns."""

    image: str = field(metadata={"help": "the image file"})
    output: str = field(metadata={"help": "the instances json to write"})
    prompts: str | None = field(
        default=None, metadata={"help": 'JSON: {"boxes": [...], "points": [...], "point_boxes": [...]}'}
    )
    model: ModelConfig = field(default_factory=lambda: ModelConfig(random_init=True), metadata={"group": "model"})
    save_logits: str | None = field(
        default=None, metadata={"help": "write low_res/head/clip/fused logits and labels to this .npz"}
    )
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda, cuda:1...)"})
    with_embedding: bool = field(
        default=False, metadata={"help": "store each instance's float16 region and CLIP embeddings"}
    )
    grid: int | None = field(
        default=None,
        metadata={
            "metavar": "N",
            "help": (
                "instead of --prompts: segment everything from an N x N point grid (stability, mask NMS: "
                "OVSAMAutomaticMaskGenerator's defaults)"
            ),
        },
    )
    grid_options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    overlay: str | None = field(
        default=None,
        metadata={
            "metavar": "PNG",
            "help": "also draw the prediction on the image into this PNG (masks, boxes, labels, as ovsam-ray show)",
        },
    )

    def __post_init__(self) -> None:
        if (self.prompts is None) == (self.grid is None):
            raise ConfigError("predict: give --prompts FILE or --grid N (segment everything), one of them")
        if self.grid is not None and self.grid < 1:
            raise ConfigError(f"--grid {self.grid}: need >= 1 points per side")


def run_predict(cfg: PredictConfig) -> dict:
    """Predict every prompt of one image (or everything, with ``grid``); writes and returns
    ``{"instances": [...], ...}``."""
    s3 = cfg.model.s3_endpoint
    image = read_image(cfg.image, s3_endpoint=s3)
    height, width = image.shape[:2]
    prompts = None if cfg.prompts is None else _read_prompts(cfg.prompts, width=width, height=height, s3_endpoint=s3)
    predictor, vocab, loaded = build_predictor(cfg.model, cfg.device)
    types = None
    if prompts is None:
        assert cfg.grid is not None, "PredictConfig asks for --prompts or --grid"
        generated = OVSAMAutomaticMaskGenerator(predictor, points_per_side=cfg.grid, **cfg.grid_options).predict(image)
        pred, prompts, types = generated.prediction, generated.prompts, ["grid"] * len(generated)
    else:
        pred = predictor([image], [prompts])[0]
    instances = prediction_to_instances(pred, prompts, vocab, types=types, with_embedding=cfg.with_embedding)
    result = {
        "image": cfg.image,
        "width": width,
        "height": height,
        "model": loaded.identity(),
        "vocabulary": {"name": vocab.name, "sha256": vocab.sha256, "num_classes": vocab.num_classes},
        "random_init": loaded.random_init,
        "instances": instances,
    }
    with storage.open_url(cfg.output, "w", s3_endpoint=s3) as f:
        json.dump(result, f)
    if cfg.save_logits:
        with storage.open_url(cfg.save_logits, "wb", s3_endpoint=s3) as f:
            np.savez(
                f,
                low_res_logits=pred.low_res_logits,
                head_logits=pred.head_logits,
                clip_logits=pred.clip_logits,
                fused_logits=pred.fused_logits,
                labels=pred.labels,
            )
    return result


def _read_prompts(url: str, *, width: int, height: int, s3_endpoint: str | None) -> ImagePrompts:
    raw = json.loads(storage.read_bytes(url, s3_endpoint=s3_endpoint))
    parsed = parse_prompts_json(json.dumps(raw).encode(), width=width, height=height)
    for warning in parsed.warnings:
        log.warning("prompt dropped: %s", warning)
    return ImagePrompts(boxes=parsed.boxes, points=parsed.points, point_boxes=parsed.point_boxes)
