"""Cost of ``detector:sam3`` (SAM 3 through transformers ``Sam3Model``) at the published size
(``facebook/sam3``: ViT-L/14-style backbone at 1008x1008, CLIP-L text encoder, 6+6-layer DETR
encoder/decoder with 200 queries, mask decoder at 288x288), random weights, nothing downloaded.

SAM 3 reads one concept per pass, so a label job pays one image encoding per image plus one pass
of the DETR encoder, decoder and mask decoder per concept per image. Measured here:

- FLOPs (``hf_detectors.sam3_flops``: ``torch.utils.flop_counter``): the image encoding, and the
  per-concept pass at 1 and at ``--concept-batch`` concepts (equal per concept: linear).
- Seconds of the per-concept pass (``--device``), at 1 concept and at ``--concept-batch`` concepts
  per call, against a stored image encoding of the published shapes (a one-layer stand-in backbone
  makes it: the per-concept pass never runs the backbone).
- With ``--full`` (the GPU run): the label job's own ``Sam3Detector`` at the published size on
  1024x768 images, ``--concepts`` concepts, seconds per image (encoding + all the concepts).

    python -m bench.sam3_cost --out bench/results/sam3_cost_cpu.json
    python -m bench.sam3_cost --device cuda --full --batch 4 --concepts 80 --repeats 3 \\
        --out bench/results/sam3_cost_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import string
import sys
import tempfile
import time

import numpy as np
import torch

from bench import benchlib
from ovsam_ray.pipeline.hf_detectors import Sam3Detector, sam3_flops


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def concept_seconds(config, *, concepts: int, repeats: int, device: str) -> list[float]:
    """Seconds per concept of the per-concept pass, ``concepts`` per call, one image."""
    from transformers import Sam3Model
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    small = copy.deepcopy(config)
    bb = small.vision_config.backbone_config
    bb.hidden_size, bb.intermediate_size, bb.num_hidden_layers, bb.num_attention_heads = 16, 16, 1, 1
    bb.global_attn_indexes = [0]
    small.text_config.num_hidden_layers = 1
    model = Sam3Model(small).eval().to(device)
    side = bb.image_size
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    with torch.no_grad(), autocast:
        vision = model.get_vision_features(pixel_values=torch.zeros(1, 3, side, side, device=device))
        idx = torch.zeros(concepts, dtype=torch.long, device=device)
        vision = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(x[idx] for x in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(x[idx] for x in vision.fpn_position_encoding),
        )
        length = int(config.text_config.max_position_embeddings)
        text = BaseModelOutputWithPooling(
            pooler_output=torch.randn(concepts, length, config.detr_encoder_config.hidden_size, device=device)
        )
        mask = torch.ones(concepts, length, dtype=torch.long, device=device)
        model(vision_embeds=vision, text_embeds=text, attention_mask=mask)  # warm-up
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(vision_embeds=vision, text_embeds=text, attention_mask=mask)
            _sync(device)
            times.append((time.perf_counter() - t0) / concepts)
    return times


def save_published(folder: str) -> None:
    """The published configuration, a character-level stand-in tokenizer, the processor's settings."""
    from transformers import CLIPTokenizer, Sam3Config, Sam3ImageProcessor, Sam3Processor

    chars = list(string.ascii_lowercase) + list(string.digits)
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 49406, 49407
    Sam3Config().save_pretrained(folder)
    Sam3Processor(
        image_processor=Sam3ImageProcessor(), tokenizer=CLIPTokenizer(vocab=vocab, merges=[])
    ).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concept-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="time Sam3Detector end to end (GPU run)")
    ap.add_argument("--batch", type=int, default=1, help="--full: images per call")
    ap.add_argument("--concepts", type=int, default=80, help="--full: concepts")
    ap.add_argument("--out")
    a = ap.parse_args()
    from transformers import Sam3Config

    torch.set_num_threads(os.cpu_count() or 1)
    config = Sam3Config()
    result = {
        "machine": benchlib.machine_info(),
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "device": a.device,
    }
    image, per_concept = sam3_flops(config)
    _, per_concept_batched = sam3_flops(config, concepts=a.concept_batch)
    result["gflops"] = {
        "image_encoding": round(image / 1e9, 1),
        "per_concept": round(per_concept / 1e9, 1),
        f"per_concept_at_{a.concept_batch}": round(per_concept_batched / 1e9, 1),
        "concepts_per_image_encoding": round(image / per_concept, 1),
    }
    print("gflops", json.dumps(result["gflops"]), flush=True)
    for c in (1, a.concept_batch):
        times = concept_seconds(config, concepts=c, repeats=a.repeats, device=a.device)
        result[f"s_per_concept_at_{c}"] = [round(t, 3) for t in times]
        print(f"s_per_concept_at_{c}", times, flush=True)
    if a.full:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8) for _ in range(a.batch)]
        concepts = [f"concept {i}" for i in range(a.concepts)]
        with tempfile.TemporaryDirectory() as tmp:
            save_published(tmp)
            det = Sam3Detector(
                queries=concepts,
                weights=tmp,
                device=a.device,
                random_init=True,
                concept_batch=a.concept_batch,
                max_concepts=a.concepts,
                score_threshold=0.0,
            )
            det(images[:1])
            _sync(a.device)
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                det(images)
                _sync(a.device)
                times.append((time.perf_counter() - t0) / a.batch)
            result["full"] = {"batch": a.batch, "concepts": a.concepts, "s_per_image": [round(t, 3) for t in times]}
            print("full", json.dumps(result["full"]), flush=True)
    print(json.dumps(result, indent=1))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
