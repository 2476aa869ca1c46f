"""The options of ``export_<format>(labels, output, **options)``, as flags: each keyword's default lives in
its exporter's signature, its help text (and choices) here, once per name (a name means one thing in every
format). :func:`options_config` makes an exporter's options a dataclass, whose fields the CLI turns into flags;
:data:`EXPORT_OPTIONS` holds them per format."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from ovsam_ray.export import EXPORTERS
from ovsam_ray.export.coco import LABEL_SOURCES, SCORE_MODES
from ovsam_ray.export.labelstudio import MASK_FORMATS

__all__ = ["EXPORT_OPTIONS", "OPTION_FIELDS", "options_config"]

#: Keyword name -> field metadata (``help``, ``choices``; ``cli: False``: no flag).
OPTION_FIELDS: dict[str, dict[str, Any]] = {
    "min_score": {"help": "leave out instances scoring below this"},
    "shards": {"help": "input shards (default: the label run record's input)"},
    "s3_endpoint": {"help": "S3-compatible endpoint URL (else AWS_ENDPOINT_URL)"},
    "categories": {
        "help": "COCO json / _categories.json / vocabulary giving the category ids (default: "
        "coco_ov/lvis_v1 labels get COCO's/LVIS's own ids)"
    },
    "label_source": {"choices": LABEL_SOURCES, "help": "each instance's label: OV-SAM's, or its prompt's detector's"},
    "score": {
        "choices": SCORE_MODES,
        "help": "each instance's score (auto: the detector's for detector labels, "
        "else label x detector score, or the label's without a detector)",
    },
    "results": {"help": "a COCO results array (COCO.loadRes) instead"},
    "with_images": {"help": "also copy the images out of the shards, to <output folder>/images/"},
    "classes": {"help": "vocabulary or COCO json fixing the class order (default: the labels' vocabulary)"},
    "tolerance": {"help": "polygon simplification, pixels"},
    "image_url": {
        "help": "template over {file_name} (<shard>/<key>.<ext> as written under images/ by "
        "--with-images), {file_url} (the same, URL-quoted), {shard}, {key}, {image_id}, {ext}; the default is "
        "Label Studio's local-files URL of the images --with-images writes (README: Label Studio)"
    },
    "masks": {"choices": MASK_FORMATS, "help": "Label Studio's brush RLE or polygons"},
    "from_name": {"help": "the labelling config's control name"},
    "to_name": {"help": "the labelling config's image name"},
    "overwrite": {"help": "replace the files of an earlier export of this format (never anyone else's files)"},
    "model_version": {"cli": False, "help": "the tasks' model_version (fixed: ovsam)"},
}


def options_config(export: Callable[..., Any]) -> type:
    """A dataclass with one field per keyword-only parameter of ``export``: its default and type from
    the signature, its metadata from :data:`OPTION_FIELDS` (a KeyError for a keyword without one)."""
    fields = []
    for p in inspect.signature(export, eval_str=True).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.name not in OPTION_FIELDS:
            raise KeyError(f"{export.__name__}({p.name}=...): give it a help text in export.options.OPTION_FIELDS")
        fields.append((p.name, p.annotation, dataclasses.field(default=p.default, metadata=OPTION_FIELDS[p.name])))
    name = export.__name__.removeprefix("export_").title() + "Options"
    return dataclasses.make_dataclass(name, fields, frozen=True)


#: Format -> the dataclass of its exporter's options.
EXPORT_OPTIONS: dict[str, type] = {name: options_config(export) for name, export in EXPORTERS.items()}
