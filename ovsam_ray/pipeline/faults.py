"""Crash points for the label job's exactly-once tests (off unless the environment names them).

``OVSAM_RAY_FAULTS="point[,point...]"`` makes the process that reaches a named point exit at once
(as a SIGKILL would), the first time only: a flag file in ``OVSAM_RAY_FAULTS_DIR`` records that it
fired, so the retry that follows goes through. Points: ``part_written`` (a worker, after writing a
part file, before reporting it), ``before_commit`` / ``after_commit`` (a commit task, before the
shard's Parquet file / after its marker), ``driver_before_commit`` (the driver, once a shard's
parts are all written, before it starts the commit).
"""

from __future__ import annotations

import os


def maybe_fail(point: str) -> None:
    names = os.environ.get("OVSAM_RAY_FAULTS")
    if not names or point not in names.split(","):
        return
    flag = os.path.join(os.environ.get("OVSAM_RAY_FAULTS_DIR", "."), f"fired-{point}")
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(137)
