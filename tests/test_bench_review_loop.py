"""Smoke test of bench/review_loop.py: the review loop's benchmark runs end to end at tiny sizes
(tiny recipe of a few steps, a pool of a few images, a two-step fine-tune) and reports what it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPE = {
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


@pytest.mark.slow
def test_review_loop_bench_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    args = ["--work", str(tmp_path / "w"), "--recipe", json.dumps(RECIPE), "--pool-images", "12"]
    args += ["--images-per-shard", "6", "--eval-images", "4", "--budget", "6", "--steps", "2", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.review_loop", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["pool"]["images"] == 12 and r["pool"]["instances"] > 0
    for pick in ("uncertain", "random"):
        assert r[pick]["selected"] == 6
        assert 0 <= r[pick]["errors_found"] <= 6
        assert r[pick]["errors_per_100"] == pytest.approx(100 * r[pick]["errors_found"] / 6)
    assert r["random"]["by_reason"] == {"random": 6}
    # every picked instance came back through review import as a correction
    assert sum(r["import"]["corrections"].values()) == 6 and r["import"]["imported"]
    assert r["import"]["corrections"]["accepted"] == 6 - r["uncertain"]["errors_found"]
    assert r["finetune"]["steps"] == 2 and r["finetune"]["images_seen"] == 4
    assert "corrections=only" in " ".join(r["finetune"]["flags"])
    for when in ("before", "after", "after_seen"):
        box = r[when]["box"]
        assert box["objects_base"] + box["objects_novel"] > 0
    # the default export keeps the held-out shapes the corrections trained unseen; "seen" keeps none
    kept = r["finetune"]["kept_unseen"]
    assert set(kept["unseen"]) <= {"pentagon", "cross"} and kept["seen"] == []
    assert os.path.isdir(tmp_path / "w" / "labels" / "_corrections")
    assert "per 100 reviewed" in proc.stdout
