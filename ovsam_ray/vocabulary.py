"""Class vocabularies and prompt templates (DESIGN 2.6, 2.7, 2.9).

A ``Vocabulary`` is what the open-vocabulary classifier scores: class names, the synonyms written
into the prompt templates, and per class whether it was in the checkpoint's training vocabulary
(``seen``, which picks the fusion exponent) or is left out by the evaluation protocol (``excluded``,
logit -1000). Built-ins ship as package data; user vocabularies are .txt or .json files on any
fsspec file system. Text embeddings are cached by (CLIP model, CLIP weights hash, vocabulary hash).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import posixpath
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import fsspec

from ovsam_ray.errors import ConfigError, MissingInputError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["BUILTIN_VOCABULARIES", "Vocabulary", "clean_class_name", "load_templates", "load_vocabulary", "sha256_json"]

_log = logging.getLogger(__name__)

BUILTIN_VOCABULARIES = ("coco_ov", "lvis_v1", "in21k")

# (seen, excluded) per protocol tag. COCO-OV (Zareian et al.): 48 base, 17 novel, 15 in neither split.
# LVIS: the released OV-SAM LVIS model was trained without the rare classes.
_SPLIT_FLAGS = {"base": (True, False), "novel": (False, False), "none": (False, True)}
_FREQUENCY_FLAGS = {"f": (True, False), "c": (True, False), "r": (False, False)}
_HASHED_FIELDS = ("class_names", "synonyms", "seen", "excluded", "class_ids")


@dataclass(frozen=True)
class Vocabulary:
    """C classes and how the classifier treats each of them.

    Attributes:
        name: a label for logs and run records (not part of ``sha256``).
        class_names: (C,) the names written into outputs.
        synonyms: (C,) tuples of >= 1 prompt names each; their embeddings are the class's prototypes.
        seen: (C,) True where the class was in the checkpoint's training vocabulary.
        excluded: (C,) True where the protocol leaves the class out (logit -1000).
        class_ids: (C,) the dataset's original ids (LVIS 1..1203, COCO-OV 0..79).
    """

    name: str
    class_names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    seen: tuple[bool, ...]
    excluded: tuple[bool, ...]
    class_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        # Lists from callers or JSON become tuples so that equal vocabularies compare and hash equal.
        if any(isinstance(syns, str) for syns in self.synonyms):
            raise TypeError("Vocabulary.synonyms needs one tuple of names per class: (('cat', 'kitty'),)")
        set_field = functools.partial(object.__setattr__, self)
        set_field("class_names", tuple(str(n) for n in self.class_names))
        set_field("synonyms", tuple(tuple(str(s) for s in syns) for syns in self.synonyms))
        set_field("seen", tuple(bool(s) for s in self.seen))
        set_field("excluded", tuple(bool(e) for e in self.excluded))
        set_field("class_ids", tuple(int(i) for i in self.class_ids))
        self._validate()

    def _validate(self) -> None:
        n = len(self.class_names)
        if n == 0:
            raise ConfigError(f"vocabulary {self.name!r} has no classes; give at least one class name")
        lengths = {k: len(getattr(self, k)) for k in ("synonyms", "seen", "excluded", "class_ids")}
        if any(v != n for v in lengths.values()):
            raise ConfigError(f"vocabulary {self.name!r}: {n} class names but field lengths {lengths}")
        blank = [i for i, syns in enumerate(self.synonyms) if not syns or not all(s.strip() for s in syns)]
        blank += [i for i, name in enumerate(self.class_names) if not name.strip()]
        if blank:
            raise ConfigError(
                f"vocabulary {self.name!r}: classes at {sorted(set(blank))[:10]} have a blank name or no synonyms"
            )
        for field, values in (("class_ids", self.class_ids), ("class_names", self.class_names)):
            dupes = sorted((v for v, k in Counter(values).items() if k > 1), key=str)
            if dupes:
                raise ConfigError(f"vocabulary {self.name!r}: duplicate {field} {dupes[:10]}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def max_synonyms(self) -> int:
        """S_max: the synonym axis of the class embedding tensor."""
        return max(len(s) for s in self.synonyms)

    @functools.cached_property
    def sha256(self) -> str:
        """Stable hex digest of everything that changes embeddings, logits or label ids (not ``name``)."""
        return sha256_json({f: getattr(self, f) for f in _HASHED_FIELDS})

    def seen_tensor(self) -> Tensor:
        """(C,) bool."""
        import torch

        return torch.tensor(self.seen, dtype=torch.bool)

    def excluded_tensor(self) -> Tensor:
        """(C,) bool."""
        import torch

        return torch.tensor(self.excluded, dtype=torch.bool)

    def to_dict(self) -> dict[str, Any]:
        rows = zip(self.class_ids, self.class_names, self.synonyms, self.seen, self.excluded, strict=True)
        keys = ("id", "name", "synonyms", "seen", "excluded")
        classes = [dict(zip(keys, (i, n, list(s), sn, ex), strict=True)) for i, n, s, sn, ex in rows]
        return {"name": self.name, "sha256": self.sha256, "classes": classes}

    def to_json(self) -> str:
        """JSON that ``from_json`` and ``load_vocabulary('<file>.json')`` read back unchanged."""
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str | dict[str, Any], *, name: str = "vocabulary") -> Vocabulary:
        """Parse any JSON vocabulary format (see ``load_vocabulary``); ``name`` if the JSON has none."""
        data = json.loads(text) if isinstance(text, str) else text
        return _vocabulary_from_json_data(data, default_name=name)


def clean_class_name(name: str) -> str:
    """The text a class name contributes to a prompt (torch-free: the exporters and the evaluation
    clean names the same way without loading a model).

    Dataset names use underscores for spaces (LVIS: ``"aerosol_can"``); the reference OV-SAM label
    preprocessing turns them into spaces and lower-cases the name (a no-op for CLIP's own BPE
    tokenizer, which lower-cases anyway). Unlike the reference, names are not split on ``/`` or
    ``_or_``: here synonyms are listed explicitly by the vocabulary.
    """
    return " ".join(name.replace("_", " ").lower().split())


def sha256_json(obj: Any) -> str:
    """SHA-256 of an object's canonical JSON (sorted keys, no spaces): the vocabulary's and the
    text-embedding cache's identity."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _dedupe(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(n for n in names if n))


def _protocol_flags(item: dict[str, Any], where: str) -> tuple[bool, bool]:
    """(seen, excluded) of one JSON class: explicit flags, else COCO-OV split, else LVIS frequency."""
    if "seen" in item or "excluded" in item:
        return bool(item.get("seen", True)), bool(item.get("excluded", False))
    for key, table in (("split", _SPLIT_FLAGS), ("frequency", _FREQUENCY_FLAGS)):
        if key in item:
            if item[key] not in table:
                raise ConfigError(f"{where}: unknown {key} {item[key]!r}; expected one of {sorted(table)}")
            return table[item[key]]
    return True, False


def _class_from_json_item(item: Any, index: int, where: str) -> tuple[int, str, list[str], bool, bool]:
    """(id, name, synonyms, seen, excluded) from a name, a list of synonyms, or a class dict."""
    where = f"{where}: class #{index}"
    if isinstance(item, str):
        item = {"name": item}
    elif isinstance(item, list):
        if not item or not all(isinstance(s, str) for s in item):
            raise ConfigError(f"{where}: a list of synonyms must be non-empty strings, got {item!r}")
        item = {"name": item[0], "synonyms": item}
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a name, a list of synonyms or an object, got {item!r}")
    synonyms = item.get("synonyms") or ([item["name"]] if item.get("name") else [])
    if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
        raise ConfigError(f"{where}: 'synonyms' must be a list of strings, got {synonyms!r}")
    synonyms = _dedupe([s.strip() for s in synonyms])
    name = item.get("name") or (synonyms[0] if synonyms else "")
    if not isinstance(name, str) or not synonyms:
        raise ConfigError(f"{where}: needs a 'name' or 'synonyms', got {item!r}")
    seen, excluded = _protocol_flags(item, where)
    return int(item.get("id", index)), name.strip(), synonyms, seen, excluded


def _vocabulary_from_rows(name: str, rows: list[tuple[int, str, list[str], bool, bool]]) -> Vocabulary:
    if not rows:
        raise ConfigError(f"vocabulary {name!r} has no classes; give at least one class name")
    ids, names, synonyms, seen, excluded = zip(*rows, strict=True)
    return Vocabulary(name, names, synonyms, seen, excluded, ids)


def _vocabulary_from_json_data(data: Any, *, default_name: str) -> Vocabulary:
    name = default_name
    items = data
    if isinstance(data, dict):
        if "classes" not in data:
            raise ConfigError(f"vocabulary {default_name!r}: a JSON object needs a 'classes' list")
        name, items = str(data.get("name") or default_name), data["classes"]
    if not isinstance(items, list):
        kind = type(items).__name__
        raise ConfigError(f"vocabulary {default_name!r}: expected a list of classes, got {kind}")
    return _vocabulary_from_rows(name, [_class_from_json_item(it, i, name) for i, it in enumerate(items)])


def _vocabulary_from_txt(text: str, *, name: str) -> Vocabulary:
    """One class per line, comma-separated synonyms (the first is the class name); '#' starts a comment."""
    rows: list[tuple[int, str, list[str], bool, bool]] = []
    for line in text.splitlines():
        synonyms = _dedupe([s.strip() for s in line.split("#", 1)[0].split(",")])
        if synonyms:
            rows.append((len(rows), synonyms[0], synonyms, True, False))
    return _vocabulary_from_rows(name, rows)


def _names_per_class(vocab: Vocabulary) -> list[set[str]]:
    """Per class, its name and synonyms as compared for ``seen`` matching (lower case, no underscores)."""
    pairs = zip(vocab.class_names, vocab.synonyms, strict=True)
    return [{clean_class_name(n) for n in (name, *synonyms)} for name, synonyms in pairs]


def _read_resource(filename: str) -> Any:
    resource = resources.files("ovsam_ray") / "resources" / "vocab" / filename
    return json.loads(resource.read_text("utf-8"))


def _read_text(url: str) -> str:
    try:
        with fsspec.open(url, "rt", encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError as e:
        raise MissingInputError(f"vocabulary file {url}: no such file") from e


def _in21k_vocabulary() -> Vocabulary:
    """ImageNet-21k/22k (21,841 synsets, fall11) from timm's offline ImageNetInfo: one class per
    synset, its WordNet lemmas as synonyms; a lemma shared by several synsets gets the synset id
    appended to the class name. All classes seen (it is an image-level training vocabulary)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-22k")
    rows, taken = [], set()
    for i in range(info.num_classes()):
        lemmas = _dedupe([x.strip() for x in info.index_to_description(i).split(",") if x.strip()])
        name = lemmas[0] if lemmas[0] not in taken else f"{lemmas[0]} ({info.index_to_label_name(i)})"
        taken.add(name)
        rows.append((i, name, [name, *lemmas[1:]] if name != lemmas[0] else lemmas, True, False))
    return _vocabulary_from_rows("in21k", rows)


def _load_spec(spec: str) -> Vocabulary:
    if spec == "in21k":
        return _in21k_vocabulary()
    if spec in BUILTIN_VOCABULARIES:
        return _vocabulary_from_json_data(_read_resource(f"{spec}.json"), default_name=spec)
    stem, ext = posixpath.splitext(posixpath.basename(spec.rstrip("/")))
    if ext.lower() == ".txt":
        return _vocabulary_from_txt(_read_text(spec), name=stem)
    if ext.lower() == ".json":
        try:
            data = json.loads(_read_text(spec))
        except json.JSONDecodeError as e:
            raise ConfigError(f"vocabulary file {spec}: not valid JSON ({e})") from e
        return _vocabulary_from_json_data(data, default_name=stem)
    raise ConfigError(
        f"unknown vocabulary {spec!r}: use a built-in ({', '.join(BUILTIN_VOCABULARIES)}) or a local path or "
        "fsspec URL (s3://...) of a .txt or .json vocabulary file"
    )


def _resolve_seen(vocab: Vocabulary, seen: str) -> tuple[bool, ...]:
    if seen in ("all", "none"):
        return (seen == "all",) * vocab.num_classes
    try:
        trained = _load_spec(seen)
    except ValueError as e:
        raise ConfigError(
            f"seen={seen!r}: use 'all', 'none' or the vocabulary the checkpoint was trained on ({e})"
        ) from e
    known = set().union(*(n for n, ok in zip(_names_per_class(trained), trained.seen, strict=True) if ok))
    return tuple(bool(n & known) for n in _names_per_class(vocab))


def load_vocabulary(spec: str, *, seen: str | None = None) -> Vocabulary:
    """Load a built-in vocabulary or a vocabulary file.

    Args:
        spec: ``coco_ov`` (80 classes: base -> seen, novel -> unseen, the 15 others -> excluded),
            ``lvis_v1`` (1203 classes: frequent/common -> seen, rare -> unseen), or a local path /
            fsspec URL of a ``.txt`` file (one class per line, comma-separated synonyms with the
            class name first, blank lines and ``#`` comments skipped) or a ``.json`` file (the
            built-in format, ``Vocabulary.to_json`` output, a list of names, or a list of synonym
            lists). File classes are seen and not excluded unless the JSON says otherwise.
        seen: overrides the seen flags: ``all``, ``none``, a built-in vocabulary name, or a
            .txt/.json file; with the latter two a class is seen when its name or a synonym matches
            (case- and underscore-insensitive) a seen class of that vocabulary.

    Raises:
        ValueError: unknown spec, malformed file or an empty vocabulary.
    """
    vocab = _load_spec(spec)
    if seen is not None:
        vocab = dataclasses.replace(vocab, seen=_resolve_seen(vocab, seen))
    return vocab


def load_templates() -> list[str]:
    """The 14 ViLD prompt templates, each with one ``{}`` for the class name."""
    templates = list(_read_resource("templates_vild.json")["templates"])
    if not templates or not all("{}" in t for t in templates):
        raise ValueError(f"templates_vild.json: every template needs a '{{}}', got {templates}")
    return templates
