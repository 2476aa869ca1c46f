"""Category lists for exports and evaluations: from a COCO-style json (``categories``), a vocabulary, or the
vocabulary a label output was made with (its run record)."""

from __future__ import annotations

import json
import logging
from typing import Any

from ovsam_ray import storage
from ovsam_ray.vocabulary import clean_class_name

__all__ = ["COCO_CATEGORY_IDS", "category_index", "dataset_categories", "load_categories", "record_vocabulary"]

log = logging.getLogger(__name__)

# COCO's own category ids (1..90 with gaps) of its 80 classes in contiguous order: coco_ov's ids 0..79.
COCO_CATEGORY_IDS = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
)


def load_categories(spec: str, *, s3_endpoint: str | None = None) -> list[dict[str, Any]]:
    """``[{"id", "name", ...}]`` from a json holding ``categories`` (a COCO/LVIS annotation file,
    a converter's ``_categories.json``) or from a vocabulary (``coco_ov``, ``lvis_v1``, .txt/.json)."""
    if spec.endswith(".json") and storage.exists(spec, s3_endpoint=s3_endpoint):
        data = json.loads(storage.read_bytes(spec, s3_endpoint=s3_endpoint))
        if isinstance(data, dict) and isinstance(data.get("categories"), list):
            return [dict(c) for c in data["categories"]]
    from ovsam_ray.vocabulary import load_vocabulary

    vocab = load_vocabulary(spec)
    return [{"id": int(i), "name": n} for i, n in zip(vocab.class_ids, vocab.class_names)]


def category_index(categories: list[dict[str, Any]]) -> dict[str, int]:
    """Normalised name (lower case, ``_`` = space) and synonyms -> category id; names win over synonyms."""
    out: dict[str, int] = {}
    for c in categories:
        out.setdefault(clean_class_name(str(c["name"])), int(c["id"]))
    for c in categories:
        for s in c.get("synonyms") or []:
            out.setdefault(clean_class_name(str(s)), int(c["id"]))
    return out


def record_vocabulary(labels: str, *, s3_endpoint: str | None = None) -> Any:
    """The :class:`~ovsam_ray.vocabulary.Vocabulary` a label output was labelled with, from its run
    record (the configured ``vocab`` spec, else the recorded built-in name), or ``None`` when there
    is no record or the vocabulary cannot be loaded or does not match the record's class count."""
    from ovsam_ray.labels.run_record import read_run_record
    from ovsam_ray.vocabulary import BUILTIN_VOCABULARIES, load_vocabulary

    record = read_run_record(labels, s3_endpoint=s3_endpoint)
    if record is None:
        return None
    recorded = (record.get("identity") or {}).get("vocabulary") or {}
    spec = (((record.get("details") or {}).get("config") or {}).get("model") or {}).get("vocab")
    spec = spec or (recorded.get("name") if recorded.get("name") in BUILTIN_VOCABULARIES else None)
    if not spec:
        return None
    try:
        vocab = load_vocabulary(spec)
    except (OSError, ValueError) as e:
        log.warning("the labels' vocabulary %r cannot be loaded (%s): using the label ids", spec, e)
        return None
    if recorded.get("num_classes") not in (None, vocab.num_classes):
        log.warning(
            "vocabulary %r has %d classes, the run record %s: using the label ids",
            spec,
            vocab.num_classes,
            recorded.get("num_classes"),
        )
        return None
    return vocab


def dataset_categories(vocab: Any) -> tuple[list[dict[str, Any]], dict[int, int]] | None:
    """For a built-in vocabulary, its dataset's categories (``coco_ov``: COCO's ids 1..90;
    ``lvis_v1``: LVIS's ids) and label id -> category id; ``None`` for other vocabularies."""
    if vocab is None or vocab.name not in ("coco_ov", "lvis_v1"):
        return None
    ids = COCO_CATEGORY_IDS if vocab.name == "coco_ov" else vocab.class_ids
    if len(ids) != vocab.num_classes:
        return None
    cats = [{"id": int(i), "name": n} for i, n in zip(ids, vocab.class_names)]
    return cats, {int(c): int(i) for c, i in zip(vocab.class_ids, ids)}
