"""Smoke test of bench/perf.py and its helpers: the benchmark must keep running end to end
(modes a and c on two tiny images, CPU) and its measuring pieces must measure what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import benchlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_shards_have_exact_prompt_count(tmp_path):
    from ovsam_ray.data.decode import decode_sample
    from ovsam_ray.data.shards import read_shard

    urls = benchlib.write_bench_shards(
        str(tmp_path), num_images=5, images_per_shard=2, size=(96, 64), prompts=7, workers=1
    )
    assert [os.path.basename(u) for u in urls] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = [s for u in urls for s in read_shard(u).samples]
    assert len(samples) == 5
    for s in samples:
        d = decode_sample(s)
        assert d.ok and d.image.shape == (64, 96, 3) and d.prompts.num_boxes == 7


def test_compare_predictions_and_peaks():
    from ovsam_ray.data.rle import encode_masks

    a = np.zeros((2, 8, 8), bool)
    a[0, :4] = True
    b = a.copy()
    b[0, :2] = True
    b[0, 2:4] = False  # half of mask 0 kept: IoU 0.5; mask 1 empty in both: IoU 1
    ra, rb = encode_masks(a), encode_masks(b)
    out = benchlib.compare_predictions({"k": [[1, ra[0]], [2, ra[1]]]}, {"k": [[1, rb[0]], [3, rb[1]]]})
    assert out["prompts"] == 2 and out["labels_equal_fraction"] == 0.5
    assert out["mask_iou_min"] == 0.5 and out["mask_iou_mean"] == 0.75
    assert benchlib.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.5
    assert benchlib.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert benchlib.peak_bf16_tflops(None) is None


def test_tree_sampler_sees_this_process():
    sampler = benchlib.TreeSampler(interval_s=0.05).start()
    sum(i * i for i in range(200_000))
    sampler.stop()
    assert sampler.peak_pss_mib > 10 and sampler.samples[-1]["processes"] >= 1
    assert sampler.cpu_seconds >= 0


def test_perf_modes_a_c_end_to_end(tmp_path):
    out = tmp_path / "perf.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.perf",
        "--device",
        "cpu",
        "--preset",
        "ovsam_tiny",
        "--modes",
        "a,c",
        "--num-images",
        "2",
        "--prompts",
        "3",
        "--width",
        "160",
        "--height",
        "120",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for mode in ("a", "c"):
        row = result["rows"][mode]
        assert row["images"] == 2 and row["images_per_s"] > 0 and row["gflops_per_image"] > 0
        assert row["mfu"] is None  # no peak claimed for a CPU
    assert set(result["rows"]["c"]["stages_ms"]) >= {"backbone", "adapter", "fpn", "decode", "classify", "post"}
    check = result["checks"]["fast_vs_reference"]
    assert check["prompts"] == 6 and check["labels_equal_fraction"] == 1.0 and check["mask_iou_min"] >= 0.99
    assert result["checks"]["fast_vs_fp32"]["ok"] and result["checks"]["fast_vs_fp32"]["prompts"] == 6
    assert "| a: ours ovsam_tiny" in proc.stdout


def test_tiny_recipe_bench_trains_and_splits_the_accuracy(tmp_path):
    recipe = {
        "train_images": 4,
        "images_per_shard": 4,
        "image_size": [[96, 72], [128, 96]],
        "stage0_steps": 2,
        "stage0_pool": 64,
        "stage0_colours": 2,
        "stage0_scene_steps": 2,
        "stage0_scene_batch": 2,
        "cotrain_steps": 2,
        "batch_size": 2,
        "num_prompts": 2,
        "num_points": 64,
        "warmup_steps": 1,
    }
    out = tmp_path / "r.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.tiny_recipe",
            "--work",
            str(tmp_path / "w"),
            "--recipe",
            json.dumps(recipe),
            "--eval-images",
            "3",
            "--eval-dir",
            str(tmp_path / "eval"),
            "--out",
            str(out),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=600,
    )
    r = json.loads(out.read_text())
    box = r["label_job_metrics"]["metrics"]["box"]
    assert r["objects"] == box["objects"] > 0
    for key in ("fused_accuracy", "head_accuracy", "clip_accuracy", "head_accuracy_gt_boxes"):
        assert 0.0 <= r[key] <= 1.0
    assert r["fused_accuracy"] == box["accuracy"]  # same labels as the one scorer's
    assert sum(b["n"] for b in r["head_by_mask_box_iou"].values()) == r["objects"]
    assert r["train_wall_s"] > 0 and r["machine"]["cpu"]


@pytest.mark.slow
def test_train_precision_compares_fp32_with_bf16(tmp_path):
    """bench/train_precision.py (the GPU run's train_precision stage) at CPU smoke size: both
    precisions train the same steps on the same data and seed, and the check reads the result."""
    from bench import train_precision
    from bench.gpu_run_checks import StageCtx, check_precision

    out = tmp_path / "train_precision"
    argv = ["--out", str(out), "--steps", "2", "--device", "cpu", "--train-images", "20", "--eval-images", "4"]
    assert train_precision.main([*argv, "--log-every", "1"]) == 0
    record = json.loads((out / "train_precision.json").read_text())
    runs = record["runs"]
    assert [r["loss"] is not None for r in runs["fp32"]["curve"]] == [True, True]
    assert len(runs["bf16"]["curve"]) == 2 and runs["fp32"]["curve"] != runs["bf16"]["curve"], "bf16 ran"
    assert record["comparison"]["mean_abs_loss_gap"] is not None
    assert "box" in record["comparison"]["fp32"]["metrics"]
    checks, figures, _ = check_precision(StageCtx(smoke=True, work=str(tmp_path), python="", env={}), "")
    assert all(c.ok for c in checks) and figures["steps"] == 2
