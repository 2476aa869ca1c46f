"""Stream a label job's output: committed Parquet files, batch by batch (bounded memory).

Only shards with a commit marker are read (a Parquet file without one is left over from a crash);
a folder of Parquet files without markers (written by other tools with the same schema) is read
whole. Memory holds one record batch at a time, never the whole output.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import logging
import os
import tarfile
import uuid
from collections.abc import Iterator, Sequence
from typing import IO, Any

import pyarrow.parquet as pq

from ovsam_ray import io
from ovsam_ray.pipeline.writer import RUN_RECORD_NAME, ShardCommitter

log = logging.getLogger(__name__)

__all__ = [
    "ImageExts",
    "iter_label_batches",
    "iter_label_rows",
    "label_files",
    "open_output",
    "read_label_file",
    "run_record",
    "shard_image_exts",
    "source_shards",
    "write_file",
]


def label_files(labels: str, *, s3_endpoint: str | None = None) -> list[str]:
    """Parquet URLs of a label output in shard order: the committed ones, else every ``*.parquet``
    directly below ``labels`` (or ``labels`` itself when it is one file)."""
    committed = ShardCommitter(labels, s3_endpoint=s3_endpoint).committed_parquet_urls()
    if committed:
        return committed
    files = io.list_files(labels, suffix=".parquet", s3_endpoint=s3_endpoint)
    if not files and labels.endswith(".parquet") and io.exists(labels, s3_endpoint=s3_endpoint):
        files = [labels]
    if not files:
        raise FileNotFoundError(f"no label files under {io.redact(labels)} (expected <shard>.parquet files)")
    return files


def read_label_file(url: str, *, columns: Sequence[str] | None = None, s3_endpoint: str | None = None
                    ) -> list[dict[str, Any]]:
    """All rows of one label file (one shard) as dicts."""
    return [row for batch in _iter_file(url, columns, 1024, s3_endpoint) for row in batch]


def _iter_file(url: str, columns: Sequence[str] | None, batch_size: int, s3_endpoint: str | None
               ) -> Iterator[list[dict[str, Any]]]:
    fs, path = io.get_filesystem(url, s3_endpoint=s3_endpoint)
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


def iter_label_batches(labels: str, *, columns: Sequence[str] | None = None, batch_size: int = 256,
                       s3_endpoint: str | None = None) -> Iterator[list[dict[str, Any]]]:
    """Rows of every label file, ``batch_size`` at a time, in shard and row order."""
    for url in label_files(labels, s3_endpoint=s3_endpoint):
        yield from _iter_file(url, columns, batch_size, s3_endpoint)


def iter_label_rows(labels: str, *, columns: Sequence[str] | None = None, batch_size: int = 256,
                    s3_endpoint: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of every label file, one at a time (see :func:`iter_label_batches`)."""
    for batch in iter_label_batches(labels, columns=columns, batch_size=batch_size, s3_endpoint=s3_endpoint):
        yield from batch


@contextlib.contextmanager
def open_output(url: str, mode: str = "w", *, s3_endpoint: str | None = None) -> Iterator[IO[Any]]:
    """Write a file that readers see complete or not at all: locally a hidden temporary file
    renamed over the target at the end; on S3 one upload that becomes visible when closed. An
    exception leaves no file behind (S3 multipart uploads are aborted by fsspec)."""
    fs, path = io.get_filesystem(url, s3_endpoint=s3_endpoint)
    if io.is_remote(url):
        raw = fs.open(path, "wb")
        f = raw if "b" in mode else _io.TextIOWrapper(raw, encoding="utf-8")
        try:
            yield f
        except BaseException:
            discard = getattr(raw, "discard", None)  # s3fs: abort the upload instead of completing it
            if discard is not None:
                with contextlib.suppress(Exception):
                    discard()
            raise
        f.close()
        return
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_record(labels: str, *, s3_endpoint: str | None = None) -> dict[str, Any] | None:
    """The label output's run record (``_run.json``) as a dict, or ``None`` when it has none."""
    url = io.join(labels, RUN_RECORD_NAME)
    if labels.endswith(".parquet") or not io.exists(url, s3_endpoint=s3_endpoint):
        return None
    return json.loads(io.read_bytes(url, s3_endpoint=s3_endpoint))


def source_shards(labels: str, shards: str | None = None, *, s3_endpoint: str | None = None) -> dict[str, str]:
    """Shard name -> URL of the shards a label output was made from: ``shards`` (any spec
    :func:`~ovsam_ray.data.shards.list_shards` takes) or else the ``input`` in the run record."""
    from ovsam_ray.data.shards import list_shards, shard_name

    if shards is None:
        record = run_record(labels, s3_endpoint=s3_endpoint)
        if record is None:
            raise FileNotFoundError(f"{io.redact(labels)} has no _run.json: say where the input shards are (--shards)")
        shards = (record.get("details", {}).get("config") or {}).get("input")
        if not shards:
            raise ValueError("the run record does not name the input shards: pass --shards")
    return {shard_name(u): u for u in list_shards(shards, s3_endpoint=s3_endpoint)}


def shard_image_exts(shard_url: str, *, s3_endpoint: str | None = None) -> dict[str, str]:
    """Key -> image extension (``jpg``, ``png``...) of one WebDataset shard, read from the tar
    headers only (tarfile seeks over the member data). A damaged tar gives the keys before the damage."""
    from ovsam_ray.data.shards import IMAGE_EXTENSIONS, split_member_name

    rank = {e: i for i, e in enumerate(IMAGE_EXTENSIONS)}
    out: dict[str, str] = {}
    with io.open_url(shard_url, "rb", s3_endpoint=s3_endpoint) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for member in tf:
                    parts = split_member_name(member.name) if member.isfile() else None
                    if parts is None or parts[1] not in rank:
                        continue
                    key, ext = parts
                    if key not in out or rank[ext] < rank[out[key]]:  # the member the label job decoded
                        out[key] = ext
        except (tarfile.TarError, EOFError) as e:
            log.warning("%s: %s (image names after it are unknown)", io.redact(shard_url), e)
    return out


class ImageExts:
    """``exts(shard, key)``: the extension of the image ``key`` in its input shard (``None`` when
    the shard or key is unknown). Rows come shard by shard, so one shard's index is held at a time.
    With ``shards`` unknown and no run record naming them, every answer is ``None`` (logged once)."""

    def __init__(self, labels: str, shards: str | None = None, *, s3_endpoint: str | None = None) -> None:
        self.s3_endpoint = s3_endpoint
        try:
            self.urls = source_shards(labels, shards, s3_endpoint=s3_endpoint)
        except (FileNotFoundError, ValueError) as e:
            log.warning("image file extensions unknown (%s)", e)
            self.urls = {}
        self._shard: str | None = None
        self._exts: dict[str, str] = {}

    def __call__(self, shard: str, key: str) -> str | None:
        if shard != self._shard:
            url = self.urls.get(shard)
            self._shard = shard
            self._exts = shard_image_exts(url, s3_endpoint=self.s3_endpoint) if url else {}
        return self._exts.get(key)


def write_file(url: str, data: bytes, *, s3_endpoint: str | None = None) -> None:
    """Write one small output file (many per export: no fsync, no temporary name)."""
    fs, path = io.get_filesystem(url, s3_endpoint=s3_endpoint)
    if not io.is_remote(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)
