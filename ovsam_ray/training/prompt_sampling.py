"""Prompt sampling for CLIP2SAM co-training (DESIGN §5).

Per image up to ``num_prompts`` (40) instances, repeated when there are fewer; the list is
shuffled and split half box / half point prompts (points are the second half). A box prompt is
the instance's mask box ``[x_first, y_first, x_last + 1, y_last + 1]``; a point prompt is a
random pixel ``(x, y)`` inside the mask (integer pixel coordinates, as the reference; the prompt
encoder adds the +0.5). Image-level samples get one whole-image box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovsam_ray.data.rle import boxes_from_binary_masks


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


def choose_instances(num_instances: int, num_prompts: int, rng: np.random.Generator) -> np.ndarray:
    """Instance index per prompt: a random subset when there are more than ``num_prompts``,
    else the instances repeated (each ``floor`` or ``ceil`` of num_prompts / N times); shuffled."""
    if num_instances == 0:
        return np.zeros(0, np.int64)
    if num_instances >= num_prompts:
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
    masks: np.ndarray, rng: np.random.Generator, num_prompts: int = 40, *, points: bool = True
) -> PromptSample:
    """masks: (N, H, W) bool instance masks (input pixels) -> ``num_prompts`` prompts (or none for
    N = 0); ``points=False``: box prompts only (box-only datasets, whose "masks" are their boxes)."""
    masks = np.asarray(masks, bool)
    instance = choose_instances(masks.shape[0], num_prompts, rng)
    if len(instance) == 0:
        return empty_prompts()
    is_point = np.zeros(len(instance), bool)
    if points:
        is_point[len(instance) - len(instance) // 2 :] = True
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
