"""Stream a label job's output: committed Parquet files, batch by batch (bounded memory).

Only shards with a commit marker are read (a Parquet file without one is left over from a crash,
or is being written right now); a label output with our run record but no committed shard yet is
refused, never read as "every Parquet file"; a folder of Parquet files without markers and without
a run record (written by other tools with the same schema) is read whole. Memory holds one
record batch at a time, never the whole output. :func:`source_shards` finds the input shards a
label output was made from.

Review corrections (:mod:`ovsam_ray.labels.overlays`, ``<labels>/_corrections/``) are applied to
the rows read, by default; ``corrections=False`` (or :func:`raw_output` around any reader, which is
what ``--raw`` of the commands does) reads the output as the label job committed it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow.parquet as pq

from ovsam_ray import storage
from ovsam_ray.data.shards import list_shards, shard_names
from ovsam_ray.errors import ConfigError, MissingInputError
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.overlays import Corrections, apply_corrections, load_corrections
from ovsam_ray.labels.run_record import is_own_record, read_run_record

__all__ = [
    "corrections_of",
    "iter_label_batches",
    "iter_label_rows",
    "label_files",
    "raw_output",
    "read_label_file",
    "source_shards",
]

_RAW = contextvars.ContextVar("ovsam_ray_raw_labels", default=False)


@contextlib.contextmanager
def raw_output() -> Iterator[None]:
    """Inside it, every reader of a label output reads it raw: without review corrections."""
    token = _RAW.set(True)
    try:
        yield
    finally:
        _RAW.reset(token)


def corrections_of(labels: str, corrections: bool = True, *, s3_endpoint: str | None = None) -> Corrections:
    """The review corrections readers apply to ``labels``: none when ``corrections`` is False or
    inside :func:`raw_output`."""
    if not corrections or _RAW.get():
        return {}
    return load_corrections(labels, s3_endpoint=s3_endpoint)


def label_files(labels: str, *, s3_endpoint: str | None = None) -> list[str]:
    """Parquet URLs of a label output in shard order: the committed ones, else (a folder without
    our run record: another tool's output) every ``*.parquet`` directly below ``labels`` (or
    ``labels`` itself when it is one file)."""
    committed = ShardCommitter(labels, s3_endpoint=s3_endpoint).committed_parquet_urls()
    if committed:
        return committed
    if is_own_record(read_run_record(labels, s3_endpoint=s3_endpoint)):
        raise MissingInputError(
            f"label output {storage.redact(labels)} has no committed shard yet (its Parquet files "
            "without a marker are unfinished or left over from a crash): wait for the label job, "
            "or rerun it to finish"
        )
    files = storage.list_files(labels, suffix=".parquet", s3_endpoint=s3_endpoint)
    if not files and labels.endswith(".parquet") and storage.exists(labels, s3_endpoint=s3_endpoint):
        files = [labels]
    if not files:
        raise MissingInputError(f"no label files under {storage.redact(labels)} (expected <shard>.parquet files)")
    return files


def read_label_file(
    url: str, *, columns: Sequence[str] | None = None, s3_endpoint: str | None = None, corrections: bool = True
) -> list[dict[str, Any]]:
    """All rows of one label file (one shard) as dicts, with the review corrections of its label
    output (the folder holding it) unless ``corrections=False``."""
    fixes = corrections_of(url.rpartition("/")[0] or ".", corrections, s3_endpoint=s3_endpoint)
    return [row for batch in _iter_file(url, columns, 1024, s3_endpoint, fixes) for row in batch]


def _iter_file(
    url: str, columns: Sequence[str] | None, batch_size: int, s3_endpoint: str | None, fixes: Corrections
) -> Iterator[list[dict[str, Any]]]:
    if fixes and (columns is None or "instances" in columns):
        wanted = list(columns) if columns else None
        extra = [c for c in ("shard", "key") if wanted is not None and c not in wanted]
        for batch in _iter_raw_file(url, wanted + extra if wanted is not None else None, batch_size, s3_endpoint):
            out = []
            for row in batch:
                row = apply_corrections(row, fixes.get((row["shard"], row["key"])))
                for c in extra:
                    row.pop(c, None)
                out.append(row)
            yield out
        return
    yield from _iter_raw_file(url, columns, batch_size, s3_endpoint)


def _iter_raw_file(
    url: str, columns: Sequence[str] | None, batch_size: int, s3_endpoint: str | None
) -> Iterator[list[dict[str, Any]]]:
    fs, path = storage.get_filesystem(url, s3_endpoint=s3_endpoint)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        folder, _, name = url.rpartition("/")
        committer = ShardCommitter(folder, s3_endpoint=s3_endpoint)
        if name.endswith(".parquet") and committer.is_committed(name[: -len(".parquet")]):
            raise committer.missing_file_error(name[: -len(".parquet")]) from None
        raise
    with f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None):
            yield batch.to_pylist()


def iter_label_batches(
    labels: str,
    *,
    columns: Sequence[str] | None = None,
    batch_size: int = 256,
    s3_endpoint: str | None = None,
    corrections: bool = True,
    shards: set[str] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Rows of every label file (of the ``shards`` named, when given), ``batch_size`` at a time,
    in shard and row order, with the review corrections applied unless ``corrections=False``."""
    fixes = corrections_of(labels, corrections, s3_endpoint=s3_endpoint)
    for url in label_files(labels, s3_endpoint=s3_endpoint):
        if shards is not None and url.rpartition("/")[2].removesuffix(".parquet") not in shards:
            continue
        yield from _iter_file(url, columns, batch_size, s3_endpoint, fixes)


def iter_label_rows(
    labels: str,
    *,
    columns: Sequence[str] | None = None,
    batch_size: int = 256,
    s3_endpoint: str | None = None,
    corrections: bool = True,
    shards: set[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows of every label file, one at a time (see :func:`iter_label_batches`)."""
    for batch in iter_label_batches(
        labels,
        columns=columns,
        batch_size=batch_size,
        s3_endpoint=s3_endpoint,
        corrections=corrections,
        shards=shards,
    ):
        yield from batch


def source_shards(labels: str, shards: str | None = None, *, s3_endpoint: str | None = None) -> dict[str, str]:
    """Shard name -> URL of the shards a label output was made from: ``shards`` (any spec
    :func:`~ovsam_ray.data.shards.list_shards` takes) or else the ``input`` in the run record."""
    if shards is None:
        record = read_run_record(labels, s3_endpoint=s3_endpoint)
        if record is None:
            raise MissingInputError(
                f"{storage.redact(labels)} has no _run.json: say where the input shards are (--shards)"
            )
        shards = (record.get("details", {}).get("config") or {}).get("input")
        if not shards:
            raise ConfigError("the run record does not name the input shards: pass --shards")
    urls = list_shards(shards, s3_endpoint=s3_endpoint)
    return dict(zip(shard_names(urls), urls))
