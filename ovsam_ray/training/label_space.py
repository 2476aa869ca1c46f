"""One training vocabulary for a mixture of datasets, and each dataset's labels mapped into it.

Every dataset may have its own vocabulary (category ids and names); the training vocabulary is
given (``train_vocab``) or the union of the datasets' vocabularies in order, classes merged when a
name or synonym matches (case- and underscore-insensitive). An annotation's label is looked up
by ``category_name`` first, then by ``category_id`` in its dataset's vocabulary; labels that do
not map are dropped (and counted).

The open-vocabulary protocol (``DatasetSpec.split``): with ``split="base"`` (the default) only the
classes a dataset's vocabulary marks seen are trained — COCO-OV's 48 base classes, LVIS's
frequent and common classes — as the paper trains (the reference's ``sub_split='48_17'`` and
``lvis_v1_train_norare.json``); annotations of its other classes map to no label and are removed,
and an image left without any is dropped by the sample builder. ``split="all"`` trains every
class. The classes some dataset trains are the training vocabulary's ``seen`` classes
(``seen_classes``, in the exported checkpoint's metadata), so inference fuses the others with the
unseen-class weight. A label output (``DatasetSpec.corrections``) trains every class it names:
its labels are a reviewer's (or the model's own), not a benchmark's protocol.

A class that only label outputs train (a fine-tune on a reviewer's corrections, typically tens of
examples of it) is not made seen by them: ``exported_seen_classes`` keeps it as the training
vocabulary marks it (``corrected_classes="unseen"``, the default of ``train export``), so inference
goes on fusing it with the unseen-class weight (mostly the CLIP branch) rather than trusting a head
that saw it a few dozen times; ``corrected_classes="seen"`` marks every trained class seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ovsam_ray.errors import ConfigError
from ovsam_ray.training.config import DatasetSpec
from ovsam_ray.vocabulary import Vocabulary, clean_class_name, load_vocabulary

# Keys an image-level JSON may carry its class in (ImageNet-22k style shards).
IMAGE_LABEL_NAME_KEYS = ("category_name", "class_name", "label", "class", "synset")
IMAGE_LABEL_ID_KEYS = ("category_id", "class_id", "label_id", "label", "cls")
# How the export marks a class that only label outputs (corrections) train; see the module docstring.
CORRECTED_CLASSES = ("unseen", "seen")


def _names(name: str, synonyms: Sequence[str]) -> set[str]:
    return {clean_class_name(n) for n in (name, *synonyms)}


@dataclass
class DatasetLabels:
    """Label lookup for one dataset: its category ids and names -> training class index."""

    by_id: dict[int, int] = field(default_factory=dict)
    by_name: dict[str, int] = field(default_factory=dict)
    known_names: set[str] = field(default_factory=set)  # every class name of the dataset, trained or not

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
        """Training class of a COCO-style annotation (``category_name`` or ``category_id``), -1 if
        none. A name the dataset's vocabulary knows decides (an untrained class stays -1 even
        where its id would mean another class, e.g. COCO's ids 1..90 against COCO-OV's 0..79)."""
        name = ann.get("category_name")
        label = self.from_name(name)
        if label < 0 and isinstance(name, str) and clean_class_name(name) in self.known_names:
            return -1
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
    # Trained classes that only label outputs train and the training vocabulary does not mark seen.
    corrected_unseen: list[str] = field(default_factory=list)


def exported_seen_classes(space: LabelSpace, corrected_classes: str = "unseen") -> list[str]:
    """The seen classes an export records (inference fuses the others with the unseen-class
    weight): every trained class with ``corrected_classes="seen"``; with ``"unseen"`` (the default)
    less ``space.corrected_unseen``, the classes only corrections trained that the training
    vocabulary did not mark seen."""
    if corrected_classes not in CORRECTED_CLASSES:
        raise ConfigError(
            f"corrected_classes={corrected_classes!r}: use 'unseen' (classes only corrections trained stay "
            "on the unseen-class fusion) or 'seen'"
        )
    if corrected_classes == "seen":
        return list(space.seen_classes)
    kept = set(space.corrected_unseen)
    return [n for n in space.seen_classes if n not in kept]


def _union(vocabs: list[Vocabulary]) -> Vocabulary:
    """The union of the vocabularies (a class excluded only where every source excludes it)."""
    names: list[str] = []
    synonyms: list[tuple[str, ...]] = []
    sources: list[set[tuple[int, int]]] = []
    index: dict[str, int] = {}
    for v, vocab in enumerate(vocabs):
        for c, (name, syns) in enumerate(zip(vocab.class_names, vocab.synonyms)):
            hit = next((index[n] for n in _names(name, syns) if n in index), None)
            if hit is None:
                hit = len(names)
                names.append(name)
                synonyms.append(tuple(syns))
                sources.append(set())
            sources[hit].add((v, c))
            for n in _names(name, syns):
                index.setdefault(n, hit)
    c = len(names)
    excluded = tuple(all(vocabs[v].excluded[k] for v, k in src) for src in sources)
    label = "+".join(v.name for v in vocabs)
    return Vocabulary(label, tuple(names), tuple(synonyms), (True,) * c, excluded, tuple(range(c)))


def _trained_classes(vocab: Vocabulary, split: str) -> list[int]:
    """Indices of ``vocab``'s classes that train under ``split`` ("base": its seen classes)."""
    return [i for i in range(vocab.num_classes) if split == "all" or vocab.seen[i]]


def build_label_space(datasets: Sequence[DatasetSpec], train_vocab: str | None = None) -> LabelSpace:
    """Training vocabulary + per-dataset label maps (see the module docstring). The vocabulary's
    ``seen`` flags are the trained classes; ``excluded`` stays where every source excludes it."""
    dataset_vocabs = [load_vocabulary(d.vocab) if d.vocab else None for d in datasets]
    if train_vocab:
        vocab = load_vocabulary(train_vocab)
    elif any(v is not None for v in dataset_vocabs):
        vocab = _union([v for v in dataset_vocabs if v is not None])
    else:
        raise ConfigError("no vocabulary: give train_vocab or a vocab for at least one dataset")
    train_index: dict[str, int] = {}
    for i, (name, syns) in enumerate(zip(vocab.class_names, vocab.synonyms)):
        for n in _names(name, syns):
            train_index.setdefault(n, i)

    seen: set[int] = set()
    by_corrections: set[int] = set()  # trained by a label output
    by_others: set[int] = set()  # trained by any other dataset
    lookups = []
    for spec, dv in zip(datasets, dataset_vocabs):
        labels = DatasetLabels()
        corrections = bool(getattr(spec, "corrections", None))
        split = "all" if corrections else spec.split  # a label output: every class
        if dv is None:  # names resolve directly against the training vocabulary
            trained = set(_trained_classes(vocab, split))
            labels.by_name = {n: i for n, i in train_index.items() if i in trained}
            labels.known_names = set(train_index)
            seen.update(trained)
            (by_corrections if corrections else by_others).update(trained)
        else:
            labels.known_names = set().union(*(_names(n, syn) for n, syn in zip(dv.class_names, dv.synonyms)))
            for k in _trained_classes(dv, split):
                names = _names(dv.class_names[k], dv.synonyms[k])
                hit = next((train_index[n] for n in sorted(names) if n in train_index), -1)
                if hit >= 0:
                    labels.by_id[int(dv.class_ids[k])] = hit
                    for n in names:
                        labels.by_name.setdefault(n, hit)
                    labels.by_name.setdefault(clean_class_name(vocab.class_names[hit]), hit)
                    seen.add(hit)
                    (by_corrections if corrections else by_others).add(hit)
        lookups.append(labels)
    for labels in lookups:  # a name the dataset's vocabulary lacks resolves against the trained classes
        for n, i in train_index.items():
            if i in seen and n not in labels.known_names:
                labels.by_name.setdefault(n, i)
    corrected_unseen = [vocab.class_names[i] for i in sorted(by_corrections - by_others) if not vocab.seen[i]]
    flags = tuple(i in seen for i in range(vocab.num_classes))
    excluded = tuple(e and not s for e, s in zip(vocab.excluded, flags))
    vocab = dataclasses.replace(vocab, seen=flags, excluded=excluded)
    seen_names = [vocab.class_names[i] for i in sorted(seen)]
    return LabelSpace(vocab=vocab, seen_classes=seen_names, datasets=lookups, corrected_unseen=corrected_unseen)
