"""Copy labelled images out of their input shards, one shard at a time, under checked names."""

from __future__ import annotations

import logging

from ovsam_ray.data.shards import iter_shard_samples
from ovsam_ray.export._paths import _safe_join
from ovsam_ray.export.reader import write_file

__all__ = ["ImageCopier", "output_folder"]

log = logging.getLogger(__name__)


class ImageCopier:
    """``add(shard, key)`` for each labelled image, in output order; a shard's images are written to
    ``<folder>/<shard>/<key>.<ext>`` (the shard's own bytes and extension) once the rows move on to
    the next shard, so memory holds one shard's keys. ``close()`` copies the last shard and returns
    the number of images written."""

    def __init__(self, urls: dict[str, str], folder: str, *, s3_endpoint: str | None = None) -> None:
        self.urls, self.folder, self.s3_endpoint = urls, folder, s3_endpoint
        self.pending: dict[str, set[str]] = {}
        self.written = 0

    def add(self, shard: str, key: str) -> None:
        self._flush(keep=shard)
        self.pending.setdefault(shard, set()).add(key)

    def close(self) -> int:
        self._flush()
        return self.written

    def _flush(self, keep: str | None = None) -> None:
        for shard in [s for s in self.pending if s != keep]:
            keys = self.pending.pop(shard)
            url = self.urls.get(shard)
            if url is None:
                log.warning("no input shard %s: its images are not copied", shard)
                continue
            for s in iter_shard_samples(url, s3_endpoint=self.s3_endpoint):
                if s["key"] in keys and s["image_bytes"] is not None:
                    target = _safe_join(self.folder, shard, f"{s['key']}.{s['image_ext']}")
                    write_file(target, s["image_bytes"], s3_endpoint=self.s3_endpoint)
                    self.written += 1


def output_folder(url: str) -> str:
    """The folder holding the file ``url`` (local path or ``s3://`` URL)."""
    head = url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."
    return head or "/"
