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
- With ``--encode-repeats N``: seconds of encoding one image (``Sam3VisionModel``, ViT + FPN) at
  the configuration's input size, N calls, and the process's peak resident memory.
- With ``--full`` (the GPU run): the label job's own ``Sam3Detector`` at the published size on
  ``--width`` x ``--height`` images (1024x768), at each of ``--concepts`` (comma-separated) concept
  counts, seconds per image (encoding + all the concepts); a line through them gives the seconds
  of the encoding (``t_image``) and per concept (``t_concept``). ``--weights DIR``: a
  ``save_pretrained`` folder instead of random weights.
- With ``--ovsam-preset`` as well: the OV-SAM predictor as the label job builds it, on the same
  images, with SAM 3's boxes as prompts (the job's NMS, at most ``--ovsam-prompts`` per image):
  seconds per image (``t_ovsam``). Then the GPU split rule (``split_rule``): for each of
  ``--split-concepts`` concepts, the share of the GPUs each pool needs for both to keep pace,
  ``t_d(K) / (t_d(K) + t_ovsam)`` with ``t_d(K) = t_image + K t_concept``, in GPUs of ``--gpus``,
  and the actors per GPU and flags that set it.

``--size tiny`` runs the same code at a few-layer configuration (the GPU run's CPU smoke).

    python -m bench.sam3_cost --out bench/results/sam3_cost_cpu.json
    python -m bench.sam3_cost --encode-repeats 2 --out bench/results/sam3_cost_cpu_encode.json
    python -m bench.sam3_cost --device cuda --full --batch 4 --concepts 1,16,80 --concept-batch 16 \\
        --repeats 3 --ovsam-preset ovsam_rn50x16 --out bench/results/sam3_cost_gpu.json
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


def encode_seconds(config, *, repeats: int, device: str) -> dict:
    """Seconds of encoding one image (ViT + FPN, ``Sam3VisionModel``) at the configuration's input
    size, random weights; ``repeats`` timed calls, the first one cold (no warm-up: at the published
    size on a CPU one call takes minutes). With the peak resident memory of this process (MiB)."""
    import resource

    from transformers.models.sam3.modeling_sam3 import Sam3VisionModel

    t0 = time.perf_counter()
    model = Sam3VisionModel(config.vision_config).eval().to(device)
    build = time.perf_counter() - t0
    side = config.vision_config.backbone_config.image_size
    side = side if isinstance(side, int) else side[0]
    pixels = torch.zeros(1, 3, side, side, device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    times = []
    with torch.no_grad(), autocast:
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            model(pixel_values=pixels)
            _sync(device)
            times.append(time.perf_counter() - t0)
            print(f"encode {side}x{side}: {times[-1]:.1f} s", flush=True)
    return {
        "side": side,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "build_s": round(build, 1),
        "s": [round(t, 2) for t in times],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def save_published(folder: str) -> None:
    """The published configuration, a character-level stand-in tokenizer, the processor's settings."""
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Processor

    Sam3Config().save_pretrained(folder)
    Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=_char_tokenizer()).save_pretrained(folder)


def _char_tokenizer():
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase) + list(string.digits)
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 49406, 49407
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_config():
    """A few-layer SAM 3 on a 56-pixel square (one ViT layer, 8 queries, hidden size 16): the same
    code paths as the published size, in seconds on a CPU."""
    from transformers import Sam3Config

    side, grid, hidden = 56, 4, 16
    small = {"hidden_size": hidden, "num_attention_heads": 2, "intermediate_size": 32}
    return Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model",
                **small,
                "num_hidden_layers": 1,
                "image_size": side,
                "patch_size": 14,
                "window_size": grid,
                "global_attn_indexes": [0],
                "pretrain_image_size": side,
            },
            "fpn_hidden_size": hidden,
            "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
        },
        text_config={
            **small,
            "vocab_size": 49408,
            "projection_dim": hidden,
            "num_hidden_layers": 1,
            "max_position_embeddings": 32,
        },
        geometry_encoder_config={**small, "num_layers": 1},
        detr_encoder_config={**small, "num_layers": 1},
        detr_decoder_config={**small, "num_layers": 1, "num_queries": 8},
        mask_decoder_config={"hidden_size": hidden, "num_attention_heads": 2},
    )


def save_config(folder: str, config) -> None:
    """``config`` with the stand-in tokenizer and a processor at its input size (no weights)."""
    from transformers import Sam3ImageProcessor, Sam3Processor

    config.save_pretrained(folder)
    side = config.vision_config.backbone_config.image_size
    mask = 4 * side // config.vision_config.backbone_config.patch_size
    processor = Sam3ImageProcessor(size={"height": side, "width": side}, mask_size={"height": mask, "width": mask})
    Sam3Processor(image_processor=processor, tokenizer=_char_tokenizer()).save_pretrained(folder)


def with_concepts(det: Sam3Detector, k: int) -> Sam3Detector:
    """The same detector (same model, same text features) reading only its first ``k`` concepts."""
    view = copy.copy(det)
    view.queries, view.text, view.text_mask = det.queries[:k], det.text[:k], det.text_mask[:k]
    return view


def _timed(run, *, images: int, repeats: int, device: str) -> list[float]:
    """Seconds per image of ``run()`` (which handles ``images`` images), ``repeats`` calls after a warm-up."""
    run()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - t0) / images)
    return times


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (concepts, seconds per image): the
    seconds of the image encoding and per concept, neither below 0 (timing noise can tilt a line
    through near-equal times; the slope is then 0 and the intercept the mean). Needs two concept
    counts or more."""
    ks = np.array([k for k, _ in points], dtype=float)
    ts = np.array([t for _, t in points], dtype=float)
    if len(set(ks.tolist())) < 2:
        raise ValueError("a line needs two concept counts or more (--concepts 1,80)")
    slope = max(float(np.polyfit(ks, ts, 1)[0]), 0.0)
    return max(float(ts.mean() - slope * ks.mean()), 0.0), slope


def split_rule(
    t_image: float, t_concept: float, t_ovsam: float, concepts: list[int], *, gpus: int = 8, max_actors: int = 8
) -> list[dict]:
    """Per concept count K: the SAM 3 pool's share of every GPU, ``t_d / (t_d + t_ovsam)`` with
    ``t_d = t_image + K t_concept`` (GPU-seconds per image of each pool alone on a GPU), in GPUs of
    ``gpus``; and the actors per GPU that set it (``k_d : k_s`` nearest ``t_d : t_ovsam``, at most
    ``max_actors`` per GPU, each asking ``1 / (k_d + k_s)`` of a GPU), as label-job flags."""
    rows = []
    for k in concepts:
        t_d = t_image + k * t_concept
        share = t_d / (t_d + t_ovsam)
        pairs = [(kd, n - kd) for n in range(2, max_actors + 1) for kd in range(1, n)]
        kd, ks = min(pairs, key=lambda p: (abs(p[0] / (p[0] + p[1]) - share), p[0] + p[1]))
        frac = f"{1 / (kd + ks):.4g}"
        rows.append(
            {
                "concepts": k,
                "sam3_s_per_image": round(t_d, 4),
                "ovsam_s_per_image": round(t_ovsam, 4),
                "sam3_share": round(share, 3),
                "sam3_gpus": round(share * gpus, 2),
                "ovsam_gpus": round((1 - share) * gpus, 2),
                "actors_per_gpu": {"sam3": kd, "ovsam": ks},
                "flags": f"--detector-num-gpus {frac} --detector-concurrency {kd * gpus} "
                f"--num-gpus {frac} --concurrency {ks * gpus}",
            }
        )
    return rows


def split_table(rows: list[dict], gpus: int) -> str:
    lines = [
        f"| concepts | SAM 3 s/image | OV-SAM s/image | SAM 3 share | of {gpus} GPUs: SAM 3 / OV-SAM "
        "| actors per GPU (SAM 3 : OV-SAM) | flags |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["actors_per_gpu"]
        lines.append(
            f"| {r['concepts']} | {r['sam3_s_per_image']} | {r['ovsam_s_per_image']} | {r['sam3_share']} "
            f"| {r['sam3_gpus']} / {r['ovsam_gpus']} | {a['sam3']} : {a['ovsam']} | `{r['flags']}` |"
        )
    return "\n".join(lines)


def full_detector(a: argparse.Namespace, config, images: list[np.ndarray]) -> tuple[dict, list[dict]]:
    """``Sam3Detector`` end to end at each of ``--concepts``: seconds per image; and its detections
    at the largest count (the OV-SAM pool's prompts)."""
    counts = sorted(set(a.concepts))
    names = [f"concept {i}" for i in range(max(counts))]
    with tempfile.TemporaryDirectory() as tmp:
        if a.weights is None:
            save_config(tmp, config)
        t0 = time.perf_counter()
        det = Sam3Detector(
            queries=names,
            weights=a.weights or tmp,
            device=a.device,
            random_init=a.weights is None,
            concept_batch=a.concept_batch,
            max_concepts=max(counts),
            score_threshold=0.0,
        )
        build = time.perf_counter() - t0
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for k in counts:
        view = with_concepts(det, k)
        times = _timed(lambda v=view: v(images), images=len(images), repeats=a.repeats, device=a.device)
        rows.append({"concepts": k, "s_per_image": [round(t, 4) for t in times]})
        print(f"full: {k} concepts, s per image {times}", flush=True)
    full: dict = {
        "batch": len(images),
        "image_size": [images[0].shape[1], images[0].shape[0]],
        "concept_batch": a.concept_batch,
        "weights": a.weights or f"random ({a.size} configuration)",
        "build_s": round(build, 1),
        "rows": rows,
    }
    if a.device == "cuda":
        full["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if len(counts) >= 2:
        t_image, t_concept = fit_line([(r["concepts"], min(r["s_per_image"])) for r in rows])
        full["t_image_s"], full["t_concept_s"] = round(t_image, 4), round(t_concept, 5)
    return full, det(images)


def ovsam_seconds(a: argparse.Namespace, images: list[np.ndarray], detections: list[dict]) -> dict:
    """The OV-SAM predictor (as the label job builds it) on ``images`` with SAM 3's boxes after
    the job's NMS (IoU 0.5), at most ``--ovsam-prompts`` per image: seconds per image."""
    from ovsam_ray.inference import ModelConfig, load_model, make_predictor, vocabulary_text
    from ovsam_ray.model.predictor import ImagePrompts
    from ovsam_ray.pipeline.detectors import postprocess_detections

    cfg = ModelConfig(preset=a.ovsam_preset, random_init=True, vocab="coco_ov")
    loaded = load_model(cfg)
    loaded.model.requires_grad_(False)
    text, vocab = vocabulary_text(cfg, loaded, a.device)
    predictor = make_predictor(cfg, loaded, text, vocab, a.device)
    prompts = []
    for det in detections:
        kept = postprocess_detections(det, score_threshold=0.0, nms_iou=0.5, max_per_image=a.ovsam_prompts)
        prompts.append(ImagePrompts(boxes=np.asarray(kept["boxes"], np.float32).reshape(-1, 4)))
    times = _timed(
        lambda: predictor.predict(predictor.embed(images), prompts),
        images=len(images),
        repeats=a.repeats,
        device=a.device,
    )
    print(f"ovsam: {a.ovsam_preset}, s per image {times}", flush=True)
    return {
        "preset": a.ovsam_preset,
        "prompts_per_image": [len(p) for p in prompts],
        "s_per_image": [round(t, 4) for t in times],
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=["published", "tiny"], default="published")
    ap.add_argument("--concept-batch", type=int, default=4)
    ap.add_argument("--skip-flops", action="store_true", help="no FLOP count (it runs on the CPU: slow at full size)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--encode-repeats", type=int, default=0, help="time the image encoding this many times (minutes on a CPU)"
    )
    ap.add_argument("--full", action="store_true", help="time Sam3Detector end to end (GPU run)")
    ap.add_argument("--weights", default=None, help="--full: a save_pretrained folder (default: random weights)")
    ap.add_argument("--batch", type=int, default=1, help="--full: images per call")
    ap.add_argument("--concepts", type=_ints, default=[80], help="--full: concept counts, comma-separated")
    ap.add_argument("--width", type=int, default=1024, help="--full: image width")
    ap.add_argument("--height", type=int, default=768, help="--full: image height")
    ap.add_argument("--ovsam-preset", default=None, help="--full: time this OV-SAM preset on the same images")
    ap.add_argument("--ovsam-prompts", type=int, default=100, help="SAM 3 boxes per image for OV-SAM (the job's cap)")
    ap.add_argument("--split-concepts", type=_ints, default=[1, 10, 20, 80, 100], help="split rule: concept counts")
    ap.add_argument("--gpus", type=int, default=8, help="split rule: GPUs to share")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.ovsam_preset and not a.full:
        ap.error("--ovsam-preset needs --full")
    if a.full and not a.concepts:
        ap.error("--concepts: at least one count")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    from transformers import Sam3Config

    torch.set_num_threads(os.cpu_count() or 1)
    config = Sam3Config() if a.size == "published" else tiny_config()
    result = {
        "machine": benchlib.machine_info(),
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "device": a.device,
        "size": a.size,
    }
    if not a.skip_flops:
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
    if a.encode_repeats:
        result["encode"] = encode_seconds(config, repeats=a.encode_repeats, device=a.device)
        print("encode", json.dumps(result["encode"]), flush=True)
    if a.full:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (a.height, a.width, 3), dtype=np.uint8) for _ in range(a.batch)]
        result["full"], detections = full_detector(a, config, images)
        print("full", json.dumps(result["full"]), flush=True)
        if a.ovsam_preset:
            result["ovsam"] = ovsam_seconds(a, images, detections)
            full = result["full"]
            if "t_image_s" in full:
                t_image, t_concept = full["t_image_s"], full["t_concept_s"]
            else:  # one concept count: the per-concept pass gives the slope
                t_concept = min(result[f"s_per_concept_at_{a.concept_batch}"])
                k = full["rows"][0]["concepts"]
                t_image = max(min(full["rows"][0]["s_per_image"]) - k * t_concept, 0.0)
            rows = split_rule(t_image, t_concept, min(result["ovsam"]["s_per_image"]), a.split_concepts, gpus=a.gpus)
            result["split"] = {"t_image_s": t_image, "t_concept_s": t_concept, "gpus": a.gpus, "rows": rows}
            print("\nGPU split between the SAM 3 and the OV-SAM pools (each pool's seconds per image alone):")
            print(split_table(rows, a.gpus), flush=True)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
