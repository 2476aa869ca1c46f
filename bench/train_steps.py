"""Step times of a few training steps, through the same code as ``ovsam-ray train distill|cotrain``.

    python bench/train_steps.py distill --out distill.json -- --storage-path RUNS --name d \\
        --dataset SHARDS --preset ovsam_rn50x16 --random-init --teacher vit_h \\
        --teacher-checkpoint sam_vit_h_random.pth --use-gpu --batch-size 2 --max-steps 12 --log-every 1
    python bench/train_steps.py write-sam-encoder --kind vit_h --out sam_vit_h_random.pth

Everything after ``--`` is parsed by the training CLI's own parser and run by ``run_distill`` /
``run_cotrain`` on Ray Train, exactly as the CLI does; with ``--log-every 1`` every step reports its
images/s, so the step time is ``images / images_per_s`` of that step (data waiting included). The
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
import statistics
import sys
import time
from typing import Any

from benchlib import machine_info, now_iso, save_json

# Images one GPU-run of each recipe reads (DESIGN §5; the paper's schedules):
# distillation 24 epochs on 1% of SA-1B (11.1M images -> ~111k); co-training 12 epochs on COCO
# train2017 (118,287 images), without the optional ImageNet-22k mixture.
RECIPES = {
    "distill": {"what": "SAM2CLIP distillation, 24 epochs x 1% of SA-1B (~111,000 images)",
                "images": 24 * 111_000},
    "cotrain": {"what": "CLIP2SAM co-training, 12 epochs x COCO train2017 (118,287 images)",
                "images": 12 * 118_287},
}


def step_times(rows: list[dict[str, Any]], warmup_steps: int) -> dict[str, Any]:
    """Per-step seconds from per-step reports (``log_every=1``: each row is one step, ``images``
    counted over all workers) and the steady median after ``warmup_steps``."""
    rows = sorted(rows, key=lambda r: r["step"])
    steps = [{"step": int(r["step"]), "seconds": r["images"] / r["images_per_s"], "images": int(r["images"]),
              "loss": r.get("loss")} for r in rows if r.get("images_per_s")]
    steady = [s for s in steps if s["step"] > warmup_steps] or steps[-1:]
    if not steady:
        return {"steps": steps, "steady_step_s": None, "steady_images_per_s": None}
    step_s = statistics.median(s["seconds"] for s in steady)
    images = statistics.median(s["images"] for s in steady)
    return {"steps": steps, "steady_steps": len(steady), "steady_step_s": round(step_s, 4),
            "steady_images_per_s": round(images / step_s, 3), "first_step_s": round(steps[0]["seconds"], 3)}


def gpu_hours(stage: str, images_per_s_per_gpu: float | None) -> dict[str, Any] | None:
    recipe = RECIPES.get(stage)
    if recipe is None or not images_per_s_per_gpu:
        return None
    return {**recipe, "gpu_hours": round(recipe["images"] / images_per_s_per_gpu / 3600, 1),
            "note": "projection from the steady step time of this short run (random weights, synthetic data)"}


def run_training(stage: str, train_argv: list[str], out: str, warmup_steps: int) -> int:
    import ray

    from ovsam_ray.training import cli

    parser = cli.distill_parser() if stage == "distill" else cli.cotrain_parser()
    args = parser.parse_args(train_argv)
    cfg = cli.distill_config_from_args(args) if stage == "distill" else cli.cotrain_config_from_args(args)
    if cfg.run.log_every != 1:
        raise SystemExit("--log-every 1 is needed: every step must report its own time")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    t0 = time.time()
    try:
        if stage == "distill":
            from ovsam_ray.training.distill import run_distill

            result = run_distill(cfg)
        else:
            from ovsam_ray.training.cotrain import run_cotrain

            result = run_cotrain(cfg)
    finally:
        wall = time.time() - t0
        ray.shutdown()
    rows = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    times = step_times(rows, warmup_steps)
    gpus = cfg.run.num_workers if cfg.run.use_gpu else 0
    per_gpu = times["steady_images_per_s"] / gpus if (gpus and times["steady_images_per_s"]) else None
    record = {
        "benchmark": f"train_{stage}", "date": now_iso(), "machine": machine_info(), "command": " ".join(sys.argv),
        "preset": cfg.model.preset, "random_init": cfg.model.random_init, "use_gpu": cfg.run.use_gpu,
        "num_workers": cfg.run.num_workers, "batch_size_per_worker": cfg.run.batch_size,
        "precision": "bf16 autocast" if cfg.run.use_gpu else "fp32 (CPU)", "max_steps": cfg.run.max_steps,
        "steps_done": int(result.metrics.get("step", 0)) if result.metrics else 0, "wall_s": round(wall, 1),
        "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:2000],
        **times, "images_per_s_per_gpu": round(per_gpu, 3) if per_gpu else None,
        "recipe_projection": gpu_hours(stage, per_gpu),
    }
    save_json(record, out)
    print(json.dumps({k: v for k, v in record.items() if k not in ("steps", "machine")}, indent=1))
    return 0 if result.error is None and record["steps_done"] == cfg.run.max_steps else 1


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
    state = {f"image_encoder.{k}": (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
             for k, shape in shapes.items()}
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
