"""The review loop: pick the instances a person should check first (:mod:`.select`), export them
as Label Studio and CVAT tasks, and bring the reviewed export back as corrections (:mod:`.importer`,
overlays beside the labels: :mod:`ovsam_ray.labels.overlays`)."""

from __future__ import annotations

from ovsam_ray.review.importer import ImportConfig, import_review
from ovsam_ray.review.select import SELECTION_NAME, ReviewSelectConfig, select_for_review

__all__ = ["SELECTION_NAME", "ImportConfig", "ReviewSelectConfig", "import_review", "select_for_review"]
