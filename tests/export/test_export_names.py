"""``data_file_name``: the one rule turning a shard name and an image key (data) into a file name
under an export folder. Properties over generated names: contained, injective (prefix keys
included), stable, within the OS limits, creatable on a real disk."""

from __future__ import annotations

import os
import posixpath
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovsam_ray.export.paths import NAME_BYTES, SUFFIXES, data_file_name

# pieces that break naive joins: separators, dots, escapes, controls, surrogates, long runs
_ATOMS = [
    "/",
    "//",
    ".",
    "..",
    "../",
    "%",
    "%2E",
    "%~",
    "\\",
    "\x00",
    "\n",
    "\x7f",
    "\u2028",
    "\udce9",
    "\ud800",
    "d.jpg",
    ".jpg",
    ".JSON",
    "~",
    "é",
    "日本",
    "🐈",
    "C:",
    "s3://",
    "x" * 120,
    "y" * 254,
]
_CHARS = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None)
_PIECE = st.one_of(st.sampled_from(_ATOMS), st.text(_CHARS, max_size=6))
NAMES = st.lists(_PIECE, max_size=10).map("".join)
EXTS = st.sampled_from(sorted(SUFFIXES))
_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _components(name: str) -> list[str]:
    return name.split("/")


@_SETTINGS
@given(NAMES, NAMES, EXTS)
def test_contained_and_within_os_limits(shard, key, ext):
    name = data_file_name(shard, key, ext)
    assert not name.startswith("/") and "\\" not in name and "\x00" not in name
    name.encode("utf-8")  # no surrogates: every store takes it
    for part in _components(name):
        assert part not in ("", ".", "..") and not part.startswith(".")
        assert len(part.encode("utf-8")) <= NAME_BYTES <= 255
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in part)
    root = "/export/root"
    assert posixpath.normpath(posixpath.join(root, name)).startswith(root + "/")
    assert name == data_file_name(shard, key, None) + f".{ext}"  # one stem for the image, its labels, its json
    assert name.split("/", 1)[1] == data_file_name(None, key, ext)  # a tar member or a record's file_name
    assert len(name.encode("utf-8")) <= 1024


@_SETTINGS
@given(NAMES, NAMES, EXTS, NAMES, NAMES, EXTS)
def test_injective_and_no_file_is_a_folder(s1, k1, e1, s2, k2, e2):
    a, b = data_file_name(s1, k1, e1), data_file_name(s2, k2, e2)
    if (s1, k1, e1) != (s2, k2, e2):
        assert a != b
    if (s1, k1) != (s2, k2):
        assert not b.startswith(a + "/") and not a.startswith(b + "/")


@_SETTINGS
@given(st.lists(st.tuples(NAMES, NAMES), min_size=2, max_size=12, unique=True), EXTS)
def test_prefix_keys_get_distinct_files_that_do_not_block_each_other(pairs, ext):
    # the generated keys plus their prefixes as path components (d, d.jpg/x, d.jpg/x/...)
    keys = {(s, k) for s, k in pairs} | {(s, f"{k}.{ext}/{k}") for s, k in pairs}
    names = [data_file_name(s, k, ext) for s, k in keys]
    assert len(set(names)) == len(keys)
    folders = {"/".join(_components(n)[:i]) for n in names for i in range(1, len(_components(n)))}
    assert not folders & set(names)


def test_shard_only_and_key_only_names():
    assert data_file_name("shard-000000", None, "tar") == "shard-000000.tar"
    assert data_file_name(None, "dir/000123", "json") == "dir/000123.json"
    assert data_file_name("s", "k", None) == "s/k"
    with pytest.raises(ValueError, match="extension"):
        data_file_name("s", "k", "exe")


# fixed values: a change here renames every export an earlier version wrote
GOLDEN = [
    (("shard-000000", "000000000005", "png"), "shard-000000/000000000005.png"),
    (("shard-000000", "dir/v1.0/img", "jpg"), "shard-000000/dir/v1.0/img.jpg"),
    (("s", "d", "jpg"), "s/d.jpg"),
    (("s", "d.jpg/x", "jpg"), "s/d%2Ejpg/x.jpg"),
    (("s", "../../etc/passwd", "json"), "s/%2E./%2E./etc/passwd.json"),
    (("s", "/abs/x", "txt"), "s/%/abs/x.txt"),
    (("s", "a//b/", "png"), "s/a/%/b/%.png"),
    (("s", "caf\\xe9", "jpg"), "s/caf%5Cxe9.jpg"),
    (("s", "caf\udce9", "jpg"), "s/caf%uDCE9.jpg"),
    (("s", "ctl\x01\n%", "jpg"), "s/ctl%01%0A%25.jpg"),
    (("../x", ".hidden", "jpg"), "%2E.%2Fx/%2Ehidden.jpg"),
    (("contact_sheet.png", "k", "png"), "contact_sheet%2Epng/k.png"),
    (("s", "k" * 300, "jpg"), "s/" + "k" * 173 + "%~17b16d8ef494060fefa3.jpg"),
]


@pytest.mark.parametrize(("args", "expected"), GOLDEN)
def test_golden_names(args, expected):
    assert data_file_name(*args) == expected


def test_stable_across_processes():
    """No per-process state (``hash()`` is salted per process): another interpreter gives the same names."""
    code = (
        "import json, sys; from ovsam_ray.export.paths import data_file_name as f; "
        "print(json.dumps([f(*a) for a in json.loads(sys.stdin.read())]))"
    )
    args = [a for a, _ in GOLDEN] + [("s", "/".join(["p" * 100] * 12), "png")]
    import json

    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(args), capture_output=True, text=True, env=env, check=True
    ).stdout
    assert json.loads(out) == [data_file_name(*a) for a in args]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(NAMES, NAMES), min_size=1, max_size=8, unique=True), EXTS)
def test_every_name_is_a_file_the_os_creates(tmp_path, pairs, ext):
    root = tempfile.mkdtemp(dir=tmp_path)  # a fresh folder per example
    for shard, key in pairs:
        path = os.path.join(root, data_file_name(shard, key, ext))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "x") as f:  # "x": a second key landing on one file fails here
            f.write(f"{shard!r} {key!r}")
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert len(files) == len(pairs)


def test_long_paths_become_one_hashed_component():
    deep = "/".join(["p" * 100] * 30)  # 3 kB: past PATH_MAX with a long export root
    name = data_file_name("s", deep, "jpg")
    assert len(name.encode()) < 512 and name.count("/") == 1 and "%~" in name
    assert name != data_file_name("s", deep + "/q", "jpg")
