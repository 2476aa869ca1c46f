"""Running the CLI in-process and reading its one-line errors, for the tests."""

from __future__ import annotations

import logging

import pytest


def run_cli(*argv: str) -> int:
    """``ovsam-ray ARGV...`` in this process; its exit code."""
    from ovsam_ray.cli import main

    return main(list(argv))


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ERROR (and worse) messages logged so far."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
