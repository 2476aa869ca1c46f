"""Which files in an output folder a command may replace: only those an earlier run of the same
command provably wrote.

The exporters, ``show``, ``convert`` and ``train export`` write files with names from data
(``labels/<shard>/<key>.txt``, ``shard-000000.tar``, ``coco.json``). Before writing anything each
one lists the names it will write and calls :func:`writing`, which refuses (:class:`OutputClashError`,
one line naming the flag and a few files) when one of them already exists and

- is not listed in the folder's manifest (``_ovsam_written.json``) for this command: someone
  else's file, refused whatever ``overwrite`` says; or
- is listed for this command, whose earlier run finished, and ``overwrite`` is not given.

A file listed for a run that did not finish (status ``writing``) is replaced without
``overwrite``: a rerun completes what an interrupted run began. Files in the folder that the
command would not write are never looked at and never block. The manifest is written before the
first data file (listing the names about to be written) and marked complete at the end, so an
interrupted run's files stay provably ours.

Single-file outputs (``export coco --output x.json``) keep their manifest in the file's folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from ovsam_ray import storage
from ovsam_ray.errors import OVSAMRayError

__all__ = ["MANIFEST_NAME", "Claim", "OutputClashError", "file_and_folder", "writing"]

MANIFEST_NAME = "_ovsam_written.json"
_PRODUCER = "ovsam-ray"
_SHOWN = 3


def file_and_folder(url: str) -> tuple[str, str]:
    """(the folder holding the file ``url``, the file's name): where a single-file output's
    manifest goes, and the name it is listed under."""
    head, sep, name = url.rstrip("/").rpartition("/")
    return (head or "/") if sep else ".", name


class OutputClashError(OVSAMRayError, ValueError):
    """A file the command would write exists and may not be replaced."""


def _show(names: list[str]) -> str:
    shown = ", ".join(storage.safe_for_log(n, limit=100) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _read_manifest(url: str, flag: str, folder: str, s3_endpoint: str | None) -> dict[str, Any]:
    """The manifest's per-command entries; ``{}`` without one. A file of that name that we did
    not write is refused (it would be overwritten)."""
    if not storage.exists(url, s3_endpoint=s3_endpoint):
        return {}
    try:
        data = json.loads(storage.read_bytes(url, s3_endpoint=s3_endpoint))
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("producer") != _PRODUCER or not isinstance(data.get("commands"), dict):
        raise OutputClashError(
            f"{flag} {storage.redact(folder)} holds {MANIFEST_NAME}, which no ovsam-ray command "
            "wrote: move it away or choose another output"
        )
    return data["commands"]


class _Existing:
    """Whether a relative name exists below ``folder``: one listing of the folder's files and one
    recursive listing per subfolder asked about, so a name costs no storage request of its own."""

    def __init__(self, folder: str, s3_endpoint: str | None) -> None:
        self.folder, self.s3_endpoint = folder, s3_endpoint
        self.listed: dict[str, set[str]] = {}
        self.linked: set[str] = set()  # local folders below ``folder`` that are symbolic links

    def _list(self, sub: str) -> set[str]:
        if sub not in self.listed and not storage.is_remote(self.folder):
            self.listed[sub] = self._list_local(sub)
        if sub not in self.listed:
            url = storage.join(self.folder, sub) if sub else self.folder
            fs, path = storage.get_filesystem(url, s3_endpoint=self.s3_endpoint)
            base = storage.to_url(fs, path).rstrip("/") + "/"
            files = storage.list_files(url, recursive=bool(sub), s3_endpoint=self.s3_endpoint)
            prefix = sub + "/" if sub else ""
            self.listed[sub] = {prefix + u[len(base) :] for u in files if u.startswith(base)}
        return self.listed[sub]

    def _list_local(self, sub: str) -> set[str]:
        """Every entry but folders, links included (a dangling one too: writing to it would create
        a file wherever it points); a folder that is a link is remembered, not entered (what lies
        behind it is someone else's)."""
        _, root = storage.get_filesystem(self.folder)
        start = os.path.join(root, sub) if sub else root
        if os.path.islink(start) and os.path.isdir(start):
            self.linked.add(sub)
            return set()
        found: set[str] = set()
        for here, dirs, files in os.walk(start):
            rel = os.path.relpath(here, root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for d in dirs:
                if os.path.islink(os.path.join(here, d)):
                    self.linked.add(rel + d)
            found.update(rel + f for f in files)
            if not sub:
                found.update(rel + d for d in dirs if os.path.islink(os.path.join(here, d)))
                break
        return found

    def __contains__(self, name: str) -> bool:
        top, sep, _ = name.partition("/")
        if name in self._list(top if sep else ""):
            return True
        parts = name.split("/")[:-1]  # a name below a linked folder is written through the link
        return any("/".join(parts[: i + 1]) in self.linked for i in range(len(parts)))


class Claim:
    """The files one run of ``command`` writes in ``folder``: built by :func:`writing`."""

    def __init__(self, folder: str, command: str, *, flag: str, overwrite: bool, s3_endpoint: str | None) -> None:
        self.folder, self.command, self.flag = folder, command, flag
        self.overwrite, self.s3_endpoint = overwrite, s3_endpoint
        self.url = storage.join(folder, MANIFEST_NAME)
        self.entries = _read_manifest(self.url, flag, folder, s3_endpoint)
        entry = self.entries.get(command) or {}
        self.listed = set(entry.get("files") or [])
        self.finished = entry.get("status") == "complete"
        self.patterns = [re.compile(p) for p in entry.get("patterns") or []] if not self.finished else []
        self.planned: set[str] = set()
        self.keep: set[str] = set()

    def _ours(self, name: str) -> bool:
        return name in self.listed or any(p.fullmatch(name) for p in self.patterns)

    def check(self, names: Iterable[str]) -> None:
        """Refuse (see the module doc) before anything is written; remember the names."""
        existing = _Existing(self.folder, self.s3_endpoint)
        foreign: list[str] = []
        earlier: list[str] = []
        for name in names:
            self.planned.add(name)
            if name not in existing:
                continue
            if not self._ours(name):
                foreign.append(name)
            elif self.finished and not self.overwrite:
                earlier.append(name)
        where = f"{self.flag} {storage.redact(self.folder)}"
        if foreign:
            raise OutputClashError(
                f"{where} holds {_show(sorted(foreign))}, which `{self.command}` would write and no earlier "
                f"`{self.command}` wrote: move them away or choose another output (--overwrite replaces only "
                "files an earlier run wrote)"
            )
        if earlier:
            raise OutputClashError(
                f"{where} holds the output of an earlier `{self.command}` "
                f"({_show(sorted(earlier))}): pass --overwrite to replace it"
            )
        # files of an earlier run that this one does not write stay ours (they are still there)
        self.keep = {n for n in self.listed if n in existing}

    def _write(self, status: str, patterns: Iterable[str] = ()) -> None:
        entry = {"status": status, "files": sorted(self.keep | self.planned), "patterns": list(patterns)}
        data = {"producer": _PRODUCER, "commands": {**self.entries, self.command: entry}}
        storage.atomic_write_bytes(self.url, json.dumps(data, indent=1).encode(), s3_endpoint=self.s3_endpoint)

    def withdraw(self, patterns: Iterable[str]) -> None:
        """After a run that stopped before writing any file (a refusal of its input): remove the
        record this run created, so that the refusal leaves the output as it found it. Once a file
        of the run exists, the record stays: it is what lets a rerun complete the output."""
        existing = _Existing(self.folder, self.s3_endpoint)
        regexes = [re.compile(p) for p in patterns]
        names = existing._list("") - {MANIFEST_NAME}
        if any(n in existing for n in self.planned) or any(r.fullmatch(n) for r in regexes for n in names):
            return
        with contextlib.suppress(OSError):
            storage.remove(self.url, s3_endpoint=self.s3_endpoint)
            if not storage.is_remote(self.folder) and not os.listdir(self.folder):
                os.rmdir(self.folder)

    def add(self, names: Iterable[str]) -> None:
        """Names written that were not known up front (``convert``'s shards): listed at the end."""
        self.planned.update(names)


@contextlib.contextmanager
def writing(
    folder: str,
    command: str,
    names: Iterable[str],
    *,
    overwrite: bool = False,
    flag: str = "--output",
    patterns: Iterable[str] = (),
    s3_endpoint: str | None = None,
) -> Iterator[Claim]:
    """Check ``names`` (relative to ``folder``) against what exists there (see the module doc),
    record them as being written, run the body, and mark the run complete. ``patterns``
    (regular expressions over relative names): names the body may write that are not known
    up front; they count as ours until the run completes, by then :meth:`Claim.add` lists them."""
    claim = Claim(folder, command, flag=flag, overwrite=overwrite, s3_endpoint=s3_endpoint)
    claim.check(names)
    patterns = list(patterns)
    fresh = not claim.entries and not storage.exists(claim.url, s3_endpoint=s3_endpoint)
    claim._write("writing", patterns)
    try:
        yield claim
    except BaseException:
        if fresh:
            claim.withdraw(patterns)
        raise
    claim._write("complete")
