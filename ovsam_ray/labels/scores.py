"""The score a label instance is ranked by: one rule for the COCO export and the AP evaluation."""

from __future__ import annotations

from typing import Any

__all__ = ["LABEL_SOURCES", "SCORE_MODES", "instance_label", "instance_score"]

#: Where an instance's label comes from: OV-SAM's classifier or the detector that prompted it.
LABEL_SOURCES = ("ovsam", "detector")
#: detector: the detector's score; label: OV-SAM's label probability; product: both multiplied;
#: auto: detector for detector labels, product for OV-SAM labels (label alone without a detector score).
SCORE_MODES = ("auto", "detector", "label", "product")


def instance_score(inst: dict[str, Any], label_source: str = "ovsam", mode: str = "auto") -> float:
    """The score an instance is ranked by (see :data:`SCORE_MODES`)."""
    det, lab = inst.get("detector_score"), inst.get("label_score")
    if mode == "auto":
        mode = "detector" if label_source == "detector" else ("product" if det is not None else "label")
    if mode == "detector":
        return float(det if det is not None else 1.0)
    if mode == "label":
        return float(lab if lab is not None else 0.0)
    return float(det if det is not None else 1.0) * float(lab if lab is not None else 0.0)


def instance_label(inst: dict[str, Any], label_source: str = "ovsam") -> str | None:
    """The class name an instance is counted as: OV-SAM's ``label``, or (``label_source="detector"``)
    its prompt's own label: the detector's, else the shard's (``shard_label``; outputs written
    before that field hold a shard prompt's label in ``detector_label``)."""
    if label_source != "detector":
        return inst.get("label")
    det = inst.get("detector_label")
    return det if det is not None else inst.get("shard_label")
