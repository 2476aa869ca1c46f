"""Mixed shards: every converter's default writer (DESIGN §4.8). Each output shard is a near-i.i.d.
sample of the whole dataset, written by parallel tasks (a local process pool, or Ray Data across a
cluster), resumable, with every source image accounted for.

A converter hands over *units*: a class folder or class tar, a chunk of COCO records, an input
shard. The driver only plans: it groups units into scatter tasks and fixes, for every image, the
output shard it goes to (a seeded assignment, never a global in-memory shuffle):

- when every unit's image count is known (folders, COCO/LVIS records), a seeded permutation of
  the N images: shard ``j`` gets positions ``j*n .. (j+1)*n - 1``, so shards hold exactly
  ``images_per_shard`` images (the last fewer);
- else (tars, whose contents are known only once read) a seeded hash of the sample key, over
  ``N_est / images_per_shard`` shards, ``N_est`` from the tars' sizes and the first tar's
  images: shards then hold ``images_per_shard`` on average (binomial spread, +-3% at 1,000).

Two passes, each task's memory bounded by one image plus an index:

1. *scatter*, one task per group of units: read the units, write each image (key, extension,
   bytes, JSON) into a local spill file, then copy the records into one staging file under
   ``<output>/_convert/staging/`` ordered by output shard, and commit a marker naming each shard's
   byte range and what was skipped;
2. *write*, one task per output shard: read its range of every staging file, drop a key already
   seen (the hash sends one key to one shard; the plan drops duplicates it can see), shuffle with
   a seed of its own, write ``shard-NNNNNN.tar`` atomically, then its marker
   ``<output>/_convert/shards/shard-NNNNNN.json`` (images, annotations, skips, image classes).

A marker is written only after its file is complete, so a rerun (same command) skips every
committed task and redoes the others; ``_convert/plan.json`` pins the plan (seed, shard count,
units) and a rerun with different inputs or arguments is refused. At the end the driver checks
that every staged image was written or counted as skipped, writes ``_convert.json`` and
``_image_classes.parquet`` from the markers, and deletes the staging files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ovsam_ray import storage
from ovsam_ray.convert.records import ConvertError
from ovsam_ray.data.shards import IMAGE_CLASSES_FILE
from ovsam_ray.data.synthetic import tar_bytes
from ovsam_ray.data.tar_writer import (
    IMAGE_CLASSES_SCHEMA,
    MAX_LISTED_SKIPS,
    ConvertSummary,
    Sample,
    image_classes,
)
from ovsam_ray.errors import ConfigError

__all__ = [
    "ORDERS",
    "STATE_FOLDER",
    "TASK_IMAGES",
    "Unit",
    "check_order",
    "file_sizes",
    "key_bucket",
    "sample_units",
    "unit",
    "write_mixed",
]

log = logging.getLogger(__name__)

#: ``shuffled``: mixed shards (this module); ``source``: the source order (``write_shards``).
ORDERS = ("shuffled", "source")
#: The conversion's own state beside the shards (plan, staging files, markers).
STATE_FOLDER = "_convert"
#: Images per scatter task when the units' counts are known (bytes of tar per task otherwise).
TASK_IMAGES = 50_000
TASK_BYTES = 4 << 30
_HEADER = struct.Struct("<HHII")
_PROGRESS_SECONDS = 10.0
#: Conversions of fewer planned images run in this process unless on Ray.
SMALL_IMAGES = 20_000


@dataclass(frozen=True)
class Unit:
    """A piece of the source read by one task: ``read(summary)`` yields its samples in a fixed
    order (counting what it skips in ``summary``); a module-level function or a
    ``functools.partial`` of one, so that it travels to another process. ``count``: how many
    samples ``read`` yields, when known without reading; ``size``: its bytes, when known."""

    name: str
    read: Callable[[ConvertSummary], Iterator[Sample]]
    count: int | None = None
    size: int = 0


@dataclass
class _Task:
    index: int
    units: list[Unit]
    buckets: list[np.ndarray | None]  # per unit: the output shard of each sample (None: hashed)
    caps: list[int | None]
    staging: str
    marker: str
    seed: int
    num_shards: int
    s3_endpoint: str | None


@dataclass
class _WriteTask:
    index: int
    ranges: list[tuple[str, int, int]]
    shard: str
    marker: str
    seed: int
    s3_endpoint: str | None


# --- assignment -----------------------------------------------------------------------------------


def key_bucket(key: str, seed: int, num_shards: int) -> int:
    """The output shard of a key in hashed mode: one key, one shard, whatever unit it is in."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


def _exact_buckets(counts: list[int], seed: int, per_shard: int) -> list[np.ndarray]:
    total = sum(counts)
    position = np.random.default_rng([seed, 104729]).permutation(total)
    buckets = (position // per_shard).astype(np.int64)
    return list(np.split(buckets, np.cumsum(counts)[:-1])) if counts else []


# --- scatter ----------------------------------------------------------------------------------------


def _materialise(sample: Sample, s3_endpoint: str | None) -> tuple[bytes, bytes] | str:
    """(image bytes, JSON bytes), or why the sample cannot be written (as ``write_shards`` skips it)."""
    try:
        data = (
            sample.image
            if sample.image is not None
            else storage.read_bytes(sample.image_url or "", s3_endpoint=s3_endpoint)
        )
        if sample.meta_bytes is not None:
            return data, sample.meta_bytes
        meta = sample.load_meta() if sample.load_meta is not None else sample.meta
    except (FileNotFoundError, OSError, ValueError) as e:
        return f"not readable: {type(e).__name__}: {e}"
    try:
        return data, json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as e:
        return f"JSON not writable: {e}"


def _record(key: str, ext: str, image: bytes, meta: bytes) -> bytes:
    k, e = key.encode("utf-8", "surrogatepass"), ext.encode()
    return _HEADER.pack(len(k), len(e), len(image), len(meta)) + k + e + image + meta


def _records(blob: bytes) -> Iterator[tuple[str, str, bytes, bytes]]:
    at = 0
    while at < len(blob):
        nk, ne, ni, nm = _HEADER.unpack_from(blob, at)
        at += _HEADER.size
        key = blob[at : at + nk].decode("utf-8", "surrogatepass")
        at += nk
        ext = blob[at : at + ne].decode()
        at += ne
        image, meta = blob[at : at + ni], blob[at + ni : at + ni + nm]
        at += ni + nm
        yield key, ext, image, meta


def _scatter(task: _Task) -> dict[str, Any]:
    """Read the task's units into one staging file ordered by output shard; commit its marker."""
    summary = ConvertSummary()
    spans: list[tuple[int, int, int]] = []  # (bucket, offset in the spill file, length)
    with tempfile.TemporaryFile(prefix="ovsam-convert-") as spill:
        offset = 0
        for unit, buckets, cap in zip(task.units, task.buckets, task.caps):
            for i, sample in enumerate(unit.read(summary)):
                if (cap is not None and i >= cap) or (buckets is not None and i >= len(buckets)):
                    break
                got = _materialise(sample, task.s3_endpoint)
                if isinstance(got, str):
                    summary.skip(sample.image_url or sample.key, got)
                    continue
                bucket = int(buckets[i]) if buckets is not None else key_bucket(sample.key, task.seed, task.num_shards)
                record = _record(sample.key, sample.image_ext, *got)
                spill.write(record)
                spans.append((bucket, offset, len(record)))
                offset += len(record)
        spans.sort(key=lambda s: s[0])  # stable: source order within a shard
        ranges: dict[int, list[int]] = {}
        written = 0
        with storage.open_url(task.staging, "wb", s3_endpoint=task.s3_endpoint) as out:
            for bucket, at, length in spans:
                spill.seek(at)
                out.write(spill.read(length))
                span = ranges.setdefault(bucket, [written, 0])
                span[1] += length
                written += length
    result = {
        "task": task.index,
        "staged": len(spans),
        "ranges": {str(b): r for b, r in ranges.items()},
        **_summary_part(summary),
    }
    storage.atomic_write_bytes(task.marker, json.dumps(result).encode(), s3_endpoint=task.s3_endpoint)
    return result


# --- write -----------------------------------------------------------------------------------------


def _read_range(url: str, offset: int, length: int, s3_endpoint: str | None) -> bytes:
    with storage.open_url(url, "rb", s3_endpoint=s3_endpoint) as f:
        f.seek(offset)
        return f.read(length)


def _write_shard(task: _WriteTask) -> dict[str, Any]:
    """One output shard from its ranges of the staging files: dedupe keys, shuffle, write, commit."""
    summary = ConvertSummary()
    seen: set[str] = set()
    records: list[tuple[str, str, bytes, bytes]] = []
    for url, offset, length in task.ranges:
        for key, ext, image, meta in _records(_read_range(url, offset, length, task.s3_endpoint)):
            if key in seen:
                summary.skip(key, f"sample key {key} is also an earlier image's")
                continue
            seen.add(key)
            records.append((key, ext, image, meta))
    order = np.random.default_rng([task.seed, 15485863, task.index]).permutation(len(records))
    members: list[tuple[str, bytes]] = []
    classes: list[list[Any]] = []
    annotations = 0
    for k in order:
        key, ext, image, meta = records[int(k)]
        members.append((f"{key}.{ext}", image))
        if meta:
            members.append((f"{key}.json", meta))
        anns = _annotations(meta)
        annotations += len(anns) if isinstance(anns, list) else 0
        pairs = image_classes(anns)
        classes.append([key, [n for n, _ in pairs], [c for _, c in pairs]])
    if records:
        storage.atomic_write_bytes(task.shard, tar_bytes(members), s3_endpoint=task.s3_endpoint)
    result = {
        "shard": task.index,
        "images": len(records),
        "annotations": annotations,
        "classes": classes,
        **_summary_part(summary),
    }
    storage.atomic_write_bytes(task.marker, json.dumps(result).encode(), s3_endpoint=task.s3_endpoint)
    return result


def _annotations(meta: bytes) -> Any:
    if not meta:
        return []
    try:
        obj = json.loads(meta)
    except ValueError:
        return []
    return obj.get("annotations") or [] if isinstance(obj, dict) else []


# --- summaries --------------------------------------------------------------------------------------


def _summary_part(summary: ConvertSummary) -> dict[str, Any]:
    return {
        "skipped": summary.skipped,
        "skipped_examples": summary.skipped_examples,
        "skipped_records": summary.skipped_records,
        "skipped_record_examples": summary.skipped_record_examples,
        "notes": summary.notes,
    }


def _merge(summary: ConvertSummary, part: dict[str, Any]) -> None:
    summary.skipped += part["skipped"]
    room = MAX_LISTED_SKIPS - len(summary.skipped_examples)
    summary.skipped_examples.extend(part["skipped_examples"][: max(room, 0)])
    for kind, n in part["skipped_records"].items():
        summary.skipped_records[kind] = summary.skipped_records.get(kind, 0) + n
    room = MAX_LISTED_SKIPS - len(summary.skipped_record_examples)
    summary.skipped_record_examples.extend(part["skipped_record_examples"][: max(room, 0)])
    summary.notes.extend(n for n in part["notes"] if n not in summary.notes)


# --- running tasks ----------------------------------------------------------------------------------


def _call(fn_and_task: bytes) -> bytes:
    fn, task = pickle.loads(fn_and_task)
    return pickle.dumps(fn(task))


def _ray_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"result": _call(row["task"])}


def _run(
    fn: Callable[[Any], dict[str, Any]],
    tasks: list[Any],
    *,
    workers: int,
    ray_address: str | None,
    small: bool = False,
) -> Iterator[dict[str, Any]]:
    """``fn(task)`` for every task, results as they finish: Ray Data tasks when ``ray_address`` is
    given (``auto``: the cluster this runs on; ``local``: a local Ray), else ``workers`` local
    processes (in this process when 1, or for a ``small`` conversion: starting processes would
    take longer than it does)."""
    if not tasks:
        return
    if ray_address is not None:
        import ray

        if not ray.is_initialized():
            ray.init(address=None if ray_address == "local" else ray_address, log_to_driver=False)
        items = [{"task": pickle.dumps((fn, t))} for t in tasks]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map(_ray_row, num_cpus=1)
        for row in ds.iter_rows():
            yield pickle.loads(row["result"])
        return
    if workers <= 1 or small:
        for t in tasks:
            yield fn(t)
        return
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures: list[Future] = [pool.submit(fn, t) for t in tasks]
        for future in as_completed(futures):
            yield future.result()


class _Progress:
    def __init__(self, what: str, total: int, done: int) -> None:
        self.what, self.total, self.done, self.images = what, total, done, 0
        self.start = self.last = time.monotonic()
        self.first = done

    def step(self, images: int) -> None:
        self.done += 1
        self.images += images
        now = time.monotonic()
        if now - self.last < _PROGRESS_SECONDS and self.done < self.total:
            return
        self.last = now
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        log.info(
            "%s: %d/%d tasks, %d images (%.0f images/s), ETA %s",
            self.what,
            self.done,
            self.total,
            self.images,
            self.images / max(now - self.start, 1e-9),
            _duration(eta),
        )


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


# --- planning ---------------------------------------------------------------------------------------


def _cap_units(units: list[Unit], limit: int | None) -> list[int | None]:
    """Per unit, how many samples to take so that the first ``limit`` samples (source order) are
    written; units of unknown size are counted by reading them here (``--limit`` is for trials)."""
    if limit is None:
        return [None] * len(units)
    caps: list[int | None] = []
    left = max(limit, 0)
    for unit in units:
        n = unit.count if unit.count is not None else sum(1 for _ in unit.read(ConvertSummary()))
        cap = min(n, left)
        caps.append(cap)
        left -= cap
    return caps


def _estimate_count(units: list[Unit]) -> int:
    """Images in units of unknown count: their bytes over the bytes per image of the first one."""
    known = sum(u.count for u in units if u.count is not None)
    unknown = [u for u in units if u.count is None]
    if not unknown:
        return known
    first = unknown[0]
    n = sum(1 for _ in first.read(ConvertSummary()))
    per_image = max(first.size, 1) / max(n, 1)
    return known + max(n, round(sum(u.size for u in unknown) / per_image))


def _group(units: list[Unit], caps: list[int | None], task_images: int, task_bytes: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    images = size = 0
    for i, (unit, cap) in enumerate(zip(units, caps)):
        if cap == 0:
            continue
        n = cap if cap is not None else unit.count
        if groups[-1] and (
            (n is not None and images + n > task_images) or (unit.count is None and size + unit.size > task_bytes)
        ):
            groups.append([])
            images = size = 0
        groups[-1].append(i)
        images += n or 0
        size += unit.size
    return [g for g in groups if g]


def _fingerprint(units: list[Unit], caps: list[int | None], options: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for unit, cap in zip(units, caps):
        h.update(f"{unit.name}\0{unit.count}\0{unit.size}\0{cap}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _plan(
    output: str,
    units: list[Unit],
    caps: list[int | None],
    *,
    seed: int,
    images_per_shard: int,
    options: dict[str, Any],
    s3_endpoint: str | None,
) -> dict[str, Any]:
    """The run's plan: read from ``_convert/plan.json`` when an earlier run of the same conversion
    left one, else made and written there."""
    url = storage.join(output, STATE_FOLDER, "plan.json")
    fingerprint = _fingerprint(units, caps, {**options, "seed": seed, "images_per_shard": images_per_shard})
    if storage.exists(url, s3_endpoint=s3_endpoint):
        plan = json.loads(storage.read_bytes(url, s3_endpoint=s3_endpoint))
        if plan.get("fingerprint") != fingerprint:
            raise ConvertError(
                f"{storage.redact(output)} holds an unfinished conversion of other inputs or settings "
                f"({STATE_FOLDER}/plan.json): rerun that command, or pass --overwrite to start this one afresh"
            )
        return plan
    exact = all(u.count is not None for u in units) or None not in caps
    if exact:
        counts = [c if c is not None else u.count for u, c in zip(units, caps)]
        total = sum(c or 0 for c in counts)
    else:
        total = _estimate_count([u for u, c in zip(units, caps) if c != 0])
    plan = {
        "fingerprint": fingerprint,
        "seed": seed,
        "mode": "exact" if exact else "hashed",
        "images": total,
        "num_shards": max(1, -(-total // images_per_shard)),
    }
    storage.atomic_write_bytes(url, json.dumps(plan, indent=1).encode(), s3_endpoint=s3_endpoint)
    return plan


def _committed(folder: str, s3_endpoint: str | None) -> dict[str, str]:
    return {
        u.rsplit("/", 1)[-1][: -len(".json")]: u
        for u in storage.list_files(folder, suffix=".json", s3_endpoint=s3_endpoint)
    }


def _read_markers(urls: Iterable[str], s3_endpoint: str | None) -> list[dict[str, Any]]:
    return [json.loads(storage.read_bytes(u, s3_endpoint=s3_endpoint)) for u in urls]


# --- the writer -------------------------------------------------------------------------------------


def write_mixed(
    units: list[Unit],
    output: str,
    *,
    images_per_shard: int = 1000,
    seed: int = 0,
    limit: int | None = None,
    workers: int = 4,
    ray_address: str | None = None,
    task_images: int = TASK_IMAGES,
    task_bytes: int = TASK_BYTES,
    options: dict[str, Any] | None = None,
    s3_endpoint: str | None = None,
    summary: ConvertSummary | None = None,
) -> ConvertSummary:
    """Write the samples of ``units`` as mixed shards ``<output>/shard-%06d.tar`` (see the module
    doc), with ``_convert.json`` and ``_image_classes.parquet``; resume an interrupted run of the
    same plan. ``options``: the converter's settings, part of the plan (a rerun must match them)."""
    if images_per_shard < 1 or workers < 1 or task_images < 1:
        raise ConfigError("images_per_shard, workers and task_images must be >= 1")
    summary = summary or ConvertSummary()
    caps = _cap_units(units, limit)
    plan = _plan(
        output,
        units,
        caps,
        seed=seed,
        images_per_shard=images_per_shard,
        options=options or {},
        s3_endpoint=s3_endpoint,
    )
    num_shards, exact = int(plan["num_shards"]), plan["mode"] == "exact"
    small = int(plan["images"]) < SMALL_IMAGES
    state = storage.join(output, STATE_FOLDER)
    staging = storage.join(state, "staging")
    groups = _group(units, caps, task_images, task_bytes)
    buckets: list[np.ndarray | None] = [None] * len(units)
    if exact:
        taken = [i for g in groups for i in g]
        counts = [caps[i] if caps[i] is not None else units[i].count for i in taken]
        for i, b in zip(taken, _exact_buckets([c or 0 for c in counts], seed, images_per_shard)):
            buckets[i] = b
    log.info(
        "converting %d units in %d tasks into %d %s shards under %s",
        len(units),
        len(groups),
        num_shards,
        "mixed" if exact else "hash-mixed",
        storage.redact(output),
    )
    # 1. scatter
    done = _committed(staging, s3_endpoint)
    tasks = [
        _Task(
            index=t,
            units=[units[i] for i in g],
            buckets=[buckets[i] for i in g],
            caps=[caps[i] for i in g],
            staging=storage.join(staging, f"task-{t:06d}.bin"),
            marker=storage.join(staging, f"task-{t:06d}.json"),
            seed=seed,
            num_shards=num_shards,
            s3_endpoint=s3_endpoint,
        )
        for t, g in enumerate(groups)
    ]
    shard_markers = storage.join(state, "shards")
    written = _committed(shard_markers, s3_endpoint)
    todo_shards = [j for j in range(num_shards) if f"shard-{j:06d}" not in written]
    scattered = _read_markers(
        (done[f"task-{t.index:06d}"] for t in tasks if f"task-{t.index:06d}" in done), s3_endpoint
    )
    if todo_shards:
        progress = _Progress("scatter", len(tasks), len(scattered))
        for result in _run(
            _scatter,
            [t for t in tasks if f"task-{t.index:06d}" not in done],
            workers=workers,
            ray_address=ray_address,
            small=small,
        ):
            scattered.append(result)
            progress.step(result["staged"])
    elif len(scattered) < len(tasks):
        raise ConvertError(f"{storage.redact(output)}: every shard is written but staging markers are missing")
    scattered.sort(key=lambda r: r["task"])
    # 2. write shards
    ranges: dict[int, list[tuple[str, int, int]]] = {}
    for r in scattered:
        url = tasks[r["task"]].staging
        for b, (offset, length) in r["ranges"].items():
            ranges.setdefault(int(b), []).append((url, offset, length))
    writes = [
        _WriteTask(
            index=j,
            ranges=ranges.get(j, []),
            shard=storage.join(output, f"shard-{j:06d}.tar"),
            marker=storage.join(shard_markers, f"shard-{j:06d}.json"),
            seed=seed,
            s3_endpoint=s3_endpoint,
        )
        for j in todo_shards
    ]
    results = _read_markers(written.values(), s3_endpoint)
    progress = _Progress("write", num_shards, len(results))
    for result in _run(_write_shard, writes, workers=workers, ray_address=ray_address, small=small):
        results.append(result)
        progress.step(result["images"])
    results.sort(key=lambda r: r["shard"])
    # 3. account, summarise
    for part in scattered:
        _merge(summary, part)
    rows: dict[str, list] = {name: [] for name in IMAGE_CLASSES_SCHEMA.names}
    for r in results:
        _merge(summary, r)
        summary.images += r["images"]
        summary.annotations += r["annotations"]
        name = f"shard-{r['shard']:06d}.tar"
        if r["images"]:
            summary.shards.append(storage.join(output, name))
        for key, names, ids in r["classes"]:
            rows["shard"].append(name)
            rows["key"].append(key)
            rows["category_names"].append(names)
            rows["category_ids"].append(ids)
    staged = sum(r["staged"] for r in scattered)
    deduped = sum(r["skipped"] for r in results)
    if summary.images + deduped != staged:
        raise ConvertError(
            f"{storage.redact(output)}: {staged} images staged but {summary.images} written and {deduped} "
            "skipped as duplicates; rerun with --overwrite"
        )
    if any(rows["category_ids"]):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pydict(rows, schema=IMAGE_CLASSES_SCHEMA), sink, compression="zstd")
        storage.atomic_write_bytes(
            storage.join(output, IMAGE_CLASSES_FILE), sink.getvalue().to_pybytes(), s3_endpoint=s3_endpoint
        )
    summary.notes.append(f"shards mixed across the dataset (seed {seed}, {plan['mode']} assignment)")
    storage.atomic_write_bytes(
        storage.join(output, "_convert.json"), json.dumps(summary.to_dict(), indent=1).encode(), s3_endpoint=s3_endpoint
    )
    storage.remove_tree(staging, s3_endpoint=s3_endpoint)
    log.info(
        "wrote %d images (%d annotations) into %d mixed shards under %s; %d images skipped (reasons in _convert.json)",
        summary.images,
        summary.annotations,
        len(summary.shards),
        storage.redact(output),
        summary.skipped,
    )
    return summary


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ConfigError(f"order={order!r}: choose one of {ORDERS}")


def _listed(samples: list[Sample], summary: ConvertSummary) -> Iterator[Sample]:
    yield from samples


def sample_units(samples: Iterable[Sample], summary: ConvertSummary, per_unit: int = 1000) -> list[Unit]:
    """Units of ready samples (COCO-format records, built on the driver), ``per_unit`` each; a
    sample whose key an earlier one had is skipped here (one key is one image across all shards)."""
    seen: set[str] = set()
    chunks: list[list[Sample]] = [[]]
    for s in samples:
        if s.key in seen:
            summary.skip(s.image_url or s.key, f"sample key {s.key} is also an earlier image's")
            continue
        seen.add(s.key)
        if len(chunks[-1]) == per_unit:
            chunks.append([])
        chunks[-1].append(s)
    return [unit(f"records-{i:06d}", _listed, c, count=len(c)) for i, c in enumerate(chunks) if c]


def unit(name: str, fn: Callable[..., Iterator[Sample]], *args: Any, count: int | None = None, size: int = 0) -> Unit:
    """A :class:`Unit` reading ``fn(*args, summary)``."""
    return Unit(name=name, read=functools.partial(fn, *args), count=count, size=size)


def file_sizes(root: str, *, s3_endpoint: str | None = None) -> dict[str, int]:
    """Bytes of every file below ``root`` by URL, from one recursive listing."""
    fs, path = storage.get_filesystem(root, s3_endpoint=s3_endpoint)
    found = fs.find(path, detail=True)
    return {storage.to_url(fs, p): int(info.get("size") or 0) for p, info in found.items()}


def local_workers() -> int:
    """The machine's cores, for the local process pool."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
