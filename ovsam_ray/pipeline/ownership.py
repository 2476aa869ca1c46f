"""Whose files lie in a label output folder, checked before a job writes or deletes anything there.

A label output is ours once it holds our run record (``_run.json``): from then on the job may
delete what it generates itself there (see :mod:`ovsam_ray.labels.committer`). A folder without
one that holds files of any other name (a user's ``notes.parquet``, an export, a converter's
shards) is refused, unless the user allows it (``--allow-foreign-files``); even then those files
are never deleted, and a file the job would overwrite (``<shard>.parquet`` of one of its shards)
is refused whatever the flag says.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection

from ovsam_ray import io
from ovsam_ray.errors import OVSAMRayError
from ovsam_ray.labels.schema import RUN_RECORD_NAME
from ovsam_ray.pipeline.lease import LEASE_NAME
from ovsam_ray.pipeline.parts import PARTS_DIR

__all__ = ["ALLOW_FOREIGN_FILES_HELP", "ForeignFilesError", "check_output_owned", "foreign_files"]

log = logging.getLogger(__name__)

#: Names our commands write at the top of a label output, and the folders that are wholly ours.
OWN_FILES = frozenset((RUN_RECORD_NAME, "_summary.json", "_stats.json", LEASE_NAME))
OWN_FOLDERS = frozenset(("_committed", "_stats", PARTS_DIR))
# our temporaries: atomic writes (.<name>.tmp-<uuid>) and a stale lease moved aside (.<name>.stale-<uuid>)
_HIDDEN_RE = re.compile(r"^\..+\.(tmp|stale)-[0-9a-f]{32}$")
_SHOWN = 5
#: What ``allow_foreign_files`` (``--allow-foreign-files``) does, for every job that takes it.
ALLOW_FOREIGN_FILES_HELP = ("write into an output folder that holds files no ovsam-ray command wrote (they are left "
                            "alone; without this flag such a folder is refused)")


class ForeignFilesError(OVSAMRayError, ValueError):
    """The output folder holds files that no command of ours wrote, and no run record."""


def foreign_files(output: str, *, s3_endpoint: str | None = None) -> list[str]:
    """Names (relative to ``output``, sorted) of the files below it that none of our commands
    writes: anything but our fixed names, folders, temporaries and ``<shard>.parquet`` files
    whose shard has a commit marker."""
    fs, path = io.get_filesystem(output, s3_endpoint=s3_endpoint)
    base = io.to_url(fs, path).rstrip("/") + "/"
    names = [u[len(base):] for u in io.list_files(output, recursive=True, s3_endpoint=s3_endpoint)
             if u.startswith(base)]
    markers = {n[len("_committed/"):-len(".json")] for n in names if n.startswith("_committed/")}
    return sorted(n for n in names if not _ours(n, markers))


def _ours(name: str, markers: set[str]) -> bool:
    top, _, rest = name.partition("/")
    if rest:
        return top in OWN_FOLDERS
    return name in OWN_FILES or bool(_HIDDEN_RE.match(name)) or (
        name.endswith(".parquet") and name[: -len(".parquet")] in markers)


def check_output_owned(output: str, shards: Collection[str], *, allow_foreign_files: bool,
                       s3_endpoint: str | None = None) -> None:
    """Refuse (:class:`ForeignFilesError`, one line naming a few files) an output folder without
    our run record that holds others' files, unless ``allow_foreign_files``; refuse in any case
    one that holds ``<shard>.parquet`` for a shard in ``shards`` that no marker of ours covers
    (the job would overwrite it)."""
    if io.exists(io.join(output, RUN_RECORD_NAME), s3_endpoint=s3_endpoint):
        return
    foreign = foreign_files(output, s3_endpoint=s3_endpoint)
    if not foreign:
        return
    where = io.redact(output)
    wanted = {f"{s}.parquet" for s in shards}
    clashes = [n for n in foreign if n in wanted]
    if clashes:
        raise ForeignFilesError(f"output {where} holds {_show(clashes)}, which no run of ours wrote and this job "
                                "would overwrite: move them away or choose another output folder")
    if not allow_foreign_files:
        raise ForeignFilesError(f"output {where} holds files that no ovsam-ray command wrote and no run record "
                                f"({_show(foreign)}): choose a new or empty output folder, or pass "
                                "--allow-foreign-files to write beside them (they are left alone)")
    log.warning("output %s holds %d files of others (%s): they are left alone", where, len(foreign), _show(foreign))


def _show(names: list[str]) -> str:
    shown = ", ".join(io.safe_for_log(n, limit=100) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
