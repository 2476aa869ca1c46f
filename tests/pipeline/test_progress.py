"""The job's progress line: shards and images done out of their totals, images/s, time left; Ray
Data's own progress off in a log; libraries' root-logger chatter dropped from the CLI's log."""

from __future__ import annotations

import logging

import pytest

from ovsam_ray.pipeline.progress import JobProgress, quiet_ray_data_progress


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_line_has_totals_rate_and_time_left(caplog) -> None:
    clock = Clock()
    p = JobProgress(total_shards=4, interval_s=10.0, clock=clock)
    assert "images 0/? " in p.line() and "time left unknown" in p.line()
    p.shard_size("a", 100)
    clock.t += 20
    p.update(images=50)
    # one shard of four seen: 400 images estimated; 50 in 20 s -> 2.5/s -> 350 left in 140 s
    line = p.line()
    assert "shards 0/4, images 50/~400 (2.50 images/s), time left ~2m20s" in line, line
    for name in ("b", "c", "d"):
        p.shard_size(name, 10)
    assert "images 50/130 " in p.line() and "time left 32s" in p.line()  # exact once every shard is seen
    with caplog.at_level(logging.INFO, logger="ovsam_ray.progress"):
        p.update(images=80, shards=4)  # the last shard: logged whatever the interval
    assert (
        caplog.messages[-1].startswith("progress: shards 4/4, images 130/130") and "time left 0s" in caplog.messages[-1]
    )


def test_the_line_is_logged_at_most_every_interval(caplog) -> None:
    clock = Clock()
    p = JobProgress(total_shards=3, interval_s=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="ovsam_ray.progress"):
        p.update(images=1)
        clock.t += 5
        p.update(images=1)
        clock.t += 6
        p.update(images=1)
    assert len(caplog.messages) == 1 and "elapsed 11s" in caplog.messages[0]


def test_ray_data_progress_is_off_in_a_log_only() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    try:
        ctx.enable_progress_bars = True
        assert quiet_ray_data_progress(interactive=True) is False and ctx.enable_progress_bars
        assert quiet_ray_data_progress(interactive=False) is True and not ctx.enable_progress_bars
        assert logging.getLogger("ray.data._internal.progress").getEffectiveLevel() == logging.ERROR
    finally:
        ctx.enable_progress_bars = before


@pytest.mark.parametrize(
    ("name", "path", "level", "kept"),
    [
        ("root", "/x/site-packages/open_clip/factory.py", logging.INFO, False),
        ("root", "/x/site-packages/open_clip/factory.py", logging.WARNING, True),
        ("root", "/x/elsewhere.py", logging.INFO, True),
        ("ovsam_ray.pipeline.label_job", "/x/ovsam_ray/pipeline/label_job.py", logging.INFO, True),
    ],
)
def test_open_clips_root_logger_info_is_dropped(name, path, level, kept) -> None:
    from ovsam_ray.cli import configure_logging

    configure_logging()
    record = logging.LogRecord(name, level, path, 1, "Parsing tokenizer identifier", None, None)
    handlers = logging.getLogger().handlers
    assert handlers and all(h.filter(record) == kept for h in handlers if h.filters)
    assert any(h.filters for h in handlers)
