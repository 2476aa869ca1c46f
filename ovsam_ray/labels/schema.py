"""The schema of a label output: one row per input image with a list of instances (DESIGN §4).

The output folder holds ``<shard>.parquet`` files of :data:`OUTPUT_SCHEMA`, a commit marker per
shard under ``_committed/`` and the run record :data:`RUN_RECORD_NAME` (see :mod:`ovsam_ray.labels`).
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import pyarrow as pa

__all__ = [
    "INSTANCE_TYPE",
    "OUTPUT_SCHEMA",
    "RLE_TYPE",
    "RUN_RECORD_NAME",
    "V3_INSTANCE_FIELDS",
    "conform_instances",
    "conform_table",
    "rows_to_table",
    "timestamp",
]

RUN_RECORD_NAME = "_run.json"

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])

#: One prompt's result. prompt_type is "box", "point" or "grid"; prompt_box/bbox are XYXY in
#: original-image pixels (bbox = the mask's [x_first, y_first, x_last+1, y_last+1]); point is xy;
#: rle is COCO RLE of the mask at original size; embedding / clip_embedding / clip_valid are the
#: optional float16 region and CLIP embeddings and CLIP-validity flag (re-scoring, ``relabel``).
#: Schema version 3 adds, last and nullable (older files read with them null), the quality signals
#: a reviewer's queue is built from (``ovsam-ray review select``): ``label_margin`` (top-1 minus
#: top-2 label probability), ``stability_score`` (IoU of the mask at logit +1 and -1, SAM's),
#: ``box_iou`` (IoU of the mask's box with its prompt box; null for point prompts) and
#: ``label_agrees`` (the prompt's detector label is OV-SAM's label; null without a detector label);
#: and ``review``, the reviewer's verdict set when corrections are applied (:mod:`.overlays`:
#: "accepted", "relabelled", "mask_edited", "added"; null for an unreviewed instance).
#: ``detector_rle`` is the detector's own mask of a box prompt (COCO RLE at original size; SAM 3 with
#: ``--keep-source-masks``), null otherwise.
#: ``source`` says where the prompt came from ("shard", "detector:NAME", "grid"); ``shard_label`` is
#: the shard's own label of a shard prompt (``detector_label`` is a detector's). Both are nullable
#: additions: files written before them read with nulls there.
INSTANCE_TYPE = pa.struct(
    [
        ("prompt_type", pa.string()),
        ("prompt_box", pa.list_(pa.float32(), 4)),
        ("point", pa.list_(pa.float32(), 2)),
        ("detector_score", pa.float32()),
        ("detector_label", pa.string()),
        ("bbox", pa.list_(pa.float32(), 4)),
        ("area", pa.int64()),
        ("rle", RLE_TYPE),
        ("label", pa.string()),
        ("label_id", pa.int32()),
        ("label_score", pa.float32()),
        ("topk_labels", pa.list_(pa.string())),
        ("topk_scores", pa.list_(pa.float32())),
        ("embedding", pa.list_(pa.float16())),
        ("clip_embedding", pa.list_(pa.float16())),
        ("clip_valid", pa.bool_()),
        ("label_margin", pa.float32()),
        ("stability_score", pa.float32()),
        ("box_iou", pa.float32()),
        ("label_agrees", pa.bool_()),
        ("review", pa.string()),
        ("detector_rle", RLE_TYPE),
        ("source", pa.string()),
        ("shard_label", pa.string()),
    ]
)

#: The instance fields each schema version added (a file of an older version lacks them).
V3_INSTANCE_FIELDS = (
    "label_margin",
    "stability_score",
    "box_iou",
    "label_agrees",
    "review",
    "detector_rle",
    "source",
    "shard_label",
)

#: One row per input image (DESIGN §4). Error rows have status "error", a message in ``error``,
#: width/height when the image could be decoded, and no instances. ``warnings`` (schema version
#: 2, last so that version-1 files read the same by name): what happened to the image's prompts
#: (dropped, clipped, capped at --max-prompts, none at all), null for none; version-1 files lack
#: the column and :func:`conform_table` gives them a null one.
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("instances", pa.list_(INSTANCE_TYPE)),
        pa.field("warnings", pa.list_(pa.string())),
    ],
    metadata={"ovsam_ray.schema_version": "3"},
)

_STATUSES = ("ok", "error")


def _normalise_row(i: int, row: dict[str, Any]) -> dict[str, Any]:
    unknown = set(row) - set(OUTPUT_SCHEMA.names)
    if unknown:
        raise ValueError(f"row {i}: unknown fields {sorted(unknown)}; schema has {OUTPUT_SCHEMA.names}")
    if not row.get("key") or not row.get("shard"):
        raise ValueError(f"row {i}: 'key' and 'shard' are required")
    status = row.get("status")
    if status not in _STATUSES:
        raise ValueError(f"row {i} ({row['key']}): status must be one of {_STATUSES}, got {status!r}")
    if status == "error" and not row.get("error"):
        raise ValueError(f"row {i} ({row['key']}): an error row needs an 'error' message")
    out = dict(row)
    out["instances"] = [_normalise_instance(inst) for inst in (row.get("instances") or [])]
    if out.get("image_id") is not None:
        out["image_id"] = str(out["image_id"])
    return out


def _normalise_instance(inst: dict[str, Any]) -> dict[str, Any]:
    out = dict(inst)
    score = out.get("detector_score")
    if score is not None and math.isnan(float(score)):  # NaN means "no detector score" upstream
        out["detector_score"] = None
    return out


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build an OUTPUT_SCHEMA table from row dicts (numpy arrays are fine for list fields).

    Missing optional fields become null; ``instances`` defaults to ``[]``; a NaN
    ``detector_score`` becomes null. Raises ``ValueError`` for unknown fields, a missing key/shard,
    a bad status or an error row without a message.
    """
    normalised = [_normalise_row(i, row) for i, row in enumerate(rows)]
    return pa.Table.from_pylist(normalised, schema=OUTPUT_SCHEMA)


def conform_table(table: pa.Table) -> pa.Table:
    """``table`` with exactly OUTPUT_SCHEMA (same columns and types; nullability and metadata may
    differ, as they do after a trip through Ray Data). A table of an older schema version (no
    ``warnings`` column, instances without the version-3 fields) gets null ones."""
    if table.schema.equals(OUTPUT_SCHEMA):
        return table
    if "warnings" not in table.column_names:
        table = table.append_column("warnings", pa.nulls(table.num_rows, OUTPUT_SCHEMA.field("warnings").type))
    if "instances" in table.column_names:
        index = table.column_names.index("instances")
        table = table.set_column(index, "instances", conform_instances(table.column("instances")))
    try:
        return table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    except (KeyError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"table does not match OUTPUT_SCHEMA ({e}); build it with rows_to_table()") from None


def conform_instances(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """A ``list<instance>`` column of any schema version as ``list<INSTANCE_TYPE>``: instance
    fields it lacks (an older version's) become null; fields INSTANCE_TYPE does not know raise."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    return pa.chunked_array([_conform_list(c) for c in chunks], pa.list_(INSTANCE_TYPE))


def _conform_list(arr: pa.Array) -> pa.Array:
    if arr.type == pa.list_(INSTANCE_TYPE):
        return arr
    struct_type = arr.type.value_type
    have = {struct_type.field(i).name for i in range(struct_type.num_fields)}
    if not have - set(INSTANCE_TYPE.names) and have != set(INSTANCE_TYPE.names):
        values = arr.values  # offsets kept below; the struct's children are rebuilt in order
        children = [values.field(f.name) if f.name in have else pa.nulls(len(values), f.type) for f in INSTANCE_TYPE]
        struct = pa.StructArray.from_arrays(children, fields=list(INSTANCE_TYPE), mask=values.is_null())
        arr = pa.ListArray.from_arrays(arr.offsets, struct, mask=arr.is_null())
    return arr.cast(pa.list_(INSTANCE_TYPE))


def timestamp() -> str:
    """Now, as commit markers and run records write it (UTC, ISO 8601, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
