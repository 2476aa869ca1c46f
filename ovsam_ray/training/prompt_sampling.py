"""Prompt sampling for CLIP2SAM co-training (DESIGN §5).

Per image ``num_prompts`` (40) instances, as the reference's preprocessor
(seg/models/data_preprocessor/ovsam_preprocessor.py:149-160): the first ``num_prompts`` in
annotation order (``config.INSTANCE_SELECTIONS``: "first"; "random" draws them at random instead, a
deviation), the list repeated when there are fewer, shuffled, and split by position into
``n // 2 + 1`` box prompts then the rest as points (``prompt_kinds``: 21 boxes + 19 points of 40).
A box prompt is
the instance's mask box ``[x_first, y_first, x_last + 1, y_last + 1]``; a point prompt is a
random pixel ``(x, y)`` inside the mask (integer pixel coordinates, as the reference; the prompt
encoder adds the +0.5). Image-level samples get one whole-image box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovsam_ray.data.rle import boxes_from_binary_masks
from ovsam_ray.training.config import INSTANCE_SELECTIONS

# ``selection`` (``CotrainConfig.instance_selection``): which instances an image with more than
# ``num_prompts`` trains. "first": the first ``num_prompts`` in annotation order (the reference,
# ovsam_preprocessor.py:152 ``gt_instances[:num_proposals]``); "random": a random subset (a
# deviation: every instance of a crowded image gets its turn over the epochs).


@dataclass
class PromptSample:
    """P prompts of one image: instance (P,) index into its masks/labels; is_point (P,);
    boxes (P, 4) XYXY (the instance box, also for point prompts: the RoI of recognition);
    points (P, 2) XY (zeros for box prompts). Input pixels."""

    instance: np.ndarray
    is_point: np.ndarray
    boxes: np.ndarray
    points: np.ndarray

    def __len__(self) -> int:
        return int(self.instance.shape[0])


def empty_prompts() -> PromptSample:
    return PromptSample(
        np.zeros(0, np.int64), np.zeros(0, bool), np.zeros((0, 4), np.float32), np.zeros((0, 2), np.float32)
    )


#: What ``--print-config`` states about the prompt kinds (``prompt_kinds``).
PROMPT_KINDS_RULE = "n // 2 + 1 box prompts, then the rest point prompts (40: 21 boxes + 19 points; reference)"


def prompt_kinds(n: int) -> np.ndarray:
    """(n,) bool, True for a point prompt: the reference's
    ``torch.arange(2).repeat_interleave(n // 2 + 1)[:n]`` (ovsam_preprocessor.py:158), i.e.
    ``min(n, n // 2 + 1)`` boxes first, then points (40: 21 + 19; 2: two boxes, no point)."""
    return np.repeat(np.array([False, True]), n // 2 + 1)[:n]


def choose_instances(
    num_instances: int, num_prompts: int, rng: np.random.Generator, selection: str = "first"
) -> np.ndarray:
    """Instance index per prompt: with more than ``num_prompts`` instances the first
    ``num_prompts`` (``selection="first"``, the reference) or a random subset ("random"); with
    fewer, the instances repeated in order (each ``floor`` or ``ceil`` of num_prompts / N times,
    the reference's ``InstanceData.cat`` of copies); then shuffled."""
    if selection not in INSTANCE_SELECTIONS:
        raise ValueError(f"instance selection {selection!r}: use one of {INSTANCE_SELECTIONS}")
    if num_instances == 0:
        return np.zeros(0, np.int64)
    if num_instances > num_prompts and selection == "random":
        chosen = rng.choice(num_instances, size=num_prompts, replace=False)
    else:
        chosen = np.tile(np.arange(num_instances), -(-num_prompts // num_instances))[:num_prompts]
    return rng.permutation(chosen).astype(np.int64)


def random_points_in_masks(masks: np.ndarray, instance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random (x, y) pixel inside ``masks[i]`` for each ``i`` in ``instance`` -> (P, 2) float32.
    An empty mask gives its (0, 0)."""
    points = np.zeros((len(instance), 2), np.float32)
    cache: dict[int, tuple[np.ndarray, ...]] = {}
    for j, i in enumerate(instance):
        if int(i) not in cache:
            cache[int(i)] = np.nonzero(masks[i])
        ys, xs = cache[int(i)]
        if len(xs):
            k = int(rng.integers(len(xs)))
            points[j] = (xs[k], ys[k])
    return points


def sample_prompts(
    masks: np.ndarray,
    rng: np.random.Generator,
    num_prompts: int = 40,
    *,
    points: bool = True,
    selection: str = "first",
) -> PromptSample:
    """masks: (N, H, W) bool instance masks (input pixels, annotation order) -> ``num_prompts``
    prompts (or none for N = 0); ``points=False``: box prompts only (box-only datasets, whose
    "masks" are their boxes); ``selection``: see ``choose_instances``."""
    masks = np.asarray(masks, bool)
    instance = choose_instances(masks.shape[0], num_prompts, rng, selection)
    if len(instance) == 0:
        return empty_prompts()
    is_point = prompt_kinds(len(instance)) if points else np.zeros(len(instance), bool)
    boxes = boxes_from_binary_masks(masks)[instance]
    point_xy = np.zeros((len(instance), 2), np.float32)
    point_xy[is_point] = random_points_in_masks(masks, instance[is_point], rng)
    return PromptSample(instance, is_point, boxes.astype(np.float32), point_xy)


def whole_image_prompt(height: int, width: int) -> PromptSample:
    """One box prompt covering the (unpadded) image, for image-level (classification) samples."""
    return PromptSample(
        np.zeros(1, np.int64),
        np.zeros(1, bool),
        np.array([[0.0, 0.0, float(width), float(height)]], np.float32),
        np.zeros((1, 2), np.float32),
    )
