"""One writer per output folder: the label job's lease ``<output>/_lease.json``.

A job takes the lease before it deletes or writes anything in its output (start-up cleanup of
temporaries and parts included), renews it from a heartbeat thread on the driver, and releases
it at the end. A second job on the same output is refused while the holder is alive; a lease
whose heartbeat is older than :data:`STALE_AFTER` heartbeat intervals (the holder's own, as
written in the lease), or whose holder process is gone (same host and PID namespace only), is
stale and taken over.

Atomicity. Local folder: the lease is written to a temporary file and ``os.link``-ed to its
name, which fails when the name exists, so two jobs cannot both create it; a stale lease is first
renamed away (only one contender's rename succeeds) and checked to be the stale one read before.
S3 (no create-if-absent here): read, write ours, wait :data:`S3_SETTLE_S`, re-read; whoever's
lease is read back holds it. Race window: a second job whose read and write straddle the first
job's write *and* its settle wait (its own read-to-write gap longer than ``S3_SETTLE_S``) would
also believe it holds the lease; the next heartbeat of the job that lost the last write sees the
other's lease and stops that job (:class:`LeaseLostError`). Staleness compares the holder's
heartbeat with this host's clock: clocks must agree to well within ``STALE_AFTER`` intervals.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

from ovsam_ray import storage
from ovsam_ray.errors import ConfigError, OVSAMRayError

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
HEARTBEAT_S = 30.0
#: A lease is stale when its heartbeat is older than this many of its holder's intervals.
STALE_AFTER = 3
S3_SETTLE_S = 2.0
#: The longest heartbeat interval a lease may promise: a longer one would keep a dead job's output
#: locked for hours.
MAX_INTERVAL_S = 3600.0
#: A heartbeat this far in this host's future is a clock disagreement worth naming.
CLOCK_SKEW_S = 1.0

__all__ = [
    "HEARTBEAT_S",
    "LEASE_NAME",
    "MAX_INTERVAL_S",
    "LeaseHeldError",
    "LeaseLostError",
    "OutputLease",
    "check_interval",
    "check_not_being_written",
]


class LeaseHeldError(OVSAMRayError, RuntimeError):
    """Another live job holds the output folder's lease."""


class LeaseLostError(OVSAMRayError, RuntimeError):
    """This job's lease was taken over by another job (this one looked dead to it)."""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. EPERM: it exists
        return False
    return False


def check_interval(value: Any, what: str) -> float:
    """``value`` as a heartbeat interval in seconds, or a ValueError naming ``what`` (a flag, a
    field, a lease file): a finite number in (0, MAX_INTERVAL_S]; NaN, inf, <= 0, text are refused."""
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if abs(value) < 1e300 else math.inf  # an int beyond float range is "huge"
    if not math.isfinite(number) or not 0 < number <= MAX_INTERVAL_S:
        raise ConfigError(
            f"{what}: lease heartbeat interval {storage.safe_for_log(repr(value), limit=80)} is not a "
            f"number of seconds in (0, {MAX_INTERVAL_S:.0f}]"
        )
    return float(number)


class LeaseValueError(OVSAMRayError, ValueError):
    """A lease file holds a value no job writes (a non-finite heartbeat, a bad interval)."""


class OutputLease:
    """The lease of ``output`` for this process. ``with OutputLease(...)`` acquires it (raising
    :class:`LeaseHeldError`), starts the heartbeat and releases it on exit; :meth:`check` raises
    :class:`LeaseLostError` once a heartbeat found the lease taken over."""

    def __init__(self, output: str, *, s3_endpoint: str | None = None, interval_s: float = HEARTBEAT_S) -> None:
        self.url = storage.join(output, LEASE_NAME)
        self.output, self.s3 = output, s3_endpoint
        self.interval_s = check_interval(interval_s, f"the lease of {storage.redact(output)}")
        self.job_id = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the lease record ---

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "job_id": self.job_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_ns": _pid_namespace(),
            "heartbeat": now,
            "heartbeat_at": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds"),
            "interval_s": self.interval_s,
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            data = storage.read_bytes(self.url, s3_endpoint=self.s3)
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(data)
        except ValueError:
            lease = None
        # Our leases are written whole (a link of a complete file; one PUT): anything else under
        # this name is someone else's file, never taken over (that would delete it).
        if not isinstance(lease, dict) or not isinstance(lease.get("job_id"), str):
            raise LeaseValueError(
                f"lease file {storage.redact(self.url)} is not a lease of ovsam-ray (not a JSON object with a job_id): "
                f"it is left alone; move it away if no job writes {storage.redact(self.output)}, or choose another "
                "output folder"
            )
        return lease

    def stale_reason(self, lease: dict[str, Any]) -> str | None:
        """Why ``lease`` no longer protects anything, or None while its holder is alive. A lease
        whose heartbeat or interval no job writes (NaN, inf, <= 0, text) is refused, never guessed at."""
        if lease.get("job_id") == self.job_id:
            return None
        try:
            heartbeat = float(lease["heartbeat"])
        except (KeyError, TypeError, ValueError):
            return "unreadable lease"
        if not math.isfinite(heartbeat):
            raise self._value_error(f"heartbeat {heartbeat}")
        age = time.time() - heartbeat
        if age > STALE_AFTER * self._interval(lease):
            return f"no heartbeat for {age:.0f}s"
        same_process_space = lease.get("host") == socket.gethostname() and lease.get("pid_ns") == _pid_namespace()
        if same_process_space and isinstance(lease.get("pid"), int) and _process_gone(lease["pid"]):
            return f"process {lease['pid']} on this host is gone"
        return None

    def _interval(self, lease: dict[str, Any]) -> float:
        """The heartbeat interval the lease's holder promised (HEARTBEAT_S when it names none)."""
        if lease.get("interval_s") is None:
            return HEARTBEAT_S
        try:
            return check_interval(lease["interval_s"], f"lease file {storage.redact(self.url)}")
        except ValueError:
            raise self._value_error(
                f"interval_s {lease['interval_s']!r} is not a number of seconds in (0, {MAX_INTERVAL_S:.0f}]"
            ) from None

    def _value_error(self, what: str) -> LeaseValueError:
        return LeaseValueError(
            f"lease file {storage.redact(self.url)}: {storage.safe_for_log(what, limit=200)}; "
            "no label job writes that, so this job does not guess whether its holder is alive. "
            "Delete the file once no job writes "
            f"{storage.redact(self.output)}."
        )

    def _describe(self, lease: dict[str, Any]) -> str:
        shown = storage.safe_for_log(
            f"job {lease.get('job_id')} (host {lease.get('host')}, pid {lease.get('pid')}, "
            f"heartbeat {lease.get('heartbeat_at')})"
        )  # a lease file is data too
        return shown + self._clock_note(lease)

    def _clock_note(self, lease: dict[str, Any]) -> str:
        """Says so when the holder's heartbeat lies in this host's future: its clock is ahead, and
        its lease looks alive for that much longer."""
        try:
            ahead = float(lease["heartbeat"]) - time.time()
        except (KeyError, TypeError, ValueError):
            return ""
        if not math.isfinite(ahead) or ahead <= CLOCK_SKEW_S:
            return ""
        host = storage.safe_for_log(str(lease.get("host")), limit=100)
        return (
            f"; its heartbeat lies {ahead:.0f}s in the future: the clock of host {host} is {ahead:.0f}s ahead "
            "of this host's (clocks must agree to well within a minute)"
        )

    # --- acquire / renew / release ---

    def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseHeldError` naming the holder and what to do."""
        held = self._read()
        if held is not None and held and self.stale_reason(held) is None:
            raise self._held_error(held)
        if held is not None:
            log.warning(
                "taking over the lease of %s: %s held it (%s)",
                storage.redact(self.output),
                self._describe(held),
                self.stale_reason(held) or "unreadable",
            )
        if storage.is_remote(self.url):
            self._acquire_remote()
        else:
            self._acquire_local(held)

    def _held_error(self, held: dict[str, Any]) -> LeaseHeldError:
        stale = STALE_AFTER * self._interval(held)
        return LeaseHeldError(
            f"output {storage.redact(self.output)} is in use by another label job: {self._describe(held)}. Wait for it "
            f"to finish, or use another --output; a lease whose job died is taken over after {stale:.0f}s without "
            f"a heartbeat (or at once on the same host). Lease file: {LEASE_NAME}."
        )

    def _acquire_local(self, stale: dict[str, Any] | None) -> None:
        _, path = storage.get_filesystem(self.url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if stale is not None:
            moved = os.path.join(os.path.dirname(path), f".{LEASE_NAME}.stale-{uuid.uuid4().hex}")
            try:
                os.rename(path, moved)
            except FileNotFoundError:
                pass  # another contender moved it first; the link below decides
            else:
                self._check_moved(moved, path, stale)
        tmp = os.path.join(os.path.dirname(path), f".{LEASE_NAME}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(json.dumps(self._record()).encode())
        try:
            os.link(tmp, path)  # fails if the name exists: an atomic create of a complete file
        except FileExistsError:
            raise self._held_error(self._read() or {}) from None
        finally:
            os.remove(tmp)

    def _check_moved(self, moved: str, path: str, stale: dict[str, Any]) -> None:
        """The lease just renamed away must be the stale one read before; if another contender
        replaced it meanwhile with its own, put that back and give up."""
        with open(moved, "rb") as f:
            try:
                taken = json.loads(f.read())
            except ValueError:
                taken = None
        taken = taken.get("job_id") if isinstance(taken, dict) else None
        if taken == stale.get("job_id"):
            os.remove(moved)
            return
        try:
            os.link(moved, path)
        except FileExistsError:
            pass
        os.remove(moved)
        raise LeaseHeldError(
            f"output {storage.redact(self.output)}: another job took the stale lease over at the same "
            "moment; it holds the output now"
        )

    def _acquire_remote(self) -> None:
        storage.atomic_write_bytes(self.url, json.dumps(self._record()).encode(), s3_endpoint=self.s3)
        time.sleep(S3_SETTLE_S)
        back = self._read() or {}
        if back.get("job_id") != self.job_id:
            raise self._held_error(back)

    def renew(self) -> None:
        """One heartbeat: rewrite the lease, unless another job took it over (then :attr:`lost`)."""
        held = self._read()
        if held is not None and held.get("job_id") != self.job_id:
            self.lost = f"the lease was taken over by {self._describe(held)}"
            return
        storage.atomic_write_bytes(self.url, json.dumps(self._record()).encode(), s3_endpoint=self.s3)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` once the lease is lost: this job must stop writing."""
        if self.lost:
            raise LeaseLostError(
                f"output {storage.redact(self.output)}: {self.lost}; this job stops. Run one job per output folder."
            )

    def release(self) -> None:
        """Delete the lease if it is still ours."""
        held = self._read()
        if held is not None and held.get("job_id") == self.job_id:
            storage.remove(self.url, s3_endpoint=self.s3)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried at the next one
                log.warning(
                    "lease heartbeat of %s failed: %s: %s",
                    storage.redact(self.output),
                    type(e).__name__,
                    storage.safe_for_log(storage.redact(str(e))),
                )
            if self.lost:
                log.error("%s", storage.safe_for_log(self.lost))
                return

    def start(self) -> None:
        """Start the heartbeat thread (after :meth:`acquire`)."""
        self._thread = threading.Thread(target=self._heartbeat, name="output-lease", daemon=True)
        self._thread.start()

    def __enter__(self) -> OutputLease:
        self.acquire()
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the heartbeat and release the lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.release()
        except Exception as e:  # noqa: BLE001 - a lease left behind goes stale; never mask the job's error
            log.warning(
                "could not release the lease of %s: %s", storage.redact(self.output), storage.safe_for_log(str(e))
            )


def check_not_being_written(folder: str, flag: str, *, s3_endpoint: str | None = None) -> None:
    """Raise :class:`LeaseHeldError` (one line naming ``flag`` and the holder) when a live job holds
    the lease of ``folder``, an input about to be read whole: its shards are not all committed yet,
    and reading it now would silently leave out the ones still to come."""
    lease = OutputLease(folder, s3_endpoint=s3_endpoint)
    held = lease._read()
    if held is not None and lease.stale_reason(held) is None:
        raise LeaseHeldError(
            f"{flag} {storage.redact(folder)} is being written by a label job right now "
            f"({lease._describe(held)}): wait for it to finish, then rerun"
        )
