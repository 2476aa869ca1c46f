"""Whose files lie in a label output folder, checked before a job writes or deletes anything there.

A label output is ours once it holds our run record (``_run.json``): from then on the job may
delete what it generates itself there (see :mod:`ovsam_ray.labels.committer`). A folder without
one that holds files of any other name (a user's ``notes.parquet``, an export, a converter's
shards) is refused, unless the user allows it (``--allow-foreign-files``); even then those files
are never deleted, and a file the job would overwrite or delete (``<shard>.parquet`` of one of its
shards; without a run record of ours, anything under our own names: ``_summary.json``,
``_stats.json``, ``_committed/``, ``_stats/``, ``_parts/``) is refused whatever the flag says. A
``_run.json`` that is not one of ours is refused (:class:`~ovsam_ray.labels.run_record.RunRecordError`),
and so is a local output whose own names are symbolic links (the job would write or delete through
them, in a folder of someone else's).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection

from ovsam_ray import storage
from ovsam_ray.errors import OVSAMRayError
from ovsam_ray.labels.run_record import load_run_record
from ovsam_ray.labels.schema import RUN_RECORD_NAME
from ovsam_ray.locations import canonical_location
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
ALLOW_FOREIGN_FILES_HELP = (
    "write into an output folder that holds files no ovsam-ray command wrote (they are left "
    "alone; without this flag such a folder is refused)"
)


class ForeignFilesError(OVSAMRayError, ValueError):
    """The output folder holds files that no command of ours wrote, and no run record."""


def foreign_files(output: str, *, s3_endpoint: str | None = None) -> list[str]:
    """Names (relative to ``output``, sorted) of the files below it that none of our commands
    writes: anything but our fixed names, folders, temporaries and ``<shard>.parquet`` files
    whose shard has a commit marker."""
    return _foreign(_listed(output, s3_endpoint))


def _foreign(names: list[str]) -> list[str]:
    markers = {n[len("_committed/") : -len(".json")] for n in names if n.startswith("_committed/")}
    return sorted(n for n in names if not _ours(n, markers))


def _ours(name: str, markers: set[str]) -> bool:
    top, _, rest = name.partition("/")
    if rest:
        return top in OWN_FOLDERS
    return (
        name in OWN_FILES
        or bool(_HIDDEN_RE.match(name))
        or (name.endswith(".parquet") and name[: -len(".parquet")] in markers)
    )


def check_output_owned(
    output: str, shards: Collection[str], *, allow_foreign_files: bool, s3_endpoint: str | None = None
) -> None:
    """Refuse (:class:`ForeignFilesError`, one line naming a few files) an output folder without
    our run record that holds others' files, unless ``allow_foreign_files``; refuse in any case
    one that holds ``<shard>.parquet`` for a shard in ``shards`` that no marker of ours covers, or
    (no run record) files under our own names (the job would overwrite or delete them), one whose
    own names are symbolic links, and one whose ``_run.json`` is not ours."""
    _refuse_inside_own_folder(output, s3_endpoint)
    _refuse_linked_names(output, s3_endpoint)
    if load_run_record(output, s3_endpoint=s3_endpoint, own=True) is not None:
        return
    names = _listed(output, s3_endpoint)
    foreign = _foreign(names)
    # Without a run record nothing here is provably ours: files under our names are someone else's
    # (a user's _summary.json, markers left after deleting _run.json by hand), and the job would
    # overwrite them (_summary.json, _stats.json, _stats/) or act on them (_committed/, _parts/).
    ours_by_name = [n for n in names if _ours(n, set()) and n != LEASE_NAME and not _HIDDEN_RE.match(n)]
    if not foreign and not ours_by_name:
        return
    where = storage.redact(output)
    wanted = {f"{s}.parquet" for s in shards}
    clashes = sorted(ours_by_name + [n for n in foreign if n in wanted])
    if clashes:
        raise ForeignFilesError(
            f"output {where} holds {_show(clashes)}, which no run of ours wrote (no run record) "
            "and this job would overwrite or delete: move them away or choose another output "
            "folder"
        )
    if not allow_foreign_files:
        raise ForeignFilesError(
            f"output {where} holds files that no ovsam-ray command wrote and no run record "
            f"({_show(foreign)}): choose a new or empty output folder, or pass "
            "--allow-foreign-files to write beside them (they are left alone)"
        )
    log.warning("output %s holds %d files of others (%s): they are left alone", where, len(foreign), _show(foreign))


def _listed(output: str, s3_endpoint: str | None) -> list[str]:
    fs, path = storage.get_filesystem(output, s3_endpoint=s3_endpoint)
    base = storage.to_url(fs, path).rstrip("/") + "/"
    return [
        u[len(base) :]
        for u in storage.list_files(output, recursive=True, s3_endpoint=s3_endpoint)
        if u.startswith(base)
    ]


def _refuse_inside_own_folder(output: str, s3_endpoint: str | None) -> None:
    """An output inside another label output's own folders (``X/_parts/mine``) is refused: that
    job deletes or rewrites what lies there."""
    loc = canonical_location(output)
    for i, part in enumerate(loc.parts):
        if part not in OWN_FOLDERS:
            continue
        parent = "/".join(loc.parts[:i])
        parent = f"/{parent}" if loc.scheme == "file" else f"{loc.scheme}://{loc.root}/{parent}"
        if storage.exists(storage.join(parent, RUN_RECORD_NAME), s3_endpoint=s3_endpoint):
            raise ForeignFilesError(
                f"output {storage.redact(output)} lies inside {part}/ of the label output "
                f"{storage.redact(parent)}, which that label job rewrites and deletes: choose an output "
                "outside it"
            )


def _refuse_linked_names(output: str, s3_endpoint: str | None) -> None:
    """A local output whose own names (``_committed``, ``_parts``, ``_run.json``...) are symbolic
    links is refused: the job writes and deletes below those names."""
    if storage.is_remote(output):
        return
    _, path = storage.get_filesystem(output, s3_endpoint=s3_endpoint)
    linked = sorted(n for n in OWN_FILES | OWN_FOLDERS if os.path.islink(os.path.join(path, n)))
    if linked:
        targets = ", ".join(
            f"{n} -> {storage.safe_for_log(os.readlink(os.path.join(path, n)), limit=100)}" for n in linked[:_SHOWN]
        )
        raise ForeignFilesError(
            f"output {storage.redact(output)} holds symbolic links under the job's own names ({targets}); "
            "the job writes and deletes below these names and never through a link: remove the link or choose "
            "another output folder"
        )


def _show(names: list[str]) -> str:
    shown = ", ".join(storage.safe_for_log(n, limit=100) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
