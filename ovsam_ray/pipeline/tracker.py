"""The label job driver's whole view of the rows: part metadata per shard, one commit task per
shard once its parts are all written, and the job summary's counts (``pipeline/parts.py``)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import ray

from ovsam_ray import storage
from ovsam_ray.pipeline.faults import maybe_fail
from ovsam_ray.pipeline.parts import StorageUnavailableError, commit_shard
from ovsam_ray.pipeline.progress import JobProgress
from ovsam_ray.pipeline.stats import merge_stats

log = logging.getLogger("ovsam_ray.pipeline.label_job")

__all__ = ["ShardTracker", "storage_error"]


class ShardTracker:
    """Parts per shard, and one commit task per shard once its parts are all written. Memory: the
    part URLs of the shards in flight. ``summary``: a ``LabelSummary``, counted into."""

    def __init__(self, output: str, s3_endpoint: str | None, summary: Any, progress: JobProgress) -> None:
        self.output, self.s3 = output, s3_endpoint
        self.summary, self.progress = summary, progress
        self.pending: dict[str, dict[str, Any]] = {}
        self.running: dict[Any, str] = {}
        self.commit = ray.remote(num_cpus=0.25, max_retries=3)(commit_shard)
        self.parts_seen = 0
        self.stats = merge_stats([])  # this run's committed shards

    def add(self, meta: dict[str, Any]) -> None:
        self.parts_seen += 1
        name = meta["shard"]
        if meta["kind"] == "failed":
            self.summary.shards_failed.append({"shard": name, "error": meta["damage"]})
            log.error(
                "shard %s could not be read and was NOT committed (a rerun retries it): %s",
                storage.safe_for_log(name),
                storage.safe_for_log(meta["damage"]),
            )
            return
        shard = self.pending.setdefault(
            name, {"parts": [], "rows": 0, "total": 0, "damage": "", "skipped": "", "submitted": False}
        )
        shard["skipped"] = meta["skipped"] or shard["skipped"]
        if meta["kind"] == "part":
            shard["parts"].append(meta["part"])
            shard["rows"] += meta["rows"]
            shard["total"], shard["damage"] = meta["total"], meta["damage"]
            self.progress.shard_size(name, meta["total"])
            self.progress.update(images=meta["rows"], errors=meta["errors"], masks=meta["masks"])
        if shard["rows"] >= shard["total"] and not shard["submitted"]:
            maybe_fail("driver_before_commit")
            shard["submitted"] = True
            # Ray's stubs type .remote() with the positional arguments only
            ref = self.commit.remote(  # type: ignore[call-arg]
                self.output,
                name,
                list(shard["parts"]),
                shard["total"],
                shard["damage"],
                skipped=shard["skipped"],
                s3_endpoint=self.s3,
            )
            self.running[ref] = name

    def collect(self, *, wait: bool) -> None:
        """Take the results of finished commit tasks (all of them with ``wait``)."""
        while self.running:
            ready, _ = ray.wait(
                list(self.running), num_returns=len(self.running) if wait else 1, timeout=0 if not wait else None
            )
            if not ready:
                return
            for ref in ready:
                self._finish(self.running.pop(ref), ref)

    def _finish(self, name: str, ref: Any) -> None:
        shown = storage.safe_for_log(name)
        try:
            res = ray.get(ref)
        except StorageUnavailableError as e:
            raise (storage_error(e) or e) from None
        except Exception as e:  # noqa: BLE001 - a commit task that failed for good: shard not committed
            self.pending.pop(name, None)
            self.summary.shards_failed.append({"shard": name, "error": f"commit failed: {type(e).__name__}: {e}"})
            log.error("shard %s was NOT committed (a rerun retries it): %s", shown, storage.safe_for_log(str(e)))
            return
        if "missing" in res:  # a duplicate part made the count look complete: wait for the rest
            self.pending[name]["submitted"] = False
            return
        del self.pending[name]
        self._count(res)
        if res["damage"]:
            self.summary.shards_damaged.append({"shard": name, "error": res["damage"]})
            log.error(
                "shard %s is damaged (%s): committed the %d images read before the damage",
                shown,
                storage.safe_for_log(res["damage"]),
                res["ok"] + res["error"],
            )
        if res["stats"] is not None:
            self.stats = merge_stats([self.stats, res["stats"]])
        for row in res["errors_sample"]:
            log.warning(
                "error row %s/%s: %s",
                shown,
                storage.safe_for_log(storage.redact(row["key"]), limit=120),
                storage.safe_for_log(row["error"]),
            )
        if res["warned"]:
            example = res["warnings_sample"][0] if res["warnings_sample"] else None
            log.warning(
                "shard %s: %d images have prompt warnings (column `warnings`)%s",
                shown,
                res["warned"],
                ""
                if example is None
                else f", e.g. {storage.safe_for_log(example['key'], limit=120)}: "
                f"{storage.safe_for_log('; '.join(example['warnings']))}",
            )
        self.progress.update(shards=1)

    def _count(self, res: dict[str, Any]) -> None:
        s = self.summary
        s.shards_committed += 1
        s.images_ok += res["ok"]
        s.images_error += res["error"]
        s.masks += res["masks"]
        s.images_with_warnings += res["warned"]
        s.images_no_prompts += res["no_prompts"]
        s.images_all_filtered += res.get("all_filtered", 0)
        s.members_skipped = dict(sorted((Counter(s.members_skipped) + Counter(res["skipped"])).items()))


def storage_error(e: BaseException) -> StorageUnavailableError | None:
    """The StorageUnavailableError behind a task's or Ray Data's wrapped exception, unwrapped
    (its message alone: the job's one-line reason), or None."""
    seen = set()
    link: BaseException | None = e
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        cause = getattr(link, "cause", None)
        if isinstance(link, StorageUnavailableError) and not isinstance(cause, StorageUnavailableError):
            return StorageUnavailableError(str(link).splitlines()[-1] if "Traceback" in str(link) else str(link))
        link = cause or link.__cause__ or link.__context__
    return _storage_error_in_text(e)


_STORAGE_ERROR = f"{StorageUnavailableError.__module__}.{StorageUnavailableError.__qualname__}: "


def _storage_error_in_text(e: BaseException) -> StorageUnavailableError | None:
    """Ray Data's UDF error keeps the worker's exception only as text (its traceback, in the
    message): find the StorageUnavailableError line there."""
    for line in str(e).splitlines():
        if _STORAGE_ERROR in line:
            return StorageUnavailableError(line.split(_STORAGE_ERROR, 1)[1].strip())
    return None
