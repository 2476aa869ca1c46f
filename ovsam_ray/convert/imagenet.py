"""ImageNet-style classification data -> WebDataset shards with one class per image.

Input is a folder (or ``s3://`` prefix) holding either one sub-folder of images per class
(``train/n01440764/n01440764_10026.JPEG``) or one tar of images per class
(``fall11_whole/n01440764.tar``, ImageNet-22k's layout). A synset map names the classes:
``LOC_synset_mapping.txt`` / ``words.txt`` lines (``n01440764 tench, Tinca tinca``, space or tab),
or JSON (``{"n01440764": "tench"}``, ``{"n01440764": ["tench", "Tinca tinca"]}`` or Keras'
``{"0": ["n01440764", "tench"]}``). The first name is the class name, the others its synonyms.
Each image's JSON: ``image_id`` (``<synset>/<file stem>``), ``class_name``, ``synset``,
``class_id`` (position of the synset in the map, else in sorted folder order) — what CLIP2SAM
co-training reads as image-level labels. Shards are mixed across classes (a seeded random order,
DESIGN §4.8); ``order="source"`` writes classes in ``class_id`` order, files sorted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ovsam_ray import storage
from ovsam_ray.convert.mixed import TASK_IMAGES, Unit, check_order, file_sizes, unit, write_mixed
from ovsam_ray.convert.records import ConvertError, parse_json
from ovsam_ray.data.shards import is_damage_marker, iter_shard_samples
from ovsam_ray.data.tar_writer import ConvertSummary, Sample, image_extension, sample_key, write_shards

__all__ = ["SynsetClass", "convert_imagenet", "load_synset_map"]


@dataclass(frozen=True)
class SynsetClass:
    synset: str
    name: str
    synonyms: tuple[str, ...] = ()


def _names(value: Any) -> list[str]:
    """Comma-separated names from text or a list of texts (one level: anything else is not a name)."""
    texts = (
        [value]
        if isinstance(value, str)
        else [v for v in value if isinstance(v, str)]
        if isinstance(value, (list, tuple))
        else []
    )
    return [n.strip() for t in texts for n in t.split(",") if n.strip()]


def _class_index(key: str) -> int | None:
    """Keras' ``"0"``... keys; anything else (or an index beyond int64) is a synset."""
    return int(key) if key.isdecimal() and key.isascii() and len(key) <= 18 else None


def _classes_from_json(obj: Any) -> list[SynsetClass]:
    out: list[tuple[int, SynsetClass]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            index = _class_index(key)
            if isinstance(value, (list, tuple)) and len(value) >= 2 and index is not None:  # Keras class index
                synset, names = str(value[0]), _names(list(value[1:]))
            else:
                synset, names = key, _names(value)
            out.append((index if index is not None else len(out), SynsetClass(synset, *_split(names, synset))))
        out.sort(key=lambda p: p[0])
        return [c for _, c in out]
    raise ConvertError("synset map JSON must be an object")


def _split(names: list[str], synset: str) -> tuple[str, tuple[str, ...]]:
    names = names or [synset]
    return names[0], tuple(names[1:])


def load_synset_map(url: str, *, s3_endpoint: str | None = None) -> list[SynsetClass]:
    """Classes of a synset map file, in file order (see the module docstring for the formats)."""
    data = storage.read_bytes(url, s3_endpoint=s3_endpoint)
    if data.lstrip().startswith(b"{"):
        return _classes_from_json(parse_json(data, storage.redact(url)))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConvertError(
            f"{storage.safe_for_log(storage.redact(url))} is not UTF-8 text (bad byte at offset {e.start})"
        ) from None
    classes = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        synset, _, rest = line.replace("\t", " ").partition(" ")
        classes.append(SynsetClass(synset, *_split(_names(rest), synset)))
    if not classes:
        raise ConvertError(f"{storage.redact(url)}: no classes in the synset map")
    return classes


def _meta(synset: str, stem: str, classes: dict[str, tuple[int, SynsetClass]]) -> dict[str, Any]:
    class_id, cls = classes[synset]
    return {
        "image_id": f"{synset}/{stem}",
        "class_name": cls.name,
        "synset": synset,
        "class_id": class_id,
        "synonyms": list(cls.synonyms),
    }


def _key(synset: str, stem: str) -> str:
    return sample_key(stem) if stem.startswith(synset + "_") else sample_key(synset, stem)


def _layout(root: str, s3_endpoint: str | None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Image files per class folder, and tar files per class."""
    folders: dict[str, list[str]] = defaultdict(list)
    tars: dict[str, str] = {}
    prefix = root.rstrip("/") + "/"
    for url in storage.list_files(root, recursive=True, s3_endpoint=s3_endpoint):
        rel = url[len(prefix) :] if url.startswith(prefix) else url.rsplit("/", 1)[-1]
        parts = rel.split("/")
        if len(parts) == 1 and rel.endswith(".tar"):
            tars[rel[: -len(".tar")]] = url
        elif len(parts) >= 2 and image_extension(rel):
            folders[parts[0]].append(url)
    return folders, tars


def _class_samples(
    synset: str,
    tar: str | None,
    files: list[str],
    classes: dict[str, tuple[int, SynsetClass]],
    s3_endpoint: str | None,
    summary: ConvertSummary,
) -> Iterator[Sample]:
    """One class's samples: its tar's images in tar order, else its folder's files (given sorted)."""
    source: Iterator[tuple[str, Any]]
    if tar is not None:
        read = iter_shard_samples(tar, s3_endpoint=s3_endpoint)
        source = (((s["key"] or "").rsplit("/", 1)[-1], s) for s in read)
    else:
        source = ((u.rsplit("/", 1)[-1].rsplit(".", 1)[0], u) for u in files)
    for stem, item in source:
        if isinstance(item, str):
            yield Sample(
                key=_key(synset, stem),
                image_ext=image_extension(item) or "jpg",
                image_url=item,
                meta=_meta(synset, stem, classes),
            )
        elif is_damage_marker(item) or item["error"]:
            summary.skip(f"{tar}:{item['key']}", item["error"])
        else:
            yield Sample(
                key=_key(synset, stem),
                image_ext=item["image_ext"],
                image=item["image_bytes"],
                meta=_meta(synset, stem, classes),
            )


def _samples(
    root_folders: dict[str, list[str]],
    tars: dict[str, str],
    order: list[str],
    classes: dict[str, tuple[int, SynsetClass]],
    summary: ConvertSummary,
    limit: int | None,
    s3_endpoint: str | None,
) -> Iterator[Sample]:
    n = 0
    for synset in order:
        files = sorted(root_folders.get(synset, []))
        for sample in _class_samples(synset, tars.get(synset), files, classes, s3_endpoint, summary):
            if limit is not None and n >= limit:
                return
            n += 1
            yield sample


def _units(
    root: str,
    folders: dict[str, list[str]],
    tars: dict[str, str],
    order: list[str],
    classes: dict[str, tuple[int, SynsetClass]],
    summary: ConvertSummary,
    s3_endpoint: str | None,
) -> list[Unit]:
    """One unit per class; a folder's files whose key an earlier file had are skipped here."""
    sizes = file_sizes(root, s3_endpoint=s3_endpoint) if tars else {}
    seen: set[str] = set()
    units = []
    for synset in order:
        own = {synset: classes[synset]}
        if synset in tars:
            url = tars[synset]
            units.append(unit(synset, _class_samples, synset, url, [], own, s3_endpoint, size=sizes.get(url, 0)))
            continue
        files = []
        for url in sorted(folders[synset]):
            key = _key(synset, url.rsplit("/", 1)[-1].rsplit(".", 1)[0])
            if key in seen:
                summary.skip(url, f"sample key {key} is also an earlier image's")
            else:
                seen.add(key)
                files.append(url)
        units.append(unit(synset, _class_samples, synset, None, files, own, s3_endpoint, count=len(files)))
    return units


def convert_imagenet(
    input: str,
    output: str,
    *,
    synsets: str | None = None,
    images_per_shard: int = 1000,
    limit: int | None = None,
    workers: int = 4,
    order: str = "shuffled",
    seed: int = 0,
    ray_address: str | None = None,
    task_images: int = TASK_IMAGES,
    s3_endpoint: str | None = None,
) -> ConvertSummary:
    """Folder-per-class or tar-per-class images under ``input`` -> shards under ``output``.
    ``synsets``: the synset map file (without it the folder/tar names are the class names).
    ``order``: ``shuffled`` (mixed shards, :func:`~ovsam_ray.convert.mixed.write_mixed`; ``seed``,
    ``ray_address``, ``task_images`` as there) or ``source`` (classes in ``class_id`` order)."""
    check_order(order)
    folders, tars = _layout(input, s3_endpoint)
    present = set(folders) | set(tars)
    if not present:
        raise ConvertError(f"{storage.redact(input)}: found neither class folders of images nor per-class .tar files")
    known = (
        load_synset_map(synsets, s3_endpoint=s3_endpoint) if synsets else [SynsetClass(s, s) for s in sorted(present)]
    )
    classes = {c.synset: (i, c) for i, c in enumerate(known)}
    summary = ConvertSummary()
    missing = sorted(present - set(classes))
    if missing:
        summary.notes.append(f"{len(missing)} class folders/tars not in the synset map were skipped: {missing[:10]}")
    synset_order = [c.synset for c in known if c.synset in present]
    if order == "source":
        samples = _samples(folders, tars, synset_order, classes, summary, limit, s3_endpoint)
        summary = write_shards(
            samples,
            output,
            images_per_shard=images_per_shard,
            workers=workers,
            s3_endpoint=s3_endpoint,
            summary=summary,
        )
    else:
        summary = write_mixed(
            _units(input, folders, tars, synset_order, classes, summary, s3_endpoint),
            output,
            images_per_shard=images_per_shard,
            seed=seed,
            limit=limit,
            workers=workers,
            ray_address=ray_address,
            task_images=task_images,
            options={"format": "imagenet", "synsets": synsets},
            s3_endpoint=s3_endpoint,
            summary=summary,
        )
    names = [{"id": i, "synset": c.synset, "name": c.name, "synonyms": list(c.synonyms)} for i, c in enumerate(known)]
    storage.atomic_write_bytes(
        storage.join(output, "_categories.json"),
        json.dumps({"categories": names}, indent=1).encode(),
        s3_endpoint=s3_endpoint,
    )
    return summary
