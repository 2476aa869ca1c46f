"""Faults for the label job's exactly-once and failure tests (off unless the environment names them).

``OVSAM_RAY_FAULTS="point[,point...]"`` makes the process that reaches a named point exit at once
(as a SIGKILL would), the first time only: a flag file in ``OVSAM_RAY_FAULTS_DIR`` records that it
fired, so the retry that follows goes through. Points: ``part_written`` (a worker, after writing a
part file, before reporting it), ``before_commit`` / ``after_commit`` (a commit task, before the
shard's Parquet file / after its marker), ``driver_before_commit`` (the driver, once a shard's
parts are all written, before it starts the commit). ``point:sleep=S`` sleeps S seconds there
instead, every time (a slow job, to stop it midway).

``OVSAM_RAY_FULL_DISK="pattern"`` makes every write of a file whose path matches the ``fnmatch``
pattern (``*/_parts/*``, ``*/_committed/*``...) fail as a full disk does (``OSError`` ENOSPC),
in every process that imports the label job's write path (the environment reaches Ray workers).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import time
from typing import Any


def _armed(point: str) -> str | None:
    """The action named for ``point`` ("" for the default exit), or None when not armed."""
    for entry in os.environ.get("OVSAM_RAY_FAULTS", "").split(","):
        name, _, action = entry.partition(":")
        if name == point:
            return action
    return None


def maybe_fail(point: str) -> None:
    action = _armed(point)
    if action is None:
        return
    if action.startswith("sleep="):
        time.sleep(float(action.removeprefix("sleep=")))
        return
    flag = os.path.join(os.environ.get("OVSAM_RAY_FAULTS_DIR", "."), f"fired-{point}")
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(137)


def install_full_disk() -> None:
    """With ``OVSAM_RAY_FULL_DISK`` set, make ``storage.atomic_write_bytes`` fail with ENOSPC for the
    matching paths (once per process; every write path of the job goes through that function)."""
    pattern = os.environ.get("OVSAM_RAY_FULL_DISK")
    from ovsam_ray import storage

    if not pattern or getattr(storage.atomic_write_bytes, "full_disk", False):
        return
    write = storage.atomic_write_bytes

    def full_disk_write(url: str, data: bytes, **kwargs: Any) -> None:
        if fnmatch.fnmatch(url, pattern):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), url)
        write(url, data, **kwargs)

    full_disk_write.full_disk = True  # type: ignore[attr-defined]
    storage.atomic_write_bytes = full_disk_write
