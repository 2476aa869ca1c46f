"""bench/sam3_cost.py's arithmetic and its timing of the image encoding, on a CPU with a few-layer
SAM 3 (the published size is bench/RESULTS.md's)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", minversion="5")

from bench import sam3_cost  # noqa: E402


def test_split_rule_shares_the_gpus_by_each_pools_seconds():
    # t_d(K) = 0.2 + 0.01 K; OV-SAM 0.3 s per image
    rows = sam3_cost.split_rule(0.2, 0.01, 0.3, [10, 40, 100], gpus=8)
    assert [r["sam3_s_per_image"] for r in rows] == [0.3, 0.6, 1.2]
    assert [r["sam3_share"] for r in rows] == [0.5, 0.667, 0.8]
    assert [(r["sam3_gpus"], r["ovsam_gpus"]) for r in rows] == [(4.0, 4.0), (5.33, 2.67), (6.4, 1.6)]
    assert [r["actors_per_gpu"] for r in rows] == [
        {"sam3": 1, "ovsam": 1},
        {"sam3": 2, "ovsam": 1},
        {"sam3": 4, "ovsam": 1},
    ]
    assert rows[2]["flags"] == "--detector-num-gpus 0.2 --detector-concurrency 32 --num-gpus 0.2 --concurrency 8"
    # never more than max_actors per GPU, and each pool keeps one actor
    (lopsided,) = sam3_cost.split_rule(10.0, 0.0, 0.01, [1], max_actors=4)
    assert lopsided["actors_per_gpu"] == {"sam3": 3, "ovsam": 1}
    assert "| 100 | 1.2 | 0.3 | 0.8 | 6.4 / 1.6 | 4 : 1 |" in sam3_cost.split_table(rows, 8)


def test_fit_line_gives_encoding_and_per_concept_seconds():
    image, concept = sam3_cost.fit_line([(1, 0.21), (16, 0.36), (80, 1.0)])
    assert image == pytest.approx(0.2) and concept == pytest.approx(0.01)
    # noise that tilts the line below 0: no concept costs less than nothing
    assert sam3_cost.fit_line([(1, 0.5), (4, 0.4)]) == (pytest.approx(0.45), 0.0)
    with pytest.raises(ValueError, match="two concept counts"):
        sam3_cost.fit_line([(80, 1.0), (80, 1.1)])


def test_encode_seconds_times_the_vision_encoder_at_its_input_size():
    r = sam3_cost.encode_seconds(sam3_cost.tiny_config(), repeats=2, device="cpu")
    assert r["side"] == 56 and len(r["s"]) == 2 and all(t >= 0 for t in r["s"])
    assert r["params_m"] >= 0 and r["peak_rss_mib"] > 0


def test_arguments():
    a = sam3_cost.parse_args(["--full", "--concepts", "1,16,80", "--ovsam-preset", "ovsam_tiny"])
    assert a.concepts == [1, 16, 80] and a.split_concepts == [1, 10, 20, 80, 100] and a.encode_repeats == 0
    with pytest.raises(SystemExit):
        sam3_cost.parse_args(["--ovsam-preset", "ovsam_tiny"])  # OV-SAM is timed on --full's images
