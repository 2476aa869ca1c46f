"""The label job's result path, on the workers: rows -> part files -> one committed shard.

The model stage's rows never reach the driver. A CPU task (:func:`write_parts`) writes each
batch's rows of a shard as one part file under ``<output>/_parts/<shard>/`` and returns one small
metadata row per part; the driver adds up row counts per shard and, once a shard's rows are all
written, starts :func:`commit_shard` (a Ray task), which reads that shard's parts — only the ones
the driver was told about — keeps one row per image index, checks that every index of the shard
is there, and commits the shard's Parquet file and marker (``ShardCommitter``), then its
statistics, then deletes the parts.

Exactly once: a part written by a task attempt that died is never named to the driver (it is
garbage, deleted with the shard's parts folder); a row seen twice (a retried task whose first
output did arrive) is kept once, by index; a shard commits only when indices 0..total-1 are all
present; a commit task killed midway is retried by Ray and rewrites the same file (the marker is
still written last); a driver killed before a marker leaves parts that the next run deletes
(:func:`remove_all_parts`, at start-up, before anything is written) and recomputes.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovsam_ray import storage
from ovsam_ray.errors import OVSAMRayError
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.schema import OUTPUT_SCHEMA
from ovsam_ray.pipeline.faults import install_full_disk, maybe_fail
from ovsam_ray.pipeline.stages import SHARD_EMPTY, SHARD_FAILED
from ovsam_ray.pipeline.stats import table_stats, write_shard_stats

log = logging.getLogger(__name__)
install_full_disk()  # a test's simulated full disk (off unless the environment asks)

PARTS_DIR = "_parts"
# Commits are retried on top of the S3 client's own retries (which ride out ~9 s), so that a
# short object-store outage costs time, not the job; a longer one ends it with a clear error.
COMMIT_ATTEMPTS = 3
COMMIT_BACKOFF_S = 2.0
# Error rows named in the worker's log per shard (all of them are in the Parquet file).
LOGGED_ERRORS = 20

#: One row per part (or per whole-shard event) — all the driver ever sees of the rows. ``damage``
#: and ``skipped`` are the shard's (see stages.DECODED_SCHEMA), passed on to its commit task.
PART_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("kind", pa.string()),
        ("part", pa.string()),
        ("rows", pa.int64()),
        ("total", pa.int64()),
        ("damage", pa.string()),
        ("skipped", pa.string()),
        ("errors", pa.int64()),
        ("masks", pa.int64()),
    ]
)

# A part file: output rows plus their shard index and prompt count (for the statistics).
_PART_EXTRA = ["index", "num_prompts"]
_PART_FILE_SCHEMA = pa.schema(
    list(OUTPUT_SCHEMA) + [pa.field("index", pa.int32()), pa.field("num_prompts", pa.int32())]
)
# Rows whose warnings the commit task logs per shard (all are in the Parquet file).
LOGGED_WARNINGS = 5


class StorageUnavailableError(OVSAMRayError, RuntimeError):
    """The output storage stayed unreachable through every retry of a shard's commit."""


# Storage errors no retry can mend within seconds: a full disk, a quota, a read-only filesystem.
_FINAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_RERUN = (
    "shards committed by this run (and any before it) are complete and kept; a shard is committed only "
    "once its marker is written. Rerun the same command when the storage {}: it skips the committed shards "
    "and labels the rest."
)


def with_storage_retries(what: str, write: Callable[[], Any], *, committed: int | None = None) -> Any:
    """Run one storage write (``what``: "commit shard X"), retried with backoff; a full disk or
    a read-only filesystem ends it at once. Raises :class:`StorageUnavailableError` (one line: what,
    the path and the error)."""
    t0 = time.time()
    done = "The" if committed is None else f"The {committed}"
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            return write()
        except (ValueError, FileNotFoundError):  # a bad table, a missing file: retrying cannot help
            raise
        except Exception as e:  # noqa: BLE001 - storage clients raise many types; all are retried
            error = storage.safe_for_log(f"{type(e).__name__}: {storage.redact(str(e))}", limit=500)
            if isinstance(e, OSError) and e.errno in _FINAL_ERRNOS:
                raise StorageUnavailableError(
                    f"could not {what}: {error}. {done} " + _RERUN.format("has room again")
                ) from None
            log.warning("%s failed (attempt %d/%d): %s", what, attempt + 1, COMMIT_ATTEMPTS, error)
            if attempt + 1 == COMMIT_ATTEMPTS:
                raise StorageUnavailableError(
                    f"could not {what} ({COMMIT_ATTEMPTS} attempts in {time.time() - t0:.0f}s; last error {error}). "
                    f"{done} " + _RERUN.format("is reachable again")
                ) from None
            time.sleep(COMMIT_BACKOFF_S * 2**attempt)


def parts_url(output: str, shard: str | None = None) -> str:
    root = storage.join(output, PARTS_DIR)
    return root if shard is None else storage.join(root, shard)


def write_parts(batch: pa.Table, *, output: str, s3_endpoint: str | None = None) -> pa.Table:
    """map_batches (CPU task): RESULT rows -> one part file per shard in the batch; returns
    PART_SCHEMA rows (whole-shard events pass through as rows of kind "failed"/"empty")."""
    meta: list[dict[str, Any]] = []
    status = batch.column("status")
    for kind in (SHARD_FAILED, SHARD_EMPTY):
        for row in batch.filter(pc.equal(status, kind)).select(["shard", "shard_damage", "shard_skipped"]).to_pylist():
            meta.append(
                {
                    "shard": row["shard"],
                    "kind": kind.removeprefix("shard_"),
                    "part": "",
                    "rows": 0,
                    "total": 0,
                    "damage": row["shard_damage"],
                    "skipped": row["shard_skipped"] or "",
                    "errors": 0,
                    "masks": 0,
                }
            )
    rows = batch.filter(pc.invert(pc.is_in(status, pa.array([SHARD_FAILED, SHARD_EMPTY]))))
    for shard in pc.unique(rows.column("shard")).to_pylist():
        part = rows.filter(pc.equal(rows.column("shard"), shard))
        url = storage.join(parts_url(output, shard), f"{uuid.uuid4().hex}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(part.select(OUTPUT_SCHEMA.names + _PART_EXTRA), sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        with_storage_retries(
            f"write the part file {storage.redact(url)} of shard {storage.safe_for_log(shard)}",
            functools.partial(storage.atomic_write_bytes, url, data, s3_endpoint=s3_endpoint),
        )
        maybe_fail("part_written")
        meta.append(
            {
                "shard": shard,
                "kind": "part",
                "part": url,
                "rows": part.num_rows,
                "total": part.column("shard_total")[0].as_py(),
                "damage": part.column("shard_damage")[0].as_py() or "",
                "skipped": part.column("shard_skipped")[0].as_py() or "",
                "errors": int(pc.sum(pc.equal(part.column("status"), "error")).as_py() or 0),
                "masks": int(pc.sum(pc.list_value_length(part.column("instances"))).as_py() or 0),
            }
        )
    return pa.Table.from_pylist(meta, schema=PART_SCHEMA)


def _read_parts(urls: list[str], s3_endpoint: str | None) -> pa.Table:
    tables = [pq.read_table(pa.BufferReader(storage.read_bytes(u, s3_endpoint=s3_endpoint))) for u in urls]
    return pa.concat_tables(tables) if tables else _PART_FILE_SCHEMA.empty_table()


def _one_row_per_index(table: pa.Table) -> pa.Table:
    index = table.column("index").to_numpy()
    order = np.argsort(index, kind="stable")
    first = np.ones(len(order), bool)
    first[1:] = index[order][1:] != index[order][:-1]
    return table.take(pa.array(order[first]))


def commit_shard(
    output: str,
    shard: str,
    parts: list[str],
    total: int,
    damage: str,
    *,
    skipped: str = "",
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """Ray task: compact ``parts`` into the committed ``<output>/<shard>.parquet`` (rows in shard
    order), its marker and statistics; delete the parts. ``skipped``: the reader's JSON
    ``{reason: count}`` of members that gave no row (or ""). Returns counts for the job summary,
    or ``{"shard", "missing": n}`` (nothing written) when the parts do not cover every image."""
    committer = ShardCommitter(output, s3_endpoint=s3_endpoint)
    where = storage.redact(output)
    # Reads ride out a storage blip like the writes below (a task that raised is not retried by Ray).
    marker = with_storage_retries(
        f"read the marker of shard {storage.safe_for_log(shard)} in {where}",
        lambda: committer.read_marker(shard) if committer.is_committed(shard) else None,
    )
    if marker is not None and marker.get("num_rows") == total:  # a retry of a commit that got as far as the marker
        _remove_quietly(parts_url(output, shard), s3_endpoint)
        return _result(marker, damage, [], [])
    table = _one_row_per_index(
        with_storage_retries(
            f"read the parts of shard {storage.safe_for_log(shard)} in {where}", lambda: _read_parts(parts, s3_endpoint)
        )
    )
    index = table.column("index").to_numpy()
    if table.num_rows != total or (total and (index[0] != 0 or index[-1] != total - 1)):
        return {"shard": shard, "missing": total - table.num_rows}
    stats = table_stats(table, members_skipped=json.loads(skipped) if skipped else {})
    table = table.select(OUTPUT_SCHEMA.names)
    marker_stats = {"damage": damage or None, "committed_by": "label_job", **{k: stats[k] for k in _MARKER_STATS}}
    maybe_fail("before_commit")
    marker = with_storage_retries(
        f"commit shard {storage.safe_for_log(shard)} ({storage.redact(committer.parquet_url(shard))}, "
        f"then its marker {storage.redact(committer.marker_url(shard))})",
        lambda: committer.commit(shard, table, marker_stats),
    )
    with_storage_retries(
        f"write the statistics {storage.redact(storage.join(output, '_stats', shard + '.json'))}",
        lambda: write_shard_stats(output, shard, stats, s3_endpoint=s3_endpoint),
    )
    maybe_fail("after_commit")
    _remove_quietly(parts_url(output, shard), s3_endpoint)
    errors = table.filter(pc.equal(table.column("status"), "error")).select(["key", "error"]).slice(0, LOGGED_ERRORS)
    for row in errors.to_pylist():
        log.warning(
            "error row %s/%s: %s",
            storage.safe_for_log(shard),
            storage.safe_for_log(row["key"], limit=120),
            storage.safe_for_log(row["error"]),
        )
    warned = table.filter(pc.fill_null(pc.greater(pc.list_value_length(table.column("warnings")), 0), False))
    warned = warned.select(["key", "warnings"]).slice(0, LOGGED_WARNINGS).to_pylist()
    for row in warned:
        log.warning(
            "prompt warnings %s/%s: %s",
            storage.safe_for_log(shard),
            storage.safe_for_log(row["key"], limit=120),
            storage.safe_for_log("; ".join(row["warnings"])),
        )
    return _result(marker, damage, errors.slice(0, 3).to_pylist(), warned[:3], stats)


# Counts a shard's marker keeps (so a retried commit task can report them without the table).
_MARKER_STATS = ("images_with_warnings", "images_no_prompts", "images_all_filtered", "members_skipped")


def _result(
    marker: dict[str, Any], damage: str, errors: list[dict], warned: list[dict], stats: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What the driver learns of a committed shard: counts, a few error and warning rows, the
    shard's statistics (None when a retried commit found it done: the run statistics re-read them)."""
    extra = marker.get("stats") or {}
    return {
        "shard": marker["shard"],
        "ok": marker["num_ok"],
        "error": marker["num_error"],
        "masks": marker["num_instances"],
        "damage": damage,
        "errors_sample": errors,
        "warnings_sample": warned,
        "warned": extra.get("images_with_warnings", 0),
        "no_prompts": extra.get("images_no_prompts", 0),
        "all_filtered": extra.get("images_all_filtered", 0),
        "skipped": extra.get("members_skipped") or {},
        "stats": stats,
    }


def _remove_quietly(url: str, s3_endpoint: str | None) -> None:
    try:
        storage.remove_tree(url, s3_endpoint=s3_endpoint)
    except Exception as e:  # noqa: BLE001 - leftover parts are garbage the next run deletes
        log.warning("could not delete the parts in %s (the next run deletes them): %s", storage.redact(url), e)


def remove_all_parts(output: str, *, s3_endpoint: str | None = None) -> None:
    """Delete every part file under ``output`` (call at start-up, before any part is written)."""
    storage.remove_tree(parts_url(output), s3_endpoint=s3_endpoint)
