"""Benchmarks (not tests). Each writes a JSON result and prints a markdown table row.

    python -m bench.run overhead --preset ovsam_rn50_small --num-images 16 --out bench/results/overhead.json

overhead: images/s of the whole label job (Ray Data: read -> decode -> model actor -> RLE ->
Parquet commit) vs the same model alone in one process (decode -> predict -> RLE, no Ray), same
machine, preset and inputs; ``ray_overhead_ratio`` = job / model alone (target >= 0.8).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

from bench.benchlib import TreeSampler, machine_info, now_iso, save_json


def _peak_delta_mib(sampler: TreeSampler) -> float:
    """Peak PSS of this process tree (the driver and the Ray cluster it started) above its start."""
    return round(sampler.peak_pss_mib - sampler.samples[0]["pss_mib"], 1)


def _model_alone(shards: list[str], model_cfg, batch_size: int) -> dict:
    """decode -> predict -> RLE in one process (``labelling.label_samples``), ``batch_size`` images a call."""
    from ovsam_ray.data.shards import read_shard
    from ovsam_ray.inference import build_predictor
    from ovsam_ray.labelling import label_samples

    predictor, vocab, _ = build_predictor(model_cfg)
    samples = [s for url in shards for s in read_shard(url).samples]
    list(label_samples(predictor, vocab, samples[:1]))  # warm-up (first-call allocations), not timed
    t0 = time.time()
    masks = sum(len(row["instances"]) for row in label_samples(predictor, vocab, samples, batch_size=batch_size))
    wall = time.time() - t0
    return {"images": len(samples), "masks": masks, "wall_s": wall, "images_per_s": len(samples) / wall}


def _job(shards_dir: str, out_dir: str, model_cfg, batch_size: int) -> dict:
    from ovsam_ray.pipeline.label_job import LabelConfig, run_label

    summary = run_label(
        LabelConfig(input=shards_dir, output=out_dir, model=model_cfg, batch_size=batch_size, progress_interval_s=30.0)
    )
    return {
        "images": summary.images,
        "masks": summary.masks,
        "wall_s": summary.wall_time_s,
        "images_per_s": summary.images_per_s,
        "errors": summary.images_error,
    }


def overhead(args: argparse.Namespace) -> dict:
    import ray

    from ovsam_ray.data.synthetic import generate_shards
    from ovsam_ray.inference import ModelConfig

    work = tempfile.mkdtemp(prefix="ovsam_bench_")
    try:
        shards_dir = os.path.join(work, "shards")
        shards = generate_shards(
            shards_dir,
            num_images=args.num_images,
            images_per_shard=args.images_per_shard,
            seed=0,
            image_size=(args.width, args.height),
            min_objects=args.objects,
            max_objects=args.objects,
        )
        vocab = os.path.join(work, "vocab.txt")
        from ovsam_ray.data.synthetic import shape_vocabulary_names

        with open(vocab, "w") as f:
            f.write("\n".join(shape_vocabulary_names()))
        model_cfg = ModelConfig(preset=args.preset, random_init=True, vocab=vocab)
        with TreeSampler(interval_s=0.2) as mem_alone:
            alone = _model_alone(shards, model_cfg, args.batch_size)
        alone["peak_mem_delta_mib"] = _peak_delta_mib(mem_alone)
        alone["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        with TreeSampler(interval_s=0.2) as mem_job:
            job = _job(shards_dir, os.path.join(work, "labels"), model_cfg, args.batch_size)
        job["peak_mem_delta_mib"] = _peak_delta_mib(mem_job)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "overhead",
        "date": now_iso(),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "preset": args.preset,
        "num_images": args.num_images,
        "image_size": [args.width, args.height],
        "boxes_per_image": args.objects,
        "batch_size": args.batch_size,
        "model_alone": alone,
        "job": job,
        "ray_overhead_ratio": round(job["images_per_s"] / alone["images_per_s"], 3),
    }


def classify(args: argparse.Namespace) -> dict:
    """Per-mask classification cost (head + CLIP logits and fusion) vs vocabulary size."""
    import torch

    from ovsam_ray.model.classifier import OpenVocabClassifier

    torch.manual_seed(0)
    rows = []
    for num_classes in args.classes:
        text = torch.nn.functional.normalize(torch.randn(num_classes, args.synonyms, args.dim), dim=-1)
        clf = OpenVocabClassifier(text_embeddings=text, seen=torch.rand(num_classes) < 0.5)
        region, clip = torch.randn(args.masks, args.dim), torch.randn(args.masks, args.dim)
        valid = torch.ones(args.masks, dtype=torch.bool)
        clf(region[:8], clip[:8], valid[:8])
        with TreeSampler(interval_s=0.2) as mem:
            t0 = time.time()
            for start in range(0, args.masks, args.chunk):
                sl = slice(start, start + args.chunk)
                clf(region[sl], clip[sl], valid[sl])
            wall = time.time() - t0
        rows.append(
            {
                "classes": num_classes,
                "synonyms": args.synonyms,
                "dim": args.dim,
                "masks": args.masks,
                "ms_per_mask": 1000 * wall / args.masks,
                "text_embedding_mib": text.numel() * 4 / 2**20,
                "peak_mem_delta_mib": _peak_delta_mib(mem),
            }
        )
    return {
        "benchmark": "classify",
        "date": now_iso(),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--preset", default="ovsam_rn50_small")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--images-per-shard", type=int, default=4)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--objects", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--out", required=True)
    p = sub.add_parser("classify")
    p.add_argument("--classes", type=lambda t: [int(x) for x in t.split(",")], default=[80, 21841])
    p.add_argument("--synonyms", type=int, default=4)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--masks", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.bench == "classify":
        result = classify(args)
        save_json(result, args.out)
        print("| classes | synonyms | D | ms per mask | text emb MiB | peak mem MiB |")
        print("|---|---|---|---|---|---|")
        for r in result["rows"]:
            print(
                f"| {r['classes']} | {r['synonyms']} | {r['dim']} | {r['ms_per_mask']:.3f} | "
                f"{r['text_embedding_mib']:.1f} | {r['peak_mem_delta_mib']} |"
            )
        return
    result = overhead(args)
    save_json(result, args.out)
    a, j = result["model_alone"], result["job"]
    print("| date | machine | preset | images | model alone img/s | job img/s | ratio | peak mem job (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {result['date'][:10]} | {result['machine']['cpu']} x{result['machine']['cores']} | {args.preset} | "
        f"{args.num_images} | {a['images_per_s']:.3f} | {j['images_per_s']:.3f} | {result['ray_overhead_ratio']} | "
        f"{j['peak_mem_delta_mib']} |"
    )


if __name__ == "__main__":
    main()
