"""Stage 2a of the tiny recipe: warm up the CLIP2SAM recognizer on rendered scenes before co-training.

The recognizer (FPN over the frozen CLIP stages, RoIAlign on the ground-truth box, 1x1 conv +
ReLU + mean, DESIGN §2.5) is trained in co-training on the ground-truth RoI of each prompt and
never looks at the mask decoder's output, so it can learn on its own, with every object of a
scene per step and without the decoder's cost: one step of this is ~0.17 s on 2 CPU cores
against ~0.37 s for a co-training step. With every class seen the fused label follows the head
(a = 0.1), and the head is what the tiny recipe's CPU minutes limit (bench/RESULTS.md).

The classifier is the one co-training uses: cosine to the class-name text embeddings at a fixed
temperature, background column 0.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from ovsam_ray.model.ovsam import OVSAM

from .clip_pretrain import PretrainResult, scene_batches, train_steps
from .losses import class_logits

log = logging.getLogger(__name__)


@torch.no_grad()
def region_accuracy(model: OVSAM, text_embeddings: torch.Tensor, batches: list) -> float:
    """Head accuracy on ground-truth boxes over ``SceneBatch``es (background column excluded)."""
    correct = total = 0
    for batch in batches:
        fpn = model.recognizer.fpn(model.backbone(batch.images))
        region = model.recognizer.region_embeddings(fpn, batch.boxes, batch.image_index)
        logits = class_logits(region, text_embeddings, 0.0)[:, :-1]
        correct += int((logits.argmax(1) == batch.kinds).sum())
        total += len(batch.kinds)
    return correct / max(total, 1)


def warm_up_recognizer(model: OVSAM, text_embeddings: torch.Tensor, *, class_names: list[str], steps: int = 400,
                       image_size: int = 256,
                       scene_sizes: tuple[tuple[int, int], tuple[int, int]] = ((224, 168), (288, 224)),
                       objects: tuple[int, int] = (2, 5), batch_size: int = 8, lr: float = 1e-3,
                       log_scale: float = 3.0, weight_decay: float = 0.05, warmup: int = 25, seed: int = 0,
                       time_budget_s: float | None = None, clock: str = "wall", log_every: int = 50
                       ) -> PretrainResult:
    """Train ``model.recognizer`` in place (CLIP frozen, in eval mode) with cross-entropy of its
    region embeddings on every object's box in ``batch_size`` rendered scenes per step against
    ``text_embeddings`` (C, S, D) of ``class_names`` at temperature exp(``log_scale``)."""
    t0 = time.perf_counter()
    model.backbone.eval()
    recognizer = model.recognizer

    batches = scene_batches(seed + 2, batch_size, class_names=class_names, image_size=image_size,
                            scene_sizes=scene_sizes, objects=objects)

    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        batch = next(batches)
        with torch.no_grad():
            feats = model.backbone(batch.images)
        region = recognizer.region_embeddings(recognizer.fpn(feats), batch.boxes, batch.image_index)
        return F.cross_entropy(class_logits(region, text_embeddings, log_scale), batch.kinds)

    try:
        step, first, last = train_steps(recognizer, loss_fn, stage="stage 2a (recognizer)", steps=steps, lr=lr,
                                        weight_decay=weight_decay, warmup=warmup, seed=seed + 2,
                                        time_budget_s=time_budget_s, clock=clock, log_every=log_every)
    finally:
        batches.close()
    seconds = time.perf_counter() - t0
    log.info("stage 2a (recognizer) done: %d steps in %.0fs, loss %.3f -> %.3f", step, seconds, first, last)
    return PretrainResult(step, first, last, seconds, float("nan"))
