"""The one scorer of prompted segmentation: the paper's Table 1 protocol (box/point mIoU, top-1
accuracy over all, seen and unseen classes, and the box-fill baseline).

``ovsam-ray eval --mode interactive``, the demo, the tiny recipe's evaluation and the bench scripts
all score here. Every prompted object (see :mod:`ovsam_ray.data.gt_prompts`) is one ground-truth
object and gets one record: the IoU of the mask predicted *for its prompt* with its ground-truth
mask, and whether the top label is its class. Objects are matched by the prompt that produced
them, never by where a mask landed: the shard JSON says which annotation each prompt came from
(``box_annotations`` / ``point_annotations``), and an instance is paired with a prompt by its
prompt box or point, so a prompt the label job dropped is counted, not mis-paired. The records
are averaged per prompt type over all objects and over the base (``seen``, trained) and novel
(unseen) classes of the vocabulary. Objects whose class the vocabulary excludes (COCO-OV's 15) or
does not know are not prompted and not scored. The box-fill baseline (the prompt box itself as
the mask) is reported next to the box IoU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ovsam_ray import storage
from ovsam_ray.data.gt_prompts import object_mask, with_gt_prompts
from ovsam_ray.data.rle import box_fill_mask, decode_rle
from ovsam_ray.data.shards import iter_shard_samples, shard_names
from ovsam_ray.labels.reader import label_files, read_label_file
from ovsam_ray.vocabulary import Vocabulary, clean_class_name

__all__ = [
    "ClassLookup",
    "ObjectScore",
    "evaluate_label_output",
    "evaluate_predictor",
    "label_shard_pairs",
    "mask_iou",
    "score_image",
    "score_label_shard",
    "shard_metas",
    "summarize",
    "table1_markdown",
]

log = logging.getLogger(__name__)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (H, W) bool masks. Two empty masks give 0.0, as ``pycocotools.mask.iou`` (the
    IoU of COCO's evaluation) gives for an empty union: a scored object is a ground-truth object,
    which COCO and SAM's mIoU assume non-empty, and predicting nothing must never score as a
    perfect match. (Comparing two *predictions* for agreement is another question: there, two
    empty masks agree.)"""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _norm(name: Any) -> str:
    return clean_class_name(str(name)).lower()


class ClassLookup:
    """Maps ground-truth categories and predicted labels to vocabulary classes.

    A category matches by ``category_name`` (the class name first, then a synonym; case- and
    underscore-insensitive), else by ``category_id`` against the vocabulary's ``class_ids``.
    Picklable (plain dicts), so Ray tasks can take it.
    """

    def __init__(self, vocab: Vocabulary) -> None:
        self.names = list(vocab.class_names)
        self.seen = list(vocab.seen)
        self.excluded = list(vocab.excluded)
        self.by_name: dict[str, int] = {}
        for i, name in enumerate(vocab.class_names):
            self.by_name.setdefault(_norm(name), i)
        for i, syns in enumerate(vocab.synonyms):
            for s in syns:
                self.by_name.setdefault(_norm(s), i)
        self.by_id = {int(c): i for i, c in enumerate(vocab.class_ids)}

    def index(self, ann: dict[str, Any]) -> int:
        """Vocabulary index of an annotation's class, -1 when it has none."""
        name = ann.get("category_name")
        if name is not None:
            return self.by_name.get(_norm(name), -1)
        cid = ann.get("category_id")
        if isinstance(cid, int) and not isinstance(cid, bool):
            return self.by_id.get(cid, -1)
        return -1

    def label_index(self, label: str | None) -> int:
        """Vocabulary index of a predicted label (a class name), -1 for None/unknown."""
        return -1 if label is None else self.by_name.get(_norm(label), -1)

    def keep(self, ann: dict[str, Any]) -> bool:
        """Whether the protocol evaluates this object: a known, not excluded class."""
        i = self.index(ann)
        return i >= 0 and not self.excluded[i]


@dataclass
class ObjectScore:
    """One prompted object: ``iou`` of the predicted mask, ``correct`` top label, ``fill_iou``
    of the prompt box as a mask (box prompts only, else NaN)."""

    prompt_type: str
    class_index: int
    seen: bool
    iou: float
    correct: bool
    fill_iou: float = float("nan")


def _prompt_coords(prompt_type: str, meta: dict[str, Any], k: int, width: int, height: int) -> np.ndarray:
    """Where the label job put prompt ``k`` after clipping it to the image (see decode)."""
    if prompt_type == "box":
        x0, y0, x1, y1 = (float(v) for v in meta["boxes"][k])
        xs = np.clip([min(x0, x1), max(x0, x1)], 0, width)
        ys = np.clip([min(y0, y1), max(y0, y1)], 0, height)
        return np.asarray([xs[0], ys[0], xs[1], ys[1]])
    x, y = (float(v) for v in meta["points"][k])
    return np.asarray([min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)])


def _matches(inst: dict[str, Any], prompt_type: str, coords: np.ndarray) -> bool:
    got = inst.get("prompt_box") if prompt_type == "box" else inst.get("point")
    return got is not None and bool(np.allclose(np.asarray(got, np.float64), coords, atol=1e-2))


def score_image(row: dict[str, Any], meta: dict[str, Any], lookup: ClassLookup) -> tuple[list[ObjectScore], int]:
    """Score one label row against its shard JSON (``annotations`` + ``box_annotations`` /
    ``point_annotations``). Instances are matched to prompts in prompt order by their prompt box
    or point, so a prompt the label job dropped is counted, not mis-paired. Returns the records
    and the number of prompts without an instance."""
    anns = meta.get("annotations") or []
    height = int(row.get("height") or meta.get("height") or 0)
    width = int(row.get("width") or meta.get("width") or 0)
    instances = list(row.get("instances") or [])
    out: list[ObjectScore] = []
    missing = 0
    masks: dict[int, np.ndarray] = {}
    for prompt_type, field in (("box", "box_annotations"), ("point", "point_annotations")):
        preds = [i for i in instances if i["prompt_type"] == prompt_type]
        j = 0
        for k, ann_index in enumerate(meta.get(field) or []):
            coords = _prompt_coords(prompt_type, meta, k, width, height)
            if j >= len(preds) or not _matches(preds[j], prompt_type, coords):
                missing += 1
                continue
            inst = preds[j]
            j += 1
            ann = anns[ann_index]
            cls = lookup.index(ann)
            if cls < 0 or lookup.excluded[cls]:
                continue
            if ann_index not in masks:
                masks[ann_index] = object_mask(ann, height, width)
            target = masks[ann_index]
            fill = (
                mask_iou(box_fill_mask(inst["prompt_box"], height, width), target)
                if prompt_type == "box"
                else float("nan")
            )
            out.append(
                ObjectScore(
                    prompt_type,
                    cls,
                    lookup.seen[cls],
                    mask_iou(decode_rle(inst["rle"]), target),
                    lookup.label_index(inst.get("label")) == cls,
                    fill,
                )
            )
    return out, missing


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(records: Iterable[ObjectScore]) -> dict[str, dict[str, Any]]:
    """Per prompt type: ``objects``, ``miou``, ``accuracy`` over all objects, and the same over
    ``base`` (seen) and ``novel`` (unseen) objects, suffixed ``_base`` / ``_novel`` (``None``
    where there are none); for boxes also ``box_fill_miou`` (and ``_base`` / ``_novel``)."""
    groups: dict[str, list[ObjectScore]] = {}
    for r in records:
        groups.setdefault(r.prompt_type, []).append(r)
    out = {}
    for prompt_type in sorted(groups, key=lambda t: (t != "box", t)):
        recs = groups[prompt_type]
        entry: dict[str, Any] = {}
        for split, chosen in (
            ("", recs),
            ("_base", [r for r in recs if r.seen]),
            ("_novel", [r for r in recs if not r.seen]),
        ):
            entry[f"objects{split}"] = len(chosen)
            entry[f"miou{split}"] = _mean([r.iou for r in chosen])
            entry[f"accuracy{split}"] = _mean([float(r.correct) for r in chosen])
            if prompt_type == "box":
                entry[f"box_fill_miou{split}"] = _mean([r.fill_iou for r in chosen])
        out[prompt_type] = entry
    return out


def _fmt(value: Any, percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else str(value)


def table1_markdown(metrics: dict[str, dict[str, Any]]) -> str:
    """The metrics of :func:`summarize` as a markdown table (IoU and accuracy in %)."""
    lines = [
        "| prompt | objects (base/novel) | mIoU | mIoU base | mIoU novel | acc | acc base | acc novel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for prompt_type, m in metrics.items():
        lines.append(
            f"| {prompt_type} | {m['objects']} ({m['objects_base']}/{m['objects_novel']}) | {_fmt(m['miou'])} | "
            f"{_fmt(m['miou_base'])} | {_fmt(m['miou_novel'])} | {_fmt(m['accuracy'])} | "
            f"{_fmt(m['accuracy_base'])} | {_fmt(m['accuracy_novel'])} |"
        )
    if "box" in metrics and metrics["box"].get("box_fill_miou") is not None:
        lines.append("")
        lines.append(f"Box-fill baseline (the prompt box as the mask): mIoU {_fmt(metrics['box']['box_fill_miou'])}")
    return "\n".join(lines) + "\n"


# --- scoring label output and predictors --------------------------------------------------------


def shard_metas(shard_url: str, s3_endpoint: str | None = None) -> dict[str, dict[str, Any]]:
    """key -> the parsed JSON of every sample of a shard that has one (unparsable JSON skipped)."""
    out = {}
    for s in iter_shard_samples(shard_url, s3_endpoint=s3_endpoint):
        if s["key"] is None or s["json_bytes"] is None:
            continue
        try:
            meta = json.loads(s["json_bytes"])
        except ValueError:
            continue
        if isinstance(meta, dict):
            out[s["key"]] = meta
    return out


def label_shard_pairs(labels: str, shards: Sequence[str], s3_endpoint: str | None = None) -> list[tuple[str, str]]:
    """(label file, input shard) pairs of a label output, matched by the shard's name."""
    by_name = dict(zip(shard_names(list(shards)), shards))
    pairs = []
    for url in label_files(labels, s3_endpoint=s3_endpoint):
        name = url.rsplit("/", 1)[-1][: -len(".parquet")]
        if name in by_name:
            pairs.append((url, by_name[name]))
        else:
            log.warning("label file %s has no input shard named %s: not scored", storage.redact(url), name)
    return pairs


def _score_rows(
    rows: Iterable[dict[str, Any]], metas: dict[str, dict[str, Any]], lookup: ClassLookup
) -> tuple[list[ObjectScore], dict[str, int]]:
    records: list[ObjectScore] = []
    counts = {"images": 0, "images_error": 0, "prompts_without_instance": 0}
    for row in rows:
        counts["images"] += 1
        if row["status"] != "ok":
            counts["images_error"] += 1
            continue
        scored, missing = score_image(row, metas.get(row["key"], {}), lookup)
        records += scored
        counts["prompts_without_instance"] += missing
    return records, counts


def score_label_shard(
    label_url: str, shard_url: str, lookup: ClassLookup, s3_endpoint: str | None = None
) -> tuple[list[ObjectScore], dict[str, int]]:
    """The records of one label file against the prompted shard it was labelled from, and counts
    (``images``, ``images_error``, ``prompts_without_instance``)."""
    return _score_rows(read_label_file(label_url, s3_endpoint=s3_endpoint), shard_metas(shard_url, s3_endpoint), lookup)


def _add_counts(total: dict[str, int], part: dict[str, int]) -> dict[str, int]:
    return {k: total.get(k, 0) + v for k, v in part.items()}


def evaluate_label_output(
    labels: str, shards: Sequence[str], lookup: ClassLookup, *, s3_endpoint: str | None = None
) -> dict[str, Any]:
    """Score a label output (labelled from ``shards``, which carry ground-truth prompts, see
    :func:`~ovsam_ray.data.gt_prompts.rewrite_shard_prompts`) in this process: ``metrics``
    (:func:`summarize`) and ``counts``. ``ovsam-ray eval`` does the same with a Ray task per shard."""
    records: list[ObjectScore] = []
    counts: dict[str, int] = {}
    for label_url, shard_url in label_shard_pairs(labels, shards, s3_endpoint):
        part, c = score_label_shard(label_url, shard_url, lookup, s3_endpoint)
        records += part
        counts = _add_counts(counts, c)
    return {"metrics": summarize(records), "counts": counts}


def evaluate_predictor(
    predictor: Any,
    vocab: Vocabulary,
    shards: Sequence[str],
    *,
    prompts: str = "both",
    batch_size: int = 8,
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """Table 1 of a predictor run in this process on shards with ground truth (``annotations``):
    each object's box and/or interior point as prompts (as ``eval`` writes them), labelled by
    :func:`~ovsam_ray.labelling.label_samples`; returns ``metrics`` and ``counts`` as
    :func:`evaluate_label_output`."""
    from ovsam_ray.labelling import label_samples

    lookup = ClassLookup(vocab)
    records: list[ObjectScore] = []
    counts: dict[str, int] = {}
    for url in shards:
        samples, metas = [], {}
        for s in iter_shard_samples(url, s3_endpoint=s3_endpoint):
            try:
                meta = with_gt_prompts(json.loads(s["json_bytes"]), s["image_bytes"], mode=prompts, keep=lookup.keep)
            except (ValueError, TypeError, KeyError, AttributeError, OSError):
                samples.append(s)  # no ground truth to prompt with: labelled as it is (an error row if bad)
                continue
            metas[s["key"]] = meta
            samples.append({**s, "json_bytes": json.dumps(meta).encode()})
        part, c = _score_rows(label_samples(predictor, vocab, samples, batch_size=batch_size), metas, lookup)
        records += part
        counts = _add_counts(counts, c)
    return {"metrics": summarize(records), "counts": counts}
