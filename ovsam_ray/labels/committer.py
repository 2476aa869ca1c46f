"""Write stage: rows -> one Parquet file per input shard, committed atomically; the run record.

Output layout (local directory or ``s3://`` prefix)::

    <output>/_run.json                  run record (identity checked by a resumed run)
    <output>/<shard>.parquet            one row per input image, OUTPUT_SCHEMA
    <output>/_committed/<shard>.json    commit marker, written LAST

A shard is committed iff its marker exists; a Parquet file without a marker is left over from a
crash and is overwritten by the next run. Temporary files start with ``.`` and committed-marker
and run-record names with ``_``, so ``pyarrow.dataset``/``pandas.read_parquet(<output>)`` and
``*.parquet`` globs only ever see complete Parquet files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovsam_ray import io

__all__ = [
    "INSTANCE_TYPE",
    "OUTPUT_SCHEMA",
    "RLE_TYPE",
    "RunMismatchError",
    "RunRecord",
    "ShardCommitter",
    "MissingShardFileError",
    "check_or_write_run_record",
    "conform_table",
    "rows_to_table",
]

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])

#: One prompt's result. prompt_type is "box", "point" or "grid"; prompt_box/bbox are XYXY in
#: original-image pixels (bbox = the mask's [x_first, y_first, x_last+1, y_last+1]); point is xy;
#: rle is COCO RLE of the mask at original size; embedding / clip_embedding / clip_valid are the
#: optional float16 region and CLIP embeddings and CLIP-validity flag (re-scoring, ``relabel``).
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
    ]
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
    metadata={"ovsam_ray.schema_version": "2"},
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


def _table_counts(table: pa.Table) -> dict[str, int]:
    def count(mask: pa.ChunkedArray) -> int:
        return int(pc.sum(mask).as_py() or 0)

    return {
        "num_rows": table.num_rows,
        "num_ok": count(pc.equal(table["status"], "ok")),
        "num_error": count(pc.equal(table["status"], "error")),
        "num_instances": count(pc.list_value_length(table["instances"])),
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
_SHARD_NAME_RE = re.compile(r"^[^/\\]+$")


class MissingShardFileError(FileNotFoundError):
    """A shard has a commit marker but its Parquet file is gone (deleted by hand or by a tool)."""


class ShardCommitter:
    """Commits one Parquet file per shard under ``output_url``, atomically, marker last.

    Safe for many concurrent committers of *different* shards; two committers of the same shard
    (a retried task) both leave a complete file and a consistent marker behind.
    """

    def __init__(self, output_url: str, *, s3_endpoint: str | None = None) -> None:
        self.output_url = output_url.rstrip("/") if len(output_url) > 1 else output_url
        self.s3_endpoint = s3_endpoint

    def parquet_url(self, shard_name: str) -> str:
        return io.join(self.output_url, f"{_check_shard_name(shard_name)}.parquet")

    def marker_url(self, shard_name: str) -> str:
        return io.join(self.output_url, "_committed", f"{_check_shard_name(shard_name)}.json")

    def is_committed(self, shard_name: str) -> bool:
        return io.exists(self.marker_url(shard_name), s3_endpoint=self.s3_endpoint)

    def committed_shards(self) -> set[str]:
        """Names of all committed shards (one listing of ``_committed/``)."""
        markers = io.list_files(
            io.join(self.output_url, "_committed"), suffix=".json", s3_endpoint=self.s3_endpoint
        )
        return {m.rsplit("/", 1)[-1][: -len(".json")] for m in markers}

    def read_marker(self, shard_name: str) -> dict[str, Any]:
        return json.loads(io.read_bytes(self.marker_url(shard_name), s3_endpoint=self.s3_endpoint))

    def missing_file_error(self, shard_name: str) -> MissingShardFileError:
        """The error for a committed shard whose Parquet file is missing: names both files and
        what to do."""
        where = io.redact(self.output_url)
        return MissingShardFileError(
            f"shard {io.safe_for_log(shard_name)} of {where} is committed (marker _committed/{shard_name}.json) but "
            f"its Parquet file {shard_name}.parquet is missing (deleted after the commit?). Rerun the label job on "
            f"{where}: it relabels such shards; or delete that marker to drop the shard from the output.")

    def markers_without_parquet(self, committed: set[str] | None = None) -> list[str]:
        """Committed shards whose Parquet file is missing (one or two listings, no per-shard
        request); ``committed``: the committed shard names, when the caller has listed them."""
        present = {u.rsplit("/", 1)[-1][: -len(".parquet")]
                   for u in io.list_files(self.output_url, suffix=".parquet", s3_endpoint=self.s3_endpoint)}
        return sorted((self.committed_shards() if committed is None else committed) - present)

    def committed_parquet_urls(self) -> list[str]:
        """The Parquet files readers should consume: those with a commit marker."""
        return [self.parquet_url(name) for name in sorted(self.committed_shards())]

    def commit(self, shard_name: str, table: pa.Table, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``<output>/<shard>.parquet`` atomically, then the marker; return the marker.

        The marker holds ``shard``, ``parquet`` (file name), ``num_rows``, ``num_ok``,
        ``num_error``, ``num_instances``, ``parquet_bytes``, ``sha256``, ``committed_at`` (UTC ISO)
        and ``stats`` (whatever the caller passes: timings, shard damage, warnings...).
        """
        table = conform_table(table)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        io.atomic_write_bytes(self.parquet_url(shard_name), data, s3_endpoint=self.s3_endpoint)
        marker = {
            "shard": shard_name,
            "parquet": f"{shard_name}.parquet",
            **_table_counts(table),
            "parquet_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "committed_at": _now(),
            "stats": io.redact_config(dict(stats or {})),
        }
        payload = json.dumps(marker, indent=1, sort_keys=True, default=str).encode()
        io.atomic_write_bytes(self.marker_url(shard_name), payload, s3_endpoint=self.s3_endpoint)
        return marker

    def cleanup_temporaries(self, committed: set[str] | None = None) -> list[str]:
        """Delete temporaries and uncommitted Parquet files; return the deleted URLs.

        Call it at job start, before any committer of this output runs: a Parquet file without a
        marker is only garbage when nobody is between writing it and writing its marker.
        ``committed``: the committed shard names, when the caller has listed them already.
        """
        committed = self.committed_shards() if committed is None else committed
        removed = []
        for folder in (self.output_url, io.join(self.output_url, "_committed")):
            for url in io.list_files(folder, s3_endpoint=self.s3_endpoint):
                name = url.rsplit("/", 1)[-1]
                stray_parquet = (
                    folder == self.output_url and name.endswith(".parquet") and name[:-8] not in committed
                )
                if _TMP_RE.match(name) or stray_parquet:
                    io.remove(url, s3_endpoint=self.s3_endpoint)
                    removed.append(url)
        return removed

    def delete_all(self) -> list[str]:
        """Delete every file the label job owns here (markers first, so that an interrupted
        delete never leaves a marker without its Parquet file); other files are left alone."""
        names = sorted(self.committed_shards())
        targets = [self.marker_url(n) for n in names] + [self.parquet_url(n) for n in names]
        removed = []
        for url in targets:
            io.remove(url, s3_endpoint=self.s3_endpoint)
            removed.append(url)
        removed += self.cleanup_temporaries()
        # The label job's statistics and summary describe the deleted shards: they go too.
        stats_dir = io.join(self.output_url, "_stats")
        stale = io.list_files(stats_dir, s3_endpoint=self.s3_endpoint)
        io.remove_tree(stats_dir, s3_endpoint=self.s3_endpoint)
        removed += stale
        for name in ("_stats.json", "_summary.json"):
            url = io.join(self.output_url, name)
            if io.exists(url, s3_endpoint=self.s3_endpoint):
                io.remove(url, s3_endpoint=self.s3_endpoint)
                removed.append(url)
        record_url = io.join(self.output_url, RUN_RECORD_NAME)
        if io.exists(record_url, s3_endpoint=self.s3_endpoint):
            io.remove(record_url, s3_endpoint=self.s3_endpoint)
            removed.append(record_url)
        return removed


def conform_table(table: pa.Table) -> pa.Table:
    """``table`` with exactly OUTPUT_SCHEMA (same columns and types; nullability and metadata may
    differ, as they do after a trip through Ray Data). A table of an older schema version (no
    ``warnings`` column) gets a null one."""
    if table.schema.equals(OUTPUT_SCHEMA):
        return table
    if "warnings" not in table.column_names:
        table = table.append_column("warnings", pa.nulls(table.num_rows, OUTPUT_SCHEMA.field("warnings").type))
    try:
        return table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    except (KeyError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"table does not match OUTPUT_SCHEMA ({e}); build it with rows_to_table()") from None


def _check_shard_name(name: str) -> str:
    if not name or name in (".", "..") or not _SHARD_NAME_RE.match(name):
        raise ValueError(f"invalid shard name {name!r}")
    return name


# --- run record ----------------------------------------------------------------------------------

RUN_RECORD_NAME = "_run.json"


class RunMismatchError(RuntimeError):
    """The output folder holds results of a different run (model, weights, vocabulary...)."""


@dataclass
class RunRecord:
    """What produced an output folder.

    ``identity`` must be equal for a rerun to continue into the same folder (model and weight
    hashes, vocabulary hash, thresholds, random-init flag, ...); ``details`` is informative
    (resolved config, code version, start time...). Both are stored with credentials redacted.
    """

    identity: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return io.redact_config(
            {"identity": self.identity, "details": self.details, "created_at": self.created_at}
        )

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> RunRecord:
        return cls(identity=obj.get("identity", {}), details=obj.get("details", {}),
                   created_at=obj.get("created_at", ""))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    missing = object()
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def check_or_write_run_record(
    output_url: str, record: RunRecord, *, overwrite: bool = False, s3_endpoint: str | None = None
) -> str:
    """Check ``record`` against ``<output>/_run.json`` before a label job writes anything.

    Returns ``"created"`` (fresh folder: record written), ``"resumed"`` (same identity: continue,
    committed shards will be skipped) or ``"overwritten"`` (``overwrite=True``: the old run's
    Parquet files, markers, temporaries and record were deleted and the new record written).
    Raises :class:`RunMismatchError` naming the differing identity fields, or when the folder holds
    committed shards but no run record.
    """
    record_url = io.join(output_url, RUN_RECORD_NAME)
    committer = ShardCommitter(output_url, s3_endpoint=s3_endpoint)
    new = json.loads(json.dumps(record.to_dict(), sort_keys=True, default=str))
    if io.exists(record_url, s3_endpoint=s3_endpoint):
        old = json.loads(io.read_bytes(record_url, s3_endpoint=s3_endpoint))
        diff = _identity_diff(old.get("identity", {}), new["identity"])
        if not diff:
            return "resumed"
        problem = "differs from the run that wrote it: " + "; ".join(diff)
    elif committer.committed_shards():
        problem = "holds committed shards but no run record"
    else:
        _write_record(record_url, new, s3_endpoint)
        return "created"
    if not overwrite:
        raise RunMismatchError(
            f"output {io.redact(output_url)} {problem}. Use a new output location, or pass "
            "overwrite=True (--overwrite) to delete the old results and start over."
        )
    committer.delete_all()
    _write_record(record_url, new, s3_endpoint)
    return "overwritten"


def _write_record(url: str, record: dict[str, Any], s3_endpoint: str | None) -> None:
    payload = json.dumps(record, indent=1, sort_keys=True).encode()
    io.atomic_write_bytes(url, payload, s3_endpoint=s3_endpoint)
