"""Mixed-shard conversion at scale on this machine: throughput, a kill and a rerun, and how many
classes training's reader sees per 1,000 samples (mixed vs class-sorted shards).

    python -m bench.convert_mixed --images 1000000 --classes 2000 --workers 2 --root /tmp/bench_convert

Writes a synthetic ImageNet-like tar-per-class source (16x16 JPEG, one random image per class
re-used, so generation stays cheap; the converter passes image bytes through, as it does for real
JPEGs), converts it with ``ovsam-ray convert imagenet`` in a subprocess killed (SIGKILL) part-way
through the shard writing, reruns the same command, verifies every source image exactly once, then
measures the reader (``training.stream.interleave`` over 8 shards, 256-sample buffer, as training
reads a work item) on the mixed shards and on class-sorted shards (``--order source``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from ovsam_ray.data.shards import list_shards, read_shard
from ovsam_ray.data.synthetic import encode_image, tar_bytes
from ovsam_ray.training.stream import interleave


def make_source(root: str, images: int, classes: int) -> str:
    src = os.path.join(root, "src")
    if os.path.exists(os.path.join(src, "_done")):
        return src
    os.makedirs(src, exist_ok=True)
    rng = np.random.default_rng(0)
    per = images // classes
    for c in range(classes):
        jpg = encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "jpg")
        synset = f"n{c:08d}"
        members = [(f"{synset}_{j}.JPEG", jpg) for j in range(per)]
        with open(os.path.join(src, f"{synset}.tar"), "wb") as f:
            f.write(tar_bytes(members))
    open(os.path.join(src, "_done"), "w").close()
    return src


def convert(src: str, out: str, workers: int, order: str, kill_after: float | None) -> tuple[float, bool]:
    cmd = [sys.executable, "-m", "ovsam_ray.cli", "convert", "imagenet", "--input", src, "--output", out,
           "--workers", str(workers), "--order", order, "--task-images", "100000"]  # fmt: skip
    start = time.monotonic()
    log = open(out.rstrip("/") + ".log", "a")  # a pipe would fill and block the converter
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    killed = False
    if kill_after is not None:
        markers = os.path.join(out, "_convert", "shards")
        while proc.poll() is None:
            done = len(os.listdir(markers)) if os.path.isdir(markers) else 0
            if done >= kill_after:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.2)
    proc.wait()
    log.close()
    if not killed and proc.returncode != 0:
        raise SystemExit(f"convert failed: see {log.name}")
    return time.monotonic() - start, killed


def classes_per_window(folder: str, window: int = 1000, shards_per_item: int = 8, buffer: int = 256) -> float:
    urls = list_shards(folder)
    labels = {u: [s["key"].split("_")[0] for s in read_shard(u).samples] for u in urls}
    rng = np.random.default_rng(0)
    order = [urls[i] for i in rng.permutation(len(urls))]
    counts = []
    for start in range(0, len(order) - shards_per_item + 1, shards_per_item):
        item = order[start : start + shards_per_item]
        stream = list(interleave([iter(labels[u]) for u in item], rng, buffer))
        counts += [len(set(stream[i : i + window])) for i in range(0, len(stream) - window + 1, window)]
    return float(np.mean(counts))


def iid_expectation(classes: int, window: int = 1000) -> float:
    return classes * (1 - (1 - 1 / classes) ** window)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--classes", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--root", default="/tmp/bench_convert")
    a = p.parse_args()
    t0 = time.monotonic()
    src = make_source(a.root, a.images, a.classes)
    gen = time.monotonic() - t0
    total = (a.images // a.classes) * a.classes
    out = os.path.join(a.root, "mixed")
    shards = -(-total // 1000)
    first, killed = convert(src, out, a.workers, "shuffled", kill_after=shards // 2)
    second, _ = convert(src, out, a.workers, "shuffled", kill_after=None)
    keys: list[str] = []
    for url in list_shards(out):
        keys += [s["key"] for s in read_shard(url).samples]
    summary = json.load(open(os.path.join(out, "_convert.json")))
    sorted_out = os.path.join(a.root, "sorted")
    plain, _ = convert(src, sorted_out, a.workers, "source", kill_after=None)
    result = {
        "images": total,
        "classes": a.classes,
        "workers": a.workers,
        "generate_s": round(gen, 1),
        "killed_after_s": round(first, 1),
        "killed": killed,
        "rerun_s": round(second, 1),
        "written": len(keys),
        "distinct": len(set(keys)),
        "summary_images": summary["images"],
        "summary_skipped": summary["skipped"],
        "source_order_s": round(plain, 1),
        "source_order_images_per_s": round(total / plain),
        "iid_classes_per_1000": round(iid_expectation(a.classes), 1),
        "mixed_classes_per_1000": round(classes_per_window(out), 1),
        "sorted_classes_per_1000": round(classes_per_window(sorted_out), 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
