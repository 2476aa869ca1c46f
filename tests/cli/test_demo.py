"""``ovsam-ray demo``: the quick demo end to end on the session's local Ray, and the order of the
full demo's steps (training before Ray starts)."""

from __future__ import annotations

import json

import pytest

from ovsam_ray.demo import DemoConfig, run_demo


def test_quick_demo_labels_the_held_out_images_and_writes_its_metrics(ray_local, tmp_path, capsys):
    work = tmp_path / "demo"
    assert run_demo(DemoConfig(work_dir=str(work), quick=True, num_images=4, images_per_shard=2)) == 0
    # The snippet it prints to read the labels runs as printed.
    out = capsys.readouterr().out
    snippet = out.split("read the labels:\n", 1)[1].split("=" * 72, 1)[0]
    namespace: dict = {}
    exec("\n".join(line.strip() for line in snippet.strip().splitlines()), namespace)
    assert namespace["m"].shape[:2] == tuple(namespace["inst"]["rle"]["size"])
    result = json.loads((work / "metrics.json").read_text())
    assert result["random_init"] is True
    assert result["counts"] == {"images": 4, "images_error": 0, "prompts_without_instance": 0}
    box, point = result["metrics"]["box"], result["metrics"]["point"]
    for value in (box["miou"], point["miou"], box["accuracy"], point["accuracy"], box["box_fill_miou"]):
        assert 0.0 <= value <= 1.0
    assert box["objects"] >= 4 and point["objects"] == box["objects"]
    assert any(p.suffix == ".parquet" for p in (work / "labels").rglob("*"))


class _Stop(Exception):
    pass


def test_full_demo_trains_before_starting_ray(monkeypatch, tmp_path):
    """Ray's idle processes would take CPU from the 2-core training, so it starts afterwards."""
    import ray

    import ovsam_ray.pipeline.label_job as label_job
    import ovsam_ray.training.tiny_recipe as recipe

    calls: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: "ray.init" in calls)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append("ray.init"))
    monkeypatch.setattr(recipe, "run_tiny_recipe", lambda *a, **k: calls.append("train") or str(tmp_path / "w"))

    def label(*a, **k):
        calls.append("label")
        raise _Stop

    monkeypatch.setattr(label_job, "run_label", label)
    with pytest.raises(_Stop):
        run_demo(DemoConfig(work_dir=str(tmp_path / "demo"), num_images=2, images_per_shard=2))
    assert calls == ["train", "ray.init", "label"]


def test_quick_demo_table_says_why_every_object_is_novel() -> None:
    from ovsam_ray.demo import QUICK_NOTE, metrics_report

    m = {
        "objects": 5, "objects_base": 0, "objects_novel": 5, "miou": 0.4, "miou_base": None, "miou_novel": 0.4,
        "accuracy": 0.2, "accuracy_base": None, "accuracy_novel": 0.2, "box_fill_miou": 0.5,
    }  # fmt: skip
    quick = metrics_report({"box": m}, quick=True)
    assert quick.rstrip().endswith(QUICK_NOTE) and "random weights" in QUICK_NOTE and "novel" in QUICK_NOTE
    trained = metrics_report({"box": m}, quick=False)
    assert QUICK_NOTE not in trained and "seen classes (0 objects)" in trained and "unseen classes (5" in trained
