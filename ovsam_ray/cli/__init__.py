"""``ovsam-ray``: the command line. Each subcommand parses flags into a config and calls run_*()."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from ovsam_ray import __version__
from ovsam_ray.cli.convert import add_convert, add_convert_clip, add_reshard
from ovsam_ray.cli.demo import add_demo, add_demo_data
from ovsam_ray.cli.evaluate import add_eval
from ovsam_ray.cli.export import add_export
from ovsam_ray.cli.label import add_label, add_relabel
from ovsam_ray.cli.predict import add_predict
from ovsam_ray.cli.review import add_review
from ovsam_ray.cli.show import add_show
from ovsam_ray.cli.train import add_train_subcommands
from ovsam_ray.errors import OVSAMRayError

__all__ = ["EXIT_STOPPED", "STOP_ERRORS", "build_parser", "configure_logging", "main", "report_stop"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovsam-ray", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_predict,
        add_label,
        add_relabel,
        add_convert_clip,
        add_demo_data,
        add_demo,
        add_convert,
        add_reshard,
        add_eval,
        add_export,
        add_show,
        add_review,
        add_train_subcommands,
    ):
        add(sub)
    return parser


#: What a job that cannot start or go on raises (a bad flag, storage unreachable, an output in
#: use or not writable...): our own errors, each with a one-line reason. The CLI reports them as
#: that line and exits EXIT_STOPPED, no traceback; any other exception is a bug (or a failure
#: nobody foresaw) and keeps its traceback, exit 1. argparse's own errors exit 2 too.
STOP_ERRORS = (OVSAMRayError,)
EXIT_STOPPED = 2


def report_stop(e: BaseException, prefix: str = "") -> int:
    """Log ``e`` as one line (the traceback at DEBUG level) and return EXIT_STOPPED."""
    from ovsam_ray.storage import redact, safe_for_log

    log = logging.getLogger("ovsam_ray")
    log.debug("stopped by", exc_info=e)
    log.error("%s%s", prefix, safe_for_log(redact(str(e) or type(e).__name__), limit=2000))
    return EXIT_STOPPED


class _LibraryChatter(logging.Filter):
    """Drops open_clip's INFO lines: it logs them on the root logger ("INFO root: Parsing tokenizer
    identifier...", "Loaded ... model config"), which the job's log would show as ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno < logging.WARNING
            and record.name == "root"
            and f"{os.sep}open_clip{os.sep}" in (record.pathname or "")
        )


def configure_logging(level: int = logging.INFO) -> None:
    """The command line's log format, on stderr, without libraries' root-logger chatter."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _LibraryChatter) for f in handler.filters):
            handler.addFilter(_LibraryChatter())


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except STOP_ERRORS as e:
        return report_stop(e)
