"""CPU benchmark (not a test) of the adapter's global attention: segment_anything's ``Attention``
vs ``FastAttention`` (SDPA with the rel-pos bias as attn_mask), unchunked and chunked.

    python -m bench.attention_cpu --out bench/results/attention_cpu.json

Shape: the global block of ``ovsam_rn50_small`` (dim 256, 16 heads, 64x64 tokens), batch 1,
fp32, no grad, random weights and rel-pos tables. Each variant runs in its own subprocess so
that its peak memory is that process's ``ru_maxrss`` growth over the forward pass (the first
one; the timing is the median of the later ones). Prints a markdown row per variant and writes
JSON with the date, CPU model and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from bench.benchlib import cpu_model

DIM, HEADS, GRID = 256, 16, 64


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _measure(variant: str, batch: int, repeats: int) -> dict:
    """Runs in the child: one variant, one JSON-able result."""
    import torch
    from segment_anything.modeling.image_encoder import Attention

    from ovsam_ray.model.attention import FastAttention

    torch.manual_seed(0)
    sam = Attention(DIM, num_heads=HEADS, qkv_bias=True, use_rel_pos=True, input_size=(GRID, GRID)).eval()
    with torch.no_grad():
        sam.rel_pos_h.normal_(std=0.5)
        sam.rel_pos_w.normal_(std=0.5)
    chunk = None if variant in ("sam", "sdpa") else int(variant.removeprefix("sdpa_chunk"))
    attn = sam if variant == "sam" else FastAttention.from_sam(sam, query_chunk=chunk)
    x = torch.randn(batch, GRID, GRID, DIM)
    with torch.no_grad():
        before = _maxrss_mib()
        start = time.perf_counter()
        y = attn(x)
        first_ms = (time.perf_counter() - start) * 1e3
        peak = _maxrss_mib() - before
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            attn(x)
            times.append((time.perf_counter() - start) * 1e3)
        max_abs_diff = 0.0 if attn is sam else (y - sam(x)).abs().max().item()
    return {
        "variant": variant,
        "query_chunk": chunk,
        "ms_median": statistics.median(times),
        "ms_all": times,
        "ms_first": first_ms,
        "peak_mib_over_setup": peak,
        "max_abs_diff_vs_sam": max_abs_diff,
        "output_abs_max": y.abs().max().item(),
        "threads": torch.get_num_threads(),
    }


def _row(r: dict) -> str:
    return (
        f"| {r['variant']} | {r['ms_median']:.0f} | {r['peak_mib_over_setup']:.0f} | {r['max_abs_diff_vs_sam']:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, nargs="*", default=[1024, 256], help="query_chunk values to time")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the first")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(_measure(args.variant, args.batch, args.repeats)))
        return

    import torch

    variants = ["sam", "sdpa"] + [f"sdpa_chunk{c}" for c in args.chunks]
    print(f"global attention, dim {DIM}, {HEADS} heads, {GRID}x{GRID} tokens, batch {args.batch}, fp32, CPU")
    print("| variant | ms (median) | peak MiB over setup | max abs diff vs SAM |")
    print("|---|---|---|---|")
    results = []
    for variant in variants:
        cmd = [
            sys.executable,
            "-m",
            "bench.attention_cpu",
            "--variant",
            variant,
            "--batch",
            str(args.batch),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(_row(results[-1]), flush=True)
    record = {
        "benchmark": "attention_cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "shape": {"dim": DIM, "heads": HEADS, "grid": GRID, "batch": args.batch, "dtype": "float32"},
        "results": results,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
