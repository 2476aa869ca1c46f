"""Test helpers: a real multi-node Ray cluster on this machine and an S3 endpoint that can go down.

``LocalRayCluster`` runs ``ray start --head`` and ``ray start --address ...`` as separate process
trees: every ``ray start`` creates its own raylet (its own node id, resources and object store), all
on this host. Nodes share the head's ``--temp-dir`` (Ray puts a joining node on the same host in the
head's session directory) but each runs in its own session/process group, so ``kill_node`` can
SIGKILL one node's raylet, agents and workers at once, as when a machine dies.

Never ``ray stop`` here: it stops every Ray process on the machine, including other people's. Each
process the cluster starts inherits a marker variable (``OVSAM_TEST_CLUSTER=<id>``) and teardown
kills exactly the processes carrying it (plus anything naming the cluster's temp dir).

``S3Gate`` is a TCP proxy in front of the moto server: ``close()`` refuses connections (the S3
endpoint is down, its data kept), ``open()`` brings it back on the same port.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable

MARKER_VAR = "OVSAM_TEST_CLUSTER"
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_ports(n: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """``n`` distinct free ports, none in ``avoid`` (picked ones are held open until all are
    picked, so none is handed out twice)."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < n + len(avoid):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
        return [p for p in ports if p not in avoid][:n]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _proc_table() -> dict[int, tuple[int, int, bytes, bytes]]:
    """pid -> (parent pid, session id, environ, cmdline) of every process we may inspect."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:  # gone meanwhile
            continue
        table[int(entry)] = (int(fields[1]), int(fields[3]), env, cmd)
    return table


def _cluster_processes(sessions: set[int], marker: bytes, temp_dir: bytes) -> list[int]:
    """Processes in one of ``sessions``, carrying ``marker`` in their environment or naming
    ``temp_dir``, and all their descendants (Ray workers rename themselves, which clobbers
    /proc/<pid>/environ, so the session and the parent links matter too)."""
    table = _proc_table()
    found = {
        pid
        for pid, (_, sid, env, cmd) in table.items()
        if sid in sessions or marker in env.split(b"\0") or temp_dir in cmd
    }
    grew = True
    while grew:
        children = {pid for pid, (ppid, *_rest) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    found.discard(os.getpid())
    return sorted(found)


class LocalRayCluster:
    """A head and worker nodes started with the ``ray`` CLI; a context manager that always tears down.

    All ports are picked free (nothing on Ray's fixed defaults, so clusters of other people and
    other tests on this machine do not collide); token authentication with a token of its own.
    """

    def __init__(self, *, env: dict[str, str] | None = None, object_store_mb: int = 256) -> None:
        self.id = uuid.uuid4().hex[:12]
        # Short path: Ray's unix sockets live below it (107-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix=f"ovr-{self.id[:6]}-", dir="/tmp")
        token_path = os.path.join(self.temp_dir, "auth_token")
        self.token = secrets.token_hex(32)
        with open(token_path, "w") as f:
            f.write(self.token)
        self.object_store_bytes = object_store_mb * 1024 * 1024
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not another Ray's
        self.env = {
            **inherited,
            **(env or {}),
            MARKER_VAR: self.id,
            # `python` in entrypoints is this interpreter, as on a node whose image has the package.
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": token_path,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            # Notice a dead node in ~3 s instead of ~15 s.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.nodes: dict[str, int] = {}  # name -> the session its `ray start` opened (= that process's pid)
        self.logs: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _ray_start(self, name: str, args: list[str], timeout: float = 120) -> None:
        listen, grpc, metrics, runtime_env = free_ports(4, avoid=(self.gcs_port, self.dashboard_port, self.client_port))
        common = [
            "--disable-usage-stats",
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
            "--dashboard-agent-listen-port",
            str(listen),
            "--dashboard-agent-grpc-port",
            str(grpc),
            "--metrics-export-port",
            str(metrics),
            "--runtime-env-agent-port",
            str(runtime_env),
            "--object-store-memory",
            str(self.object_store_bytes),
        ]
        proc = subprocess.Popen(
            [RAY, "start", *args, *common],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.nodes[name] = proc.pid  # its session id: every process this node starts stays in it
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        self.logs.append(out)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed with {proc.returncode}:\n{out[-3000:]}")

    def start_head(self, *, num_cpus: float = 1, resources: dict[str, float] | None = None) -> None:
        self._ray_start(
            "head",
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--temp-dir",
                self.temp_dir,
                "--num-cpus",
                str(num_cpus),
                "--resources",
                json.dumps(resources or {}),
                "--include-dashboard=true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--ray-client-server-port",
                str(self.client_port),
            ],
        )
        wait_for(self._dashboard_up, 60, "the dashboard (job submission API)", interval=0.5)

    def add_node(self, name: str, *, num_cpus: float, resources: dict[str, float] | None = None) -> None:
        before = self.alive_node_ids()
        self._ray_start(
            name, ["--address", self.address, "--num-cpus", str(num_cpus), "--resources", json.dumps(resources or {})]
        )
        wait_for(lambda: self.alive_node_ids() - before, 60, f"node {name} to register")

    def worker_names(self) -> list[str]:
        """Names of the worker nodes started so far (killed ones included), oldest first."""
        return [n for n in self.nodes if n != "head"]

    def node_pids(self, name: str) -> list[int]:
        """Processes of one node: those in the session its ``ray start`` created."""
        sid = self.nodes[name]
        return sorted(pid for pid, (_, s, *_rest) in _proc_table().items() if s == sid)

    def kill_node(self, name: str) -> list[str]:
        """SIGKILL a node's raylet and everything else in its session (its workers included), as
        when its machine dies; returns the killed processes' command lines (``ray::<actor>``...)."""
        table = _proc_table()
        pids = self.node_pids(name)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return [table[p][3].replace(b"\0", b" ").decode(errors="replace") for p in pids if p in table]

    def api(self, path: str, method: str = "GET", timeout: float = 10) -> object:
        req = urllib.request.Request(
            self.dashboard_url + path, method=method, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def _dashboard_up(self) -> bool:
        try:
            self.api("/api/version", timeout=2)
            return True
        except OSError:
            return False

    def alive_node_ids(self) -> set[str]:
        try:
            nodes = self.api("/nodes?view=summary")["data"]["summary"]
        except (OSError, KeyError, TypeError, ValueError):
            return set()
        return {n["raylet"]["nodeId"] for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"}

    def job_status(self, submission_id: str) -> str | None:
        try:
            return self.api(f"/api/jobs/{submission_id}")["status"]
        except (OSError, KeyError, TypeError, ValueError):
            return None

    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``ray <args>`` against this cluster (``ray job ...``) and return its result."""
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def snapshot_code(self) -> str:
        """A copy of what a job's working dir needs (``ovsam_ray/``, ``jobs/``), taken once: jobs
        submitted from it do not see edits others make to the checkout while the tests run."""
        dest = os.path.join(self.temp_dir, "code")
        if not os.path.exists(dest):
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            for name in ("ovsam_ray", "jobs"):
                shutil.copytree(os.path.join(REPO, name), os.path.join(dest, name), ignore=ignore)
            shutil.copy2(os.path.join(REPO, "pyproject.toml"), dest)
        return dest

    def submit(self, submission_id: str, entrypoint: list[str], *, working_dir: str | None = None) -> subprocess.Popen:
        """``ray job submit --working-dir ...`` as a user types it (the working dir defaults to
        :meth:`snapshot_code`); returns the CLI process, which streams the job's log (see
        :meth:`cli_log`) and exits with the job's outcome."""
        working_dir = working_dir or self.snapshot_code()
        cmd = [
            RAY,
            "job",
            "submit",
            "--address",
            self.dashboard_url,
            "--submission-id",
            submission_id,
            "--working-dir",
            working_dir,
            "--",
            *entrypoint,
        ]
        with open(self._cli_log_path(submission_id), "wb") as log:
            return subprocess.Popen(
                cmd, env=self.env, cwd=working_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _cli_log_path(self, submission_id: str) -> str:
        return os.path.join(self.temp_dir, f"submit-{submission_id}.log")

    def cli_log(self, submission_id: str) -> str:
        """What ``ray job submit`` printed so far: the job's log and its final status."""
        with open(self._cli_log_path(submission_id), errors="replace") as f:
            return f.read()

    def processes(self) -> list[int]:
        marker = f"{MARKER_VAR}={self.id}".encode()
        return _cluster_processes(set(self.nodes.values()), marker, self.temp_dir.encode())

    def teardown(self, grace_s: float = 5.0) -> None:
        """Kill every process of this cluster (TERM, then KILL), then delete its temp dir."""
        deadline = time.monotonic() + grace_s
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
            deadline = time.monotonic() + 5
        left = self.processes()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"could not stop cluster processes {left}")


class S3Gate:
    """A TCP proxy 127.0.0.1:<port> -> moto; ``close()`` takes the endpoint down, ``open()`` back up."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[-1].split(":")
        self.target = (host, int(port))
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> S3Gate:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """Refuse new connections and tear down the open ones, as when the server process dies."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            _shut(listener)
        # shutdown() (not just close()) wakes the pipe threads blocked in recv(), so no half-open
        # connection is left for a client to wait on forever.
        for c in conns:
            _shut(c)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _shut(client)
                continue
            with self._lock:
                is_open = self._listener is listener
                if is_open:
                    self._conns.update((client, upstream))
            if not is_open:  # closed while this connection was being set up
                _shut(client)
                _shut(upstream)
                return
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src)
            _shut(dst)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
