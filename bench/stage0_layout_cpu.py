"""CPU benchmark (not a test) of one step of the tiny recipe's stage 0, in the default memory
layout and in channels_last: the scene part (8 rendered scenes at 256, the tower forward and
backward, RoI-aligned regions through the attention pool, AdamW) and the crop part (32 crops at
64, ``encode_image``). The scene part trains in channels_last (``pretrain_clip_regions``).

    OMP_NUM_THREADS=1 python -m bench.stage0_layout_cpu [--repeats 15] [--out bench/results/stage0_layout_cpu.json]

Each layout runs in its own subprocess, alternately, ``--rounds`` times; per step the minimum and
the median over ``--repeats`` steps after 3 warm-up steps (the minimum is the figure least
disturbed by other load on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.benchlib import machine_info, now_iso, save_json


def _measure(layout: str, repeats: int) -> dict:
    import numpy as np
    import torch

    from ovsam_ray.data.synthetic import shape_vocabulary_names
    from ovsam_ray.model.clip_backbone import ResNetCLIPBackbone
    from ovsam_ray.model.presets import create_clip_model
    from ovsam_ray.training import clip_pretrain as cp
    from ovsam_ray.vocabulary import load_templates

    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    clip = create_clip_model("ovsam_tiny").train()
    clip.visual.to(memory_format=fmt)
    backbone = ResNetCLIPBackbone(visual=clip.visual)
    names = shape_vocabulary_names()
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-4)
    scenes = cp.render_scene_batch(
        rng, 8, class_names=names, image_size=256, scene_sizes=((224, 168), (288, 224)), objects=(2, 5)
    )
    scene_x = scenes.images.contiguous(memory_format=fmt)
    pool = cp.render_crop_pool(64, seed=0, class_names=names, size=64)
    crops, _, _ = cp.grid_batch(pool, rng, class_names=names, colours_per_batch=4, templates=load_templates())
    crop_x = cp.sam_normalize(torch.from_numpy(crops)).contiguous(memory_format=fmt)

    def scene_step() -> None:
        regions = backbone.embed_regions(backbone(scene_x), scenes.boxes, scenes.image_index, None)
        optimizer.zero_grad()
        regions.square().mean().backward()
        optimizer.step()

    def crop_step() -> None:
        optimizer.zero_grad()
        clip.encode_image(crop_x).square().mean().backward()
        optimizer.step()

    out = {}
    for name, step in (("scene_step", scene_step), ("crop_step", crop_step)):
        for _ in range(3):
            step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        out[name] = {"min_ms": round(times[0], 1), "median_ms": round(times[len(times) // 2], 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(_measure(a.child, a.repeats)))
        return
    runs: dict[str, list] = {"contiguous": [], "channels_last": []}
    for _ in range(a.rounds):
        for layout in runs:
            cmd = [sys.executable, "-m", "bench.stage0_layout_cpu", "--child", layout, "--repeats", str(a.repeats)]
            runs[layout].append(
                json.loads(
                    subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                )
            )
    result = {"date": now_iso(), "machine": machine_info(), "command": " ".join(sys.argv), "runs": runs}
    for layout, rs in runs.items():
        for part in ("scene_step", "crop_step"):
            best = min(r[part]["min_ms"] for r in rs)
            print(f"| {layout} | {part} | min {best:.0f} ms | medians {[r[part]['median_ms'] for r in rs]} |")
    if a.out:
        save_json(result, a.out)


if __name__ == "__main__":
    main()
