"""Long-run memory of the label job: does host and object-store memory stay flat?

    nice -n 19 python -m bench.memory_flat --num-images 10000 --out bench/results/memory_flat_cpu_tiny.json

Generates ``--num-images`` small JPEGs (320x240, ``--prompts`` boxes each, shards of
``--images-per-shard``), runs ``run_label`` with the tiny preset on a local Ray cluster, and every
``--interval`` seconds samples: images committed (from the commit markers), PSS of the driver's
process tree (the driver, GCS, raylet and every Ray worker: PSS so that the object store's shared
pages count once) and its private part (Pss_Anon: heaps, which is where a leak would show; the
rest is mostly the object store's mapping, whose touched pages stay resident once used), the
driver's own PSS, the largest process (name, PSS, private), and the object store's used bytes,
object count and spilled bytes (from the raylet, as ``ray memory --stats-only`` reads them).
Writes the series as CSV and a JSON summary: memory at 10/50/90/100% of the images and the
least-squares slopes (MiB per 1,000 images) after 10% (start-up allocations done) and after 50%
(the object store's working set reached too).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from bench.benchlib import CommitWatcher, TreeSampler, machine_info, now_iso, pss_mib, save_json, write_bench_shards

MEMORY_KEYS = (
    "pss_mib",
    "pss_anon_mib",
    "driver_pss_mib",
    "largest_process_pss_mib",
    "largest_process_anon_mib",
    "object_store_mib",
)


class ObjectStoreProbe:
    """Object store usage of the local cluster, through the raylet's memory-info RPC (what
    ``ray memory --stats-only`` prints). A Ray-internal API: if it fails, the fields are None."""

    def __init__(self) -> None:
        self.state: Any = None
        try:
            import ray
            from ray._private.internal_api import get_state_from_address

            self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        except Exception as e:  # noqa: BLE001 - a private API: degrade to "not measured"
            print(f"[memory_flat] object store stats unavailable: {e}", file=sys.stderr)

    def __call__(self) -> dict[str, Any]:
        empty = {"object_store_mib": None, "object_store_objects": None, "spilled_mib": None}
        if self.state is None:
            return empty
        try:
            from ray._private.internal_api import get_memory_info_reply

            stats = get_memory_info_reply(self.state, timeout_seconds=10).store_stats
        except Exception:  # noqa: BLE001
            return empty
        return {
            "object_store_mib": round(stats.object_store_bytes_used / 2**20, 1),
            "object_store_objects": int(stats.num_local_objects),
            "spilled_mib": round(stats.spilled_bytes_total / 2**20, 1),
        }


def summarize(samples: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """Memory at 10/50/90/100% of ``total`` images and slopes (MiB per 1,000 images) after 10% and 50%."""
    at = {}
    for pct in (10, 50, 90, 100):
        row = next((s for s in samples if s["images_committed"] >= pct / 100 * total), None)
        if row is not None:
            at[f"{pct}%"] = {k: row.get(k) for k in ("t_s", "images_committed", *MEMORY_KEYS, "largest_process")}
    slopes: dict[str, dict[str, float]] = {}
    for start in (10, 50):
        window = [s for s in samples if s["images_committed"] >= start / 100 * total]
        slopes[f"after_{start}pct"] = {}
        for key in MEMORY_KEYS:
            pts = [(s["images_committed"], s[key]) for s in window if s.get(key) is not None]
            if len(pts) >= 3 and len({x for x, _ in pts}) >= 2:
                x, y = np.array(pts, dtype=float).T
                slopes[f"after_{start}pct"][key] = round(float(np.polyfit(x, y, 1)[0]) * 1000, 3)
    peaks = {key: max((s[key] for s in samples if s.get(key) is not None), default=None) for key in MEMORY_KEYS}
    return {"at_progress": at, "slope_mib_per_1000_images": slopes, "peaks": peaks}


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| progress | time (s) | images committed | PSS, all processes (MiB) | of it private (anon) "
        "| driver PSS | largest process: PSS / private | object store used (MiB) |",
        "|" + "---|" * 8,
    ]
    for pct, r in summary["at_progress"].items():
        lines.append(
            f"| {pct} | {r['t_s']:.0f} | {r['images_committed']} | {r['pss_mib']:.0f} | "
            f"{r['pss_anon_mib']:.0f} | {r['driver_pss_mib']:.0f} | {r['largest_process_pss_mib']:.0f} / "
            f"{r['largest_process_anon_mib']:.0f} ({r['largest_process']}) | {r['object_store_mib']} |"
        )
    for window, s in summary["slope_mib_per_1000_images"].items():
        lines.append(
            f"| slope {window.replace('_', ' ').replace('pct', '%')} (MiB per 1,000 images) | | | "
            f"{s.get('pss_mib')} | {s.get('pss_anon_mib')} | {s.get('driver_pss_mib')} | "
            f"{s.get('largest_process_pss_mib')} / {s.get('largest_process_anon_mib')} | "
            f"{s.get('object_store_mib')} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, work: str) -> dict[str, Any]:
    import ray

    from ovsam_ray.data.synthetic import shape_vocabulary_names
    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.pipeline.label_job import LabelConfig, run_label

    t0 = time.time()
    write_bench_shards(
        os.path.join(work, "shards"),
        num_images=args.num_images,
        images_per_shard=args.images_per_shard,
        size=(args.width, args.height),
        prompts=args.prompts,
        objects=(1, 4),
    )
    generate_s = time.time() - t0
    print(f"[memory_flat] {args.num_images} images generated in {generate_s:.0f} s", file=sys.stderr, flush=True)
    vocab = os.path.join(work, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(shape_vocabulary_names()))
    output = os.path.join(work, "labels")
    cfg = LabelConfig(
        input=os.path.join(work, "shards"),
        output=output,
        batch_size=args.batch_size,
        model=ModelConfig(preset=args.preset, random_init=True, vocab=vocab),
        progress_interval_s=60.0,
    )
    store = args.object_store_mib * 2**20 if args.object_store_mib else None
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=store)
    watcher, store_probe = CommitWatcher(output), ObjectStoreProbe()
    driver = os.getpid()

    def probe() -> dict[str, Any]:
        return {**watcher.probe(), **store_probe(), "driver_pss_mib": round(pss_mib(driver), 1)}

    sampler = TreeSampler(interval_s=args.interval, probe=probe).start()
    try:
        summary = run_label(cfg)
    finally:
        sampler.stop()
        ray.shutdown()
    return {
        "generate_s": round(generate_s, 1),
        "job": summary.to_dict(),
        "samples": sampler.samples,
        "steady_images_per_s": watcher.steady_images_per_s(),
        "cpu_cores": round(sampler.cpu_seconds / max(summary.wall_time_s, 1e-9), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=10000)
    p.add_argument("--images-per-shard", type=int, default=100)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--preset", default="ovsam_tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--object-store-mib", type=int, default=None, help="cap the object store (default: Ray's)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", help="'' leaves OMP_WAIT_POLICY unset (see perf.py)")
    p.add_argument("--out", required=True, help="JSON summary; the CSV series goes beside it")
    p.add_argument("--keep-work", action="store_true")
    args = p.parse_args()
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    load_start = [round(x, 2) for x in os.getloadavg()]
    work = tempfile.mkdtemp(prefix="ovsam_memflat_")
    try:
        result = run(args, work)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    samples = result.pop("samples")
    summary = summarize(samples, result["job"]["images"])
    machine = machine_info()
    machine["load_average_start"] = load_start
    record = {
        "benchmark": "memory_flat",
        "date": now_iso(),
        "machine": machine,
        "command": " ".join(sys.argv),
        "config": vars(args),
        "random_init": True,
        **result,
        **summary,
    }
    save_json(record, args.out)
    csv_path = os.path.splitext(args.out)[0] + ".csv"
    keys = list(dict.fromkeys(k for s in samples for k in s))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(samples)
    job = result["job"]
    print(table(summary))
    print(
        f"\n{job['images']} images ({job['images_error']} errors) in {job['wall_time_s']:.0f} s: "
        f"{job['images_per_s']} images/s end to end, steady {result['steady_images_per_s']}; "
        f"CPU cores used {result['cpu_cores']}"
    )
    print(f"wrote {args.out} and {csv_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
