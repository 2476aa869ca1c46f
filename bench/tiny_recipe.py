"""Train a variant of the tiny recipe (or take exported weights) and measure it on a large held-out
set: box/point mIoU and accuracy over seen and unseen shapes as the demo and ``eval`` score them
(``evaluation.table1``, under ``label_job_metrics``), and the box-prompt accuracy of the fused
label, the recognition head and the CLIP branch, the head on ground-truth boxes, and the head by
how well the predicted mask's box matches the object (the head's RoI at inference is that box, DESIGN §2.5).

    python -m bench.tiny_recipe --work /tmp/r1 --recipe '{"cotrain_steps": 800}' \\
        [--stage0 /tmp/demo/train/clip_tiny_stage0.pth] [--seed 0] [--eval-images 160 --eval-seed 2000] \\
        [--out bench/results/tiny_recipe_r1.json]
    python -m bench.tiny_recipe --weights /tmp/demo/train/weights ...   # evaluate only

``--stage0`` reuses a stage-0 CLIP (the recipe skips stage 0 when its file exists).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from bench.benchlib import machine_info, now_iso, save_json
from ovsam_ray.data.decode import decode_image
from ovsam_ray.data.gt_prompts import gt_prompts
from ovsam_ray.data.shards import iter_shard_samples
from ovsam_ray.data.synthetic import generate_shards, shape_vocabulary_names
from ovsam_ray.evaluation.table1 import evaluate_predictor
from ovsam_ray.inference import ModelConfig, build_predictor
from ovsam_ray.model.functional import preprocess_image
from ovsam_ray.model.predictor import ImagePrompts, OVSAMPredictor
from ovsam_ray.training.losses import class_logits

IOU_BINS = ((0.0, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01))


def eval_shards(root: str, num_images: int, seed: int) -> list[str]:
    marker = os.path.join(root, "_done")
    if not os.path.exists(marker):
        generate_shards(root, num_images=num_images, images_per_shard=40, seed=seed)
        open(marker, "w").close()
    return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".tar"))


@dataclass
class HeldOutImage:
    """One held-out image with its objects: ``boxes`` (N, 4) in image pixels, ``x`` the model
    input (3, S, S), ``rois`` the boxes in input pixels, ``labels`` (N,) shape-class indices."""

    image: np.ndarray
    boxes: np.ndarray
    x: torch.Tensor
    rois: torch.Tensor
    labels: np.ndarray


def held_out_images(shards: list[str], image_size: int) -> Iterator[HeldOutImage]:
    names = shape_vocabulary_names()
    for url in shards:
        for sample in iter_shard_samples(url):
            image = decode_image(sample["image_bytes"])
            gt = gt_prompts(
                json.loads(sample["json_bytes"])["annotations"], height=image.shape[0], width=image.shape[1], mode="box"
            )
            if not gt["boxes"]:
                continue
            boxes = np.asarray(gt["boxes"], np.float32).reshape(-1, 4)
            x, (h, _) = preprocess_image(torch.from_numpy(np.ascontiguousarray(image)), image_size)
            yield HeldOutImage(
                image,
                boxes,
                x,
                torch.as_tensor(boxes) * (h / image.shape[0]),
                np.array([names.index(n) for n in gt["labels"]]),
            )


def accuracy_split(predictor: OVSAMPredictor, shards: list[str]) -> dict:
    """Box-prompt accuracy of the fused label, the head and the CLIP branch; the head on the
    ground-truth boxes; the head per bin of IoU(predicted mask's box, ground-truth box)."""
    model, text = predictor.model, predictor.classifier.text_embeddings
    fused, head, clip, head_gt, box_ious = [], [], [], [], []
    for item in held_out_images(shards, model.image_size):
        y = item.labels
        out = predictor([item.image], [ImagePrompts(boxes=item.boxes)])[0]
        fused += list(out.labels == y)
        head += list(out.head_logits[:, :-1].argmax(1) == y)
        clip += list(out.clip_logits[:, :-1].argmax(1) == y)
        mask_boxes = torch.as_tensor(out.mask_boxes, dtype=torch.float32)
        box_ious += box_iou(mask_boxes, torch.as_tensor(item.boxes)).diag().tolist()
        with torch.no_grad():
            fpn = model.recognizer.fpn(model.backbone(item.x[None]))
            index = torch.zeros(len(item.rois), dtype=torch.long)
            region = model.recognizer.region_embeddings(fpn, item.rois, index)
            head_gt += list(class_logits(region, text, 0.0)[:, :-1].argmax(1).numpy() == y)
    head_arr, ious = np.array(head), np.array(box_ious)
    bins = {}
    for lo, hi in IOU_BINS:
        sel = (ious >= lo) & (ious < hi)
        bins[f"{lo}-{min(hi, 1.0)}"] = {
            "n": int(sel.sum()),
            "head_accuracy": float(head_arr[sel].mean()) if sel.any() else None,
        }
    return {
        "objects": len(fused),
        "fused_accuracy": float(np.mean(fused)),
        "head_accuracy": float(np.mean(head)),
        "clip_accuracy": float(np.mean(clip)),
        "head_accuracy_gt_boxes": float(np.mean(head_gt)),
        "head_by_mask_box_iou": bins,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="training folder (train/ inside it)")
    p.add_argument("--weights", help="evaluate these exported weights instead of training")
    p.add_argument("--recipe", default="{}", help="TinyRecipe overrides as JSON")
    p.add_argument("--stage0", help="a stage-0 CLIP file to reuse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=160)
    p.add_argument("--eval-seed", type=int, default=2000)
    p.add_argument("--eval-dir", default="/tmp/ovsam_bench_eval")
    p.add_argument("--out")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result: dict = {"date": now_iso(), "machine": machine_info(), "recipe": json.loads(a.recipe), "seed": a.seed}
    weights = a.weights
    if weights is None:
        from ovsam_ray.training.tiny_recipe import TinyRecipe, run_tiny_recipe

        if not a.work:
            p.error("give --work (to train) or --weights (to evaluate)")
        train = os.path.join(a.work, "train")
        os.makedirs(train, exist_ok=True)
        if a.stage0:
            shutil.copy(a.stage0, os.path.join(train, "clip_tiny_stage0.pth"))
        t0 = time.perf_counter()
        weights = run_tiny_recipe(train, seed=a.seed, recipe=TinyRecipe(**json.loads(a.recipe)))
        result["train_wall_s"] = time.perf_counter() - t0
        result["stage0_reused"] = bool(a.stage0)
    shards = eval_shards(os.path.join(a.eval_dir, f"seed{a.eval_seed}-n{a.eval_images}"), a.eval_images, a.eval_seed)
    # the predictor the label job would build from these weights, built once for both measurements
    model = ModelConfig(preset="ovsam_tiny", weights=weights, train_vocab="shapes")
    predictor, vocab, _ = build_predictor(model, "cpu")
    result["label_job_metrics"] = evaluate_predictor(predictor, vocab, shards)
    result.update(accuracy_split(predictor, shards))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if a.out:
        save_json(result, a.out)


if __name__ == "__main__":
    main()
