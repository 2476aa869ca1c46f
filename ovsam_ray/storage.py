"""Storage paths: local files and ``s3://`` URLs behind one fsspec code path.

Every function takes a URL (a local path, ``file://...`` or ``s3://bucket/key``) and an optional
``s3_endpoint`` (an S3-compatible server such as MinIO or moto). Without it the endpoint comes
from the ``AWS_ENDPOINT_URL`` environment variable, else AWS itself. Credentials are never passed
around here: botocore finds them in the usual places (environment, ``~/.aws``, instance roles).
Anything that may end up in a log, an output or a run record goes through :func:`redact` /
:func:`redact_config` first.

Text from data (tar member names, shard file names, JSON strings) is made storable with
:func:`safe_text`, printable on one log line with :func:`safe_for_log`, and never becomes a path
except through :func:`safe_join`.
"""

from __future__ import annotations

import os
import re
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem

from ovsam_ray.errors import ConfigError, MissingInputError, OVSAMRayError

__all__ = [
    "UnsafePathError",
    "atomic_write_bytes",
    "check_endpoint",
    "exists",
    "get_filesystem",
    "is_remote",
    "join",
    "list_files",
    "open_url",
    "read_bytes",
    "redact",
    "redact_config",
    "remove",
    "safe_for_log",
    "safe_join",
    "safe_text",
    "to_url",
]

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def _protocol(url: str) -> str:
    match = _SCHEME_RE.match(url)
    if not match:
        return "file"
    scheme = match.group(1).lower()
    return "s3" if scheme in ("s3", "s3a") else scheme


def is_remote(url: str) -> bool:
    """True for anything that is not a local path (``s3://``, ``gs://``...)."""
    return _protocol(url) != "file"


def get_filesystem(url: str, *, s3_endpoint: str | None = None) -> tuple[AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``url``; ``path`` is what the filesystem's methods take.

    Local paths are made absolute. For ``s3://`` the endpoint is ``s3_endpoint`` or
    ``$AWS_ENDPOINT_URL``; listings are not cached, because several processes write the same
    output prefix and each must see the others' commit markers.
    """
    protocol = _protocol(url)
    if protocol == "file":
        path = url[len("file://") :] if url.startswith("file://") else url
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    if protocol == "s3":
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        kwargs: dict[str, Any] = {"use_listings_cache": False}
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        path = _SCHEME_RE.sub("", url, count=1).rstrip("/")
        return fsspec.filesystem("s3", **kwargs), path
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def to_url(fs: AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-internal ``path`` back into a URL the user would write."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    if protocol in ("s3", "s3a"):
        return "s3://" + path
    return fs.unstrip_protocol(path)


def check_endpoint(endpoint: str | None) -> None:
    """Raise ``ValueError`` (one line, with an example) unless ``endpoint`` is None or an
    ``http(s)://host[:port]`` URL, before any storage client meets it."""
    if endpoint is None:
        return
    parsed = urllib.parse.urlsplit(endpoint)
    try:
        parsed.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        parsed = parsed._replace(netloc="")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        shown = safe_for_log(redact(endpoint), limit=100)
        raise ConfigError(
            f"--s3-endpoint {shown!r} is not an endpoint URL: expected http(s)://HOST[:PORT], e.g. "
            "http://127.0.0.1:9000 or https://s3.us-east-1.amazonaws.com"
        )


def join(url: str, *names: str) -> str:
    """Join URL/path components with ``/`` (object stores and POSIX paths agree on it)."""
    out = url
    for name in names:
        out = out.rstrip("/") + "/" + name.lstrip("/")
    return out


def exists(url: str, *, s3_endpoint: str | None = None) -> bool:
    """Whether a file (or directory / non-empty prefix) exists at ``url``."""
    fs, path = get_filesystem(url, s3_endpoint=s3_endpoint)
    return bool(fs.exists(path))


def open_url(url: str, mode: str = "rb", *, s3_endpoint: str | None = None) -> IO[Any]:
    """Open ``url`` with fsspec; the result is a seekable file object for reading. Writing to a
    local path creates its missing parent folders (as writing an S3 key does)."""
    fs, path = get_filesystem(url, s3_endpoint=s3_endpoint)
    if not is_remote(url) and any(c in mode for c in "wax"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        return fs.open(path, mode)
    except FileNotFoundError as e:
        raise _no_such_file(url) from e


def read_bytes(url: str, *, s3_endpoint: str | None = None) -> bytes:
    """The whole content of ``url``; a missing file raises :class:`MissingInputError` (a
    ``FileNotFoundError`` naming ``url``, redacted)."""
    fs, path = get_filesystem(url, s3_endpoint=s3_endpoint)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise _no_such_file(url) from e


def _no_such_file(url: str) -> MissingInputError:
    """A file the caller was told to read is not there: a wrong path, one line, no traceback."""
    return MissingInputError(f"no such file: {safe_for_log(redact(url))}")


def atomic_write_bytes(url: str, data: bytes, *, s3_endpoint: str | None = None) -> None:
    """Write ``data`` to ``url`` so that readers see either nothing (or the old file) or all of it.

    Local: the bytes go to a hidden temporary file in the same directory (``.<name>.tmp-<uuid>``,
    so no ``*.parquet`` glob and no pyarrow dataset discovery picks it up), are fsynced, and the
    file is renamed over the target with ``os.replace`` (atomic on POSIX within one filesystem).
    S3: one PUT (or one multipart upload for large objects) from memory; S3 makes an object
    visible only once the whole upload is complete, so no temporary object is needed.
    """
    fs, path = get_filesystem(url, s3_endpoint=s3_endpoint)
    if is_remote(url):
        fs.pipe_file(path, data)
        return
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_files(
    url: str, *, suffix: str | None = None, recursive: bool = False, s3_endpoint: str | None = None
) -> list[str]:
    """Sorted URLs of the files directly under ``url`` (all levels if ``recursive``).

    ``suffix`` filters on the end of the name (``".tar"``). A missing directory gives ``[]``.
    """
    fs, path = get_filesystem(url, s3_endpoint=s3_endpoint)
    if not is_remote(url) and not recursive:  # one scandir, no stat per entry (100,000 markers: ~0.1 s)
        try:
            with os.scandir(path) as entries:
                paths = [os.path.join(path, e.name) for e in entries if e.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(p for p in paths if suffix is None or p.endswith(suffix))
    if not fs.exists(path):
        return []
    if recursive:
        paths = fs.find(path)
    else:
        paths = [e["name"] for e in fs.ls(path, detail=True) if e.get("type") == "file"]
    if suffix is not None:
        paths = [p for p in paths if p.endswith(suffix)]
    return sorted(to_url(fs, p) for p in paths)


def remove(url: str, *, s3_endpoint: str | None = None, missing_ok: bool = True) -> None:
    """Delete one file; a missing file is fine unless ``missing_ok=False``."""
    fs, path = get_filesystem(url, s3_endpoint=s3_endpoint)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(url: str, *, s3_endpoint: str | None = None) -> None:
    """Delete a folder (or ``s3://`` prefix) and everything below it; a missing one is fine."""
    fs, path = get_filesystem(url, s3_endpoint=s3_endpoint)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


# --- redaction -----------------------------------------------------------------------------------

_REDACTED = "***"
_SECRET_KEY_RE = re.compile(
    r"(secret|passw(or)?d|credential|access_key|api_key|private_key|signature|session_token"
    r"|security_token|auth_token|(^|_)token$)",
    re.IGNORECASE,
)
_TEXT_PATTERNS = (
    # user:password@ in URLs
    (re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@"), r"\g<pre>" + _REDACTED + "@"),
    # presigned-URL and similar query parameters
    (
        re.compile(
            r"(?P<pre>[?&](X-Amz-(Credential|Signature|Security-Token)|AWSAccessKeyId|Signature"
            r"|x-amz-security-token|sig|token)=)[^&\s]+",
            re.IGNORECASE,
        ),
        r"\g<pre>" + _REDACTED,
    ),
    # key=value / key: value with a secret-looking key name
    (
        re.compile(
            r"(?P<pre>\b([\w-]*(secret|passw(or)?d|credential|access_key|api_key|private_key)[\w-]*"
            r"|([\w-]*[_-])?token)[\"']?\s*[=:]\s*[\"']?)[^\s\"',&}]+",
            re.IGNORECASE,
        ),
        r"\g<pre>" + _REDACTED,
    ),
    # AWS access key ids
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), _REDACTED),
)
_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECURITY_TOKEN")


def redact(text: str) -> str:
    """Mask credentials in ``text``: URL userinfo, presigned-URL signatures, ``secret=...``-like
    pairs, AWS access key ids, and the literal values of the AWS credential environment variables.
    """
    out = str(text)
    for var in _SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            out = out.replace(value, _REDACTED)
    for pattern, replacement in _TEXT_PATTERNS:
        out = pattern.sub(replacement, out)
    return out


def redact_config(obj: Any) -> Any:
    """A copy of a JSON-like structure with secret-looking keys masked and every string redacted."""
    if isinstance(obj, Mapping):
        return {
            k: (_REDACTED if _SECRET_KEY_RE.search(str(k)) and v is not None and v != "" else redact_config(v))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact_config(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj


# --- text and paths from data ---------------------------------------------------------------------

_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_LOG_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_LOG_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_code_point(ch: str) -> str:
    cp = ord(ch)
    if 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte, as Python's "surrogateescape" keeps it
        return f"\\x{cp - 0xDC00:02x}"
    return _LOG_ESCAPES.get(ch) or (f"\\x{cp:02x}" if cp <= 0xFF else f"\\u{cp:04x}")


def safe_text(text: str) -> str:
    """``text`` with every code point that UTF-8 cannot encode replaced by its escape, so that
    ``safe_text(s).encode("utf-8")`` always succeeds (Arrow, Parquet, JSON and S3 keys need it).

    The rule, applied once wherever text comes from data (tar member names, shard file names,
    JSON strings): a lone surrogate U+DC80..U+DCFF — how Python's ``surrogateescape`` (tarfile,
    ``os.listdir``) carries an undecodable byte 0xNN — becomes the four characters ``\\xNN``;
    any other lone surrogate (e.g. a JSON ``"\\ud800"``) becomes ``\\uXXXX``. Valid text is
    returned unchanged (same object). ``a\\xff`` written literally and a byte 0xff therefore read
    the same; the shard reader keeps keys unique whatever the spelling.
    """
    if not _SURROGATE_RE.search(text):
        return text
    return _SURROGATE_RE.sub(lambda m: _escape_code_point(m.group()), text)


def safe_for_log(text: str, *, limit: int = 300) -> str:
    """``text`` made safe for one log line: control characters (C0, DEL, C1, U+2028/U+2029) are
    escaped (``\\n``, ``\\x1b``, ``\\u2028``), lone surrogates as in :func:`safe_text`, and text
    longer than ``limit`` characters is cut with ``...``. A key holding a newline then cannot
    forge a second log line. For display only: the result is not meant to be parsed back.
    """
    text = str(text)
    if len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    return _LOG_UNSAFE_RE.sub(lambda m: _escape_code_point(m.group()), text)


class UnsafePathError(OVSAMRayError, ValueError):
    """A path built from data would leave its root or cannot be stored; the message says why."""


def safe_join(root: str, relative: str) -> str:
    """``root`` joined with ``relative``, a ``/``-separated path that comes from data (a sample
    key, a category name), guaranteed to stay inside ``root``.

    ``root`` is trusted (a local path or URL). ``relative`` is refused with
    :class:`UnsafePathError` when it is empty, absolute (``/x``), holds a ``..`` component, a
    backslash (a Windows separator or an escape: either way not one path on every store), a NUL,
    or text that UTF-8 cannot encode (see :func:`safe_text`). ``.`` components and repeated
    slashes are dropped (``a/./b//c`` -> ``a/b/c``). Nothing is resolved on disk: the check is on
    the text alone, so it means the same for a local folder and an ``s3://`` prefix.
    """
    problem = _unsafe_relative(relative)
    if problem:
        raise UnsafePathError(f"unsafe path {safe_for_log(repr(relative))} under {redact(root)}: {problem}")
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    return join(root, *parts)


def _unsafe_relative(relative: str) -> str | None:
    if not isinstance(relative, str):
        return f"expected text, got {type(relative).__name__}"
    if "\x00" in relative:
        return "contains a NUL character"
    if "\\" in relative:
        return "contains a backslash"
    if _SURROGATE_RE.search(relative):
        return "is not valid UTF-8 text"
    if relative.startswith("/"):
        return "is absolute"
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts:
        return "is empty"
    if ".." in parts:
        return "contains a '..' component"
    return None
