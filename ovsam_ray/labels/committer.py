"""The commit protocol: one Parquet file per input shard, written atomically, its marker last.

A shard is committed iff its marker ``<output>/_committed/<shard>.json`` exists; a Parquet file
of one of the run's shards without a marker is left over from a crash and is deleted or
overwritten by the next run of the same run record; a file of any other name is never deleted.
Temporary files start with ``.`` and committed-marker and run-record names with ``_``, so
``pyarrow.dataset``/``pandas.read_parquet(<output>)`` and ``*.parquet`` globs only ever see
complete Parquet files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Collection
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovsam_ray import storage
from ovsam_ray.errors import OVSAMRayError
from ovsam_ray.labels.schema import RUN_RECORD_NAME, conform_table, timestamp

__all__ = ["MissingShardFileError", "ShardCommitter"]

log = logging.getLogger(__name__)


def _table_counts(table: pa.Table) -> dict[str, int]:
    def count(mask: pa.ChunkedArray) -> int:
        return int(pc.sum(mask).as_py() or 0)

    return {
        "num_rows": table.num_rows,
        "num_ok": count(pc.equal(table["status"], "ok")),
        "num_error": count(pc.equal(table["status"], "error")),
        "num_instances": count(pc.list_value_length(table["instances"])),
    }


_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
_SHARD_NAME_RE = re.compile(r"^[^/\\]+$")


class MissingShardFileError(OVSAMRayError, FileNotFoundError):
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
        return storage.join(self.output_url, f"{_check_shard_name(shard_name)}.parquet")

    def marker_url(self, shard_name: str) -> str:
        return storage.join(self.output_url, "_committed", f"{_check_shard_name(shard_name)}.json")

    def is_committed(self, shard_name: str) -> bool:
        return storage.exists(self.marker_url(shard_name), s3_endpoint=self.s3_endpoint)

    def committed_shards(self) -> set[str]:
        """Names of all committed shards (one listing of ``_committed/``)."""
        markers = storage.list_files(
            storage.join(self.output_url, "_committed"), suffix=".json", s3_endpoint=self.s3_endpoint
        )
        return {m.rsplit("/", 1)[-1][: -len(".json")] for m in markers}

    def read_marker(self, shard_name: str) -> dict[str, Any]:
        return json.loads(storage.read_bytes(self.marker_url(shard_name), s3_endpoint=self.s3_endpoint))

    def missing_file_error(self, shard_name: str) -> MissingShardFileError:
        """The error for a committed shard whose Parquet file is missing: names both files and
        what to do."""
        where = storage.redact(self.output_url)
        return MissingShardFileError(
            f"shard {storage.safe_for_log(shard_name)} of {where} is committed "
            f"(marker _committed/{shard_name}.json) but its Parquet file {shard_name}.parquet is missing "
            "(deleted after the commit?). Rerun the label job on "
            f"{where}: it relabels such shards; or delete that marker to drop the shard from the output."
        )

    def markers_without_parquet(self, committed: set[str] | None = None) -> list[str]:
        """Committed shards whose Parquet file is missing (one or two listings, no per-shard
        request); ``committed``: the committed shard names, when the caller has listed them."""
        present = {
            u.rsplit("/", 1)[-1][: -len(".parquet")]
            for u in storage.list_files(self.output_url, suffix=".parquet", s3_endpoint=self.s3_endpoint)
        }
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
        storage.atomic_write_bytes(self.parquet_url(shard_name), data, s3_endpoint=self.s3_endpoint)
        marker = {
            "shard": shard_name,
            "parquet": f"{shard_name}.parquet",
            **_table_counts(table),
            "parquet_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "committed_at": timestamp(),
            "stats": storage.redact_config(dict(stats or {})),
        }
        payload = json.dumps(marker, indent=1, sort_keys=True, default=str).encode()
        storage.atomic_write_bytes(self.marker_url(shard_name), payload, s3_endpoint=self.s3_endpoint)
        return marker

    def cleanup_temporaries(self, shards: Collection[str], committed: set[str] | None = None) -> list[str]:
        """Delete what a crashed run of this folder's own run left behind; return the deleted URLs.

        Deleted: our temporaries (``.<name>.tmp-<uuid>``) and ``<shard>.parquet`` without a marker
        for a shard in ``shards`` (this run's input, whose run record the caller has checked is the
        folder's own). Any other file is never ours to delete: a user's ``notes.parquet``, the
        converter's ``_image_classes.parquet``. Call it at job start, before any committer of this
        output runs (a Parquet file without a marker is only garbage when nobody is between writing
        it and writing its marker). ``committed``: the committed shard names, when already listed.
        """
        committed = self.committed_shards() if committed is None else committed
        strays = {f"{n}.parquet" for n in shards if n not in committed}
        removed = []
        for folder in (self.output_url, storage.join(self.output_url, "_committed")):
            for url in storage.list_files(folder, s3_endpoint=self.s3_endpoint):
                name = url.rsplit("/", 1)[-1]
                if _TMP_RE.match(name) or (folder == self.output_url and name in strays):
                    log.info(
                        "deleting %s (left behind by an interrupted run)", storage.safe_for_log(storage.redact(url))
                    )
                    storage.remove(url, s3_endpoint=self.s3_endpoint)
                    removed.append(url)
        return removed

    def delete_all(self, shards: Collection[str] = ()) -> list[str]:
        """Delete the old run's results here: its committed shards (markers first, so that an
        interrupted delete never leaves a marker without its Parquet file), temporaries and strays
        of ``shards`` (see :meth:`cleanup_temporaries`), per-shard statistics, ``_stats.json``,
        ``_summary.json`` and the run record. Files of any other name are left alone."""
        names = sorted(self.committed_shards())
        targets = [self.marker_url(n) for n in names] + [self.parquet_url(n) for n in names]
        # The label job's statistics and summary describe the deleted shards: they go too.
        targets += storage.list_files(
            storage.join(self.output_url, "_stats"), suffix=".json", s3_endpoint=self.s3_endpoint
        )
        fixed = (storage.join(self.output_url, n) for n in ("_stats.json", "_summary.json", RUN_RECORD_NAME))
        targets += [u for u in fixed if storage.exists(u, s3_endpoint=self.s3_endpoint)]
        for url in targets:
            storage.remove(url, s3_endpoint=self.s3_endpoint)
        log.info(
            "--overwrite: deleted %d files of the previous run in %s (%d committed shards)",
            len(targets),
            storage.redact(self.output_url),
            len(names),
        )
        return targets + self.cleanup_temporaries(shards, committed=set())


def _check_shard_name(name: str) -> str:
    if not name or name in (".", "..") or not _SHARD_NAME_RE.match(name):
        raise ValueError(f"invalid shard name {name!r}")
    return name
