"""The four measured modes of ``bench/perf.py``; each runs in its own process (``--child``) so
that its peak host and GPU memory and its CPU time are its own.

a  ours, reference-style: fp32, one image per forward, segment_anything attention, masks to the
   host at full size and RLE-encoded there (how the released OV-SAM code runs).
b  the image-crop baseline of the paper (its Fig. 2a): SAM's image encoder + prompt encoder +
   mask decoder for the boxes, then a CLIP image encoder on every box crop, classified against
   (random) text embeddings. bf16 autocast and batched images on a GPU, fp32 on a CPU.
c  ours, optimised: the predictor exactly as the label job builds it (``make_predictor``:
   batched images, all prompts of a batch in one decoder call, SDPA attention, bf16 +
   channels_last and masks run-length encoded on the device when on a GPU), with per-stage times.
d  the whole label job (``run_label``) on a local Ray cluster over all generated shards.

Every mode decodes the JPEGs from the shard bytes inside its timed loop (the job does too), so
images/s are comparable. Random weights throughout: cost does not depend on weight values.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import time
from typing import Any

import torch

from bench.benchlib import CommitWatcher, StageTimer, TreeSampler, fast_vs_fp32

OURS_STAGES = ("jpeg_decode", "preprocess", "backbone", "adapter", "fpn", "decode", "classify", "post", "records")
BASELINE_STAGES = ("jpeg_decode", "preprocess", "sam_encoder", "sam_decoder", "post", "crop", "clip", "classify")


def load_samples(work: str, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` samples (raw bytes) of the bench shards, in key order."""
    from ovsam_ray.data.shards import read_shard

    out: list[dict[str, Any]] = []
    for url in sorted(glob.glob(os.path.join(work, "shards", "shard-*.tar"))):
        out += read_shard(url).samples
        if len(out) >= limit:
            break
    return out[:limit]


def count_flops(fn: Any) -> int:
    """FLOPs (2 x multiply-adds) of ``fn()`` as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    # (models are frozen first by the callers: the counter's module tracker fails on a parameter
    # that requires grad passed as a module input under no_grad)
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> Any:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _measure(device: torch.device, run: Any) -> dict[str, Any]:
    """Wall time, peak memory (GPU allocated; host PSS of this process tree) and CPU cores of ``run()``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sampler = TreeSampler(interval_s=0.2).start()
    t0 = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    sampler.stop()
    out = {
        "wall_s": round(wall, 3),
        "peak_host_mib": round(sampler.peak_pss_mib, 1),
        "cpu_cores": round(sampler.cpu_seconds / wall, 2),
        "result": result,
    }
    out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    return out


# --- a and c: our predictor -----------------------------------------------------------------------


def _build_ours(
    cfg: Any, mode: str, device: torch.device, rle_on_device: bool | None, fast: bool | None = None
) -> tuple[Any, Any]:
    from ovsam_ray.inference import load_model, make_predictor, vocabulary_text
    from ovsam_ray.model.classifier import OpenVocabClassifier
    from ovsam_ray.model.predictor import OVSAMPredictor

    loaded = load_model(cfg)  # random_init: seeded, so a, c and the job's actors hold the same weights
    loaded.model.requires_grad_(False)
    text, vocab = vocabulary_text(cfg, loaded, device)
    if mode == "c":
        return make_predictor(cfg, loaded, text, vocab, device, rle_on_device=rle_on_device, fast=fast), vocab
    classifier = OpenVocabClassifier(
        text_embeddings=text, seen=vocab.seen_tensor(), excluded=vocab.excluded_tensor(), logit_scale=loaded.logit_scale
    )
    predictor = OVSAMPredictor(
        loaded.model, classifier, device=device, topk=cfg.topk, fast=False, fast_attention=False, rle_on_device=False
    )
    return predictor, vocab


def _ours_pass(predictor: Any, vocab: Any, samples: list[dict], batch: int, timer: StageTimer) -> dict[str, list]:
    """decode -> embed -> predict -> records over ``samples`` (``labelling.label_samples``, each
    step timed); returns {key: [[label_id, rle], ...]}."""
    from ovsam_ray.labelling import label_samples

    rows = label_samples(predictor, vocab, samples, batch_size=batch, stage=timer.stage)
    return {row["key"]: [[r["label_id"], r["rle"]] for r in row["instances"]] for row in rows}


def _instrument_ours(predictor: Any, timer: StageTimer) -> None:
    model = predictor.model
    timer.hook_module(model.backbone, "backbone")
    timer.hook_module(model.adapter, "adapter")
    timer.hook_module(model.recognizer.fpn, "fpn")
    timer.hook_module(predictor.classifier, "classify")
    timer.wrap_method(model, "decode", "decode")  # prompt encoder, mask decoder, RoI + CLIP branch


def _leaf_stages(seconds: dict[str, float]) -> dict[str, float]:
    """embed and predict minus what ran inside them: preprocess (resize, normalise, pad on the
    device) and post (upscale + threshold masks, areas/boxes, device RLE, copies to the host)."""
    s = dict(seconds)
    s["preprocess"] = s.pop("embed", 0.0) - s.get("backbone", 0.0) - s.get("adapter", 0.0) - s.get("fpn", 0.0)
    s["post"] = s.pop("predict", 0.0) - s.get("decode", 0.0) - s.get("classify", 0.0)
    return {k: s.get(k, 0.0) for k in OURS_STAGES}


def _ours_flops(predictor: Any, sample: dict[str, Any]) -> int:
    """One image's model FLOPs, counted with segment_anything's attention: the counter does not
    see SDPA with a mask on a CPU, and the model's FLOPs should not depend on the kernel."""
    from ovsam_ray.data.decode import decode_sample
    from ovsam_ray.model.attention import FastAttention, use_fast_attention, use_sam_attention
    from ovsam_ray.model.predictor import ImagePrompts

    adapter = predictor.model.adapter
    chunks = [m.query_chunk for m in adapter.modules() if isinstance(m, FastAttention)]
    use_sam_attention(adapter)
    d = decode_sample(sample)
    flops = count_flops(lambda: predictor([d.image], [ImagePrompts(boxes=d.prompts.boxes)]))
    if chunks:
        use_fast_attention(adapter, query_chunk=chunks[0])
    return flops


FAST_CHECK_IMAGES = 2


def _fast_check(predictor: Any, samples: list[dict]) -> dict[str, Any]:
    """The fast predictor against fp32 with the same weights on a few images, by what random
    weights can show (``benchlib.fast_vs_fp32``): logits, masks away from the threshold, labels
    where decided."""
    from ovsam_ray.data.decode import decode_sample
    from ovsam_ray.labelling import image_prompts
    from ovsam_ray.model.predictor import OVSAMPredictor

    decoded = [d for d in map(decode_sample, samples[:FAST_CHECK_IMAGES]) if d.ok]
    images, prompts = [d.image for d in decoded], [image_prompts(d) for d in decoded]
    ref = OVSAMPredictor(
        predictor.model,
        predictor.classifier,
        device=predictor.device,
        topk=predictor.topk,
        fast=False,
        rle_on_device=False,
    )
    embedded = ref.embed(images)
    expected = ref.predict(embedded, prompts)
    got = predictor(images, prompts)
    return fast_vs_fp32(expected, got, embedded.input_sizes, predictor.model.image_size)


def run_ours(mode: str, args: dict[str, Any], work: str) -> dict[str, Any]:
    """Mode a (reference-style) or c (optimised), see the module docstring."""
    from ovsam_ray.inference import ModelConfig

    device = torch.device(args["device"])
    cfg = ModelConfig(preset=args["preset"], random_init=True, vocab=os.path.join(work, "vocab.txt"))
    predictor, vocab = _build_ours(cfg, mode, device, args["rle_on_device"], args.get("fast"))
    batch = 1 if mode == "a" else args["batch_size"]
    samples = load_samples(work, args["ref_images"] if mode == "a" else args["num_images"])
    flops = _ours_flops(predictor, samples[0])  # also the warm-up
    if device.type == "cuda" and batch > 1:
        _ours_pass(predictor, vocab, samples[:batch], batch, StageTimer())
    sync = _sync(device)
    # On a CPU the hooks cost microseconds: the timed pass is also the per-stage pass. On a GPU
    # every stage boundary synchronises, so throughput comes from a pass without hooks.
    timer = StageTimer()
    if sync is None:
        _instrument_ours(predictor, timer)
    m = _measure(device, lambda: _ours_pass(predictor, vocab, samples, batch, timer))
    stage_images = len(samples)
    if sync is not None:
        stage_images = min(len(samples), args["stage_images"])
        timer = StageTimer(sync)
        _instrument_ours(predictor, timer)
        _ours_pass(predictor, vocab, samples[:stage_images], batch, timer)
    preds = m.pop("result")
    extra = {"fast_vs_fp32": _fast_check(predictor, samples)} if mode == "c" else {}
    with open(os.path.join(work, f"pred_{mode}.json"), "w") as f:
        json.dump(preds, f)
    stages = {k: round(1e3 * v / stage_images, 3) for k, v in _leaf_stages(timer.seconds).items()}
    settings = {
        "batch_size": batch,
        "fast": predictor.fast,
        "rle_on_device": predictor.rle_on_device,
        "fast_attention": mode == "c",
        "prompt_chunk": predictor.prompt_chunk,
        "threads": torch.get_num_threads(),
    }
    return {
        **m,
        "images": len(samples),
        "images_per_s": round(len(samples) / m["wall_s"], 3),
        "ms_per_image": round(1e3 * m["wall_s"] / len(samples), 2),
        "stages_ms": stages,
        "stage_images": stage_images,
        "flops_per_image": flops,
        "settings": settings,
        **extra,
    }


# --- d: the label job -----------------------------------------------------------------------------


def _job_predictions(output: str) -> dict[str, list]:
    import pyarrow.parquet as pq

    preds: dict[str, list] = {}
    for path in sorted(glob.glob(os.path.join(output, "*.parquet"))):
        for row in pq.read_table(path, columns=["key", "instances"]).to_pylist():
            preds[row["key"]] = [[i["label_id"], i["rle"]] for i in row["instances"] or []]
    return preds


def run_job(args: dict[str, Any], work: str) -> dict[str, Any]:
    """Mode d: ``run_label`` over every bench shard on a local Ray cluster (one model actor)."""
    import ray

    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.pipeline.label_job import LabelConfig, run_label

    cuda = args["device"] == "cuda"
    output = os.path.join(work, "labels")
    cfg = LabelConfig(
        input=os.path.join(work, "shards"),
        output=output,
        batch_size=args["batch_size"],
        model=ModelConfig(preset=args["preset"], random_init=True, vocab=os.path.join(work, "vocab.txt")),
        num_gpus=1.0 if cuda else 0.0,
        progress_interval_s=30.0,
    )
    ray.init(num_cpus=os.cpu_count(), num_gpus=1 if cuda else 0, include_dashboard=False)
    watcher = CommitWatcher(output)
    sampler = TreeSampler(interval_s=0.5, gpu=cuda, probe=watcher.probe).start()
    try:
        summary = run_label(cfg)
    finally:
        sampler.stop()
        ray.shutdown()
    wall = summary.wall_time_s
    with open(os.path.join(work, "pred_d.json"), "w") as f:
        json.dump(_job_predictions(output), f)
    gpu = None
    if sampler.peak_gpu_mib is not None:
        gpu = round(sampler.peak_gpu_mib - (sampler.samples[0].get("gpu_used_mib") or 0.0), 1)
    steady = watcher.steady_images_per_s()
    return {
        "wall_s": round(wall, 3),
        "images": summary.images,
        "errors": summary.images_error,
        "images_per_s": round(summary.images_per_s, 3),
        "ms_per_image": round(1e3 * wall / max(summary.images, 1), 2),
        "steady_images_per_s": round(steady, 3) if steady else None,
        "first_commit_s": round(watcher.events[0][0] - sampler.t0, 1) if watcher.events else None,
        "peak_host_mib": round(sampler.peak_pss_mib, 1),
        "peak_gpu_mib": gpu,
        "peak_gpu_is_device_used": True,
        "cpu_cores": round(sampler.cpu_seconds / max(wall, 1e-9), 2),
        "stages_ms": {},
        "settings": {
            "batch_size": args["batch_size"],
            "num_gpus_per_actor": cfg.num_gpus,
            "concurrency": 1,
            "shards": len(glob.glob(os.path.join(work, "shards", "shard-*.tar"))),
        },
        "samples": sampler.samples,
    }
