"""``ovsam-ray label`` (the label job: WebDataset shards -> Parquet labels) and ``relabel``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from ovsam_ray.cli.common import check_submitted_output, init_ray, print_json
from ovsam_ray.cli.flags import add_flags, config_from_args
from ovsam_ray.pipeline.label_job import LabelConfig
from ovsam_ray.pipeline.relabel import RelabelConfig

__all__ = [
    "EXIT_TERMINATED",
    "JobTerminated",
    "add_label",
    "add_label_args",
    "add_relabel",
    "label_config",
    "label_parser",
    "run_label_cli",
]

#: Exit code of a label job stopped by SIGTERM (``ray job stop``, Kubernetes) or Ctrl-C: the
#: shell's 128 + signal number (143, 130). Committed shards are kept and the lease is released;
#: rerunning the same command finishes the rest.
EXIT_TERMINATED = 128 + signal.SIGTERM
#: Exit code of a job that cannot start (``ovsam_ray.cli.EXIT_STOPPED``).
EXIT_STOPPED = 2
log = logging.getLogger("ovsam_ray.pipeline.label_job")


class JobTerminated(BaseException):
    """Raised in the driver's main thread by SIGTERM. A BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` on the way (a commit's bookkeeping) takes it for a failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def add_label_args(p: argparse.ArgumentParser) -> None:
    """The label job's flags: one per field of :class:`LabelConfig` (its model's and prompt
    filters' included), plus where Ray runs."""
    add_flags(p, LabelConfig)
    _ray_address_flag(p)


def _ray_address_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", help="Ray address; 'local' starts a new local Ray (default: RAY_ADDRESS)")


def label_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The parser of ``ovsam-ray label`` and ``jobs/label.py``."""
    parser = parser or argparse.ArgumentParser(prog="label", description=__doc__)
    add_label_args(parser)
    return parser


def label_config(a: argparse.Namespace) -> LabelConfig:
    if a.baseline:  # no model, so no weights: the model config only names the vocabulary
        a.random_init = True
    return config_from_args(a, LabelConfig)


def run_label_cli(a: argparse.Namespace) -> int:
    from ovsam_ray.pipeline.label_job import plan_label, run_label

    cfg = label_config(a)
    check_submitted_output("--output", cfg.output)
    if cfg.dry_run:
        plan = plan_label(cfg)
        print_json(plan)
        if plan["output"]["state"] == "refused":
            log.error("dry run: the job would stop (exit code 2): %s", plan["output"]["reason"])
            return EXIT_STOPPED
        log.info("dry run: nothing was written and no Ray was started")
        return 0
    with _stop_on_sigterm() as stop:
        try:
            # Ray starts only once the input is listed and the output's lease is held; ray.init
            # sets its own SIGTERM handler (exit 15), so ours goes back on after it.
            def connect() -> None:
                init_ray(a.ray_address)
                stop.install()

            summary = run_label(cfg, connect=connect)
        except BaseException as e:
            signum = stop.signum or (signal.SIGINT if _caused_by(e, KeyboardInterrupt) else None)
            if signum is None:
                raise
            log.debug("stopped by", exc_info=e)
            log.error(
                "label job stopped by %s (exit code %d): the shards committed so far are kept and the "
                "output's lease is released; rerun the same command to finish the rest",
                signal.Signals(signum).name,
                128 + signum,
            )
            return 128 + signum
    print(json.dumps(summary.to_dict(), indent=1))
    return summary.exit_code(cfg.max_error_fraction)


def _caused_by(e: BaseException | None, kind: type[BaseException]) -> bool:
    """Whether ``e`` or an exception it was raised from or during is a ``kind``: Ray's C++ calls
    turn an exception raised in a signal handler into a SystemError around it."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class _SigtermStop:
    """SIGTERM raises :class:`JobTerminated` in the main thread (the first one only: a second
    during the clean-up is ignored), so that ``finally`` blocks release the lease; :attr:`signum`
    records it, whatever the exception looks like by the time it reaches the CLI."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.active = threading.current_thread() is threading.main_thread()  # signals reach it only

    def handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            raise JobTerminated(signum)

    def install(self) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self.handler)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[_SigtermStop]:
    stop = _SigtermStop()
    previous = signal.getsignal(signal.SIGTERM)
    stop.install()
    try:
        yield stop
    finally:
        if stop.active:
            signal.signal(signal.SIGTERM, previous)


def _relabel(a: argparse.Namespace) -> int:
    from ovsam_ray.pipeline.relabel import run_relabel

    cfg = config_from_args(a, RelabelConfig)
    check_submitted_output("--output", cfg.output)
    print(json.dumps(run_relabel(cfg, connect=lambda: init_ray(a.ray_address)), indent=1))
    return 0


def add_label(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="the label job: WebDataset shards -> Parquet labels")
    label_parser(p)
    p.set_defaults(func=run_label_cli)


def add_relabel(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("relabel", help="re-score stored embeddings with a new vocabulary (no images)")
    add_flags(p, RelabelConfig)
    _ray_address_flag(p)
    p.set_defaults(func=_relabel)
