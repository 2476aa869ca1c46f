"""The images of a label output's input shards: their file extensions, and copies of them made
one shard at a time under the names :func:`~ovsam_ray.export.paths.data_file_name` gives."""

from __future__ import annotations

import logging
import tarfile

from ovsam_ray import storage
from ovsam_ray.data.shards import IMAGE_EXTENSIONS, iter_shard_samples, split_member_name
from ovsam_ray.export.output import write_file
from ovsam_ray.export.paths import data_file_name
from ovsam_ray.labels.reader import source_shards

__all__ = ["ImageCopier", "ImageExts", "output_folder", "shard_image_exts"]

log = logging.getLogger(__name__)


class ImageCopier:
    """``add(shard, key)`` for each labelled image, in output order; a shard's images are written to
    ``<folder>/<data_file_name(shard, key, ext)>`` (the shard's own bytes and extension) once the
    rows move on to the next shard, so memory holds one shard's keys. ``close()`` copies the last
    shard and returns the number of images written; ``missing`` counts the images not found
    (their shard is unknown, or the key is not in it), each logged."""

    def __init__(self, urls: dict[str, str], folder: str, *, s3_endpoint: str | None = None) -> None:
        self.urls, self.folder, self.s3_endpoint = urls, folder, s3_endpoint
        self.pending: dict[str, set[str]] = {}
        self.written = 0
        self.missing = 0

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
                log.warning("no input shard %s: its %d images are not copied", storage.safe_for_log(shard), len(keys))
                self.missing += len(keys)
                continue
            for s in iter_shard_samples(url, s3_endpoint=self.s3_endpoint):
                if s["key"] in keys and s["image_bytes"] is not None:
                    target = storage.join(self.folder, data_file_name(shard, s["key"], s["image_ext"]))
                    write_file(target, s["image_bytes"], s3_endpoint=self.s3_endpoint)
                    keys.discard(s["key"])
                    self.written += 1
            if keys:
                log.warning(
                    "shard %s: %d labelled images not found in it, not copied (first: %s)",
                    storage.safe_for_log(shard),
                    len(keys),
                    storage.safe_for_log(min(keys), limit=80),
                )
                self.missing += len(keys)


def output_folder(url: str) -> str:
    """The folder holding the file ``url`` (local path or ``s3://`` URL)."""
    head = url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."
    return head or "/"


def shard_image_exts(shard_url: str, *, s3_endpoint: str | None = None) -> dict[str, str]:
    """Key -> image extension (``jpg``, ``png``...) of one WebDataset shard (plain or gzip), read
    from the tar headers only (tarfile seeks over the member data). The keys and the member chosen
    follow the tar reader's rules (names made UTF-8-safe, links count, the first image member of a
    key is the one labelled), so the extension is the one of the file an export copies. A
    damaged tar gives the keys before the damage."""
    out: dict[str, str] = {}
    with storage.open_url(shard_url, "rb", s3_endpoint=s3_endpoint) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:*", encoding="utf-8", errors="surrogateescape") as tf:
                for member in tf:
                    if not (member.isfile() or member.islnk() or member.issym()):
                        continue
                    parts = split_member_name(storage.safe_text(member.name))
                    if parts is not None and parts[1] in IMAGE_EXTENSIONS:
                        out.setdefault(*parts)
        except (tarfile.TarError, EOFError) as e:
            log.warning("%s: %s (image names after it are unknown)", storage.redact(shard_url), e)
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
