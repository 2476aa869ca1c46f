"""One training vocabulary for a mixture of datasets, and each dataset's labels mapped into it.

Every dataset may have its own vocabulary (category ids and names); the training vocabulary is
given (``train_vocab``) or the union of the datasets' vocabularies in order, classes merged when a
name or synonym matches (case- and underscore-insensitive). An annotation's label is looked up
by ``category_name`` first, then by ``category_id`` in its dataset's vocabulary; labels that do
not map are dropped (and counted). ``seen_classes`` (the classes some dataset covers) go into the
exported checkpoint's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ovsam_ray.model.text_embedding import clean_class_name
from ovsam_ray.vocabulary import Vocabulary, load_vocabulary

from .config import DatasetSpec

# Keys an image-level JSON may carry its class in (ImageNet-22k style shards).
IMAGE_LABEL_NAME_KEYS = ("category_name", "class_name", "label", "class", "synset")
IMAGE_LABEL_ID_KEYS = ("category_id", "class_id", "label_id", "label", "cls")


def _names(name: str, synonyms: Sequence[str]) -> set[str]:
    return {clean_class_name(n) for n in (name, *synonyms)}


@dataclass
class DatasetLabels:
    """Label lookup for one dataset: its category ids and names -> training class index."""

    by_id: dict[int, int] = field(default_factory=dict)
    by_name: dict[str, int] = field(default_factory=dict)

    def from_name(self, name: Any) -> int:
        if isinstance(name, str):
            return self.by_name.get(clean_class_name(name), -1)
        return -1

    def from_id(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return -1
        try:
            return self.by_id.get(int(value), -1)
        except ValueError:
            return -1

    def annotation_label(self, ann: dict[str, Any]) -> int:
        """Training class of a COCO-style annotation (``category_name`` or ``category_id``), -1 if none."""
        label = self.from_name(ann.get("category_name"))
        if label < 0 and "category_id" in ann:
            label = self.from_id(ann["category_id"])
        return label

    def image_label(self, meta: dict[str, Any]) -> int:
        """Training class of an image-level sample's JSON (a class name or id under a usual key)."""
        for key in IMAGE_LABEL_NAME_KEYS:
            label = self.from_name(meta.get(key))
            if label >= 0:
                return label
        for key in IMAGE_LABEL_ID_KEYS:
            if key in meta and not isinstance(meta[key], str):
                label = self.from_id(meta[key])
                if label >= 0:
                    return label
        return -1


@dataclass
class LabelSpace:
    """The training vocabulary, the names of its seen classes and one lookup per dataset."""

    vocab: Vocabulary
    seen_classes: list[str]
    datasets: list[DatasetLabels]


def _union(vocabs: list[Vocabulary]) -> Vocabulary:
    names: list[str] = []
    synonyms: list[tuple[str, ...]] = []
    index: dict[str, int] = {}
    for vocab in vocabs:
        for name, syns in zip(vocab.class_names, vocab.synonyms):
            hit = next((index[n] for n in _names(name, syns) if n in index), None)
            if hit is None:
                hit = len(names)
                names.append(name)
                synonyms.append(tuple(syns))
            for n in _names(name, syns):
                index.setdefault(n, hit)
    c = len(names)
    label = "+".join(v.name for v in vocabs)
    return Vocabulary(label, tuple(names), tuple(synonyms), (True,) * c, (False,) * c, tuple(range(c)))


def build_label_space(datasets: Sequence[DatasetSpec], train_vocab: str | None = None) -> LabelSpace:
    """Training vocabulary + per-dataset label maps (see the module docstring)."""
    dataset_vocabs = [load_vocabulary(d.vocab) if d.vocab else None for d in datasets]
    if train_vocab:
        vocab = load_vocabulary(train_vocab)
    elif any(v is not None for v in dataset_vocabs):
        vocab = _union([v for v in dataset_vocabs if v is not None])
    else:
        raise ValueError("no vocabulary: give train_vocab or a vocab for at least one dataset")
    train_index: dict[str, int] = {}
    for i, (name, syns) in enumerate(zip(vocab.class_names, vocab.synonyms)):
        for n in _names(name, syns):
            train_index.setdefault(n, i)

    seen: set[int] = set()
    lookups = []
    for dv in dataset_vocabs:
        labels = DatasetLabels(by_name=dict(train_index))
        if dv is None:
            seen.update(range(vocab.num_classes))  # names resolve directly against the training vocabulary
        else:
            for cid, name, syns in zip(dv.class_ids, dv.class_names, dv.synonyms):
                hit = next((train_index[n] for n in sorted(_names(name, syns)) if n in train_index), -1)
                if hit >= 0:
                    labels.by_id[int(cid)] = hit
                    for n in _names(name, syns):
                        labels.by_name.setdefault(n, hit)
                    seen.add(hit)
        lookups.append(labels)
    seen_names = [vocab.class_names[i] for i in sorted(seen)]
    return LabelSpace(vocab=vocab, seen_classes=seen_names, datasets=lookups)
