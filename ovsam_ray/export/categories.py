"""Category lists for exports: from a COCO-style json (``categories``) or a vocabulary."""

from __future__ import annotations

import json
from typing import Any

from ovsam_ray import io
from ovsam_ray.model.text_embedding import clean_class_name

__all__ = ["category_index", "load_categories"]


def load_categories(spec: str, *, s3_endpoint: str | None = None) -> list[dict[str, Any]]:
    """``[{"id", "name", ...}]`` from a json holding ``categories`` (a COCO/LVIS annotation file,
    a converter's ``_categories.json``) or from a vocabulary (``coco_ov``, ``lvis_v1``, .txt/.json)."""
    if spec.endswith(".json") and io.exists(spec, s3_endpoint=s3_endpoint):
        data = json.loads(io.read_bytes(spec, s3_endpoint=s3_endpoint))
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
