"""The errors ovsam_ray raises for a reason a user can act on.

Every such error derives from :class:`OVSAMRayError`; the command line prints one of them as one
line and exits 2 (``ovsam_ray.cli.EXIT_STOPPED``). Any other exception is a bug, or a failure
nobody foresaw, and keeps its traceback (exit 1). Most subclasses also keep the builtin base they
had before (``ValueError``, ``RuntimeError``...), so callers that catch those still do.
"""

from __future__ import annotations

__all__ = ["ConfigError", "MissingInputError", "OVSAMRayError", "UnknownNameError"]


class OVSAMRayError(Exception):
    """Base class of the one-line, user-facing errors of this package."""


class ConfigError(OVSAMRayError, ValueError):
    """A bad setting: a config field or its CLI flag, with what to pass instead."""


class UnknownNameError(ConfigError, KeyError):
    """A name not in a registry (a preset, an export format...); the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingInputError(OVSAMRayError, FileNotFoundError):
    """A location the command reads holds nothing it can use; the message says what to pass."""
