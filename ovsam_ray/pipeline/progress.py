"""Progress for long jobs: a periodic images/s line while the job runs, a summary at the end."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("ovsam_ray.progress")


class JobProgress:
    """Counts committed work and logs a line at most every ``interval_s`` seconds.

    (Ray Data's own progress bars show the per-stage view; this line is the job-level view that
    survives in ``ray job logs``.)
    """

    def __init__(self, *, total_shards: int, interval_s: float = 10.0) -> None:
        self.total_shards = total_shards
        self.interval_s = interval_s
        self.start = self.last = time.time()
        self.images = self.errors = self.masks = self.shards = 0

    def update(self, *, images: int = 0, errors: int = 0, masks: int = 0, shards: int = 0) -> None:
        self.images += images
        self.errors += errors
        self.masks += masks
        self.shards += shards
        now = time.time()
        if now - self.last >= self.interval_s or self.shards == self.total_shards:
            self.last = now
            log.info(self.line())

    def line(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        return (
            f"progress: shards {self.shards}/{self.total_shards}, images {self.images} "
            f"({self.images / elapsed:.2f} images/s), errors {self.errors}, masks {self.masks}, "
            f"elapsed {elapsed:.0f}s"
        )

    def finish(self, summary: Any) -> None:
        s = summary
        log.info(
            "summary: shards committed %d, skipped %d, failed %d, damaged %d | images ok %d, error %d, with prompt "
            "warnings %d, without prompts %d | masks %d | wall %.1fs | %.2f images/s%s",
            s.shards_committed,
            s.shards_skipped,
            len(s.shards_failed),
            len(s.shards_damaged),
            s.images_ok,
            s.images_error,
            s.images_with_warnings,
            s.images_no_prompts,
            s.masks,
            s.wall_time_s,
            s.images_per_s,
            " | RANDOM INIT (untrained weights)" if s.random_init else "",
        )
