"""The review loop measured on the demo's world: label -> review select -> a simulated reviewer ->
review import -> fine-tune on the corrections -> held-out accuracy before and after.

1. The tiny model (``--weights``, or the tiny recipe trained into ``--work``) labels a pool of
   generated images it never saw (``--pool-images``, seed ``--pool-seed``; box prompts: each
   object's ground-truth box, as a detector would give), in this process with the label job's
   per-batch function (``labelling.label_samples``), committed as a label output with a run
   record naming the pool's shards.
2. ``review select --budget N`` (the quality signals) and ``--strategy random`` pick ``N``
   instances each. A simulated reviewer compares each picked instance with the ground truth: a
   wrong class, or a mask below ``--mask-iou`` IoU with the true one, is a label error found.
   Reported: errors found per 100 reviewed instances for each pick, and the error rate of the
   whole pool (what a random pick finds on average).
3. The reviewer's verdicts on the signals' pick (true class, true mask where the mask was bad,
   the rest accepted) are written as a Label Studio JSON export and read back by ``review
   import`` (the real import path), which adds them to the label output as an overlay.
4. Fine-tuning from the tiny weights on ``--dataset 'LABELS|corrections=only'`` (with
   ``--replay-images``, also on generated images of the six trained shapes), the flags parsed by
   ``train cotrain``'s own parser (``--steps`` steps in this process: ``trainer.run_local``, the
   loop Ray Train runs), then ``train export`` twice: as by default (``--corrected-classes
   unseen``: pentagon and cross, trained by the corrections alone, stay on the unseen-class
   fusion) and with ``--corrected-classes seen`` (the recognition head decides them).
5. Both weights label the demo's held-out set (``--eval-images`` images of seed ``--eval-seed``,
   the demo's 176 of seed 1000 by default) with the one scorer (``evaluation.table1``): box and
   point accuracy on the six trained shapes and on the two held out of the tiny recipe
   (pentagon, cross), which the fine-tuned weights have now seen through the corrections alone
   (``after``: the default export; ``after_seen``: ``--corrected-classes seen``).

    python -m bench.review_loop --work /tmp/rl --weights /tmp/demo_out/train/weights \\
        [--pool-images 500 --budget 200 --steps 400] [--out bench/results/review_loop.json]

Nothing is hard-coded: every figure comes from the run (JSON under ``--out``, a summary on stdout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.benchlib import machine_info, now_iso, save_json
from ovsam_ray.data.rle import decode_rle
from ovsam_ray.data.shards import iter_shard_samples, list_shards, shard_name
from ovsam_ray.data.synthetic import generate_shards, shape_vocabulary_names
from ovsam_ray.evaluation.table1 import evaluate_predictor
from ovsam_ray.export.brush import mask_to_brush_rle
from ovsam_ray.inference import ModelConfig, build_predictor
from ovsam_ray.labelling import label_samples
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.run_record import RunRecord, check_or_write_run_record
from ovsam_ray.labels.schema import rows_to_table
from ovsam_ray.review import ImportConfig, ReviewSelectConfig, import_review, select_for_review
from ovsam_ray.training.label_space import CORRECTED_CLASSES
from ovsam_ray.training.tiny_recipe import HELD_OUT, PRESET, TRAIN_VOCAB, TinyRecipe, run_tiny_recipe

log = logging.getLogger("bench.review_loop")


def _shards(root: str, num_images: int, seed: int, per_shard: int) -> list[str]:
    marker = os.path.join(root, f"_done-n{num_images}-s{seed}")
    if not os.path.exists(marker):
        generate_shards(root, num_images=num_images, images_per_shard=per_shard, seed=seed)
        open(marker, "w").close()
    return list_shards(root)


def write_vocab(path: str) -> str:
    """The tiny recipe's vocabulary file: the eight shapes, pentagon and cross marked unseen."""
    with open(path, "w") as f:
        json.dump(
            {
                "name": TRAIN_VOCAB,
                "classes": [{"name": n, "seen": n not in HELD_OUT} for n in shape_vocabulary_names()],
            },
            f,
        )
    return path


def label_pool(weights: str, shards: list[str], labels: str) -> dict[str, Any]:
    """Label ``shards`` with ``weights`` (box prompts: the JSON's ground-truth boxes) into a label
    output at ``labels`` (committed shards + a run record naming the shards)."""
    predictor, vocab, _ = build_predictor(ModelConfig(preset=PRESET, weights=weights, train_vocab=TRAIN_VOCAB), "cpu")
    folder = os.path.dirname(shards[0])
    shutil.rmtree(labels, ignore_errors=True)  # the bench's own: a rerun starts with no corrections
    record = RunRecord(identity={"model": {"weights": weights}}, details={"config": {"input": folder}})
    check_or_write_run_record(labels, record, overwrite=True)
    committer = ShardCommitter(labels)
    started, images, instances = time.perf_counter(), 0, 0
    for url in shards:
        samples = [{**s, "json_bytes": _boxes_only(s["json_bytes"])} for s in iter_shard_samples(url)]
        rows = list(label_samples(predictor, vocab, samples, batch_size=8))
        committer.commit(shard_name(url).removesuffix(".tar"), rows_to_table(rows), {})
        images += len(rows)
        instances += sum(len(r["instances"]) for r in rows)
    return {"images": images, "instances": instances, "seconds": round(time.perf_counter() - started, 1)}


def _boxes_only(json_bytes: bytes) -> bytes:
    meta = json.loads(json_bytes)
    meta.pop("points", None)
    return json.dumps(meta).encode()


def ground_truth(shards: list[str]) -> dict[tuple[str, str], list[tuple[str, dict]]]:
    """(shard, key) -> [(class name, RLE)] of each object, in box order (the prompts' order)."""
    names = shape_vocabulary_names()
    out = {}
    for url in shards:
        for s in iter_shard_samples(url):
            anns = json.loads(s["json_bytes"])["annotations"]
            out[(shard_name(url).removesuffix(".tar"), s["key"])] = [
                (names[a["category_id"]], a["segmentation"]) for a in anns
            ]
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def judge(inst: dict[str, Any], truth: tuple[str, dict], mask_iou: float) -> dict[str, Any]:
    """The simulated reviewer's verdict on one instance: wrong class and/or bad mask."""
    name, rle = truth
    true_mask = decode_rle({"size": list(rle["size"]), "counts": rle["counts"]})
    iou = _iou(decode_rle(inst["rle"]), true_mask)
    wrong_class, bad_mask = inst.get("label") != name, iou < mask_iou
    return {"wrong_class": wrong_class, "bad_mask": bad_mask, "error": wrong_class or bad_mask, "iou": iou}


def pool_errors(labels: str, truth: dict, mask_iou: float) -> dict[str, Any]:
    """The label errors of the whole pool (what the review is looking for)."""
    from ovsam_ray.labels.reader import iter_label_rows

    n = errors = wrong = bad = 0
    for row in iter_label_rows(labels, corrections=False):
        for i, inst in enumerate(row["instances"] or []):
            v = judge(inst, truth[(row["shard"], row["key"])][i], mask_iou)
            n, errors, wrong, bad = n + 1, errors + v["error"], wrong + v["wrong_class"], bad + v["bad_mask"]
    return {
        "instances": n,
        "errors": errors,
        "wrong_class": wrong,
        "bad_mask": bad,
        "per_100": 100 * errors / max(n, 1),
    }


def review_selection(labels: str, out: str, truth: dict, *, budget: int, strategy: str, mask_iou: float, seed: int):
    """``review select`` with ``strategy``, then the simulated reviewer's verdicts on its pick."""
    from ovsam_ray.labels.reader import iter_label_rows

    stats = select_for_review(
        ReviewSelectConfig(input=labels, output=out, budget=budget, strategy=strategy, seed=seed, overwrite=True)
    )
    picked = pq.read_table(os.path.join(out, "selection.parquet")).to_pylist()
    wanted = {(r["shard"], r["key"]) for r in picked}
    rows = {
        (r["shard"], r["key"]): r
        for r in iter_label_rows(labels, corrections=False, shards={s for s, _ in wanted})
        if (r["shard"], r["key"]) in wanted
    }
    verdicts = {}
    for r in picked:
        ident = (r["shard"], r["key"])
        verdicts[(*ident, r["instance"])] = judge(
            rows[ident]["instances"][r["instance"]], truth[ident][r["instance"]], mask_iou
        )
    found = sum(v["error"] for v in verdicts.values())
    summary = {
        "selected": len(picked),
        "images": stats["images"],
        "errors_found": found,
        "wrong_class": sum(v["wrong_class"] for v in verdicts.values()),
        "bad_mask": sum(v["bad_mask"] for v in verdicts.values()),
        "errors_per_100": 100 * found / max(len(picked), 1),
        "by_reason": stats["by_reason"],
        "picked_classes": _count(rows[(r["shard"], r["key"])]["instances"][r["instance"]]["label"] for r in picked),
    }
    return summary, verdicts


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def labelstudio_export(selection: str, truth: dict, verdicts: dict, path: str) -> str:
    """The simulated reviewer's work as Label Studio's JSON export: each task's prediction taken
    over as the annotation, with the true class and (where the mask was bad) the true mask."""
    tasks = json.load(open(os.path.join(selection, "labelstudio.json")))
    out = []
    for n, task in enumerate(tasks):
        shard, key = task["data"]["shard"], task["data"]["key"]
        by_id = {r["id"]: dict(r, value=dict(r["value"])) for r in task["predictions"][0]["result"]}
        results = []
        for i in task["data"]["instances"]:
            name, rle = truth[(shard, key)][i]
            true_mask = decode_rle({"size": list(rle["size"]), "counts": rle["counts"]})
            h, w = true_mask.shape
            r = by_id.get(f"i{i}")
            if r is None or r["type"] != "brushlabels":  # no prediction shown (an empty mask): drawn anew
                r = {"id": f"i{i}", "type": "brushlabels", "from_name": "label", "to_name": "image"}
                r |= {"original_width": w, "original_height": h, "value": {"format": "rle"}}
                verdicts[(shard, key, i)]["bad_mask"] = True
            r.pop("score", None)
            r["value"]["brushlabels"] = [name]
            if verdicts[(shard, key, i)]["bad_mask"]:
                r["value"]["rle"] = mask_to_brush_rle(true_mask)
            results.append(r)
        out.append({"id": n + 1, "data": task["data"], "annotations": [{"id": n + 1, "result": results}]})
    with open(path, "w") as f:
        json.dump(out, f)
    return path


def finetune(
    args: argparse.Namespace, labels: str, vocab_file: str, weights: str
) -> tuple[dict[str, str], dict[str, Any]]:
    """``train cotrain --dataset 'LABELS|corrections=only'`` from ``weights``, in this process;
    returns the weights exported with each ``--corrected-classes`` mode and the run's numbers."""
    from ovsam_ray.cli.train import cotrain_config_from_args, cotrain_parser
    from ovsam_ray.training.cotrain import cotrain_setup, sample_builder
    from ovsam_ray.training.release import export_checkpoint
    from ovsam_ray.training.trainer import run_local

    meta = torch.load(
        os.path.join(weights, f"clip2sam_{TRAIN_VOCAB}_tiny.pth"), map_location="cpu", weights_only=False
    ).get("meta", {})
    recipe = TinyRecipe()
    replay = []
    if args.replay_images:  # generated images of the trained shapes (split=base drops the held-out ones)
        shards = _shards(os.path.join(args.work, "replay"), args.replay_images, args.replay_seed, 16)
        replay = ["--dataset", f"{os.path.dirname(shards[0])}|vocab={vocab_file}|name=replay"]
    flags = [
        *replay,
        "--dataset", f"{labels}|corrections={args.corrections}",
        "--preset", PRESET, "--weights", weights, "--train-vocab", vocab_file,
        "--storage-path", os.path.join(args.work, "runs"), "--name", f"finetune-{args.corrections}",
        "--max-steps", str(args.steps), "--checkpoint-every", str(args.steps), "--log-every", "25",
        "--batch-size", str(recipe.batch_size), "--shuffle-shards", "1", "--shuffle-buffer", "16",
        "--lr", str(args.lr), "--schedule", "cosine", "--warmup-steps", "10", "--min-lr-factor", "0.05",
        "--grad-clip", str(recipe.grad_clip), "--no-decay", "1d", "--base-batch-size", "none",
        "--num-prompts", str(recipe.num_prompts), "--num-points", str(recipe.num_points),
        "--lsj-range", *(str(v) for v in recipe.lsj_range), "--min-mask-area", str(recipe.min_mask_area),
        "--logit-scale", str(meta.get("logit_scale", 3.0)), "--epochs", "1000",
    ]  # fmt: skip
    cfg = cotrain_config_from_args(cotrain_parser().parse_args(flags))
    shutil.rmtree(cfg.run.run_url, ignore_errors=True)  # a rerun trains anew (the same name would resume)
    started = time.perf_counter()
    state, _ = run_local("cotrain", cfg, cotrain_setup, sample_builder(cfg))
    seconds = time.perf_counter() - started
    exported, kept_unseen = {}, {}
    for mode in CORRECTED_CLASSES:
        out = os.path.join(args.work, f"weights-{args.corrections}-{mode}")
        export_checkpoint(cfg.run.run_url, out, train_vocab=TRAIN_VOCAB, corrected_classes=mode, overwrite=True)
        exported[mode] = out
        kept_unseen[mode] = torch.load(
            os.path.join(out, f"clip2sam_{TRAIN_VOCAB}_tiny.pth"), map_location="cpu", weights_only=False
        )["meta"]["corrected_classes"]["kept_unseen"]
    numbers = {"steps": state.step, "images_seen": state.images_seen, "seconds": round(seconds, 1), "flags": flags}
    return exported, {**numbers, "kept_unseen": kept_unseen}


def held_out_accuracy(weights: str, shards: list[str]) -> dict[str, Any]:
    """The one scorer on ``shards``, objects split by the tiny recipe's protocol (pentagon and
    cross: held out), whatever the weights' own seen flags say (fine-tuned weights have seen
    them through the corrections)."""
    predictor, vocab, _ = build_predictor(ModelConfig(preset=PRESET, weights=weights, train_vocab=TRAIN_VOCAB), "cpu")
    split = dataclasses.replace(vocab, seen=tuple(n not in HELD_OUT for n in vocab.class_names))
    metrics = evaluate_predictor(predictor, split, shards)["metrics"]
    return {
        p: {
            k: metrics[p][k]
            for k in ("objects_base", "objects_novel", "accuracy_base", "accuracy_novel", "miou_base", "miou_novel")
        }
        for p in ("box", "point")
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--weights", help="tiny weights (default: train the tiny recipe into WORK/train)")
    ap.add_argument("--recipe", default="{}", help="TinyRecipe fields as JSON (when training)")
    ap.add_argument("--pool-images", type=int, default=500)
    ap.add_argument("--pool-seed", type=int, default=3000)
    ap.add_argument("--eval-images", type=int, default=176)
    ap.add_argument("--eval-seed", type=int, default=1000)
    ap.add_argument("--images-per-shard", type=int, default=50)
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--mask-iou", type=float, default=0.5, help="a mask below this IoU with the truth is an error")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--corrections", default="only", choices=("only", "all"))
    ap.add_argument(
        "--replay-images",
        type=int,
        default=0,
        help="also train on this many generated images of the trained shapes (1:1 by shard, 16 per shard)",
    )
    ap.add_argument("--replay-seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.makedirs(args.work, exist_ok=True)
    t0 = time.perf_counter()
    weights = args.weights or run_tiny_recipe(
        os.path.join(args.work, "train"), seed=args.seed, recipe=TinyRecipe(**json.loads(args.recipe))
    )
    vocab_file = write_vocab(os.path.join(args.work, f"{TRAIN_VOCAB}.json"))
    pool = _shards(os.path.join(args.work, "pool"), args.pool_images, args.pool_seed, args.images_per_shard)
    held = _shards(os.path.join(args.work, "eval"), args.eval_images, args.eval_seed, 16)
    labels = os.path.join(args.work, "labels")
    labelled = label_pool(weights, pool, labels)
    truth = ground_truth(pool)
    result: dict[str, Any] = {"date": now_iso(), "machine": machine_info(), "args": vars(args), "weights": weights}
    result["pool"] = {**labelled, **pool_errors(labels, truth, args.mask_iou)}
    picks = {}
    for strategy in ("uncertain", "random"):
        out = os.path.join(args.work, f"review-{strategy}")
        picks[strategy] = review_selection(
            labels, out, truth, budget=args.budget, strategy=strategy, mask_iou=args.mask_iou, seed=args.seed
        )
        result[strategy] = picks[strategy][0]
    result["found_ratio"] = result["uncertain"]["errors_found"] / max(result["random"]["errors_found"], 1)
    selection = os.path.join(args.work, "review-uncertain")
    export = labelstudio_export(selection, truth, picks["uncertain"][1], os.path.join(args.work, "ls_export.json"))
    result["import"] = import_review(ImportConfig(input=labels, review=export, selection=selection))
    result["before"] = held_out_accuracy(weights, held)
    tuned, result["finetune"] = finetune(args, labels, vocab_file, weights)
    result["after"] = held_out_accuracy(tuned["unseen"], held)
    result["after_seen"] = held_out_accuracy(tuned["seen"], held)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(summary_markdown(result))
    if args.out:
        save_json(result, args.out)
    return 0


def summary_markdown(r: dict[str, Any]) -> str:
    u, rnd, pool = r["uncertain"], r["random"], r["pool"]
    b = r["before"]["box"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def row(name: str, p: dict[str, Any]) -> str:
        return f"| {name} | {p['errors_found']} | {p['errors_per_100']:.1f} | {p['wrong_class']} | {p['bad_mask']} |"

    def acc(name: str, m: dict[str, Any]) -> str:
        box, point = m["box"], m["point"]
        return (
            f"| {name} | {pct(box['accuracy_novel'])} | {pct(box['accuracy_base'])} | "
            f"{pct(point['accuracy_novel'])} | {pct(point['accuracy_base'])} |"
        )

    ft = r["finetune"]
    lines = [
        f"pool: {pool['images']} images, {pool['instances']} instances, {pool['errors']} label errors "
        f"({pool['per_100']:.1f} per 100; wrong class {pool['wrong_class']}, bad mask {pool['bad_mask']})",
        f"| pick ({u['selected']} instances) | errors found | per 100 reviewed | wrong class | bad mask |",
        "|---|---|---|---|---|",
        row("review select (signals)", u),
        row("random", rnd),
        f"ratio: {r['found_ratio']:.2f}x; import: {r['import']['corrections']}",
        f"fine-tune: {ft['steps']} steps, {ft['images_seen']} images, {ft['seconds']}s",
        "| weights | box acc. held-out shapes | box acc. trained shapes | point acc. held-out | point acc. trained |",
        "|---|---|---|---|---|",
        acc("before", r["before"]),
        acc("after (export default: corrected classes unseen)", r["after"]),
        acc("after (--corrected-classes seen)", r["after_seen"]),
        f"(held-out set: {b['objects_novel']} objects of the held-out shapes, {b['objects_base']} of the trained ones)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
