"""Class text embeddings: ``embed_vocabulary``, the one function inference and training embed a
vocabulary with; the cache it reads and fills, keyed by CLIP model + weights hash + vocabulary hash
(DESIGN 2.9); and the reference OV-SAM embedding files."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import posixpath
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor, nn

from ovsam_ray.errors import ConfigError, MissingInputError
from ovsam_ray.model.presets import clip_tokenizer, get_preset
from ovsam_ray.model.text_embedding import Tokenizer, embed_class_names
from ovsam_ray.vocabulary import Vocabulary, load_templates, sha256_json

__all__ = [
    "DEFAULT_CACHE_ROOT",
    "TextEmbeddingCache",
    "TextEmbeddingKey",
    "class_text_embeddings",
    "embed_vocabulary",
    "load_class_embeddings",
    "text_matmul_precision",
]

_log = logging.getLogger(__name__)

DEFAULT_CACHE_ROOT = "~/.cache/ovsam_ray/text"
_CACHE_FORMAT = "ovsam_ray.text_embeddings/1"


def load_class_embeddings(path: str) -> Tensor:
    """Read a class-embedding file in the reference OV-SAM format (``~/.cache/embd/<name>.pth``).

    The file holds a (C, S, D) tensor, bare or as the only tensor of a dict, loaded with
    ``weights_only=True``. Returns it as float32 (C, S, D); raises ValueError naming the file when
    it is not 3-D or not L2-normalised along D.
    """
    try:
        with fsspec.open(path, "rb") as f:
            obj = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise MissingInputError(f"class embeddings {path}: no such file") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ConfigError(f"{path}: cannot read class embeddings (torch.load, weights_only=True): {e}") from e
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, Tensor)]
        if len(tensors) != 1:
            raise ConfigError(f"{path}: expected a tensor or a dict with one tensor, got keys {list(obj)}")
        obj = tensors[0]
    if not isinstance(obj, Tensor) or obj.dim() != 3 or not obj.is_floating_point():
        what = f"shape {tuple(obj.shape)} {obj.dtype}" if isinstance(obj, Tensor) else type(obj).__name__
        raise ConfigError(
            f"{path}: class embeddings must be a float (num_classes, num_synonyms, dim) tensor, got {what}"
        )
    emb = obj.float().contiguous()
    norms = emb.norm(dim=-1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        raise ConfigError(
            f"{path}: class embeddings must be L2-normalised along the last dim; norms range "
            f"{norms.min().item():.4g}..{norms.max().item():.4g}"
        )
    return emb


class TextEmbeddingKey(NamedTuple):
    """What class text embeddings depend on."""

    clip_name: str
    clip_weights_sha256: str
    vocabulary_sha256: str
    templates_sha256: str = ""

    def digest(self) -> str:
        return sha256_json([_CACHE_FORMAT, *self])


class TextEmbeddingCache:
    """Class text embeddings on disk or object storage, one ``<key digest>.pt`` file per key.

    Args:
        root: a local directory or fsspec URL (``s3://bucket/prefix``); default ``~/.cache/ovsam_ray/text``.
    """

    def __init__(self, root: str | None = None) -> None:
        root = root or DEFAULT_CACHE_ROOT
        self.root = root if "://" in root else os.path.expanduser(root)
        self._fs, self._dir = fsspec.core.url_to_fs(self.root)
        self._local = isinstance(self._fs, LocalFileSystem)

    def _file(self, key: TextEmbeddingKey) -> str:
        return posixpath.join(self._dir, f"{key.digest()}.pt")

    def path(self, key: TextEmbeddingKey) -> str:
        """Where the entry for ``key`` lives (a local path or a URL)."""
        return self._file(key) if self._local else self._fs.unstrip_protocol(self._file(key))

    def get(self, key: TextEmbeddingKey) -> Tensor | None:
        """(C, S, D) float32 embeddings, or None on a miss; an unreadable entry counts as a miss."""
        try:
            with self._fs.open(self._file(key), "rb") as f:
                payload = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            _log.warning("ignoring unreadable text-embedding cache entry %s: %s", self.path(key), e)
            return None
        if not isinstance(payload, dict) or payload.get("key") != list(key):
            _log.warning("ignoring text-embedding cache entry %s: it belongs to another key", self.path(key))
            return None
        embeddings = payload.get("embeddings")
        return embeddings if isinstance(embeddings, Tensor) else None

    def put(self, key: TextEmbeddingKey, embeddings: Tensor) -> None:
        """Store (C, S, D) embeddings; readers never see a partial file."""
        buffer = io.BytesIO()
        torch.save({"key": list(key), "embeddings": embeddings.detach().cpu().contiguous()}, buffer)
        path = self._file(key)
        if not self._local:
            self._fs.pipe_file(path, buffer.getvalue())  # an object-store PUT is atomic
            return
        os.makedirs(self._dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getvalue())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def class_text_embeddings(
    vocab: Vocabulary,
    clip_model: nn.Module,
    tokenizer: Tokenizer,
    *,
    clip_name: str,
    clip_weights_sha256: str,
    cache: TextEmbeddingCache | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 512,
) -> Tensor:
    """(C, S_max, D) float32 CPU text embeddings of ``vocab``; read from ``cache`` when present there.

    ``clip_name`` and ``clip_weights_sha256`` identify the text tower for the cache key; the
    embeddings themselves come from ``embed_class_names`` with the 14 ViLD templates.
    """
    templates = load_templates()
    key = TextEmbeddingKey(clip_name, clip_weights_sha256, vocab.sha256, sha256_json(templates))
    if cache is not None:
        cached = cache.get(key)
        if cached is not None and tuple(cached.shape[:2]) == (vocab.num_classes, vocab.max_synonyms):
            return cached.float()
    embeddings = embed_class_names(
        clip_model, tokenizer, vocab.synonyms, templates, batch_size=batch_size, device=device
    )
    if cache is not None:
        cache.put(key, embeddings)
    return embeddings


@contextlib.contextmanager
def text_matmul_precision(device: str | torch.device) -> Iterator[None]:
    """TF32 matmuls for the CLIP text tower on CUDA. in21k is 40,737 names x 14 templates = 0.57M
    texts, ~7 PFLOP through RN50x16's tower: minutes in strict fp32, seconds in TF32, whose ~1e-3
    relative rounding is far below the bf16 autocast the image side runs in (tests/test_gpu.py
    checks the embeddings against the CPU's). On a CPU nothing changes (strict fp32)."""
    if torch.device(device).type != "cuda":
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def embed_vocabulary(
    vocab: Vocabulary,
    clip_model: nn.Module,
    preset: str,
    *,
    clip_weights_sha256: str | None,
    cache_root: str | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(C, S, D) float32 CPU text embeddings of ``vocab`` through the text tower of ``clip_model``,
    the CLIP of ``preset``, run on ``device`` (the model goes there and back to where it was).

    ``clip_weights_sha256``: the sha256 of the CLIP weights file, which keys the cache under
    ``cache_root`` (default ``~/.cache/ovsam_ray/text``); None for random weights, which are
    never cached.
    """
    cache = None if clip_weights_sha256 is None else TextEmbeddingCache(cache_root)
    home = next(clip_model.parameters()).device
    with text_matmul_precision(device):
        text = class_text_embeddings(
            vocab,
            clip_model.to(device),
            clip_tokenizer(preset),
            clip_name=f"{preset}:{get_preset(preset).short_name}",
            clip_weights_sha256=clip_weights_sha256 or "random",
            cache=cache,
            device=device,
        )
    clip_model.to(home)
    return text
