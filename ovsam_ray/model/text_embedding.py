"""Class text embeddings for the open-vocabulary classifier (DESIGN 2.9).

For every class and every synonym of that class, the synonym is written into each prompt template,
encoded by the CLIP text tower, L2-normalised, averaged over the templates and re-normalised. Classes
are padded to the largest synonym count by repeating their first synonym, so the classifier's
max-over-synonyms is unaffected by the padding. Result: (num_classes, max_synonyms, D) float32.

Pure torch + open_clip: no file system, no logging.
"""

import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovsam_ray.vocabulary import clean_class_name

__all__ = [
    "average_template_embeddings",
    "clean_class_name",
    "embed_class_names",
    "pad_synonyms",
    "template_tokens",
]

Tokenizer = Callable[[list[str]], Tensor]


def average_template_embeddings(embeddings: Tensor) -> Tensor:
    """Average raw text embeddings over prompt templates.

    Args:
        embeddings: (..., T, D) raw (unnormalised) CLIP text embeddings of one name written into T
            templates. Leading dims may be empty.

    Returns:
        (..., D) float32: each template embedding L2-normalised along D, averaged over T, and the
        mean L2-normalised again. Empty leading dims give an empty (..., D) result.

    Raises:
        ValueError: if the input has fewer than 2 dims or T == 0 (a mean over no templates).
    """
    if embeddings.dim() < 2:
        raise ValueError(f"expected (..., T, D) embeddings, got shape {tuple(embeddings.shape)}")
    if embeddings.shape[-2] == 0:
        raise ValueError("cannot average over zero templates: embeddings have T == 0")
    per_template = F.normalize(embeddings.float(), dim=-1)
    return F.normalize(per_template.mean(dim=-2), dim=-1)


def _padding_index(counts: Sequence[int]) -> Tensor:
    """(C, S_max) int64 rows into a flat (sum(counts), D) table; padding points at the first synonym."""
    num_classes = len(counts)
    max_count = max(counts, default=0)
    counts_t = torch.as_tensor(list(counts), dtype=torch.long)
    offsets = torch.cumsum(counts_t, dim=0) - counts_t
    slot = torch.arange(max_count, dtype=torch.long).expand(num_classes, max_count)
    slot = torch.where(slot < counts_t[:, None], slot, torch.zeros_like(slot))
    return offsets[:, None] + slot


def _check_counts(counts: Sequence[int]) -> None:
    empty = [i for i, c in enumerate(counts) if c <= 0]
    if empty:
        raise ValueError(f"every class needs at least one synonym; classes without any: {empty[:10]}")


def _gather_padded(flat: Tensor, counts: Sequence[int]) -> Tensor:
    """Gather a flat (N, D) table of synonym embeddings into (C, S_max, D), padding by repetition."""
    _check_counts(counts)
    if flat.shape[0] != sum(counts):
        raise ValueError(f"{flat.shape[0]} synonym embeddings for synonym counts summing to {sum(counts)}")
    return flat[_padding_index(counts).to(flat.device)]


def pad_synonyms(per_class: Sequence[Tensor], *, dim: int = 0) -> Tensor:
    """Stack per-class synonym embeddings, padding each class by repeating its FIRST synonym.

    Args:
        per_class: C tensors, the i-th of shape (S_i, D) with S_i >= 1 and the same D throughout.
        dim: D of the result when ``per_class`` is empty (there is nothing to read it from).

    Returns:
        (C, S_max, D) with ``out[i, :S_i] == per_class[i]`` and ``out[i, S_i:] == per_class[i][0]``.
        An empty list gives a (0, 0, dim) tensor.
    """
    if len(per_class) == 0:
        return torch.zeros(0, 0, dim)
    shapes = {tuple(t.shape[1:]) for t in per_class}
    if any(t.dim() != 2 for t in per_class) or len(shapes) != 1:
        raise ValueError(f"expected (S_i, D) tensors sharing one D, got shapes {[tuple(t.shape) for t in per_class]}")
    counts = [int(t.shape[0]) for t in per_class]
    return _gather_padded(torch.cat(list(per_class), dim=0), counts)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _char_class(ch: str) -> str:
    """CLIP's pre-tokenizer regex splits text into runs of letters, single digits and runs of
    other non-space characters; this is the class of ``ch`` in those terms."""
    if ch.isspace():
        return " "
    return {"L": "L", "N": "N"}.get(unicodedata.category(ch)[0], "O")


def _splits_between(left: str, right: str) -> bool:
    """Whether CLIP's pre-tokenizer always starts a new token between ``left``'s last character
    and ``right``'s first, so that encoding the two apart gives the tokens of the whole.
    A space, or two different classes, split; digits are single tokens; an apostrophe on the left
    could join a following letter (``'s``, ``'t``...)."""
    if not left or not right:
        return True
    a, b = _char_class(left[-1]), _char_class(right[0])
    if " " in (a, b):
        return True
    return (a == b == "N") or (a != b and left[-1] != "'")


def _spliceable(name: str) -> bool:
    """Whether the tokenizer's cleaning (ftfy, HTML unescaping, whitespace, lower case) leaves
    ``name`` the same alone as inside a template: cleaned names without ``&``/``;``."""
    return "&" not in name and ";" not in name and name == " ".join(name.split()) and name == name.lower()


def _splice_tokenizer(tokenizer: Tokenizer) -> Any:
    """open_clip's BPE ``SimpleTokenizer`` (whose ``encode`` maps a string to token ids without
    start/end tokens) behind ``tokenizer``, or None for any other tokenizer."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    ok = all(hasattr(inner, a) for a in ("encode", "sot_token_id", "eot_token_id", "context_length"))
    return inner if ok and getattr(inner, "reduction_fn", None) is None else None


def template_tokens(tokenizer: Tokenizer, names: Sequence[str], templates: Sequence[str]) -> Tensor:
    """(len(names) * T, L) token ids of every name written into every template, names outer:
    exactly ``tokenizer([t.format(n) for n in names for t in templates])``.

    With open_clip's BPE tokenizer each name is encoded once and spliced between the encoded
    template parts (a 21k vocabulary is ~570k texts: tens of seconds one by one); the pieces are
    those of the whole text wherever the pre-tokenizer splits at both joins (``_splits_between``)
    and cleaning cannot reach across them (``_spliceable``); any other name is tokenized whole.
    Over-long texts are cut at the context length with the end token last, as the tokenizer does.
    Other tokenizers (Hugging Face's) get the texts."""
    bpe = _splice_tokenizer(tokenizer)
    if bpe is None:
        return tokenizer([t.format(n) for n in names for t in templates])
    parts = [t.split("{}", 1) for t in templates]
    encoded = [(bpe.encode(pre), bpe.encode(post)) for pre, post in parts]
    length = bpe.context_length
    out = np.zeros((len(names) * len(templates), length), np.int64)
    row = 0
    for name in names:
        splice = _spliceable(name) and all(
            _splits_between(pre, name) and _splits_between(name, post) for pre, post in parts
        )
        name_ids = bpe.encode(name) if splice else None
        for template, (pre, post) in zip(templates, encoded):
            body = pre + name_ids + post if splice else bpe.encode(template.format(name))
            ids = [bpe.sot_token_id, *body, bpe.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = bpe.eot_token_id
            out[row, : len(ids)] = ids
            row += 1
    return torch.from_numpy(out)


def _encode_chunk(
    clip_model: Any,
    tokenizer: Tokenizer,
    names: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
) -> Tensor:
    """(n, D) float32 CPU embeddings of n names, each averaged over all templates."""
    tokens = template_tokens(tokenizer, names, templates).to(device)
    raw = clip_model.encode_text(tokens)
    raw = raw.reshape(len(names), len(templates), raw.shape[-1])
    return average_template_embeddings(raw).cpu()


def embed_class_names(
    clip_model: nn.Module,
    tokenizer: Tokenizer,
    synonyms: Sequence[Sequence[str]],
    templates: Sequence[str],
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> Tensor:
    """Text classifier weights for a vocabulary.

    Args:
        clip_model: an open_clip model (anything with ``encode_text(tokens) -> (N, D)``).
        tokenizer: maps a list of N strings to (N, L) token ids (``open_clip.get_tokenizer(...)``).
        synonyms: C lists of names, one list per class, each with at least one name. Underscores
            become spaces (see ``clean_class_name``).
        templates: T prompt templates, each with one ``{}`` for the name.
        batch_size: at most this many texts per ``encode_text`` call (at least one name's T
            templates); memory stays bounded by it for any number of classes.
        device: where to run the text tower; default: the device of the model's parameters.

    Returns:
        (C, S_max, D) float32 on the CPU, L2-normalised along D; classes with fewer than S_max
        synonyms repeat their first synonym. C == 0 gives a (0, 0, 0) tensor.
    """
    if len(templates) == 0:
        raise ValueError("need at least one prompt template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' for the class name; these have none: {bad}")
    if any(isinstance(names, str) for names in synonyms):
        raise TypeError("synonyms must be one list of names per class, e.g. [['cat', 'kitty'], ['dog']]")
    counts = [len(names) for names in synonyms]
    _check_counts(counts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not synonyms:
        return torch.zeros(0, 0, 0)

    device = torch.device(device) if device is not None else _model_device(clip_model)
    flat_names = [clean_class_name(name) for names in synonyms for name in names]
    names_per_call = max(1, batch_size // len(templates))
    chunks = []
    with torch.no_grad():
        for start in range(0, len(flat_names), names_per_call):
            chunk = flat_names[start : start + names_per_call]
            chunks.append(_encode_chunk(clip_model, tokenizer, chunk, templates, device))
    return _gather_padded(torch.cat(chunks, dim=0), counts)
