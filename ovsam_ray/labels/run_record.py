"""The run record: what produced a label output folder, and the check a resumed run makes.

``<output>/_run.json`` holds an ``identity`` (model and weight hashes, vocabulary hash,
thresholds...) that must be equal for a rerun to continue into the same folder, and ``details``
(resolved config, code version...) for people.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ovsam_ray import storage
from ovsam_ray.errors import OVSAMRayError
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.schema import RUN_RECORD_NAME, timestamp

__all__ = [
    "RunMismatchError",
    "RunRecord",
    "RunRecordError",
    "check_or_write_run_record",
    "identity_diff",
    "is_own_record",
    "load_run_record",
    "read_run_record",
]


class RunMismatchError(OVSAMRayError, RuntimeError):
    """The output folder holds results of a different run (model, weights, vocabulary...)."""


class RunRecordError(OVSAMRayError, ValueError):
    """A ``_run.json`` that is not a run record: not JSON, not an object, or (for a command about to
    write there) not one that ours write. Such a folder is never written into nor cleaned up."""


@dataclass
class RunRecord:
    """What produced an output folder.

    ``identity`` must be equal for a rerun to continue into the same folder (model and weight
    hashes, vocabulary hash, thresholds, random-init flag, ...); ``details`` is informative
    (resolved config, code version, start time...). Both are stored with credentials redacted.
    """

    identity: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=timestamp)

    def to_dict(self) -> dict[str, Any]:
        return storage.redact_config(
            {"identity": self.identity, "details": self.details, "created_at": self.created_at}
        )

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> RunRecord:
        return cls(
            identity=obj.get("identity", {}), details=obj.get("details", {}), created_at=obj.get("created_at", "")
        )


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    missing = object()
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def identity_diff(old: dict[str, Any], new: dict[str, Any], *, skip: Collection[str] = ()) -> list[str]:
    """The identity fields (dotted names) that differ between two run records' identities, as
    ``name: old -> new``; top-level fields in ``skip`` are left out."""
    return _identity_diff(
        {k: v for k, v in old.items() if k not in skip}, {k: v for k, v in new.items() if k not in skip}
    )


def check_or_write_run_record(
    output_url: str,
    record: RunRecord,
    *,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
    shards: Collection[str] = (),
) -> str:
    """Check ``record`` against ``<output>/_run.json`` before a label job writes anything.

    Returns ``"created"`` (fresh folder: record written), ``"resumed"`` (same identity: continue,
    committed shards will be skipped) or ``"overwritten"`` (``overwrite=True``: the old run's
    Parquet files, markers, temporaries, statistics and record were deleted, and the new record
    written; ``shards``: the run's shard names, whose unmarked Parquet files go too; nothing else).
    Raises :class:`RunMismatchError` naming the differing identity fields, or when the folder holds
    committed shards but no run record.
    """
    record_url = storage.join(output_url, RUN_RECORD_NAME)
    committer = ShardCommitter(output_url, s3_endpoint=s3_endpoint)
    new = json.loads(json.dumps(record.to_dict(), sort_keys=True, default=str))
    old = load_run_record(output_url, s3_endpoint=s3_endpoint, own=True)
    if old is not None:
        diff = _identity_diff(old.get("identity", {}), new["identity"])
        if not diff:
            return "resumed"
        problem = "differs from the run that wrote it: " + "; ".join(diff)
    elif committer.committed_shards():
        problem = "holds committed shards but no run record"
    else:
        _write_record(record_url, new, s3_endpoint)
        return "created"
    if not overwrite:
        raise RunMismatchError(
            f"output {storage.redact(output_url)} {problem}. Use a new output location, or pass "
            "overwrite=True (--overwrite) to delete the old results and start over."
        )
    committer.delete_all(shards)
    _write_record(record_url, new, s3_endpoint)
    return "overwritten"


def _write_record(url: str, record: dict[str, Any], s3_endpoint: str | None) -> None:
    payload = json.dumps(record, indent=1, sort_keys=True).encode()
    storage.atomic_write_bytes(url, payload, s3_endpoint=s3_endpoint)


def is_own_record(obj: Any) -> bool:
    """Whether ``obj`` (a parsed ``_run.json``) is a run record as our commands write it: an object
    with an ``identity`` object and a ``created_at`` text."""
    return isinstance(obj, dict) and isinstance(obj.get("identity"), dict) and isinstance(obj.get("created_at"), str)


def load_run_record(folder: str, *, s3_endpoint: str | None = None, own: bool = False) -> dict[str, Any] | None:
    """``<folder>/_run.json`` as a dict, ``None`` when there is none; :class:`RunRecordError` (one
    line naming the file) when it is not a JSON object, or, with ``own``, not a record of ours
    (:func:`is_own_record`): a command never writes into, nor deletes in, a folder whose run
    record it cannot read as its own, ``--overwrite`` or not."""
    url = storage.join(folder, RUN_RECORD_NAME)
    if not storage.exists(url, s3_endpoint=s3_endpoint):
        return None
    data = storage.read_bytes(url, s3_endpoint=s3_endpoint)
    try:
        obj = json.loads(data)
    except ValueError as e:
        problem = f"is not JSON ({e})" if data.strip() else "is empty"
    else:
        if own and not is_own_record(obj):
            problem = "is not a run record of ovsam-ray (no identity/created_at)"
        elif not isinstance(obj, dict):
            problem = f"is not a JSON object (a {type(obj).__name__})"
        else:
            return obj
    raise RunRecordError(
        f"{storage.redact(url)} {problem}: this folder's run record was not written by ovsam-ray (or "
        "was damaged by hand), so nothing here is changed or deleted, --overwrite or not; choose "
        "another output location, or move that file away if the folder is yours to reuse"
    )


def read_run_record(labels: str, *, s3_endpoint: str | None = None) -> dict[str, Any] | None:
    """The label output's run record (``_run.json``) as a dict, or ``None`` when it has none;
    :class:`RunRecordError` naming the file when it is not a JSON object."""
    if labels.endswith(".parquet"):
        return None
    return load_run_record(labels, s3_endpoint=s3_endpoint)
