"""Shards -> training rows, streamed through Ray Data (never materialised).

The stream is a deterministic sequence of *work items*. Each slot of the mixture draws a dataset
by its sampling ratio and takes its next shard (each dataset's shards are reshuffled on every
pass); ``shuffle_shards`` consecutive slots form one work item. A Ray dataset of those items is
``flat_map``-ed by a sample builder that reads the item's shards concurrently through a shuffle
buffer (``interleave``: a random open shard feeds the buffer, a random buffered sample leaves;
seeded by the run's seed and the item number, so each epoch's items are shuffled anew, a seed
gives one order, and a resumed run reads the same order), then decodes, parses the labels into
the training vocabulary, augments and samples prompts, yielding one row per usable image
(``training.batching``). A batch therefore mixes ``shuffle_shards`` shards and the datasets in
their ratios, even where a shard holds one class (ImageNet shards written class by class).
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

from ovsam_ray.data.decode import DEFAULT_MAX_PIXELS, decode_sample
from ovsam_ray.data.rle import annotation_mask
from ovsam_ray.data.shards import is_damage_marker, iter_shard_samples, list_shards
from ovsam_ray.errors import ConfigError
from ovsam_ray.training.augment import large_scale_jitter, resize_and_pad
from ovsam_ray.training.batching import pack_masks, pack_sample
from ovsam_ray.training.config import DatasetSpec
from ovsam_ray.training.label_source import label_annotations, label_dataset_shards
from ovsam_ray.training.label_space import DatasetLabels
from ovsam_ray.training.prompt_sampling import sample_prompts, whole_image_prompt

log = logging.getLogger(__name__)


# --- the item stream ------------------------------------------------------------------------------


def work_items(
    shard_lists: Sequence[Sequence[str]], ratios: Sequence[float], *, epochs: int, seed: int
) -> list[dict[str, Any]]:
    """``epochs * total shards`` items ``{"item", "dataset", "shard", "pass"}``, deterministic in
    ``seed``: each slot draws a dataset with probability proportional to its ratio."""
    if len(shard_lists) != len(ratios) or not shard_lists:
        raise ConfigError("need one ratio per dataset and at least one dataset")
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


def group_items(slots: list[dict[str, Any]], shards_per_item: int) -> list[dict[str, Any]]:
    """Consecutive slots of ``work_items`` as work items ``{"item", "parts": [slot, ...]}`` of
    ``shards_per_item`` shards each (the last may hold fewer)."""
    if shards_per_item < 1:
        raise ConfigError(f"shards_per_item={shards_per_item} must be >= 1")
    parts = [{k: v for k, v in slot.items() if k != "item"} for slot in slots]
    return [
        {"item": i, "parts": parts[start : start + shards_per_item]}
        for i, start in enumerate(range(0, len(parts), shards_per_item))
    ]


def dataset_items(
    datasets: Sequence[DatasetSpec], *, epochs: int, seed: int, s3_endpoint: str | None = None, shards_per_item: int = 1
) -> list[dict[str, Any]]:
    """Work items of a mixture (shards listed with ``list_shards``, ``shards_per_item`` per item);
    teacher-feature shards are attached to a part as ``teacher`` when its dataset has them, and a
    label-output dataset's label Parquet file as ``labels`` (``training.label_source``)."""
    shard_lists, label_of = [], []
    for d in datasets:
        pairs = label_dataset_shards(d, s3_endpoint=s3_endpoint) if d.corrections else []
        shard_lists.append([p[0] for p in pairs] if d.corrections else list_shards(d.shards, s3_endpoint=s3_endpoint))
        label_of.append(dict(pairs))
    slots = work_items(shard_lists, [d.ratio for d in datasets], epochs=epochs, seed=seed)
    for slot in slots:
        if label_of[slot["dataset"]]:  # a label output: the part's targets are its label shard's instances
            slot["labels"] = label_of[slot["dataset"]][slot["shard"]]
            slot["corrections"] = datasets[slot["dataset"]].corrections
        features = datasets[slot["dataset"]].teacher_features
        if features:
            slot["teacher"] = features.rstrip("/") + "/" + slot["shard"].rstrip("/").rsplit("/", 1)[-1]
    return group_items(slots, shards_per_item)


def item_parts(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards of a work item (an item without ``parts`` is one shard itself)."""
    return item["parts"] if "parts" in item else [item]


def interleave(sources: Sequence[Iterator[Any]], rng: np.random.Generator, buffer: int) -> Iterator[Any]:
    """The elements of several iterators in a random order: a random open source feeds a buffer
    of ``buffer`` elements, and once it is full a random element leaves (WebDataset's shuffle,
    over shards read concurrently); the rest leave shuffled when every source is done."""
    iters, live, held = list(sources), list(range(len(sources))), []
    while live:
        j = live[int(rng.integers(len(live)))]
        value = next(iters[j], _END)
        if value is _END:
            live.remove(j)
            continue
        held.append(value)
        if len(held) >= max(buffer, 1):
            k = int(rng.integers(len(held)))
            held[k], held[-1] = held[-1], held[k]
            yield held.pop()
    for k in rng.permutation(len(held)):
        yield held[int(k)]


_END = object()


# --- annotations -> masks ---------------------------------------------------------------------------


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


def box_instances(
    annotations: list[dict[str, Any]], labels: DatasetLabels, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) filled-box masks and (N,) labels of the usable, non-crowd ``bbox`` (xywh)
    annotations of a box-only dataset (the masks only carry the boxes through the augmentation)."""
    masks, out = [], []
    for ann in annotations:
        label = labels.annotation_label(ann) if not ann.get("iscrowd") else -1
        box = ann.get("bbox")
        if label < 0 or not isinstance(box, (list, tuple)) or len(box) != 4:
            continue
        try:
            x, y, w, h = (float(v) for v in box)
        except (TypeError, ValueError):
            continue
        x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
        x1, y1 = min(int(np.ceil(x + w)), width), min(int(np.ceil(y + h)), height)
        if not (np.isfinite([x, y, w, h]).all() and x1 > x0 and y1 > y0):
            continue
        mask = np.zeros((height, width), bool)
        mask[y0:y1, x0:x1] = True
        masks.append(mask)
        out.append(label)
    if not masks:
        return np.zeros((0, height, width), bool), np.zeros(0, np.int64)
    return np.stack(masks), np.asarray(out, np.int64)


class _SampleBuilder:
    """What both stages' sample builders share: called on a work item, they stream its rows
    (``_rows_of_item``) through their own ``sample_row``."""

    seed: int
    shuffle_buffer: int
    s3_endpoint: str | None
    max_pixels: int

    def sample_row(
        self,
        item: dict[str, Any],
        part: dict[str, Any],
        index: list[int],
        image: np.ndarray,
        meta: Any,
        teacher: np.ndarray | None = None,
    ) -> bytes | None:
        raise NotImplementedError

    def __call__(self, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from _rows_of_item(
            item,
            self.sample_row,
            seed=self.seed,
            buffer=self.shuffle_buffer,
            s3_endpoint=self.s3_endpoint,
            max_pixels=self.max_pixels,
        )


@dataclass
class CotrainSamples(_SampleBuilder):
    """Callable for ``Dataset.flat_map``: one work item -> co-training rows of its shards.

    Per dataset kind: ``segmentation`` — LSJ, box then point prompts (``prompt_kinds``), every loss;
    ``box`` — LSJ with the boxes, box prompts only, classification loss only (no masks);
    ``image`` — the whole image (flipped, resized, never cropped, so the labelled object stays
    in view) with one whole-image box, classification loss only."""

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
    crop_tries: int = 1
    instance_selection: str = "first"
    shuffle_buffer: int = 1

    def sample_row(
        self,
        item: dict[str, Any],
        part: dict[str, Any],
        index: list[int],
        image: np.ndarray,
        meta: Any,
        teacher: np.ndarray | None = None,
    ) -> bytes | None:
        rng = np.random.default_rng([self.seed, int(item["item"]), *index])
        d = int(part["dataset"])
        if self.kinds[d] == "image":
            return self._image_level(image, meta, self.labels[d], rng)
        h, w = image.shape[:2]
        if self.kinds[d] == "box":
            masks, labels = box_instances(meta.annotations, self.labels[d], h, w)
        else:
            masks, labels, _ = instances_from_annotations(meta.annotations, self.labels[d], h, w)
        if masks.shape[0] == 0:
            return None
        for _ in range(self.crop_tries):
            t = large_scale_jitter(
                image,
                masks,
                rng,
                size=self.image_size,
                ratio_range=self.lsj_range,
                flip_prob=self.flip_prob,
                min_mask_area=self.min_mask_area,
            )
            if t.keep.any():
                break
        else:
            return None
        kept_masks, kept_labels = t.masks[t.keep], labels[t.keep]
        with_masks = self.kinds[d] == "segmentation"
        prompts = sample_prompts(
            kept_masks, rng, self.num_prompts, points=with_masks, selection=self.instance_selection
        )
        used, inverse = np.unique(prompts.instance, return_inverse=True)
        packed = pack_masks(kept_masks[used]) if with_masks else np.zeros((0, -(-(self.image_size**2) // 8)), np.uint8)
        return pack_sample(
            image=t.image,
            input_hw=np.asarray(t.input_hw, np.int32),
            masks=packed,
            labels=kept_labels[used],
            prompt_instance=inverse.astype(np.int64),
            prompt_is_point=prompts.is_point,
            prompt_boxes=prompts.boxes,
            prompt_points=prompts.points,
            has_masks=np.asarray(with_masks),
        )

    def _image_level(
        self, image: np.ndarray, meta: Any, labels: DatasetLabels, rng: np.random.Generator
    ) -> bytes | None:
        label = labels.image_label(meta.raw)
        if label < 0:
            return None
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            image = image[:, ::-1]
        t = resize_and_pad(image, size=self.image_size)
        prompts = whole_image_prompt(*t.input_hw)
        size = self.image_size
        return pack_sample(
            image=t.image,
            input_hw=np.asarray(t.input_hw, np.int32),
            masks=np.zeros((0, -(-size * size // 8)), np.uint8),
            labels=np.asarray([label], np.int64),
            prompt_instance=prompts.instance,
            prompt_is_point=prompts.is_point,
            prompt_boxes=prompts.boxes,
            prompt_points=prompts.points,
            has_masks=np.asarray(False),
        )


@dataclass
class DistillSamples(_SampleBuilder):
    """Callable for ``Dataset.flat_map``: one work item -> distillation rows (image resized and
    padded as at inference, plus the precomputed teacher features when its shard has them;
    ``teacher_dtype``: the dtype they must be stored in, None: any)."""

    image_size: int
    flip_prob: float = 0.0
    teacher_dtype: str | None = None
    seed: int = 0
    s3_endpoint: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    shuffle_buffer: int = 1

    def sample_row(
        self,
        item: dict[str, Any],
        part: dict[str, Any],
        index: list[int],
        image: np.ndarray,
        meta: Any,
        teacher: np.ndarray | None = None,
    ) -> bytes | None:
        if part.get("teacher") and teacher is None:
            return None  # no features for this image (the dump skipped it)
        rng = np.random.default_rng([self.seed, int(item["item"]), *index])
        if teacher is None and self.flip_prob > 0 and rng.random() < self.flip_prob:
            image = image[:, ::-1]
        t = resize_and_pad(image, size=self.image_size)
        arrays = {"image": t.image, "input_hw": np.asarray(t.input_hw, np.int32)}
        if teacher is not None:
            if self.teacher_dtype is not None and teacher.dtype != np.dtype(self.teacher_dtype):
                raise ConfigError(
                    f"teacher features of {part.get('teacher')} are {teacher.dtype}, the run expects "
                    f"{self.teacher_dtype}: pass --teacher-feature-dtype {teacher.dtype} or dump them again with "
                    f"--feature-dtype {self.teacher_dtype}"
                )
            arrays["teacher"] = teacher
        return pack_sample(**arrays)


#: The raw-sample field holding a label output's annotations of it (they replace the shard JSON's).
LABEL_ANNOTATIONS = "label_annotations"


@dataclass
class _Meta:
    key: str
    annotations: list[dict[str, Any]]
    raw: dict[str, Any]


def _part_samples(part: dict[str, Any], number: int, s3_endpoint: str | None) -> Iterator[tuple]:
    """(part number, sample index, raw sample, teacher features or None) of one shard; a shard
    that breaks ends here with an error in the log."""
    features = iter_teacher_features(part["teacher"], s3_endpoint=s3_endpoint) if part.get("teacher") else None
    pending = next(features, None) if features is not None else None
    try:
        labelled = None
        if part.get("labels"):  # a label output's shard: its label file first, then the images with targets
            labelled = label_annotations(part["labels"], part.get("corrections") or "all", s3_endpoint=s3_endpoint)
        for index, raw in enumerate(iter_shard_samples(part["shard"], s3_endpoint=s3_endpoint)):
            if is_damage_marker(raw):
                log.warning("shard %s: %s", part["shard"], raw["error"])
                continue
            if labelled is not None:
                if raw.get("key") not in labelled:
                    continue
                raw = {**raw, LABEL_ANNOTATIONS: labelled[raw["key"]]}
            teacher = None
            if pending is not None and pending[0] == raw.get("key"):
                assert features is not None  # pending comes from it
                teacher, pending = pending[1], next(features, None)
            yield number, index, raw, teacher
    except Exception as e:  # noqa: BLE001 - a bad shard must not stop training
        log.error("skipping the rest of shard %s: %s: %s", part["shard"], type(e).__name__, e)


def _rows_of_item(
    item: dict[str, Any],
    build: Callable[..., bytes | None],
    *,
    seed: int,
    buffer: int,
    s3_endpoint: str | None,
    max_pixels: int,
) -> Iterator[dict[str, Any]]:
    """The rows of a work item's shards, read concurrently through ``interleave``; every bad
    sample is skipped and counted."""
    import json

    parts = item_parts(item)
    rng = np.random.default_rng([seed, 104729, int(item["item"])])
    sources = [_part_samples(part, i, s3_endpoint) for i, part in enumerate(parts)]
    skipped = 0
    for number, index, raw, teacher in interleave(sources, rng, buffer):
        part = parts[number]
        decoded = decode_sample(raw, max_pixels=max_pixels)
        if not decoded.ok:
            skipped += 1
            continue
        try:
            meta_json = json.loads(raw["json_bytes"]) if raw.get("json_bytes") else {}
        except ValueError:
            meta_json = {}
        assert decoded.prompts is not None  # parsed for every decoded (ok) sample
        annotations = raw.get(LABEL_ANNOTATIONS, decoded.prompts.annotations)
        meta = _Meta(decoded.key, annotations, meta_json if isinstance(meta_json, dict) else {})
        # the part number joins the seed only after the first, so one-shard items keep their old draws
        try:
            sample = build(item, part, [index] + ([number] if number else []), decoded.image, meta, teacher)
        except Exception as e:  # noqa: BLE001 - one bad sample must not stop training
            log.warning("shard %s, sample %s skipped: %s: %s", part["shard"], decoded.key, type(e).__name__, e)
            sample = None
        if sample is None:
            skipped += 1
            continue
        yield {"item": int(item["item"]), "dataset": int(part["dataset"]), "key": decoded.key, "sample": sample}
    if skipped:
        log.info("work item %d: %d samples skipped (undecodable or no usable labels)", int(item["item"]), skipped)


# --- teacher features -------------------------------------------------------------------------------


def iter_teacher_features(url: str, *, s3_endpoint: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, (C, h, w) float16) pairs of a teacher-feature shard, in order (``<key>.npy`` members)."""
    from ovsam_ray import storage

    with storage.open_url(url, "rb", s3_endpoint=s3_endpoint) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for member in tf:
            if not member.isfile() or not member.name.endswith(".npy"):
                continue
            member_file = tf.extractfile(member)
            assert member_file is not None  # a regular file
            data = member_file.read()
            yield member.name[: -len(".npy")], np.load(_io.BytesIO(data), allow_pickle=False)


# --- the Ray dataset --------------------------------------------------------------------------------


def build_ray_dataset(
    items: list[dict[str, Any]],
    builder: Callable[[dict[str, Any]], Iterator[dict]],
    *,
    num_cpus: float = 1.0,
    max_blocks: int = 20_000,
):
    """A lazy Ray dataset: the items (one per block up to ``max_blocks``) flat-mapped by ``builder``."""
    import ray.data

    if not items:
        raise ConfigError("no work items: the dataset has no shards left to read")
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), max_blocks))
    return ds.flat_map(builder, num_cpus=num_cpus)


def iter_local_rows(
    items: list[dict[str, Any]], builder: Callable[[dict[str, Any]], Iterator[dict]]
) -> Iterator[dict[str, Any]]:
    """The same rows without Ray (in-process training of the tiny recipe, tests)."""
    for item in items:
        yield from builder(item)
