"""fp32 against bf16 autocast in training: the same co-training, same data, same seed, twice.

    python -m bench.train_precision --out DIR                       # a GPU: 300 steps each
    python -m bench.train_precision --out DIR --steps 4 --device cpu --eval-images 8   # CPU smoke

The reference trains in fp32 and so do the named recipes; ``--precision bf16`` is an explicit
choice this run measures before anything recommends it. It runs the tiny recipe's co-training
(``ovsam_tiny`` on generated shapes, ``training.tiny_recipe.tiny_cotrain_config``; a random CLIP,
no stage 0) for ``--steps`` steps in each precision through ``trainer.run_local`` (the training
loop of ``ovsam-ray train``, one process), then exports the weights and scores them on held-out
images (``heldout.evaluate_weights``: the classifier's accuracy on seen and unseen shapes, mask
mIoU). ``DIR/train_precision.json`` holds both loss curves (every ``--log-every`` steps), their
mean gap and the scores; ``DIR/train_precision.md`` the summary table. Nothing here is the paper's
model: the figures say how bf16 moves a small model's training, on this GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

from bench.benchlib import machine_info, now_iso, save_json

PRECISIONS = ("fp32", "bf16")


def run_one(work: str, precision: str, a: argparse.Namespace, shards: str, held_out: str) -> dict[str, Any]:
    import torch

    from ovsam_ray.training.cotrain import cotrain_setup, sample_builder
    from ovsam_ray.training.heldout import evaluate_weights
    from ovsam_ray.training.release import export_checkpoint
    from ovsam_ray.training.tiny_recipe import PRESET, TRAIN_VOCAB, TinyRecipe, tiny_cotrain_config, write_vocab
    from ovsam_ray.training.trainer import run_local

    folder = os.path.join(work, precision)
    recipe = TinyRecipe(precision=precision, batch_size=a.batch_size)
    cfg = tiny_cotrain_config(
        folder,
        clip_file=None,
        shards=shards,
        vocab_file=write_vocab(work),
        seed=a.seed,
        recipe=recipe,
        max_steps=a.steps,
    )
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, log_every=a.log_every, use_gpu=a.device == "cuda"))
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    state, _ = run_local("cotrain", cfg, cotrain_setup, sample_builder(cfg), on_report=lambda m: curve.append(dict(m)))
    seconds = time.perf_counter() - t0
    weights = os.path.join(folder, "weights")
    export_checkpoint(cfg.run.run_url, weights, train_vocab=TRAIN_VOCAB, overwrite=True)
    scores = evaluate_weights(weights, held_out, preset=PRESET, train_vocab=TRAIN_VOCAB, device=a.device)
    if a.device == "cuda":
        torch.cuda.synchronize()
    return {"precision": precision, "steps": state.step, "train_s": round(seconds, 1), "curve": curve, **scores}


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean and last loss of each run and the mean |fp32 - bf16| over the reports both have."""
    out: dict[str, Any] = {}
    losses = {p: [r.get("loss") for r in runs[p]["curve"] if r.get("loss") is not None] for p in runs}
    for p, values in losses.items():
        out[p] = {
            "mean_loss": sum(values) / len(values) if values else None,
            "last_loss": values[-1] if values else None,
            "metrics": runs[p].get("metrics"),
        }
    if all(p in losses for p in PRECISIONS):
        pairs = list(zip(losses["fp32"], losses["bf16"]))
        out["mean_abs_loss_gap"] = sum(abs(x - y) for x, y in pairs) / len(pairs) if pairs else None
    return out


def summary_md(record: dict[str, Any]) -> str:
    lines = [
        f"# fp32 vs bf16 training ({record['device']}, {record['steps']} steps, seed {record['seed']})",
        "",
        "| precision | steps | train s | mean loss | last loss | box acc. seen | box acc. unseen | box mIoU "
        "| point acc. seen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    for p in PRECISIONS:
        r, c = record["runs"].get(p, {}), record["comparison"].get(p, {})
        box, point = (c.get("metrics") or {}).get("box", {}), (c.get("metrics") or {}).get("point", {})
        cells = [r.get("steps"), r.get("train_s"), c.get("mean_loss"), c.get("last_loss")]
        cells += [box.get("accuracy_base"), box.get("accuracy_novel"), box.get("miou"), point.get("accuracy_base")]
        lines.append(f"| {p} | " + " | ".join(f(v) for v in cells) + " |")
    lines.append(f"\nmean |fp32 - bf16| loss over the reports: {f(record['comparison'].get('mean_abs_loss_gap'))}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (train_precision.json, train_precision.md)")
    p.add_argument("--work", default=None, help="shards and runs (default: <out>/work)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--eval-images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    from ovsam_ray.data.synthetic import generate_shards
    from ovsam_ray.training.tiny_recipe import TinyRecipe

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for the smoke run)")
    work = a.work or os.path.join(a.out, "work")
    shards, held_out = os.path.join(work, "train"), os.path.join(work, "held_out")
    size = TinyRecipe().image_size
    generate_shards(shards, num_images=a.train_images, images_per_shard=250, seed=a.seed, image_size=size)
    generate_shards(held_out, num_images=a.eval_images, images_per_shard=50, seed=a.seed + 1000)
    runs = {prec: run_one(work, prec, a, shards, held_out) for prec in PRECISIONS}
    record = {
        "benchmark": "train_precision",
        "date": now_iso(),
        "machine": machine_info(),
        "device": a.device,
        "steps": a.steps,
        "seed": a.seed,
        "batch_size": a.batch_size,
        "runs": runs,
        "comparison": compare(runs),
    }
    save_json(record, os.path.join(a.out, "train_precision.json"))
    md = summary_md(record)
    with open(os.path.join(a.out, "train_precision.md"), "w") as f:
        f.write(md)
    print(md)
    ok = all(runs[prec]["steps"] == a.steps for prec in PRECISIONS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
