"""Write export output files: whole files that readers see complete or not at all, and many
small ones."""

from __future__ import annotations

import contextlib
import io as _io
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

from ovsam_ray import storage

__all__ = ["open_output", "write_file"]


@contextlib.contextmanager
def open_output(url: str, mode: str = "w", *, s3_endpoint: str | None = None) -> Iterator[IO[Any]]:
    """Write a file that readers see complete or not at all: locally a hidden temporary file
    renamed over the target at the end; on S3 one upload that becomes visible when closed. An
    exception leaves no file behind (S3 multipart uploads are aborted by fsspec)."""
    fs, path = storage.get_filesystem(url, s3_endpoint=s3_endpoint)
    if storage.is_remote(url):
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


def write_file(url: str, data: bytes, *, s3_endpoint: str | None = None) -> None:
    """Write one small output file (many per export: no fsync, no temporary name)."""
    fs, path = storage.get_filesystem(url, s3_endpoint=s3_endpoint)
    if not storage.is_remote(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.islink(path):  # a file of ours swapped for a link: replace the link, never write through it
            os.unlink(path)
    fs.pipe_file(path, data)
