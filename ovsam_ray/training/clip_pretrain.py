"""Stage 0 of the tiny recipe: a short contrastive pretraining of the tiny CLIP.

On a fresh machine there is no pretrained CLIP, and OV-SAM freezes CLIP, so the tiny recipe first
gives it something worth freezing: open_clip's ``ClipLoss`` on generated image/caption pairs.
Images are 128x128 crops around one shape of a rendered scene (``data.synthetic.render_image``),
the object repainted in a named colour; captions name the colour, the shape and sometimes its
size, written into the same ViLD templates that later embed the class names ("a photo of a
large red star."), and sometimes only the shape. Each batch holds every shape in a few colours,
so pairs that differ only in shape sit side by side: colour alone cannot solve the task and the
towers must learn the shapes, which the class-name embeddings need. Images are normalised with
SAM's mean/std, exactly what the frozen tower sees inside OV-SAM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from ovsam_ray.data.synthetic import render_image
from ovsam_ray.model.clip_backbone import ResNetCLIPBackbone
from ovsam_ray.model.functional import PIXEL_MEAN, PIXEL_STD, boxes_from_masks, preprocess_image
from ovsam_ray.training.config import OptimConfig
from ovsam_ray.training.loop import BudgetClock
from ovsam_ray.training.optim import adamw, build_scheduler
from ovsam_ray.vocabulary import load_templates

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (50, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (230, 215, 50),
    "orange": (240, 140, 30),
    "purple": (130, 50, 170),
    "pink": (240, 140, 190),
    "cyan": (60, 200, 215),
    "brown": (120, 75, 35),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}


def size_word(area_fraction: float) -> str:
    return "small" if area_fraction < 0.04 else "large" if area_fraction > 0.12 else ""


def _crop_box(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A square box around ``mask`` with a random margin (the object fills 55-90% of it)."""
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / rng.uniform(0.55, 0.9)
    cx += rng.uniform(-0.1, 0.1) * side
    cy += rng.uniform(-0.1, 0.1) * side
    return int(round(cx - side / 2)), int(round(cy - side / 2)), int(round(side)), int(round(side))


@dataclass
class CropPool:
    """Rendered object crops: images (N, S, S, 3) uint8, the object's mask (N, S, S), its class
    index (N,), its size word and the crop's background colour (N, 3)."""

    images: np.ndarray
    masks: np.ndarray
    kinds: np.ndarray
    sizes: list[str]
    backgrounds: np.ndarray


def render_crop_pool(
    num: int, *, seed: int, class_names: list[str], size: int = 128, scene: int = 192, max_objects: int = 3
) -> CropPool:
    """``num`` crops, each around one shape of a rendered scene (1-3 shapes, so neighbours and
    occluders show at the edges): what the recognition head and the CLIP branch see, one object
    per region."""
    from PIL import Image

    images = np.zeros((num, size, size, 3), np.uint8)
    masks = np.zeros((num, size, size), bool)
    kinds, sizes, backgrounds = np.zeros(num, np.int64), [], np.zeros((num, 3), np.float64)
    for i in range(num):
        rng = np.random.default_rng([seed, i, 17])
        image, names, scene_masks = render_image(rng, scene, scene, 1, max_objects)
        j = int(rng.integers(len(names)))
        x0, y0, w, h = _crop_box(scene_masks[j], rng)
        box = (x0, y0, x0 + w, y0 + h)
        images[i] = np.asarray(Image.fromarray(image).crop(box).resize((size, size), Image.Resampling.BILINEAR))
        crop_mask = Image.fromarray(scene_masks[j].astype(np.uint8) * 255).crop(box).resize((size, size))
        masks[i] = np.asarray(crop_mask) > 127
        kinds[i] = class_names.index(names[j])
        sizes.append(size_word(float(scene_masks[j].mean())))
        others = ~np.any(scene_masks, axis=0)
        backgrounds[i] = np.median(image[others], axis=0) if others.any() else 0.0
    return CropPool(images, masks, kinds, sizes, backgrounds)


def grid_batch(
    pool: CropPool,
    rng: np.random.Generator,
    *,
    class_names: list[str],
    colours_per_batch: int,
    templates: list[str],
    bare_fraction: float = 0.2,
    size_fraction: float = 0.3,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A batch of every class in ``colours_per_batch`` named colours: each crop's object is
    repainted in its colour (plus pixel noise) and captioned "<colour> <shape>" in a random ViLD
    template (sometimes with its size word, sometimes only the shape). Pairs that differ only in
    shape, or only in colour, share every batch, so neither cue alone solves the contrastive task.
    Returns the images, the captions and each crop's class index."""
    names = list(COLOURS)
    chosen = rng.choice(len(names), size=colours_per_batch, replace=False)
    images, captions, kinds = [], [], []
    by_kind = [np.nonzero(pool.kinds == k)[0] for k in range(len(class_names))]
    for c in chosen:
        rgb = np.asarray(COLOURS[names[c]], np.float64)
        for k, candidates in enumerate(by_kind):
            for _ in range(10):  # prefer a crop whose background contrasts with the new colour
                i = int(rng.choice(candidates))
                if np.abs(pool.backgrounds[i] - rgb).sum() >= 150:
                    break
            image = pool.images[i].astype(np.float64)
            mask = pool.masks[i]
            image[mask] = rgb + rng.normal(0.0, 6.0, (int(mask.sum()), 3))
            images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
            words = [names[c], class_names[k]]
            if rng.random() < size_fraction and pool.sizes[i]:
                words.insert(0, pool.sizes[i])
            phrase = class_names[k] if rng.random() < bare_fraction else " ".join(words)
            captions.append(templates[int(rng.integers(len(templates)))].format(phrase))
            kinds.append(k)
    return np.stack(images), captions, np.asarray(kinds, np.int64)


def sam_normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float with SAM's mean/std."""
    x = images.permute(0, 3, 1, 2).float()
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class PretrainResult:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    text_separation: float  # max cosine between two different class-name embeddings (lower is better)


LossFn = Callable[[np.random.Generator], torch.Tensor]


def _train_steps(
    trained: nn.Module,
    loss_fn: LossFn,
    *,
    stage: str,
    steps: int,
    lr: float,
    weight_decay: float,
    warmup: int,
    seed: int,
    time_budget_s: float | None,
    clock: str,
    log_every: int,
) -> tuple[int, float, float]:
    """The loop of the tiny recipe's pre-stages: AdamW on every parameter of ``trained`` (in train
    mode), ``loss_fn(rng)`` per step, linear warm-up then cosine over ``steps`` (or the time
    budget on ``clock``, whichever runs out first), gradient clipping at 1.0; leaves ``trained``
    in eval mode (BatchNorm statistics updated) with its parameters frozen. Returns (steps run,
    first loss, last loss)."""
    budget = BudgetClock(time_budget_s or 0.0, clock)
    trained.train()
    trained.requires_grad_(True)
    params = list(trained.parameters())
    optimizer = adamw(params, lr=lr, weight_decay=weight_decay)

    # The engine's one schedule (``optim.lr_factor``): linear warm-up from 1/warmup to 1 at step
    # ``warmup - 1``, i.e. (step + 1) / warmup, then cosine to 0 over the steps or the time budget.
    schedule = OptimConfig(
        lr=lr, weight_decay=weight_decay, schedule="cosine", warmup_steps=warmup, warmup_factor=1.0 / warmup
    )
    scheduler = build_scheduler(
        optimizer,
        schedule,
        steps,
        progress=lambda step: max(step / steps, budget.fraction() if time_budget_s else 0.0),
    )
    rng = np.random.default_rng([seed, 99])
    first = last = float("nan")
    step = 0
    while step < steps and not (time_budget_s and budget.expired()):
        loss = loss_fn(rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        last = float(loss.detach())
        first = last if step == 1 else first
        if step % log_every == 0:
            log.info("%s step %d: loss %.3f, lr %.2e", stage, step, last, optimizer.param_groups[0]["lr"])
    trained.eval()
    trained.requires_grad_(False)
    return step, first, last


def _with_shape_head(clip_model: Any, class_names: list[str]) -> tuple[nn.Module, nn.Module]:
    """(the module both stage-0 parts train: CLIP + a linear shape head, the head). The head is
    dropped after its part."""
    shape_head = nn.Linear(int(clip_model.visual.output_dim), len(class_names))
    return nn.ModuleDict({"clip": clip_model, "shape_head": shape_head}), shape_head


def _result(
    clip_model: Any,
    tokenizer: Callable,
    class_names: list[str],
    stage: str,
    t0: float,
    run: tuple[int, float, float],
) -> PretrainResult:
    step, first, last = run
    separation = class_name_separation(clip_model, tokenizer, class_names)
    seconds = time.perf_counter() - t0
    log.info(
        "%s done: %d steps in %.0fs, loss %.3f -> %.3f, max class-name cosine %.3f",
        stage,
        step,
        seconds,
        first,
        last,
        separation,
    )
    return PretrainResult(step, first, last, seconds, separation)


def pretrain_clip(
    clip_model: Any,
    tokenizer: Callable,
    *,
    class_names: list[str],
    steps: int = 300,
    colours_per_batch: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 25,
    pool_size: int = 1024,
    seed: int = 0,
    time_budget_s: float | None = None,
    clock: str = "wall",
    log_every: int = 25,
    shape_loss_weight: float = 1.0,
) -> PretrainResult:
    """Train ``clip_model`` (both towers) in place with ``ClipLoss`` on rendered pairs
    (``grid_batch``: every class in ``colours_per_batch`` colours per batch), for ``steps`` or
    until ``time_budget_s`` (on ``clock``, see ``loop.BudgetClock``); leaves it in eval mode
    with its BatchNorm statistics updated.

    ``shape_loss_weight``: weight of an auxiliary cross-entropy of a linear shape classifier on
    the image embedding (dropped afterwards). From scratch both towers start on a plateau — the
    random text tower maps every caption to nearly the same vector, so the contrastive loss gives
    the image tower almost no shape gradient and it learns colour first (measured: 31% zero-shot
    shape accuracy after 1,600 steps without it). The auxiliary head makes the image tower
    shape-aware from the first steps; the text tower then aligns to it through ``ClipLoss``."""
    t0 = time.perf_counter()
    size = clip_model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    pool = render_crop_pool(pool_size, seed=seed, class_names=class_names, size=size)
    templates = load_templates()
    log.info("stage 0 (crops): %d rendered crops in %.1fs", pool_size, time.perf_counter() - t0)
    clip_loss = ClipLoss()

    trained, shape_head = _with_shape_head(clip_model, class_names)

    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        images, captions, kinds = grid_batch(
            pool, rng, class_names=class_names, colours_per_batch=colours_per_batch, templates=templates
        )
        x = torch.from_numpy(images)
        if rng.random() < 0.5:
            x = x.flip(2)
        image_features = F.normalize(clip_model.encode_image(sam_normalize(x)), dim=-1)
        text_features = F.normalize(clip_model.encode_text(tokenizer(captions)), dim=-1)
        loss = clip_loss(image_features, text_features, clip_model.logit_scale.exp().clamp(max=100))
        if shape_loss_weight:
            shape_logits = shape_head(image_features * 10.0)
            loss = loss + shape_loss_weight * F.cross_entropy(shape_logits, torch.from_numpy(kinds))
        return loss

    run = _train_steps(
        trained,
        loss_fn,
        stage="stage 0 (crops)",
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        seed=seed,
        time_budget_s=time_budget_s,
        clock=clock,
        log_every=log_every,
    )
    return _result(clip_model, tokenizer, class_names, "stage 0 (crops)", t0, run)


@dataclass
class SceneBatch:
    """Rendered scenes as the model sees them: images (B, 3, S, S) resized, normalised and padded
    like ``functional.preprocess_image``; every object's box (N, 4) XYXY in input pixels, the
    image it is in (N,) and its class index (N,)."""

    images: torch.Tensor
    boxes: torch.Tensor
    image_index: torch.Tensor
    kinds: torch.Tensor


def render_scene_batch(
    rng: np.random.Generator,
    batch_size: int,
    *,
    class_names: list[str],
    image_size: int,
    scene_sizes: tuple[tuple[int, int], tuple[int, int]],
    objects: tuple[int, int] = (1, 4),
) -> SceneBatch:
    """``batch_size`` scenes of ``objects`` (min, max) shapes (``data.synthetic.render_image``, the
    generator of the training shards), sizes drawn from ``scene_sizes`` ((W_min, H_min), (W_max,
    H_max)), half of them mirrored, with each visible object's mask box."""
    (w_min, h_min), (w_max, h_max) = scene_sizes
    images, boxes, index, kinds = [], [], [], []
    for b in range(batch_size):
        width, height = int(rng.integers(w_min, w_max + 1)), int(rng.integers(h_min, h_max + 1))
        image, names, masks = render_image(rng, width, height, *objects)
        if rng.random() < 0.5:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        x, (h, _) = preprocess_image(torch.from_numpy(np.ascontiguousarray(image)), image_size)
        images.append(x)
        boxes.append(boxes_from_masks(torch.from_numpy(np.ascontiguousarray(masks))) * (h / height))
        index += [b] * len(names)
        kinds += [class_names.index(n) for n in names]
    return SceneBatch(
        torch.stack(images),
        torch.cat(boxes),
        torch.tensor(index, dtype=torch.long),
        torch.tensor(kinds, dtype=torch.long),
    )


def pretrain_clip_regions(
    clip_model: Any,
    tokenizer: Callable,
    *,
    class_names: list[str],
    steps: int = 300,
    image_size: int = 256,
    scene_sizes: tuple[tuple[int, int], tuple[int, int]] = ((224, 168), (288, 224)),
    objects: tuple[int, int] = (2, 5),
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 25,
    seed: int = 0,
    time_budget_s: float | None = None,
    clock: str = "wall",
    log_every: int = 25,
    shape_loss_weight: float = 1.0,
) -> PretrainResult:
    """The second part of stage 0: teach a crop-pretrained tiny CLIP (``pretrain_clip``) to name
    objects *in whole scenes*, the way OV-SAM's CLIP branch uses it (DESIGN §2.7).

    Each step renders ``batch_size`` scenes at the model input size, runs the trunk on them,
    RoI-aligns every object's box on the stride-32 stage and embeds it with the attention pool
    (``ResNetCLIPBackbone.embed_regions``, the CLIP branch itself), and scores those region
    embeddings against the class names, each written in a random ViLD template and embedded by
    the text tower (cross-entropy at CLIP's own temperature, plus the auxiliary linear shape
    loss). Crops alone leave the branch at ~25% in-scene accuracy (an object is a 2x2 RoI of an
    8x8 stride-32 map, and its BatchNorm statistics come from object-filled crops); 600 of these
    steps lift it to ~84% (measured on 200 held-out objects). From scratch, without the crop
    part first, it stays on the plateau (19% after 1,000 steps). Scenes of ``objects`` = 2-5 shapes
    (the shards have 1-4) give more regions per forward pass: 92% after 1,000 steps against 89%.
    On 394 held-out objects after the same 2,000 crop steps, 1,100 steps at lr 5e-4 reach 88%,
    at 1e-3 92%, at 2e-3 89% (bench/RESULTS.md, "A faster optimiser step and a better stage-0
    learning rate")."""
    t0 = time.perf_counter()
    backbone = ResNetCLIPBackbone(visual=clip_model.visual)  # shares the tower; never put in eval here
    templates = load_templates()

    trained, shape_head = _with_shape_head(clip_model, class_names)
    # channels_last: the tower's forward+backward on whole scenes is ~26% faster on CPU
    # (bench/RESULTS.md, "More, smaller co-training steps"); the tower goes back to the default layout
    # afterwards.
    clip_model.visual.to(memory_format=torch.channels_last)

    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        batch = render_scene_batch(
            rng, batch_size, class_names=class_names, image_size=image_size, scene_sizes=scene_sizes, objects=objects
        )
        captions = [templates[int(rng.integers(len(templates)))].format(n) for n in class_names]
        text = F.normalize(clip_model.encode_text(tokenizer(captions)), dim=-1)
        feats = backbone(batch.images.contiguous(memory_format=torch.channels_last))
        regions = F.normalize(backbone.embed_regions(feats, batch.boxes, batch.image_index, None), dim=-1)
        logits = clip_model.logit_scale.exp().clamp(max=100) * regions @ text.T
        loss = F.cross_entropy(logits, batch.kinds)
        if shape_loss_weight:
            loss = loss + shape_loss_weight * F.cross_entropy(shape_head(regions * 10.0), batch.kinds)
        return loss

    try:
        run = _train_steps(
            trained,
            loss_fn,
            stage="stage 0 (scenes)",
            steps=steps,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            seed=seed + 1,
            time_budget_s=time_budget_s,
            clock=clock,
            log_every=log_every,
        )
    finally:
        clip_model.visual.to(memory_format=torch.contiguous_format)
    return _result(clip_model, tokenizer, class_names, "stage 0 (scenes)", t0, run)


@torch.no_grad()
def class_name_separation(clip_model: Any, tokenizer: Callable, class_names: list[str]) -> float:
    """Max cosine similarity between the template-averaged text embeddings of two classes."""
    from ovsam_ray.model.text_embedding import embed_class_names

    emb = embed_class_names(clip_model, tokenizer, [[n] for n in class_names], load_templates())[:, 0]
    sims = emb @ emb.T - 2 * torch.eye(len(class_names))
    return float(sims.max())
