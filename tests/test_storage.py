"""ovsam_ray.storage: one code path for local files and S3 (moto server), atomic writes, redaction."""

from __future__ import annotations

import os

import pytest

from ovsam_ray import storage


def test_get_filesystem_local_paths(tmp_path):
    fs, path = storage.get_filesystem(str(tmp_path / "a" / ".." / "b"))
    assert path == str(tmp_path / "b")
    assert "file" in fs.protocol
    _, path = storage.get_filesystem(f"file://{tmp_path}/x.tar")
    assert path == f"{tmp_path}/x.tar"
    assert not storage.is_remote(str(tmp_path)) and storage.is_remote("s3://bucket/x")


def test_get_filesystem_s3_endpoint_from_argument_or_env(monkeypatch):
    fs, path = storage.get_filesystem("s3://bucket/prefix/", s3_endpoint="http://127.0.0.1:9")
    assert path == "bucket/prefix"
    assert fs.storage_options.get("endpoint_url") == "http://127.0.0.1:9"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    fs, _ = storage.get_filesystem("s3://bucket/x")
    assert fs.storage_options.get("endpoint_url") == "http://127.0.0.1:10"


def test_join_and_to_url():
    assert storage.join("s3://b/p/", "x.parquet") == "s3://b/p/x.parquet"
    assert storage.join("/data/out", "_committed", "/s.json") == "/data/out/_committed/s.json"
    fs, path = storage.get_filesystem("s3://b/p/x")
    assert storage.to_url(fs, path) == "s3://b/p/x"


def test_atomic_write_local_replaces_and_leaves_no_temporaries(tmp_path):
    url = str(tmp_path / "sub" / "f.bin")
    storage.atomic_write_bytes(url, b"one")
    storage.atomic_write_bytes(url, b"two")
    assert storage.read_bytes(url) == b"two"
    with storage.open_url(url) as f:
        assert f.read() == b"two"
    assert os.listdir(tmp_path / "sub") == ["f.bin"]


def test_atomic_write_local_failure_keeps_old_content(tmp_path, monkeypatch):
    url = str(tmp_path / "f.bin")
    storage.atomic_write_bytes(url, b"old")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        storage.atomic_write_bytes(url, b"new content")
    assert storage.read_bytes(url) == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_open_url_for_writing_creates_local_parent_folders(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.json"
    with storage.open_url(str(target), "w") as f:
        f.write("{}")
    assert target.read_text() == "{}"


def test_list_exists_remove_local(tmp_path):
    for name in ("b.tar", "a.tar", "c.txt", "d/e.tar"):
        storage.atomic_write_bytes(str(tmp_path / name), b"x")
    assert storage.list_files(str(tmp_path), suffix=".tar") == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert storage.list_files(str(tmp_path), suffix=".tar", recursive=True)[-1] == str(tmp_path / "d" / "e.tar")
    assert storage.list_files(str(tmp_path / "missing")) == []
    assert storage.exists(str(tmp_path / "a.tar"))
    storage.remove(str(tmp_path / "a.tar"))
    storage.remove(str(tmp_path / "a.tar"))  # missing is fine by default
    with pytest.raises(FileNotFoundError):
        storage.remove(str(tmp_path / "a.tar"), missing_ok=False)
    assert not storage.exists(str(tmp_path / "a.tar"))


def test_s3_roundtrip(s3_server, s3_bucket):
    root = f"s3://{s3_bucket}/out"
    storage.atomic_write_bytes(storage.join(root, "b.tar"), b"bb", s3_endpoint=s3_server)
    storage.atomic_write_bytes(storage.join(root, "a.tar"), b"aa", s3_endpoint=s3_server)
    storage.atomic_write_bytes(storage.join(root, "sub", "c.tar"), b"cc", s3_endpoint=s3_server)
    assert storage.list_files(root, s3_endpoint=s3_server) == [f"{root}/a.tar", f"{root}/b.tar"]
    assert storage.list_files(root + "/", recursive=True, s3_endpoint=s3_server)[-1] == f"{root}/sub/c.tar"
    assert storage.read_bytes(f"{root}/a.tar", s3_endpoint=s3_server) == b"aa"
    with storage.open_url(f"{root}/b.tar", s3_endpoint=s3_server) as f:
        f.seek(1)
        assert f.read() == b"b"
    assert storage.exists(f"{root}/a.tar", s3_endpoint=s3_server)
    storage.remove(f"{root}/a.tar", s3_endpoint=s3_server)
    assert not storage.exists(f"{root}/a.tar", s3_endpoint=s3_server)
    assert storage.list_files(f"s3://{s3_bucket}/nothing", s3_endpoint=s3_server) == []


@pytest.mark.parametrize(
    "text, secret",
    [
        ("s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@host/bucket", "wJalrXUtnFEMI"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Signature=deadbeef&X-Amz-Credential=AK/x", "deadbeef"),
        ("aws_secret_access_key=abc123xyz in config", "abc123xyz"),
        ('{"aws_session_token": "tok-987"}', "tok-987"),
        ("key id AKIAIOSFODNN7EXAMPLE used", "AKIAIOSFODNN7EXAMPLE"),
        ("password: hunter22", "hunter22"),
    ],
)
def test_redact_masks_credentials(text, secret):
    out = storage.redact(text)
    assert secret not in out and "***" in out


def test_redact_env_values_and_keeps_plain_text(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-42")
    assert storage.redact("failed with s3cr3t-value-42 somewhere") == "failed with *** somewhere"
    for plain in ("s3://bucket/shards/shard-000001.tar", "max_tokens=77 tokenizer: bpe", "key=000123"):
        assert storage.redact(plain) == plain


def test_redact_config_nested():
    cfg = {
        "output": "s3://user:pw@host/out",
        "storage": {"aws_secret_access_key": "zzz", "endpoint": "http://127.0.0.1:9000", "token": None},
        "list": ["password=abc", 3],
        "batch_size": 8,
        "max_tokens": 77,
    }
    out = storage.redact_config(cfg)
    assert out["storage"]["aws_secret_access_key"] == "***"
    assert out["storage"]["endpoint"] == "http://127.0.0.1:9000"
    assert out["storage"]["token"] is None
    assert "pw" not in out["output"] and out["list"] == ["password=***", 3] and out["batch_size"] == 8
    assert out["max_tokens"] == 77
    assert cfg["storage"]["aws_secret_access_key"] == "zzz"  # input untouched


# --- text and paths from data ---------------------------------------------------------------------


def test_safe_text_escapes_undecodable_bytes_and_lone_surrogates():
    name = b"caf\xe9\xff.jpg".decode("utf-8", "surrogateescape")  # as tarfile / os.listdir give it
    assert storage.safe_text(name) == "caf\\xe9\\xff.jpg"
    assert storage.safe_text("id-\ud800-\udfff") == "id-\\ud800-\\udfff"
    for text in (name, "\ud83d", "a\udc80b"):
        storage.safe_text(text).encode("utf-8")  # what Arrow and Parquet need
    plain = "ключ/画像 😀\n"
    assert storage.safe_text(plain) is plain


def test_safe_for_log_cannot_forge_a_line():
    key = "img\n2024-01-01 INFO job finished\r\x1b[31m\u2028\x85end\udcff"
    out = storage.safe_for_log(key)
    assert out == "img\\n2024-01-01 INFO job finished\\r\\x1b[31m\\u2028\\x85end\\xff"
    assert not any(c in out for c in "\n\r\x1b\u2028\x85")
    assert storage.safe_for_log("x" * 1000, limit=10) == "x" * 7 + "..."
    assert storage.safe_for_log("tab\tok") == "tab\\tok"


@pytest.mark.parametrize(
    "relative, expected",
    [
        ("a/b.png", "/out/a/b.png"),
        ("a/./b//c.png", "/out/a/b/c.png"),
        ("..png", "/out/..png"),
        ("ключ 😀", "/out/ключ 😀"),
    ],
)
def test_safe_join_keeps_paths_inside_root(relative, expected):
    assert storage.safe_join("/out", relative) == expected
    assert storage.safe_join("s3://b/out/", relative) == "s3://b" + expected


@pytest.mark.parametrize(
    "relative, problem",
    [
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("a/..", "'..'"),
        ("/etc/passwd", "absolute"),
        ("//host/share", "absolute"),
        ("a\\..\\..\\x", "backslash"),
        ("C:\\x", "backslash"),
        ("a\x00b", "NUL"),
        ("", "empty"),
        ("./.", "empty"),
        ("bad\udcff", "UTF-8"),
    ],
)
def test_safe_join_refuses_unsafe_paths(relative, problem):
    with pytest.raises(storage.UnsafePathError, match=problem):
        storage.safe_join("/out", relative)
    assert issubclass(storage.UnsafePathError, ValueError)
