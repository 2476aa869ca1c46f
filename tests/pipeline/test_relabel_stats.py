"""relabel equals running the label job with the new vocabulary; label statistics are written."""

from __future__ import annotations

import json
import os

import pyarrow.dataset as pds
import pytest

from ovsam_ray.inference import ModelConfig
from ovsam_ray.pipeline.label_job import LabelConfig, run_label
from ovsam_ray.pipeline.relabel import RelabelConfig, run_relabel
from ovsam_ray.pipeline.stats import merge_stats, shard_stats


def _rows(out: str) -> dict:
    return {(r["shard"], r["key"]): r for r in pds.dataset(out, format="parquet").to_table().to_pylist()}


def test_relabel_equals_label_job_with_the_new_vocabulary(ray_local, tmp_shards, shapes_vocab, tmp_path, bystanders):
    src = os.path.dirname(tmp_shards[0])
    other = tmp_path / "other.txt"
    other.write_text("circle\nsquare, box\ntriangle\nblob\nstar\n")
    first, direct, relabelled = (str(tmp_path / n) for n in ("first", "direct", "relabelled"))
    bystanders.beside(first)
    bystanders.beside(relabelled)

    def job(vocab: str, out: str) -> None:
        run_label(
            LabelConfig(
                input=src,
                output=out,
                with_embedding=True,
                limit=2,
                model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=vocab),
            )
        )

    job(shapes_vocab, first)
    job(str(other), direct)
    summary = run_relabel(RelabelConfig(input=first, output=relabelled, vocab=str(other)))
    assert summary["shards_relabelled"] == 2

    a, b = _rows(direct), _rows(relabelled)
    assert a.keys() == b.keys() and len(a) == 8
    compared = 0
    for key in a:
        for x, y in zip(a[key]["instances"], b[key]["instances"], strict=True):
            assert x["label"] == y["label"] and x["topk_labels"] == y["topk_labels"]
            assert x["label_score"] == pytest.approx(y["label_score"], abs=1e-6)
            assert x["rle"] == y["rle"] and x["embedding"] == y["embedding"]
            compared += 1
    assert compared > 0
    assert {i["label"] for r in b.values() for i in r["instances"]} <= {"circle", "square", "triangle", "blob", "star"}


def test_relabel_refuses_output_without_embeddings(ray_local, tmp_shards, shapes_vocab, tmp_path):
    out = str(tmp_path / "plain")
    run_label(
        LabelConfig(
            input=os.path.dirname(tmp_shards[0]),
            output=out,
            limit=1,
            model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
        )
    )
    with pytest.raises(ValueError, match="with-embedding"):
        run_relabel(RelabelConfig(input=out, output=str(tmp_path / "x"), vocab=shapes_vocab))
    stats = json.load(open(os.path.join(out, "_stats.json")))
    shard = json.load(open(os.path.join(out, "_stats", "shard-000000.json")))
    assert stats["images"] == shard["images"] == 4 and stats["masks"] == shard["masks"] > 0
    assert sum(stats["classes"].values()) == stats["masks"] and sum(stats["score_histogram"]) == stats["masks"]


def test_shard_stats_golden_and_empty():
    rows = [
        {
            "status": "ok",
            "instances": [
                {"label": "a", "label_score": 0.95, "area": 10},
                {"label": "b", "label_score": 0.15, "area": 300},
            ],
        },
        {"status": "ok", "instances": []},
        {"status": "error", "instances": []},
    ]
    s = shard_stats(rows)
    assert (s["images"], s["images_ok"], s["images_error"], s["images_empty"], s["masks"]) == (3, 2, 1, 1, 2)
    assert s["classes"] == {"a": 1, "b": 1} and s["masks_per_image"] == {0: 1, 2: 1}
    assert s["score_histogram"][9] == 1 and s["score_histogram"][1] == 1
    assert s["area_histogram"][0] == 1 and s["area_histogram"][3] == 1
    merged = merge_stats([s, shard_stats([])])
    assert merged["masks"] == 2 and merged["mean_masks_per_image"] == 1.0
    assert merged["mean_score"] == pytest.approx(0.55)
    assert merge_stats([])["masks"] == 0
