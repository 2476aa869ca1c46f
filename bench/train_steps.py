"""Step times of a few training steps, through the same code as ``ovsam-ray train distill|cotrain``.

    python -m bench.train_steps distill --out distill.json -- --storage-path RUNS --name d \\
        --dataset SHARDS --preset ovsam_rn50x16 --random-init --teacher vit_h \\
        --teacher-checkpoint sam_vit_h_random.pth --use-gpu --batch-size 2 --max-steps 12 --log-every 1
    python -m bench.train_steps write-sam-encoder --kind vit_h --out sam_vit_h_random.pth

Everything after ``--`` goes to ``python -m ovsam_ray.cli train distill|cotrain`` (Ray Train) as it
is; with ``--log-every 1`` every step logs its images/s (Ray forwards the worker's log; Ray Train
keeps only the checkpoints' metrics in ``Result``), so the step time is ``images / images_per_s`` of
that step (data waiting included). The
first ``--warmup-steps`` steps (cuDNN autotuning, allocator growth, the data stream starting) are
left out of the steady figure, the median of the rest. The JSON also projects the GPU-hours of
the paper's recipes from the steady rate (``RECIPES``): a projection, not a measurement.

``write-sam-encoder`` writes a SAM checkpoint holding only a random ``image_encoder.*`` (bf16, so
that ViT-H's is ~1.3 GB, not 2.5): the distillation teacher of a run without real weights.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.benchlib import machine_info, now_iso, save_json

# Images one GPU-run of each recipe reads (DESIGN §5; the paper's schedules):
# distillation 24 epochs on 1% of SA-1B (11.1M images -> ~111k); co-training 12 epochs on COCO
# train2017 (118,287 images), without the optional ImageNet-22k mixture.
RECIPES = {
    "distill": {"what": "SAM2CLIP distillation, 24 epochs x 1% of SA-1B (~111,000 images)", "images": 24 * 111_000},
    "cotrain": {"what": "CLIP2SAM co-training, 12 epochs x COCO train2017 (118,287 images)", "images": 12 * 118_287},
}


# The training loop's log line of every report (training/trainer.py: "%s step %d: %s", k=v pairs).
STEP_LINE = re.compile(r"\b(distill|cotrain) step (\d+): (.*)$")


def _precision(run) -> str:
    """What ``loop.Runtime.autocast`` runs the steps in."""
    bf16 = run.precision == "bf16" or (run.precision == "auto" and run.use_gpu)
    return ("bf16 autocast" if bf16 else "fp32") + ("" if run.use_gpu else " (CPU)")


def parse_step_line(line: str) -> dict[str, float] | None:
    """The metrics of one ``<stage> step N: k=v ...`` log line (as Ray forwards a worker's log), or None."""
    m = STEP_LINE.search(line.rstrip())
    if not m:
        return None
    out: dict[str, float] = {"step": int(m.group(2))}
    for item in m.group(3).split():
        key, sep, value = item.partition("=")
        if sep:
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def step_times(rows: list[dict[str, Any]], warmup_steps: int) -> dict[str, Any]:
    """Per-step seconds from per-step reports (``log_every=1``: each row is one step, ``images``
    counted over all workers; a step reported by several workers counts once) and the steady
    median after ``warmup_steps``."""
    by_step = {int(r["step"]): r for r in reversed(rows) if r.get("images_per_s")}
    steps = [
        {"step": k, "seconds": r["images"] / r["images_per_s"], "images": int(r["images"]), "loss": r.get("loss")}
        for k, r in sorted(by_step.items())
    ]
    steady = [s for s in steps if s["step"] > warmup_steps] or steps[-1:]
    if not steady:
        return {"steps": steps, "steady_step_s": None, "steady_images_per_s": None, "first_step_s": None}
    step_s = statistics.median(s["seconds"] for s in steady)
    images = statistics.median(s["images"] for s in steady)
    return {
        "steps": steps,
        "steady_steps": len(steady),
        "steady_step_s": round(step_s, 4),
        "steady_images_per_s": round(images / step_s, 3),
        "first_step_s": round(steps[0]["seconds"], 3),
    }


def gpu_hours(stage: str, images_per_s_per_gpu: float | None) -> dict[str, Any] | None:
    recipe = RECIPES.get(stage)
    if recipe is None or not images_per_s_per_gpu:
        return None
    return {
        **recipe,
        "gpu_hours": round(recipe["images"] / images_per_s_per_gpu / 3600, 1),
        "note": "projection from the steady step time of this short run (random weights, synthetic data)",
    }


def run_training(stage: str, train_argv: list[str], out: str, warmup_steps: int) -> int:
    """Run ``python -m ovsam_ray.cli train <stage> <train_argv>`` (its output passed through) and
    write the step times it logged to ``out``."""
    from ovsam_ray.cli import train as train_cli

    parser = train_cli.distill_parser() if stage == "distill" else train_cli.cotrain_parser()
    cfg_args = parser.parse_args(train_argv)
    cfg = (
        train_cli.distill_config_from_args(cfg_args)
        if stage == "distill"
        else train_cli.cotrain_config_from_args(cfg_args)
    )
    if cfg.run.log_every != 1:
        raise SystemExit("--log-every 1 is needed: every step must report its own time")
    command = [sys.executable, "-m", "ovsam_ray.cli", "train", stage, *train_argv]
    t0 = time.time()
    rows = []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        row = parse_step_line(line)
        if row is not None:
            rows.append(row)
    rc = proc.wait()
    times = step_times(rows, warmup_steps)
    gpus = cfg.run.num_workers if cfg.run.use_gpu else 0
    per_gpu = times["steady_images_per_s"] / gpus if (gpus and times["steady_images_per_s"]) else None
    steps_done = max((s["step"] for s in times["steps"]), default=0)
    record = {
        "benchmark": f"train_{stage}",
        "date": now_iso(),
        "machine": machine_info(),
        "command": " ".join(["ovsam-ray", "train", stage, *train_argv]),
        "preset": cfg.model.preset,
        "random_init": cfg.model.random_init,
        "use_gpu": cfg.run.use_gpu,
        "num_workers": cfg.run.num_workers,
        "batch_size_per_worker": cfg.run.batch_size,
        "precision": _precision(cfg.run),
        "max_steps": cfg.run.max_steps,
        "steps_done": steps_done,
        "wall_s": round(time.time() - t0, 1),
        "exit_code": rc,
        "error": None if rc == 0 else f"ovsam-ray train {stage} exited with {rc} (its log is above)",
        **times,
        "images_per_s_per_gpu": round(per_gpu, 3) if per_gpu else None,
        "recipe_projection": gpu_hours(stage, per_gpu),
    }
    save_json(record, out)
    print(json.dumps({k: v for k, v in record.items() if k not in ("steps", "machine")}, indent=1))
    return 0 if rc == 0 and steps_done == cfg.run.max_steps else 1


def write_sam_encoder(kind: str, out: str, seed: int = 0) -> None:
    """A random SAM ``image_encoder.*`` of ``kind`` in bf16; the shapes come from segment_anything's
    own builder run on the meta device (nothing is allocated or initialised there)."""
    import torch
    from segment_anything import sam_model_registry

    if kind not in sam_model_registry or kind == "default":
        raise SystemExit(f"--kind {kind}: one of vit_h, vit_l, vit_b")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in sam_model_registry[kind](checkpoint=None).image_encoder.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {
        f"image_encoder.{k}": (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        for k, shape in shapes.items()
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(state, out + ".tmp")
    os.replace(out + ".tmp", out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train_argv: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_argv = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["distill", "cotrain", "write-sam-encoder"])
    p.add_argument("--out", required=True, help="JSON result (write-sam-encoder: the .pth)")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--kind", default="vit_h")
    a = p.parse_args(argv)
    if a.what == "write-sam-encoder":
        write_sam_encoder(a.kind, a.out)
        return 0
    return run_training(a.what, train_argv, a.out, a.warmup_steps)


if __name__ == "__main__":
    sys.exit(main())
