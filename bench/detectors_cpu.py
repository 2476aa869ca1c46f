"""Cost per image of the open-vocabulary detectors (``detector:owlv2``, ``detector:grounding-dino``)
at their published configurations' sizes, random weights (nothing is downloaded).

Builds each model from its default-sized config (OWLv2 base: ViT-B/16 at 960x960, the
``google/owlv2-base-patch16-ensemble`` layout; Grounding DINO tiny: Swin-T + BERT-base, 900
queries, 800/1333 resize, ``IDEA-Research/grounding-dino-tiny``), saves config, tokenizer and
processor settings (no weights: ``random_init``) and runs the label job's detector classes on
1024x768 images (what the decode stage hands them for a 1024-pixel OV-SAM). Per detector: warm-up
forward (counted with torch's FLOP counter), then timed batches. Tokenizers are word-level stand-ins
with the real token-id layout, so prompt lengths (Grounding DINO's chunks) match the real ones for
vocabularies of one-token words and are a lower bound otherwise.

    python -m bench.detectors_cpu --out bench/results/detectors_cpu.json
    python -m bench.detectors_cpu --device cuda --batch 8 --repeats 5 --out bench/results/detectors_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
import tempfile
import time

import numpy as np
import torch

from bench import benchlib
from ovsam_ray.pipeline.hf_detectors import GroundingDinoDetector, Owlv2Detector, query_names


def _words(queries: list[str]) -> list[str]:
    return sorted({w for q in queries for w in q.replace("(", " ").replace(")", " ").split()})


def save_owlv2_base(folder: str, words: list[str]) -> None:
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ImageProcessor, Owlv2Processor

    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({w + "</w>": len(vocab) + i for i, w in enumerate(words + ["a", "photo", "of"])})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 49406, 49407
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    Owlv2Config(vision_config={"image_size": 960, "patch_size": 16}).save_pretrained(folder)
    Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 960, "width": 960}), tokenizer=tok
    ).save_pretrained(folder)


def save_grounding_dino_tiny(folder: str, words: list[str]) -> None:
    from transformers import BertTokenizer, GroundingDinoConfig, GroundingDinoImageProcessor, GroundingDinoProcessor

    vocab = [f"[unused{i}]" for i in range(30522)]
    for i, t in (
        (0, "[PAD]"),
        (100, "[UNK]"),
        (101, "[CLS]"),
        (102, "[SEP]"),
        (103, "[MASK]"),
        (1012, "."),
        (1029, "?"),
    ):
        vocab[i] = t
    for i, w in enumerate(words):  # one token per word, as bert-base-uncased has most object names
        vocab[2000 + i] = w
    GroundingDinoConfig().save_pretrained(folder)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(),
        tokenizer=BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}),
    ).save_pretrained(folder)


def measure(det, images: list[np.ndarray], batch: int, repeats: int, device: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with FlopCounterMode(display=False) as counter:
        det(images[:1])
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        det(images[:batch])
        sync()
        times.append((time.perf_counter() - t0) / batch)
    return {
        "gflops_per_image": round(counter.get_total_flops() / 1e9, 1),
        "s_per_image": [round(t, 3) for t in times],
        "best_s_per_image": round(min(times), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated runs to skip (owlv2, owlv2-lvis, gdino-coco)")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    coco, lvis = query_names("coco_ov"), query_names("lvis_v1")
    words = _words(coco + lvis)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8) for _ in range(a.batch)]
    result = {
        "machine": benchlib.machine_info(),
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "image": "1024x768",
        "batch": a.batch,
        "device": a.device,
        "runs": {},
    }
    skip = set(a.skip.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        owl, gd = os.path.join(tmp, "owlv2"), os.path.join(tmp, "grounding-dino")
        save_owlv2_base(owl, words)
        save_grounding_dino_tiny(gd, words)
        common = {"device": a.device, "random_init": True}
        runs = {
            "owlv2": lambda: Owlv2Detector(weights=owl, **common),
            "owlv2-lvis": lambda: Owlv2Detector(weights=owl, queries=lvis, **common),
            "gdino-coco": lambda: GroundingDinoDetector(weights=gd, queries=coco, **common),
        }
        for name, make in runs.items():
            if name in skip:
                continue
            det = make()
            row = measure(det, images, a.batch, a.repeats, a.device)
            row["params_m"] = round(sum(p.numel() for p in det.model.parameters()) / 1e6, 1)
            if isinstance(det, GroundingDinoDetector):
                row["prompts"] = len(det.chunks)
            result["runs"][name] = row
            print(name, json.dumps(row), flush=True)
            del det
        # Grounding DINO's cost grows with the prompts a vocabulary needs: one forward each.
        chunks = GroundingDinoDetector(weights=gd, queries=lvis, **common).chunks
        result["gdino_lvis_prompts"] = len(chunks)
        if "gdino-coco" in result["runs"]:
            per = result["runs"]["gdino-coco"]["best_s_per_image"] / result["runs"]["gdino-coco"]["prompts"]
            result["gdino_lvis_estimated_s_per_image"] = round(per * len(chunks), 2)
    print(json.dumps(result, indent=1))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
