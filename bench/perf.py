"""Performance benchmark: one table for four ways of labelling the same images.

    python -m bench.perf --out bench/results/perf_gpu_rn50x16.json     # GPU: ovsam_rn50x16, SAM vit_h, CLIP RN50x16
    nice -n 19 python -m bench.perf --device cpu --preset ovsam_tiny --sam-arch vit_b --crop-clip RN50 \\
        --num-images 16 --out bench/results/perf_cpu_tiny.json       # ~3 min on 2 busy cores

Generates its own shards (640x480 JPEGs of synthetic shapes, ``--prompts`` box prompts per
image: the shapes' boxes plus random ones), then runs each mode in its own process:

  a  ours, reference-style: fp32, batch 1, segment_anything attention, host RLE (``--ref-images``)
  b  SAM + CLIP image-crop baseline: SAM ``--sam-arch`` masks for the boxes, CLIP ``--crop-clip``
     on each box crop (bf16 and batched on a GPU, fp32 batch 1 on a CPU; ``--baseline-images``)
  c  ours, optimised, the predictor as the label job builds it, with ms per stage (``--fast on``:
     its GPU branches on a CPU too, bf16 autocast; ``--rle-on-device on`` likewise)
  d  the whole label job (``run_label``) on a local Ray cluster

Columns: images/s; ms per image and per stage (GPU stage times come from a second pass with
``torch.cuda.synchronize`` at every stage boundary, over ``--stage-images``); GFLOPs per image
(``torch.utils.flop_counter`` over one image's forward, 2 x multiply-adds); achieved TFLOP/s and
MFU against the GPU's dense bf16 peak (CPU: n/a); peak GPU memory (a-c: max_memory_allocated; d:
nvidia-smi's device-wide used memory above the start); peak host memory (PSS of the mode's
process tree: for d the driver plus every Ray process); CPU cores used (CPU time of that tree /
wall). Then the numerical checks: c against fp32 with the same weights on a few images
(``fast_vs_fp32``: logits within tolerance, masks equal away from the threshold, labels equal where
fp32 is decided; ``benchlib.fast_vs_fp32``), the agreement of a with c and of c with d (labels and
mask IoU, reported), and the Ray overhead ratio d / c
(end to end, and steady state: rate between the first and the last shard commit).

Random weights throughout (cost does not depend on weight values; labels are meaningless).
Writes JSON (date, machine, torch, command, every row) to ``--out`` and the table to ``.md`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.benchlib import (
    compare_predictions,
    machine_info,
    now_iso,
    peak_bf16_tflops,
    save_json,
    write_bench_shards,
)

MODES = ("a", "b", "c", "d")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--preset", default=None, help="default: ovsam_rn50x16 on cuda, ovsam_tiny on cpu")
    p.add_argument("--modes", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--num-images", type=int, default=None, help="images generated; c and d run all (1024 / 16)")
    p.add_argument("--ref-images", type=int, default=None, help="images for a (default min(num-images, 64))")
    p.add_argument(
        "--baseline-images", type=int, default=None, help="images for b (default: --ref-images on cuda, 2 on cpu)"
    )
    p.add_argument("--stage-images", type=int, default=128, help="images of the synchronised per-stage pass (GPU)")
    p.add_argument("--prompts", type=int, default=20, help="box prompts per image")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--images-per-shard", type=int, default=None, help="default 64 on cuda, 4 on cpu")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward for b/c/d (8 on cuda, 4 on cpu)")
    p.add_argument(
        "--sam-arch",
        default=None,
        choices=["vit_h", "vit_l", "vit_b"],
        help="SAM of the baseline (default vit_h on cuda, vit_b on cpu)",
    )
    p.add_argument("--crop-clip", default=None, help="open_clip model of the baseline (RN50x16 on cuda, RN50 on cpu)")
    p.add_argument(
        "--fast",
        choices=["auto", "on", "off"],
        default="auto",
        help="mode c's bf16 autocast + channels_last (auto: on CUDA only; on: also on a CPU, CPU bf16)",
    )
    p.add_argument(
        "--rle-on-device",
        choices=["auto", "on", "off"],
        default="auto",
        help="c/b: masks run-length encoded on the device (auto: on cuda only, as the job does)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads in modes a-c (default: torch's, one per core); d sets its own",
    )
    p.add_argument(
        "--omp-wait-policy",
        default=None,
        help="OMP_WAIT_POLICY for the children (default PASSIVE on cpu: with spinning OpenMP "
        "threads a niced run on shared cores slows down ~10x; '' leaves it unset)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak for MFU")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/perf_<device>_<preset>.json)")
    p.add_argument("--keep-work", action="store_true", help="keep the generated shards and predictions")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument(
        "--work",
        help="work folder for shards, per-mode results and predictions (default: a new "
        "temporary folder, removed at the end unless --keep-work; a given one is kept)",
    )
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the device-dependent defaults; the children read this dict from ``args.json``."""
    cuda = (args.device or ("cuda" if _cuda_available() else "cpu")) == "cuda"
    n = args.num_images or (1024 if cuda else 16)
    ref = args.ref_images or min(n, 64)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--modes {args.modes!r}: use a comma-separated subset of {','.join(MODES)}")
    return {
        "device": "cuda" if cuda else "cpu",
        "preset": args.preset or ("ovsam_rn50x16" if cuda else "ovsam_tiny"),
        "modes": modes,
        "num_images": n,
        "ref_images": min(ref, n),
        "baseline_images": min(args.baseline_images or (ref if cuda else min(n, 2)), n),
        "stage_images": args.stage_images,
        "prompts": args.prompts,
        "image_size": [args.width, args.height],
        "images_per_shard": args.images_per_shard or (64 if cuda else 4),
        "batch_size": args.batch_size or (8 if cuda else 4),
        "sam_arch": args.sam_arch or ("vit_h" if cuda else "vit_b"),
        "crop_clip": args.crop_clip or ("RN50x16" if cuda else "RN50"),
        "rle_on_device": {"auto": None, "on": True, "off": False}[args.rle_on_device],
        "fast": {"auto": None, "on": True, "off": False}[args.fast],
        "peak_tflops": args.peak_tflops,
        "threads": args.threads,
        "omp_wait_policy": ("PASSIVE" if not cuda else "") if args.omp_wait_policy is None else args.omp_wait_policy,
    }


def run_child(mode: str, work: str) -> None:
    """Child process: one mode, its result written to ``<work>/<mode>.json``."""
    with open(os.path.join(work, "args.json")) as f:
        cfg = json.load(f)
    if cfg.get("threads") and mode != "d":
        import torch

        torch.set_num_threads(cfg["threads"])
    if mode in ("a", "c"):
        from bench.perf_modes import run_ours

        result = run_ours(mode, cfg, work)
    elif mode == "b":
        from bench.perf_baseline import run_baseline

        result = run_baseline(cfg, work)
    else:
        from bench.perf_modes import run_job

        result = run_job(cfg, work)
    save_json(result, os.path.join(work, f"{mode}.json"))


def _label(mode: str, cfg: dict[str, Any], row: dict[str, Any]) -> str:
    cuda = cfg["device"] == "cuda"
    s = row.get("settings", {})
    if mode == "a":
        return f"a: ours {cfg['preset']}, reference-style (fp32, batch 1, SAM attention, host RLE)"
    if mode == "b":
        prec = f"bf16, batch {s.get('batch_size')}" if cuda else "fp32, batch 1"
        return f"b: SAM {cfg['sam_arch']} + CLIP {cfg['crop_clip']} crops ({prec})"
    if mode == "c":
        extra = ", bf16 + channels_last" if s.get("fast") else ", fp32"
        rle = "device" if s.get("rle_on_device") else "host"
        return f"c: ours {cfg['preset']}, optimised (batch {s.get('batch_size')}, SDPA attention{extra}, {rle} RLE)"
    return f"d: label job on local Ray ({cfg['preset']}, batch {s.get('batch_size')}, 1 model actor)"


def _stage_text(row: dict[str, Any]) -> str:
    if "steady_images_per_s" in row:
        steady = row.get("steady_images_per_s")
        return (
            f"end to end incl. start-up; first commit at {row.get('first_commit_s')} s; "
            f"steady {steady if steady is not None else 'n/a'} img/s"
        )
    return ", ".join(f"{k} {_num(v)}" for k, v in row.get("stages_ms", {}).items())


def _fmt(v: Any, spec: str = "") -> str:
    return "n/a" if v is None else format(v, spec)


def _num(v: float) -> str:
    """Readable at any scale: 34,460 / 142.8 / 9.22 / 0.0374."""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.3g}"


def finish_rows(rows: dict[str, dict], cfg: dict[str, Any], peak: float | None) -> None:
    """Add GFLOPs, achieved TFLOP/s and MFU to every row (d uses the model's count from c or a)."""
    ours = (rows.get("c") or {}).get("flops_per_image") or (rows.get("a") or {}).get("flops_per_image")
    for mode, row in rows.items():
        if "error" in row:
            continue
        flops = row.get("flops_per_image") or (ours if mode == "d" else None)
        row["gflops_per_image"] = round(flops / 1e9, 2) if flops else None
        tflops = flops * row["images_per_s"] / 1e12 if flops else None
        row["achieved_tflops"] = round(tflops, 4) if tflops is not None else None
        row["mfu"] = round(tflops / peak, 4) if (tflops is not None and peak) else None


def table(rows: dict[str, dict], cfg: dict[str, Any]) -> str:
    head = (
        "| mode | images | images/s | ms/image | ms per image by stage | GFLOP/image | TFLOP/s | MFU (bf16 peak) "
        "| peak GPU MiB | peak host MiB (PSS) | CPU cores used |"
    )
    lines = [head, "|" + "---|" * 11]
    for mode, row in rows.items():
        if "error" in row:
            lines.append(f"| {mode} | failed: {row['error']} |" + " |" * 9)
            continue
        gpu = row.get("peak_gpu_mib")
        gpu_text = (
            "n/a"
            if gpu is None
            else (f"{gpu:.0f} (device used)" if row.get("peak_gpu_is_device_used") else f"{gpu:.0f}")
        )
        mfu = "n/a" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
        lines.append(
            f"| {_label(mode, cfg, row)} | {row['images']} | {_num(row['images_per_s'])} | "
            f"{_num(row['ms_per_image'])} | "
            f"{_stage_text(row)} | {_fmt(row.get('gflops_per_image'), ',.4g')} | "
            f"{_fmt(row.get('achieved_tflops'), '.3g')} | {mfu} | {gpu_text} | {row['peak_host_mib']:,.0f} | "
            f"{row['cpu_cores']:.2f} |"
        )
    return "\n".join(lines)


def checks(work: str, rows: dict[str, dict]) -> dict[str, Any]:
    def load(mode: str) -> dict[str, list] | None:
        path = os.path.join(work, f"pred_{mode}.json")
        if mode not in rows or "error" in rows[mode] or not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    a, c, d = load("a"), load("c"), load("d")
    out: dict[str, Any] = {}
    if a is not None and c is not None:
        out["fast_vs_reference"] = compare_predictions(a, c)
    if "fast_vs_fp32" in rows.get("c", {}):
        out["fast_vs_fp32"] = rows["c"]["fast_vs_fp32"]
    if c is not None and d is not None:
        out["job_vs_model_alone"] = compare_predictions(c, d)
    return out


def _run_modes(cfg: dict[str, Any], work: str) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for mode in cfg["modes"]:
        t0 = time.time()
        print(f"[perf] mode {mode} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "bench.perf", "--child", mode, "--work", work])
        path = os.path.join(work, f"{mode}.json")
        if proc.returncode != 0 or not os.path.exists(path):
            rows[mode] = {"error": f"child exited with {proc.returncode} (its log is above)"}
            continue
        with open(path) as f:
            rows[mode] = json.load(f)
        print(
            f"[perf] mode {mode}: {rows[mode]['images_per_s']} images/s ({time.time() - t0:.0f} s with set-up)",
            file=sys.stderr,
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.work)
        return
    cfg = resolve(args)
    out = args.out or os.path.join("bench", "results", f"perf_{cfg['device']}_{cfg['preset']}.json")
    load_start = [round(x, 2) for x in os.getloadavg()]
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="ovsam_perf_")
    os.makedirs(work, exist_ok=True)
    try:
        t0 = time.time()
        write_bench_shards(
            os.path.join(work, "shards"),
            num_images=cfg["num_images"],
            images_per_shard=cfg["images_per_shard"],
            size=tuple(cfg["image_size"]),
            prompts=cfg["prompts"],
        )
        print(f"[perf] {cfg['num_images']} images generated in {time.time() - t0:.1f} s -> {work}", file=sys.stderr)
        from ovsam_ray.data.synthetic import shape_vocabulary_names

        with open(os.path.join(work, "vocab.txt"), "w") as f:
            f.write("\n".join(shape_vocabulary_names()))
        save_json(cfg, os.path.join(work, "args.json"))
        if cfg["omp_wait_policy"]:  # children and the Ray processes they start inherit it
            os.environ["OMP_WAIT_POLICY"] = cfg["omp_wait_policy"]
        rows = _run_modes(cfg, work)
        numeric = checks(work, rows)
    finally:
        if args.keep_work or args.work:
            print(f"[perf] kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    machine = machine_info()
    machine["load_average_start"] = load_start
    peak = (cfg["peak_tflops"] or peak_bf16_tflops(machine.get("gpu"))) if cfg["device"] == "cuda" else None
    finish_rows(rows, cfg, peak)
    c, d = rows.get("c", {}), rows.get("d", {})
    ratio = steady_ratio = None
    if "images_per_s" in c and "images_per_s" in d:
        ratio = round(d["images_per_s"] / c["images_per_s"], 3)
        if d.get("steady_images_per_s"):
            steady_ratio = round(d["steady_images_per_s"] / c["images_per_s"], 3)
    text = table(rows, cfg)
    lines = [text, ""]
    for name, chk in numeric.items():
        if "ok" in chk:  # benchlib.fast_vs_fp32
            lines.append(
                f"- {name}: {'ok' if chk['ok'] else 'FAILED'} on {chk['images']} images, {chk['prompts']} "
                f"prompts: logits max |diff| {chk['logit_max_abs_diff']:.3g} (tol {chk['logit_tol']:.3g}), "
                f"{chk['mask_pixels_off']} mask pixels off away from the threshold, labels "
                f"{chk['labels_decided_equal']}/{chk['labels_decided']} equal where decided; mask IoU "
                f"min {_fmt(chk['mask_iou_min'])}, mean {_fmt(chk['mask_iou_mean'])} (reported)"
            )
            continue
        lines.append(
            f"- {name}: {chk['prompts']} prompts on {chk['images']} images; labels equal "
            f"{_fmt(chk['labels_equal_fraction'])}; mask IoU min {_fmt(chk['mask_iou_min'])}, "
            f"mean {_fmt(chk['mask_iou_mean'])}"
        )
    lines.append(
        f"- Ray overhead ratio d / c: {_fmt(ratio)} end to end, {_fmt(steady_ratio)} steady state (target >= 0.8)"
    )
    lines.append(f"- peak for MFU: {_fmt(peak)} TFLOP/s dense bf16 ({machine.get('gpu') or 'CPU: no peak claimed'})")
    report = "\n".join(lines)
    print(report)
    result = {
        "benchmark": "perf",
        "date": now_iso(),
        "machine": machine,
        "command": " ".join(sys.argv),
        "config": cfg,
        "random_init": True,
        "peak_bf16_tflops": peak,
        "rows": rows,
        "checks": numeric,
        "ray_overhead_ratio": ratio,
        "ray_overhead_ratio_steady": steady_ratio,
    }
    save_json(result, out)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(report + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
