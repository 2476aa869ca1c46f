"""Progress for long jobs: a periodic images/s line while the job runs, a summary at the end."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ovsam_ray.progress")


def quiet_ray_data_progress(interactive: bool | None = None) -> bool:
    """Turn Ray Data's progress output off unless stdout is a terminal (``interactive``: say so
    instead). In a terminal its per-stage bars redraw in place; in a log (``ray job logs``, a file,
    CI) they become a block of lines per stage every few seconds that drowns the job's own
    progress line, which has the totals and the time left. Returns whether it was turned off."""
    if interactive is None:
        interactive = sys.stdout.isatty()
    if interactive:
        return False
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    # its one-time "Progress bars disabled. To enable, ..." warning is about this very choice
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return True


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class JobProgress:
    """Counts committed work and logs a line at most every ``interval_s`` seconds: shards and
    images done out of their totals, images/s and the time left.

    The images of a shard are known once its first part arrives; until every shard has been seen,
    the image total is estimated from the shards seen so far (``~``). The time left is the
    images still to do at the rate so far. (Ray Data's own progress bars show the per-stage view
    in a terminal; this line is the job-level view that survives in ``ray job logs``.)
    """

    def __init__(self, *, total_shards: int, interval_s: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        self.total_shards = total_shards
        self.interval_s = interval_s
        self.clock = clock
        self.start = self.last = clock()
        self.images = self.errors = self.masks = self.shards = 0
        self.shard_images: dict[str, int] = {}  # images per shard, as its parts report them

    def shard_size(self, name: str, images: int) -> None:
        """Shard ``name`` holds ``images`` images (its parts say so)."""
        self.shard_images[name] = images

    def update(self, *, images: int = 0, errors: int = 0, masks: int = 0, shards: int = 0) -> None:
        self.images += images
        self.errors += errors
        self.masks += masks
        self.shards += shards
        now = self.clock()
        if now - self.last >= self.interval_s or self.shards == self.total_shards:
            self.last = now
            log.info(self.line())

    def images_total(self) -> tuple[int, bool]:
        """(images in the job's shards, whether that is exact): an estimate from the shards seen
        so far until every shard has reported its size."""
        known = sum(self.shard_images.values())
        seen = len(self.shard_images)
        if seen >= self.total_shards or not seen:
            return max(known, self.images), seen >= self.total_shards
        return max(round(known / seen * self.total_shards), self.images), False

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.images / elapsed
        total, exact = self.images_total()
        if self.shards >= self.total_shards:
            left = "0s"
        elif rate > 0 and total:
            left = ("" if exact else "~") + _duration(max(total - self.images, 0) / rate)
        else:
            left = "unknown"
        of = f"{total}" if exact else (f"~{total}" if total else "?")
        return (
            f"progress: shards {self.shards}/{self.total_shards}, images {self.images}/{of} "
            f"({rate:.2f} images/s), time left {left}, errors {self.errors}, masks {self.masks}, "
            f"elapsed {_duration(elapsed)}"
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
