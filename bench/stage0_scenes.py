"""CPU benchmark (not a test) of the tiny recipe's stage 0: how well the frozen CLIP it leaves names
objects in scenes. Trains the crop part (or reuses a saved one), then the scene part with the given
knobs, and scores the CLIP branch (DESIGN §2.7: RoIAlign on the stride-32 stage + attention pool,
against the template-averaged class names) on the ground-truth boxes of held-out generated images —
the ceiling of what the co-trained head reaches on the same frozen tower (bench/RESULTS.md).

    OMP_NUM_THREADS=1 python -m bench.stage0_scenes --crops /tmp/st0/crops_s0.pth --seed 0 \\
        --scene-steps 1100 --scene-lr 1e-3 [--objects 2 5] [--out bench/results/stage0_scenes_s0.json]

``--crops FILE``: the crop part's CLIP, trained (2,000 steps, as the recipe) and saved there when
the file does not exist yet, so that several scene variants start from the same crop part.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from bench.benchlib import machine_info, now_iso, save_json
from bench.tiny_recipe import HeldOutImage, eval_shards, held_out_images
from ovsam_ray.data.synthetic import shape_vocabulary_names
from ovsam_ray.model.clip_backbone import ResNetCLIPBackbone
from ovsam_ray.model.presets import clip_tokenizer, create_clip_model, get_preset
from ovsam_ray.model.text_embedding import embed_class_names
from ovsam_ray.training.clip_pretrain import pretrain_clip, pretrain_clip_regions
from ovsam_ray.training.losses import class_logits
from ovsam_ray.training.tiny_recipe import TinyRecipe
from ovsam_ray.vocabulary import load_templates

PRESET = "ovsam_tiny"


@torch.no_grad()
def clip_branch_accuracy(clip_model: torch.nn.Module, held_out: list[HeldOutImage], class_names: list[str]) -> float:
    """Box accuracy of the CLIP branch on the ground-truth boxes of the held-out images."""
    text = embed_class_names(clip_model, clip_tokenizer(PRESET), [[n] for n in class_names], load_templates())
    backbone = ResNetCLIPBackbone(visual=clip_model.visual)
    backbone.lock()
    backbone.eval()
    correct = []
    for item in held_out:
        index = torch.zeros(len(item.rois), dtype=torch.long)
        regions = backbone.embed_regions(backbone(item.x[None]), item.rois, index, None)
        correct += list(class_logits(regions, text, 0.0)[:, :-1].argmax(1).numpy() == item.labels)
    return float(np.mean(correct))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", required=True, help="the crop part's CLIP file (trained and saved if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-steps", type=int, default=TinyRecipe.stage0_steps, help="crop part (when trained here)")
    p.add_argument("--scene-steps", type=int, default=TinyRecipe.stage0_scene_steps)
    p.add_argument("--scene-lr", type=float, default=TinyRecipe.stage0_scene_lr)
    p.add_argument("--objects", type=int, nargs=2, default=TinyRecipe.stage0_scene_objects)
    p.add_argument("--eval-images", type=int, default=160)
    p.add_argument("--eval-seed", type=int, default=2000)
    p.add_argument("--eval-dir", default="/tmp/ovsam_bench_eval")
    p.add_argument("--save", help="also save the stage-0 CLIP here (for bench/tiny_recipe.py --stage0)")
    p.add_argument("--out")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe, names, tokenizer = TinyRecipe(), shape_vocabulary_names(), clip_tokenizer(PRESET)
    shards = eval_shards(os.path.join(a.eval_dir, f"seed{a.eval_seed}-n{a.eval_images}"), a.eval_images, a.eval_seed)
    held_out = list(held_out_images(shards, get_preset(PRESET).image_size))  # read and decoded once, scored twice
    result: dict = {
        "date": now_iso(),
        "machine": machine_info(),
        "seed": a.seed,
        "crops_file": a.crops,
        "crop_steps": None if os.path.exists(a.crops) else a.crop_steps,
        "scene_steps": a.scene_steps,
        "scene_lr": a.scene_lr,
        "objects": list(a.objects),
        "eval_objects": sum(len(item.labels) for item in held_out),
    }
    torch.manual_seed(a.seed)  # as run_tiny_recipe: the same seed gives the same stage 0
    if os.path.exists(a.crops):
        clip_model = create_clip_model(PRESET, a.crops)
    else:
        clip_model = create_clip_model(PRESET)
        t0 = time.perf_counter()
        pretrain_clip(
            clip_model,
            tokenizer,
            class_names=names,
            steps=a.crop_steps,
            colours_per_batch=recipe.stage0_colours,
            lr=recipe.stage0_lr,
            pool_size=recipe.stage0_pool,
            seed=a.seed,
        )
        result["crops_s"] = time.perf_counter() - t0
        torch.save({"state_dict": clip_model.state_dict()}, a.crops)
    result["clip_accuracy_after_crops"] = clip_branch_accuracy(clip_model, held_out, names)
    t0 = time.perf_counter()
    run = pretrain_clip_regions(
        clip_model,
        tokenizer,
        class_names=names,
        steps=a.scene_steps,
        image_size=get_preset(PRESET).image_size,
        scene_sizes=recipe.image_size,
        objects=tuple(a.objects),
        batch_size=recipe.stage0_scene_batch,
        lr=a.scene_lr,
        seed=a.seed,
        log_every=100,
    )
    result.update(
        scenes_s=time.perf_counter() - t0,
        last_loss=run.last_loss,
        text_separation=run.text_separation,
        clip_accuracy=clip_branch_accuracy(clip_model, held_out, names),
    )
    if a.save:
        torch.save({"state_dict": clip_model.state_dict()}, a.save)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if a.out:
        save_json(result, a.out)


if __name__ == "__main__":
    main()
