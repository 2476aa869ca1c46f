"""Predictions -> output instance records (the ``instances`` struct of DESIGN §4).

One builder, :class:`InstanceColumns`, turns the predictions of many images into one Arrow
``list<INSTANCE_TYPE>`` column without a Python object per instance (flat numpy columns, one
list per image); :func:`prediction_to_instances` is the same records as Python dicts for one image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ovsam_ray.data.rle import box_fill_rles, compress_rles, encode_masks
from ovsam_ray.labels.schema import INSTANCE_TYPE
from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts
from ovsam_ray.vocabulary import Vocabulary

__all__ = ["InstanceColumns", "box_iou", "prediction_to_instances"]

_FIELDS = [f.name for f in INSTANCE_TYPE]


class InstanceColumns:
    """Accumulates the instances of a batch of images, image by image, as flat columns.

    ``add_*`` appends one image (possibly with no instance); :meth:`to_arrow` returns a
    ``list<INSTANCE_TYPE>`` array with one list per added image, in order.
    """

    def __init__(self, vocab: Vocabulary | None = None, *, with_embedding: bool = False) -> None:
        self.with_embedding = with_embedding
        self.names = np.asarray(vocab.class_names if vocab else [], dtype=object)
        self.class_ids = np.asarray(vocab.class_ids if vocab else [], dtype=np.int32)
        self._name_to_id = {n: i for n, i in zip(self.names.tolist(), self.class_ids.tolist())}
        self.counts: list[int] = []
        self.parts: dict[str, list[Any]] = {name: [] for name in _FIELDS + ["is_box", "topk_n", "emb_n"]}
        self.rles: list[dict[str, Any]] = []

    def add_empty(self) -> None:
        self.counts.append(0)

    def add_prediction(
        self,
        pred: ImagePrediction,
        prompts: ImagePrompts,
        *,
        types: list[str] | None = None,
        keep: np.ndarray | None = None,
        detector_scores: list[float | None] | None = None,
        detector_labels: list[str | None] | None = None,
        detector_masks: list[dict[str, Any] | None] | None = None,
        sources: list[str] | None = None,
    ) -> None:
        """One image's kept prompts (all by default), in prompt order (boxes, then points).

        ``types`` names each prompt ("box", "point", "grid"; default: boxes then points). The mask
        is COCO RLE at the original size (compressed from ``pred.rles`` when the predictor made
        them, else encoded from ``pred.masks``: the same strings); ``bbox`` is the mask's box;
        labels are names from the vocabulary with the fused probability; with ``with_embedding``
        the float16 region and CLIP embeddings and the CLIP-validity flag are stored;
        ``detector_masks``: the detector's own mask per box prompt (COCO RLE, ``detector_rle``). ``sources``
        names each prompt's source ("shard", "detector:NAME", "grid"): a shard prompt's label
        (``detector_labels``) is stored as ``shard_label``, a detector's as ``detector_label``;
        without it every label is a ``detector_label`` and ``source`` is null.
        """
        n_boxes, n = len(prompts.boxes), len(pred.labels)
        keep = np.arange(n) if keep is None else np.asarray(keep, np.int64)
        types = types or ["box"] * n_boxes + ["point"] * (n - n_boxes)
        if pred.rles is not None:  # run lengths computed on the model's device: only compress them
            self.rles += compress_rles([pred.rles[i] for i in keep.tolist()])
        else:
            assert pred.masks is not None, "a prediction carries masks or run lengths"
            self.rles += encode_masks(pred.masks[keep])
        is_box = keep < n_boxes
        point_idx = np.where(is_box, 0, keep - n_boxes)
        labels = pred.labels[keep].astype(np.int64)
        p = self.parts
        p["prompt_type"].append(np.asarray(types, dtype=object)[keep] if n else np.zeros(0, object))
        p["is_box"].append(is_box)
        p["prompt_box"].append(_rows(prompts.boxes, np.where(is_box, keep, 0), 4))
        p["point"].append(_rows(prompts.points, point_idx, 2))
        p["detector_score"].append(_per_box(detector_scores, keep, is_box, np.nan, np.float32))
        self._prompt_labels(_per_box(detector_labels, keep, is_box, None, object), sources, keep)
        p["detector_rle"].append(_per_box(detector_masks, keep, is_box, None, object))
        p["bbox"].append(np.asarray(pred.mask_boxes, np.float32)[keep].reshape(-1, 4))
        p["area"].append(np.asarray(pred.mask_areas(), np.int64)[keep])
        p["label"].append(self.names[labels])
        p["label_id"].append(self.class_ids[labels])
        p["label_score"].append(np.asarray(pred.scores, np.float32)[keep])
        topk = np.asarray(pred.topk_ids, np.int64)[keep]
        p["topk_labels"].append(self.names[topk.reshape(-1)])
        p["topk_scores"].append(np.asarray(pred.topk_scores, np.float32)[keep].reshape(-1))
        p["topk_n"].append(np.full(len(keep), topk.shape[1] if topk.ndim == 2 else 0, np.int64))
        top = np.asarray(pred.topk_scores, np.float32)
        top = top.reshape(len(top), -1)[keep] if top.size else np.zeros((len(keep), 0), np.float32)
        p["label_margin"].append(top[:, 0] - top[:, 1] if top.shape[1] >= 2 else np.full(len(keep), np.nan, np.float32))
        stability = pred.stability
        p["stability_score"].append(
            np.full(len(keep), np.nan, np.float32) if stability is None else np.asarray(stability, np.float32)[keep]
        )
        if self.with_embedding:
            p["embedding"].append(np.asarray(pred.region_embeddings, np.float16)[keep])
            p["clip_embedding"].append(np.asarray(pred.clip_embeddings, np.float16)[keep])
            p["clip_valid"].append(np.asarray(pred.clip_valid, bool)[keep])
        self.counts.append(len(keep))

    def add_box_fill(
        self,
        boxes: np.ndarray,
        *,
        height: int,
        width: int,
        points: np.ndarray | None = None,
        types: list[str] | None = None,
        detector_scores: list[float | None] | None = None,
        detector_labels: list[str | None] | None = None,
        detector_masks: list[dict[str, Any] | None] | None = None,
        sources: list[str] | None = None,
    ) -> None:
        """The zero-cost baseline for one image: each box prompt's mask is the box itself (the
        pixels whose centres lie inside it), each point prompt's mask its one pixel; the label is
        the prompt's own (shard or detector) label, ``label_id`` its vocabulary id when the
        vocabulary knows it, ``label_score`` the detector score; no top-k, no embeddings."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        points = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
        nb, n = len(boxes), len(boxes) + len(points)
        pixel = np.floor(points)
        mask_boxes = np.concatenate([boxes, np.concatenate([pixel, pixel + 1], axis=1)])
        rles, bbox, areas = box_fill_rles(mask_boxes, height=height, width=width)
        self.rles += rles
        keep = np.arange(n)
        is_box = keep < nb
        labels = _per_box(detector_labels, keep, is_box, None, object)
        p = self.parts
        p["prompt_type"].append(np.asarray(types or ["box"] * nb + ["point"] * (n - nb), dtype=object))
        p["is_box"].append(is_box)
        p["prompt_box"].append(np.concatenate([boxes, np.zeros((n - nb, 4), np.float32)]))
        p["point"].append(np.concatenate([np.zeros((nb, 2), np.float32), points]))
        scores = _per_box(detector_scores, keep, is_box, np.nan, np.float32)
        p["detector_score"].append(scores)
        self._prompt_labels(labels, sources, keep)
        p["detector_rle"].append(_per_box(detector_masks, keep, is_box, None, object))
        p["bbox"].append(bbox)
        p["area"].append(areas)
        p["label"].append(labels)
        p["label_id"].append(np.asarray([self._name_to_id.get(x, -1) for x in labels.tolist()], np.int32))
        p["label_score"].append(scores)
        p["topk_labels"].append(np.zeros(0, object))
        p["topk_scores"].append(np.zeros(0, np.float32))
        p["topk_n"].append(np.zeros(n, np.int64))
        p["label_margin"].append(np.full(n, np.nan, np.float32))
        p["stability_score"].append(np.full(n, np.nan, np.float32))
        self.counts.append(n)

    def _prompt_labels(self, labels: np.ndarray, sources: list[str] | None, keep: np.ndarray) -> None:
        """Each kept prompt's own label as ``detector_label`` or ``shard_label`` by its source."""
        p = self.parts
        if sources is None:
            p["detector_label"].append(labels)
            p["shard_label"].append(np.full(len(keep), None, object))
            p["source"].append(np.full(len(keep), None, object))
            return
        src = np.asarray(sources, dtype=object)[keep] if len(keep) else np.zeros(0, object)
        from_shard = src == "shard"
        none = np.full(len(src), None, object)
        p["detector_label"].append(np.where(from_shard, none, np.asarray(labels, object)))
        p["shard_label"].append(np.where(from_shard, np.asarray(labels, object), none))
        p["source"].append(src)

    def to_arrow(self) -> pa.ListArray:
        """``list<INSTANCE_TYPE>``, one (possibly empty) list per added image."""
        offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int32)
        n = int(offsets[-1])
        cat = {k: _concat(v) for k, v in self.parts.items()}
        is_box = cat["is_box"].astype(bool) if n else np.zeros(0, bool)
        det_score = cat["detector_score"].astype(np.float32) if n else np.zeros(0, np.float32)
        label_id = cat["label_id"].astype(np.int32) if n else np.zeros(0, np.int32)
        sizes = np.asarray([r["size"] for r in self.rles], np.int32).reshape(-1)
        rle_fields = list(INSTANCE_TYPE.field("rle").type)
        arrays = {
            "prompt_type": pa.array(cat["prompt_type"].tolist() if n else [], pa.string()),
            "prompt_box": _fixed(cat["prompt_box"], 4, valid=is_box),
            "point": _fixed(cat["point"], 2, valid=~is_box),
            "detector_score": pa.array(det_score, pa.float32(), mask=np.isnan(det_score)),
            "detector_label": pa.array(cat["detector_label"].tolist() if n else [], pa.string()),
            "source": pa.array(cat["source"].tolist() if n else [], pa.string()),
            "shard_label": pa.array(cat["shard_label"].tolist() if n else [], pa.string()),
            "bbox": _fixed(cat["bbox"], 4),
            "area": pa.array(cat["area"].astype(np.int64) if n else [], pa.int64()),
            "rle": pa.StructArray.from_arrays(
                [
                    pa.FixedSizeListArray.from_arrays(pa.array(sizes, pa.int32()), 2),
                    pa.array([r["counts"] for r in self.rles], pa.string()),
                ],
                fields=rle_fields,
            ),
            "label": pa.array(cat["label"].tolist() if n else [], pa.string()),
            "label_id": pa.array(label_id, pa.int32(), mask=label_id < 0),
            "label_score": pa.array(
                cat["label_score"].astype(np.float32) if n else [],
                pa.float32(),
                mask=np.isnan(cat["label_score"].astype(np.float32)) if n else None,
            ),
            "topk_labels": _lists(cat["topk_n"], pa.array(cat["topk_labels"].tolist() if n else [], pa.string())),
            "topk_scores": _lists(
                cat["topk_n"], pa.array(cat["topk_scores"].astype(np.float32) if n else [], pa.float32())
            ),
        }
        for name, dim_type in (("embedding", pa.float16()), ("clip_embedding", pa.float16())):
            values = cat[name] if self.with_embedding and n else None
            arrays[name] = (
                pa.nulls(n, pa.list_(dim_type))
                if values is None
                else _lists(np.full(n, values.shape[1], np.int64), pa.array(values.reshape(-1), dim_type))
            )
        arrays["clip_valid"] = (
            pa.array(cat["clip_valid"].astype(bool), pa.bool_())
            if self.with_embedding and n
            else pa.nulls(n, pa.bool_())
        )
        arrays.update(self._signals(cat, n, is_box))
        arrays["detector_rle"] = pa.array(cat["detector_rle"].tolist() if n else [], INSTANCE_TYPE.field("rle").type)
        struct = pa.StructArray.from_arrays([arrays[f] for f in _FIELDS], fields=list(INSTANCE_TYPE))
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), struct)

    @staticmethod
    def _signals(cat: dict[str, np.ndarray], n: int, is_box: np.ndarray) -> dict[str, pa.Array]:
        """The quality signals (schema version 3): margin and stability as the model gave them,
        the mask box's IoU with its prompt box, whether the detector label agrees; no review."""
        if not n:
            return {
                "label_margin": pa.array([], pa.float32()),
                "stability_score": pa.array([], pa.float32()),
                "box_iou": pa.array([], pa.float32()),
                "label_agrees": pa.array([], pa.bool_()),
                "review": pa.array([], pa.string()),
            }
        margin = cat["label_margin"].astype(np.float32)
        stability = cat["stability_score"].astype(np.float32)
        iou = box_iou(cat["prompt_box"].reshape(-1, 4), cat["bbox"].reshape(-1, 4))
        det = cat["detector_label"]
        has_det = np.asarray([d is not None for d in det.tolist()], bool)
        agrees = np.asarray([d == lab for d, lab in zip(det.tolist(), cat["label"].tolist())], bool)
        return {
            "label_margin": pa.array(margin, pa.float32(), mask=np.isnan(margin)),
            "stability_score": pa.array(stability, pa.float32(), mask=np.isnan(stability)),
            "box_iou": pa.array(iou, pa.float32(), mask=~is_box),
            "label_agrees": pa.array(agrees, pa.bool_(), mask=~has_det),
            "review": pa.nulls(n, pa.string()),
        }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two (N, 4) XYXY box arrays (0 where both are empty)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih

    def area(x: np.ndarray) -> np.ndarray:
        return np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)

    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0).astype(np.float32)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def _rows(values: np.ndarray, index: np.ndarray, dim: int) -> np.ndarray:
    values = np.asarray(values, np.float32).reshape(-1, dim)
    if len(values) == 0:
        return np.zeros((len(index), dim), np.float32)
    return values[np.clip(index, 0, len(values) - 1)]


def _per_box(values: list[Any] | None, keep: np.ndarray, is_box: np.ndarray, missing: Any, dtype: Any) -> np.ndarray:
    out = np.full(len(keep), missing, dtype=dtype)
    if values:
        for j, (i, box) in enumerate(zip(keep.tolist(), is_box.tolist())):
            if box and i < len(values) and values[i] is not None:
                out[j] = values[i]
    return out


def _fixed(values: np.ndarray, dim: int, valid: np.ndarray | None = None) -> pa.Array:
    flat = pa.array(np.asarray(values, np.float32).reshape(-1), pa.float32())
    mask = None if valid is None else pa.array(~np.asarray(valid, bool))
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)


def _lists(lengths: np.ndarray, values: pa.Array) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def prediction_to_instances(
    pred: ImagePrediction,
    prompts: ImagePrompts,
    vocab: Vocabulary,
    *,
    types: list[str] | None = None,
    keep: np.ndarray | None = None,
    detector_scores: list[float | None] | None = None,
    detector_labels: list[str | None] | None = None,
    detector_masks: list[dict[str, Any] | None] | None = None,
    sources: list[str] | None = None,
    with_embedding: bool = False,
) -> list[dict[str, Any]]:
    """One image's instance records as dicts (see :meth:`InstanceColumns.add_prediction`)."""
    cols = InstanceColumns(vocab, with_embedding=with_embedding)
    cols.add_prediction(
        pred,
        prompts,
        types=types,
        keep=keep,
        detector_scores=detector_scores,
        detector_labels=detector_labels,
        detector_masks=detector_masks,
        sources=sources,
    )
    return cols.to_arrow()[0].as_py()
