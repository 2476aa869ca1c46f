"""Shared fixtures: a local S3-compatible server (moto) and small synthetic shards; the markers
``ray``, ``cluster`` and ``subprocess`` put on each test by what it starts (pyproject's markers)."""

from __future__ import annotations

import inspect
import os
import re
import socket
import sys
import uuid
import warnings
from collections.abc import Iterator

import pytest

# What in a test's source (its body, the module-level helpers it calls, the fixtures it uses) says
# it starts Ray: in this process, in a CLI subprocess (--ray-address local), or as a real cluster.
_STARTS_RAY = re.compile(r"\bray\.init\(|--ray-address|\bLocalRayCluster\b|\binit_ray\(")
_STARTS_SUBPROCESS = re.compile(r"\bsubprocess\.(run|Popen|check_call|check_output|call)\b")
# Modules whose every test runs a multi-node cluster on this machine or takes S3 down mid-job.
_CLUSTER_MODULES = {"test_real_cluster.py"}


def _source(obj: object) -> str:
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def _sources(item: pytest.Item) -> str:
    """The test's own source, that of the module-level functions it names, and that of every
    fixture it uses (``item.fixturenames`` is already transitive) -- one level of helpers."""
    func = getattr(item, "function", None)
    if func is None:
        return ""
    text = _source(func)
    module = sys.modules.get(func.__module__)
    parts = [text]
    for name in set(re.findall(r"\b([A-Za-z_]\w*)\(", text)):
        helper = getattr(module, name, None)
        if inspect.isfunction(helper) and helper.__module__ == func.__module__:
            parts.append(_source(helper))
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    for defs in (getattr(fixtureinfo, "name2fixturedefs", None) or {}).values():
        for fixturedef in defs:
            parts.append(_source(getattr(fixturedef, "func", None)))
    return "\n".join(parts)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test ``ray`` / ``cluster`` / ``subprocess`` by what it starts, so the fast lane
    (``dev/test.sh --fast``: ``-m "not ray and not cluster and not slow"``) never needs a mark to
    be remembered. An explicit mark in a test file adds to these."""
    for item in items:
        text = _sources(item)
        if item.path.name in _CLUSTER_MODULES:
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.ray)
        if "ray_local" in getattr(item, "fixturenames", ()) or _STARTS_RAY.search(text):
            item.add_marker(pytest.mark.ray)
        if _STARTS_SUBPROCESS.search(text):
            item.add_marker(pytest.mark.subprocess)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Warn about a test that started Ray in this process without being marked ``ray``: the
    fast lane would then start Ray after all (the rules above missed how it does)."""
    ray = sys.modules.get("ray")
    before = bool(ray is not None and ray.is_initialized())
    try:
        return (yield)
    finally:
        ray = sys.modules.get("ray")
        if not before and ray is not None and ray.is_initialized() and item.get_closest_marker("ray") is None:
            warnings.warn(
                f"{item.nodeid} started Ray but is not marked ray: add @pytest.mark.ray",
                pytest.PytestWarning,
                stacklevel=1,
            )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 and return its endpoint URL.

    Dummy credentials go into the environment so botocore never looks further (no ~/.aws, no
    instance metadata); tests pass the endpoint explicitly.
    """
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL",
        )
    }
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "test-access-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tmp_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three small synthetic shards (10 images of 64x48) in a session temp folder."""
    from ovsam_ray.data.synthetic import generate_shards

    root = tmp_path_factory.mktemp("shards")
    return generate_shards(str(root), num_images=10, images_per_shard=4, seed=7, image_size=(64, 48))


@pytest.fixture(scope="session")
def ray_local(s3_server: str) -> Iterator[None]:
    """A session-scoped local Ray with 2 CPUs. Started after the S3 server so that its workers
    inherit the dummy AWS credentials."""
    import ray

    if not ray.is_initialized():
        # tests/helpers on the workers' path: test-only user detectors are imported there by name.
        tests_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
        path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": path}},
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def shapes_vocab(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A .txt vocabulary of the synthetic shape classes."""
    from ovsam_ray.data.synthetic import shape_vocabulary_names

    path = tmp_path_factory.mktemp("vocab") / "shapes.txt"
    path.write_text("\n".join(shape_vocabulary_names()) + "\n")
    return str(path)


class Bystanders:
    """A user's own files (a ``.parquet``, a ``.json``, a ``.tar``) planted inside and beside an
    output folder; :meth:`check` asserts every one is still there, byte for byte."""

    NAMES = ("user-table.parquet", "user-notes.json", "user-archive.tar")

    def __init__(self) -> None:
        self.files: dict[str, str] = {}

    def _plant(self, path: str) -> None:
        import hashlib
        import io as _io
        import tarfile

        import pyarrow as pa
        import pyarrow.parquet as pq

        os.makedirs(os.path.dirname(path), exist_ok=True)
        if path.endswith(".parquet"):
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table({"mine": [1, 2, 3]}), sink)
            data = sink.getvalue().to_pybytes()
        elif path.endswith(".tar"):
            buf = _io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                info = tarfile.TarInfo("mine.txt")
                info.size = 4
                tar.addfile(info, _io.BytesIO(b"mine"))
            data = buf.getvalue()
        else:
            data = b'{"mine": true}\n'
        with open(path, "wb") as f:
            f.write(data)
        self.files[path] = hashlib.sha256(data).hexdigest()

    def beside(self, output: str | os.PathLike) -> None:
        """Plant the files next to ``output`` (in its parent folder, named after it)."""
        out = os.path.abspath(os.fspath(output)).rstrip(os.sep)
        for name in self.NAMES:
            self._plant(f"{out}.{name}")

    def inside(self, output: str | os.PathLike) -> None:
        """Plant the files in ``output`` (created if missing)."""
        for name in self.NAMES:
            self._plant(os.path.join(os.fspath(output), name))

    def around(self, output: str | os.PathLike) -> None:
        self.beside(output)
        self.inside(output)

    def check(self) -> None:
        import hashlib

        for path, digest in self.files.items():
            assert os.path.isfile(path), f"bystander {path} was deleted"
            with open(path, "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == digest, f"bystander {path} was changed"


@pytest.fixture
def bystanders() -> Iterator[Bystanders]:
    """Files of a user's own beside and inside output folders, checked unchanged after the test."""
    planted = Bystanders()
    yield planted
    planted.check()
