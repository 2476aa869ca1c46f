"""What the label job's CPU side costs per image, the model taken out: the decode task
(``stages._decode_chunk``: JPEG decode, prompt JSON, the Arrow row) with the resize to the model's
input in the task (``resize_on_cpu``, the detector path) and without it (the image shipped as
decoded; the model's device resizes it), and the bytes each row puts in the object store; and the
tokenizing of a vocabulary's prompt texts for its text embeddings, one text at a time (open_clip's
tokenizer) against each name once, spliced into the templates (``template_tokens``).

    python -m bench.cpu_side decode --out bench/results/cpu_side_decode.json
    python -m bench.cpu_side tokens --vocab in21k --out bench/results/cpu_side_tokens.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bench.benchlib import machine_info, now_iso, save_json


def _samples(n: int, width: int, height: int, boxes: int) -> list[dict]:
    from ovsam_ray.data.synthetic import encode_image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        y, x = np.mgrid[0:height, 0:width]
        image = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8)
        image = (image + rng.integers(0, 30, image.shape)).clip(0, 255).astype(np.uint8)
        xy = rng.uniform(0, [width - 40, height - 40], (boxes, 2))
        wh = rng.uniform(10, 40, (boxes, 2))
        anns = [{"bbox": [*map(float, p), *map(float, s)], "category_name": "thing"} for p, s in zip(xy, wh)]
        out.append(
            {
                "key": f"{i:06d}",
                "image_bytes": encode_image(image),
                "json_bytes": json.dumps({"annotations": anns}).encode(),
            }
        )
    return out


def bench_decode(a: argparse.Namespace) -> dict:
    import torch

    from ovsam_ray.pipeline.stages import _decode_chunk

    torch.set_num_threads(1)  # a decode task holds half a CPU
    samples = _samples(a.images, a.width, a.height, a.boxes)
    rows = {}
    for name, on_cpu in (("resize in the task (before)", True), ("shipped as decoded (after)", False)):
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            table = _decode_chunk(samples, ("s", 0, len(samples), "", ""), a.image_size, 10**9, 1000, on_cpu)
            times.append(time.perf_counter() - t0)
        assert table.column("status").to_pylist() == ["ok"] * len(samples)
        rows[name] = {
            "ms_per_image_min": round(1e3 * min(times) / len(samples), 3),
            "ms_per_image_all": [round(1e3 * t / len(samples), 3) for t in times],
            "image_bytes_per_row": table.column("image")[0].as_buffer().size,
        }
    return {
        "images": a.images,
        "size": [a.width, a.height],
        "boxes": a.boxes,
        "model_input": a.image_size,
        "torch_threads": 1,
        "rows": rows,
    }


def bench_tokens(a: argparse.Namespace) -> dict:
    from ovsam_ray.model.presets import clip_tokenizer
    from ovsam_ray.model.text_embedding import template_tokens
    from ovsam_ray.vocabulary import clean_class_name, load_templates, load_vocabulary

    names = [clean_class_name(n) for syn in load_vocabulary(a.vocab).synonyms for n in syn]
    templates = load_templates()
    rows = {}
    for name, fn in (
        ("one text at a time (before)", lambda t: t([x.format(n) for n in names for x in templates])),
        ("each name once, spliced (after)", lambda t: template_tokens(t, names, templates)),
    ):
        times = []
        for _ in range(a.repeats):
            tok = clip_tokenizer(a.preset)  # a fresh tokenizer: its BPE cache starts empty, as in a job
            t0 = time.perf_counter()
            fn(tok)
            times.append(time.perf_counter() - t0)
        rows[name] = {"s_min": round(min(times), 2), "s_all": [round(t, 2) for t in times]}
    return {"vocab": a.vocab, "names": len(names), "texts": len(names) * len(templates), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["decode", "tokens"])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--boxes", type=int, default=20)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--vocab", default="in21k")
    p.add_argument("--preset", default="ovsam_rn50x16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = {
        "benchmark": f"cpu_side {a.what}",
        "date": now_iso(),
        "machine": machine_info(),
        "load_average_start": os.getloadavg()[0],
        "command": " ".join(sys.argv),
        **(bench_decode(a) if a.what == "decode" else bench_tokens(a)),
    }
    out["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(out["rows"], indent=1))
    if a.out:
        save_json(out, a.out)


if __name__ == "__main__":
    main()
