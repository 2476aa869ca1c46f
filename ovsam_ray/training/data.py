"""Shards -> training rows, streamed through Ray Data (never materialised).

The stream is a deterministic sequence of *work items*, one per (dataset, shard) visit: for
each slot a dataset is drawn by its sampling ratio and its next shard taken (each dataset's
shards are reshuffled on every pass). A Ray dataset of those items is ``flat_map``-ed by a
sample builder that reads the shard, decodes, parses the labels into the training vocabulary,
augments and samples prompts, yielding one row per usable image (``training.batching``).
The item number travels with every row: it is the data position saved in checkpoints, and a
resumed run starts its stream at the first item not yet consumed by every worker.

Bad data never stops training: an unreadable shard, an undecodable image or unusable
annotations are skipped and logged.
"""

from __future__ import annotations

import io as _io
import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ovsam_ray.data.decode import DEFAULT_MAX_PIXELS, decode_sample
from ovsam_ray.data.rle import decode_rle
from ovsam_ray.data.shards import is_damage_marker, iter_shard_samples, list_shards

from .augment import large_scale_jitter, resize_and_pad
from .batching import pack_masks, pack_sample
from .config import DatasetSpec
from .labels import DatasetLabels
from .prompts import sample_prompts, whole_image_prompt

log = logging.getLogger(__name__)


# --- the item stream ------------------------------------------------------------------------------


def work_items(
    shard_lists: Sequence[Sequence[str]], ratios: Sequence[float], *, epochs: int, seed: int
) -> list[dict[str, Any]]:
    """``epochs * total shards`` items ``{"item", "dataset", "shard", "pass"}``, deterministic in
    ``seed``: each slot draws a dataset with probability proportional to its ratio."""
    if len(shard_lists) != len(ratios) or not shard_lists:
        raise ValueError("need one ratio per dataset and at least one dataset")
    rng = np.random.default_rng([seed, 7919])
    probs = np.asarray(ratios, np.float64) / float(sum(ratios))
    order: list[list[str]] = [[] for _ in shard_lists]
    passes = [0] * len(shard_lists)
    total = epochs * sum(len(s) for s in shard_lists)
    items = []
    for seq in range(total):
        d = int(rng.choice(len(shard_lists), p=probs))
        if not order[d]:
            perm = np.random.default_rng([seed, d, passes[d]]).permutation(len(shard_lists[d]))
            order[d] = [shard_lists[d][i] for i in perm[::-1]]
            passes[d] += 1
        items.append({"item": seq, "dataset": d, "shard": order[d].pop(), "pass": passes[d] - 1})
    return items


def dataset_items(datasets: Sequence[DatasetSpec], *, epochs: int, seed: int, s3_endpoint: str | None = None
                  ) -> list[dict[str, Any]]:
    """Work items of a mixture (shards listed with ``list_shards``); teacher-feature shards are
    attached as ``teacher`` when a dataset has them."""
    shard_lists = [list_shards(d.shards, s3_endpoint=s3_endpoint) for d in datasets]
    items = work_items(shard_lists, [d.ratio for d in datasets], epochs=epochs, seed=seed)
    for item in items:
        features = datasets[item["dataset"]].teacher_features
        if features:
            item["teacher"] = features.rstrip("/") + "/" + item["shard"].rstrip("/").rsplit("/", 1)[-1]
    return items


# --- annotations -> masks ---------------------------------------------------------------------------


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray | None:
    """(H, W) bool mask of a COCO-style annotation (RLE, compressed or not, or polygons); None
    when it has no usable segmentation or a size that does not match the image."""
    seg = ann.get("segmentation")
    try:
        if isinstance(seg, dict) and "counts" in seg:
            if [int(v) for v in seg.get("size", [])] != [height, width]:
                return None
            return decode_rle(seg)
        if isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 for p in seg):
            rles = mask_utils.frPyObjects([[float(v) for v in p] for p in seg], height, width)
            return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    except (ValueError, TypeError, KeyError, OverflowError):
        return None
    return None


def instances_from_annotations(
    annotations: list[dict[str, Any]], labels: DatasetLabels, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """(N, H, W) masks, (N,) training labels of the usable, non-crowd annotations, and how many were dropped."""
    masks, out_labels, dropped = [], [], 0
    for ann in annotations:
        if ann.get("iscrowd"):
            continue
        label = labels.annotation_label(ann)
        mask = annotation_mask(ann, height, width) if label >= 0 else None
        if mask is None or not mask.any():
            dropped += 1
            continue
        masks.append(mask)
        out_labels.append(label)
    if not masks:
        return np.zeros((0, height, width), bool), np.zeros(0, np.int64), dropped
    return np.stack(masks), np.asarray(out_labels, np.int64), dropped


# --- sample builders (run inside Ray Data tasks) ----------------------------------------------------


@dataclass
class CotrainSamples:
    """Callable for ``Dataset.flat_map``: one work item -> co-training rows of its shard."""

    image_size: int
    labels: list[DatasetLabels]
    kinds: list[str]
    num_prompts: int = 40
    lsj_range: tuple[float, float] = (0.9, 2.0)
    flip_prob: float = 0.5
    min_mask_area: int = 32
    seed: int = 0
    s3_endpoint: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    crop_tries: int = 3

    def __call__(self, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from _rows_of_shard(item, self.s3_endpoint, self.max_pixels, self.sample_row)

    def sample_row(self, item: dict[str, Any], index: int, image: np.ndarray, meta: Any) -> bytes | None:
        rng = np.random.default_rng([self.seed, int(item["item"]), index])
        d = int(item["dataset"])
        if self.kinds[d] == "image":
            return self._image_level(image, meta, self.labels[d], rng)
        h, w = image.shape[:2]
        masks, labels, _ = instances_from_annotations(meta.annotations, self.labels[d], h, w)
        if masks.shape[0] == 0:
            return None
        for _ in range(self.crop_tries):
            t = large_scale_jitter(image, masks, rng, size=self.image_size, ratio_range=self.lsj_range,
                                   flip_prob=self.flip_prob, min_mask_area=self.min_mask_area)
            if t.keep.any():
                break
        else:
            return None
        kept_masks, kept_labels = t.masks[t.keep], labels[t.keep]
        prompts = sample_prompts(kept_masks, rng, self.num_prompts)
        used, inverse = np.unique(prompts.instance, return_inverse=True)
        return pack_sample(
            image=t.image, input_hw=np.asarray(t.input_hw, np.int32), masks=pack_masks(kept_masks[used]),
            labels=kept_labels[used], prompt_instance=inverse.astype(np.int64), prompt_is_point=prompts.is_point,
            prompt_boxes=prompts.boxes, prompt_points=prompts.points, has_masks=np.asarray(True),
        )

    def _image_level(self, image: np.ndarray, meta: Any, labels: DatasetLabels, rng: np.random.Generator
                     ) -> bytes | None:
        label = labels.image_label(meta.raw)
        if label < 0:
            return None
        t = large_scale_jitter(image, np.zeros((0, *image.shape[:2]), bool), rng, size=self.image_size,
                               ratio_range=self.lsj_range, flip_prob=self.flip_prob, min_mask_area=0)
        prompts = whole_image_prompt(*t.input_hw)
        size = self.image_size
        return pack_sample(
            image=t.image, input_hw=np.asarray(t.input_hw, np.int32),
            masks=np.zeros((0, -(-size * size // 8)), np.uint8), labels=np.asarray([label], np.int64),
            prompt_instance=prompts.instance, prompt_is_point=prompts.is_point, prompt_boxes=prompts.boxes,
            prompt_points=prompts.points, has_masks=np.asarray(False),
        )


@dataclass
class DistillSamples:
    """Callable for ``Dataset.flat_map``: one work item -> distillation rows (image resized and
    padded as at inference, plus the precomputed teacher features when the item has them)."""

    image_size: int
    flip_prob: float = 0.0
    seed: int = 0
    s3_endpoint: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __call__(self, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        features = iter_teacher_features(item["teacher"], s3_endpoint=self.s3_endpoint) if item.get("teacher") else None
        build = self._with_teacher(features) if features is not None else self.sample_row
        yield from _rows_of_shard(item, self.s3_endpoint, self.max_pixels, build)

    def sample_row(self, item: dict[str, Any], index: int, image: np.ndarray, meta: Any,
                   teacher: np.ndarray | None = None) -> bytes | None:
        rng = np.random.default_rng([self.seed, int(item["item"]), index])
        if teacher is None and self.flip_prob > 0 and rng.random() < self.flip_prob:
            image = image[:, ::-1]
        t = resize_and_pad(image, size=self.image_size)
        arrays = {"image": t.image, "input_hw": np.asarray(t.input_hw, np.int32)}
        if teacher is not None:
            arrays["teacher"] = teacher
        return pack_sample(**arrays)

    def _with_teacher(self, features: Iterator[tuple[str, np.ndarray]]) -> Callable[..., bytes | None]:
        def build(item: dict[str, Any], index: int, image: np.ndarray, meta: Any) -> bytes | None:
            key, teacher = next(features, (None, None))
            if key != meta.key:
                raise ValueError(f"teacher features out of step with {item['shard']}: {key} vs {meta.key}")
            return self.sample_row(item, index, image, meta, teacher)

        return build


@dataclass
class _Meta:
    key: str
    annotations: list[dict[str, Any]]
    raw: dict[str, Any]


def _rows_of_shard(item: dict[str, Any], s3_endpoint: str | None, max_pixels: int,
                   build: Callable[[dict[str, Any], int, np.ndarray, _Meta], bytes | None]) -> Iterator[dict[str, Any]]:
    """Read one shard and yield a row per usable sample; everything bad is skipped and logged."""
    import json

    skipped = 0
    try:
        for index, raw in enumerate(iter_shard_samples(item["shard"], s3_endpoint=s3_endpoint)):
            if is_damage_marker(raw):
                log.warning("shard %s: %s", item["shard"], raw["error"])
                continue
            decoded = decode_sample(raw, max_pixels=max_pixels)
            if not decoded.ok:
                skipped += 1
                continue
            try:
                meta_json = json.loads(raw["json_bytes"]) if raw.get("json_bytes") else {}
            except ValueError:
                meta_json = {}
            meta = _Meta(decoded.key, decoded.prompts.annotations, meta_json if isinstance(meta_json, dict) else {})
            sample = build(item, index, decoded.image, meta)
            if sample is None:
                skipped += 1
                continue
            yield {"item": int(item["item"]), "dataset": int(item["dataset"]), "key": decoded.key, "sample": sample}
    except Exception as e:  # noqa: BLE001 - a bad shard must not stop training
        log.error("skipping the rest of shard %s: %s: %s", item["shard"], type(e).__name__, e)
    if skipped:
        log.info("shard %s: %d samples skipped (undecodable or no usable labels)", item["shard"], skipped)


# --- teacher features -------------------------------------------------------------------------------


def iter_teacher_features(url: str, *, s3_endpoint: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, (C, h, w) float16) pairs of a teacher-feature shard, in order (``<key>.npy`` members)."""
    from ovsam_ray import io

    with io.open_url(url, "rb", s3_endpoint=s3_endpoint) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for member in tf:
            if not member.isfile() or not member.name.endswith(".npy"):
                continue
            data = tf.extractfile(member).read()
            yield member.name[: -len(".npy")], np.load(_io.BytesIO(data), allow_pickle=False)


# --- the Ray dataset --------------------------------------------------------------------------------


def build_ray_dataset(items: list[dict[str, Any]], builder: Callable[[dict[str, Any]], Iterator[dict]], *,
                      num_cpus: float = 1.0, max_blocks: int = 20_000):
    """A lazy Ray dataset: the items (one per block up to ``max_blocks``) flat-mapped by ``builder``."""
    import ray.data

    if not items:
        raise ValueError("no work items: the dataset has no shards left to read")
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), max_blocks))
    return ds.flat_map(builder, num_cpus=num_cpus)


def iter_local_rows(items: list[dict[str, Any]], builder: Callable[[dict[str, Any]], Iterator[dict]]
                    ) -> Iterator[dict[str, Any]]:
    """The same rows without Ray (in-process training of the tiny recipe, tests)."""
    for item in items:
        yield from builder(item)
