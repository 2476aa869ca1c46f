"""SAM 3 (transformers ``Sam3Model``) as a prompt source: the image encoded once and the concepts
run in batches against it, boxes in original pixels, its own masks kept on request, the concept
limit, the weights loader, the CLI and a label job end to end. A tiny random model built here
(tests/helpers/hf_detector_fixture.py); nothing is downloaded."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pyarrow.dataset as pds
import pytest
import torch

pytest.importorskip("transformers")

from hf_detector_fixture import boxes_of, decoded_batch, noise, save_tiny_sam3  # noqa: E402

from ovsam_ray.data.rle import decode_rle  # noqa: E402
from ovsam_ray.errors import ConfigError  # noqa: E402
from ovsam_ray.inference import ModelConfig  # noqa: E402
from ovsam_ray.pipeline import hf_detectors  # noqa: E402
from ovsam_ray.pipeline.detectors import DetectorStage  # noqa: E402
from ovsam_ray.pipeline.hf_detectors import Sam3Detector, check_concept_count, resolve_folder, sam3_flops  # noqa: E402
from ovsam_ray.pipeline.label_job import LabelConfig, run_label  # noqa: E402
from ovsam_ray.pipeline.prompting import SelectConfig  # noqa: E402
from ovsam_ray.weights.files import WeightsError  # noqa: E402

CONCEPTS = ["cat", "dog", "traffic light", "zebra", "kite"]


@pytest.fixture(scope="session")
def sam3_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_sam3(str(tmp_path_factory.mktemp("sam3")))


class ScriptedModel:
    """The tiny model's image encoder, then scripted detections: per (image, concept) pair the
    boxes, scores and masks of ``found[(image, concept)]``; it records every call."""

    def __init__(self, real, found: dict[tuple[int, str], list[tuple[list[float], float]]], queries: list[str]):
        self.real, self.found, self.queries = real, found, queries
        self.config = real.config
        self.vision_calls: list[int] = []
        self.pairs: list[int] = []
        self.image_ids: dict[int, int] = {}

    def get_vision_features(self, pixel_values):
        self.vision_calls.append(len(pixel_values))
        out = self.real.get_vision_features(pixel_values=pixel_values)
        # tag each image's encoding so that a pair can tell which image it was given
        out.fpn_hidden_states = tuple(x.clone() for x in out.fpn_hidden_states)
        out.fpn_hidden_states[0][:, 0, 0, 0] = torch.arange(len(pixel_values), dtype=torch.float32)
        return out

    def __call__(self, *, vision_embeds, text_embeds, attention_mask):
        n = len(attention_mask)
        self.pairs.append(n)
        images = vision_embeds.fpn_hidden_states[0][:, 0, 0, 0].round().long().tolist()
        # which concept: the text features of the pair equal those of one concept
        text = text_embeds.pooler_output
        concepts = [self.queries[int((self._text - t).abs().flatten(1).sum(1).argmin())] for t in text]
        q, side = 4, 8
        logits = torch.full((n, q), -20.0)
        boxes = torch.zeros((n, q, 4))
        masks = torch.full((n, q, side, side), -10.0)
        for p, (img, concept) in enumerate(zip(images, concepts)):
            for j, (box, score) in enumerate(self.found.get((img, concept), [])):
                logits[p, j] = torch.logit(torch.tensor(score))
                boxes[p, j] = torch.tensor(box)
                x0, y0, x1, y1 = (round(v * side) for v in box)
                masks[p, j, y0:y1, x0:x1] = 10.0
        presence = torch.full((n, 1), 20.0)  # sigmoid ~ 1: the score is the query's
        return SimpleNamespace(pred_logits=logits, presence_logits=presence, pred_boxes=boxes, pred_masks=masks)


def scripted_stage(sam3_dir, found, **kwargs) -> tuple[DetectorStage, ScriptedModel]:
    stage = DetectorStage(spec="sam3", weights=sam3_dir, device="cpu", queries=CONCEPTS, **kwargs)
    det = stage.detector
    model = ScriptedModel(det.model, found, det.queries)
    model._text = det.text
    det.model = model
    return stage, model


def test_stage_contract_boxes_in_original_pixels_and_concept_batches(sam3_dir):
    found = {
        (0, "zebra"): [([0.25, 0.25, 0.75, 0.75], 0.9)],
        (0, "cat"): [([0.0, 0.0, 0.5, 0.5], 0.6), ([0.0, 0.0, 0.5, 0.5], 0.1)],  # the second below the cut
        (1, "kite"): [([0.5, 0.0, 1.0, 0.5], 0.8)],
    }
    stage, model = scripted_stage(sam3_dir, found, score_threshold=0.3, concepts={"concept_batch": 2}, max_per_image=10)
    # resized 40x80 (original 160x80), 60x30 (original size), an error row, 48x48 where nothing is found
    batch = decoded_batch(
        [noise(40, 80), noise(60, 30), noise(8, 8), noise(48, 48)],
        [(160, 80), (30, 60), (8, 8), (48, 48)],
        ["ok", "ok", "error", "ok"],
    )
    out = stage(batch)
    assert model.vision_calls == [3]  # the three ok images encoded once, together
    assert model.pairs == [6, 6, 3]  # 5 concepts in batches of 2, each against the 3 encodings
    got0 = dict(zip(out.column("det_labels")[0].as_py(), boxes_of(out, 0).tolist()))
    assert got0 == {"zebra": pytest.approx([40, 20, 120, 60]), "cat": pytest.approx([0, 0, 80, 40])}
    assert out.column("det_scores")[0].as_py() == pytest.approx([0.9, 0.6], abs=1e-4)  # best first
    assert out.column("det_labels")[1].as_py() == ["kite"]
    assert boxes_of(out, 1).tolist() == [pytest.approx([15, 0, 30, 30])]
    assert boxes_of(out, 2).size == 0 and boxes_of(out, 3).size == 0
    assert out.column("status").to_pylist() == ["ok", "ok", "error", "ok"]
    assert "det_masks" not in out.column_names


def test_keep_masks_rle_at_original_size_follows_nms_and_cap(sam3_dir):
    found = {
        (0, "dog"): [([0.0, 0.0, 0.5, 0.5], 0.9), ([0.0, 0.0, 0.5, 0.5], 0.8), ([0.5, 0.5, 1.0, 1.0], 0.7)],
        (0, "kite"): [([0.5, 0.0, 1.0, 0.5], 0.4)],
    }
    stage, _ = scripted_stage(sam3_dir, found, keep_masks=True, nms_iou=0.5, max_per_image=2)
    out = stage(decoded_batch([noise(32, 64), noise(16, 16)], [(128, 64), (16, 16)], ["ok", "ok"]))
    assert out.column("det_labels")[0].as_py() == ["dog", "dog"]  # the duplicate dropped, the kite capped
    rles = out.column("det_masks")[0].as_py()
    assert [r["size"] for r in rles] == [[64, 128], [64, 128]]
    for rle, box in zip(rles, boxes_of(out, 0)):  # each box keeps its own mask
        mask = decode_rle(rle)
        ys, xs = np.nonzero(mask)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == pytest.approx(box.tolist(), abs=8)
    assert out.column("det_masks")[1].as_py() == []
    with pytest.raises(ConfigError, match="no masks of its own"):
        DetectorStage(spec="fcos_resnet50_fpn", random_init=True, keep_masks=True, device="cpu")


def test_encoding_once_matches_the_models_own_forward(sam3_dir):
    """Unpatched: concepts in batches against one encoding give what Sam3Model's forward gives
    for each (image, concept) from pixels and token ids; mixed sizes, every box inside its image."""
    det = Sam3Detector(queries=CONCEPTS, weights=sam3_dir, score_threshold=0.0, concept_batch=2)
    images = [noise(40, 80, 1), noise(64, 24, 2), noise(30, 30, 3)]
    out = det(images)
    whole = Sam3Detector(queries=CONCEPTS, weights=sam3_dir, score_threshold=0.0, concept_batch=len(CONCEPTS))(images)
    pixels = det._preprocess(images)
    for k, (im, res) in enumerate(zip(images, out)):
        h, w = im.shape[:2]
        assert len(res["boxes"]) == len(CONCEPTS) * det.model.config.detr_decoder_config.num_queries
        assert (
            (res["boxes"] >= 0).all() and (res["boxes"][:, [0, 2]] <= w).all() and (res["boxes"][:, [1, 3]] <= h).all()
        )
        np.testing.assert_allclose(res["scores"], whole[k]["scores"], atol=1e-5)
        ref = []
        with torch.no_grad():
            for concept in CONCEPTS:
                tok = det.tokenizer([concept], padding="max_length", max_length=32, return_tensors="pt")
                r = det.model(
                    pixel_values=pixels[k : k + 1], input_ids=tok.input_ids, attention_mask=tok.attention_mask
                )
                ref.append((r.pred_logits.sigmoid() * r.presence_logits.sigmoid())[0])
        np.testing.assert_allclose(res["scores"], torch.cat(ref).numpy(), atol=1e-5)
        assert res["labels"] == [c for c in CONCEPTS for _ in range(len(ref[0]))]
    assert det([]) == []


def test_concept_limit_names_the_cost(sam3_dir, monkeypatch, tmp_shards, shapes_vocab, tmp_path):
    check_concept_count(3, 3, flops=(2e12, 5e10))
    with pytest.raises(ConfigError, match=r"4 concepts.*limit of 3.*50 GFLOPs per concept.*0\.2 TFLOPs per image"):
        check_concept_count(4, 3, flops=(2e12, 5e10))
    calls = []
    monkeypatch.setattr(hf_detectors, "sam3_flops", lambda *a, **k: calls.append(1) or (5e12, 2.5e11))
    with pytest.raises(ConfigError, match="--detector-max-concepts"):
        Sam3Detector(queries=CONCEPTS, weights=sam3_dir, max_concepts=4)
    queries = tmp_path / "concepts.txt"
    queries.write_text("\n".join(CONCEPTS) + "\n")
    kwargs = {
        "input": os.path.dirname(tmp_shards[0]),
        "model": ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
        "prompts": "detector:sam3",
        "detector_queries": str(queries),
    }
    with pytest.raises(ConfigError, match=r"5 concepts.*250 GFLOPs"):
        LabelConfig(output=str(tmp_path / "a"), detector_max_concepts=4, **kwargs)
    LabelConfig(output=str(tmp_path / "b"), detector_max_concepts=5, **kwargs)
    assert len(calls) == 2
    with pytest.raises(ConfigError, match="needs a concept list"):
        Sam3Detector(queries=[], weights=sam3_dir)
    with pytest.raises(ValueError, match="keep_source_masks"):
        LabelConfig(output=str(tmp_path / "c"), keep_source_masks=True, **{**kwargs, "prompts": "detector:owlv2"})


def test_flops_are_linear_in_concepts(sam3_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(sam3_dir, local_files_only=True)
    image, one = sam3_flops(cfg, concepts=1)
    _, per_of_three = sam3_flops(cfg, concepts=3)
    assert image > 0 and one > 0
    assert per_of_three == pytest.approx(one, rel=1e-6)


def test_transformers_without_sam3_is_one_clear_error(sam3_dir, monkeypatch):
    monkeypatch.setattr(Sam3Detector, "model_class", "Sam3ModelOfAnotherRelease")
    with pytest.raises(ImportError, match=r"needs a transformers with Sam3ModelOfAnotherRelease.*pip install -U"):
        Sam3Detector(queries=["cat"], weights=sam3_dir)


def test_weights_errors_and_s3(sam3_dir, s3_bucket, s3_server, tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match=r"detector:sam3.*config\.json.*facebook/sam3.*SAM License"):
        resolve_folder(None, "sam3")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"missing: the weights .*the image processor's settings.*the tokenizer"):
        resolve_folder(str(partial), "sam3")
    from ovsam_ray import storage

    monkeypatch.setenv("OVSAM_RAY_CACHE", str(tmp_path / "cache"))
    for name in os.listdir(sam3_dir):
        with open(os.path.join(sam3_dir, name), "rb") as f:
            storage.atomic_write_bytes(f"s3://{s3_bucket}/detectors/sam3/{name}", f.read(), s3_endpoint=s3_server)
    det = DetectorStage(
        spec="sam3", weights=f"s3://{s3_bucket}/detectors", s3_endpoint=s3_server, device="cpu", queries=["cat"]
    ).detector
    ref = Sam3Detector(queries=["cat"], weights=sam3_dir)
    for (k, a), b in zip(det.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(a, b), k  # the published weights, not a random init


def test_cli_flags_map_onto_the_config(tmp_shards, shapes_vocab, tmp_path):
    import argparse

    from ovsam_ray.cli.label import add_label_args, label_config

    p = argparse.ArgumentParser()
    add_label_args(p)
    args = ["--input", os.path.dirname(tmp_shards[0]), "--output", str(tmp_path / "out"), "--preset", "ovsam_tiny"]
    args += ["--random-init", "--vocab", shapes_vocab, "--prompts", "detector:sam3+grid", "--detector-queries"]
    args += [shapes_vocab, "--detector-max-concepts", "50", "--detector-concept-batch", "4", "--keep-source-masks"]
    cfg = label_config(p.parse_args(args))
    assert (cfg.detector_max_concepts, cfg.detector_concept_batch, cfg.keep_source_masks) == (50, 4, True)
    assert cfg.sources.detector_name == "sam3" and cfg.sources.tiers


def _rows(out: str) -> list[dict]:
    return pds.dataset(out, format="parquet").to_table().to_pylist()


@pytest.mark.slow
def test_label_job_sam3_plus_grid_keeps_source_masks(ray_local, tmp_shards, shapes_vocab, sam3_dir, tmp_path):
    out = str(tmp_path / "sam3")
    s = run_label(
        LabelConfig(
            input=os.path.dirname(tmp_shards[0]),
            output=out,
            limit=1,
            model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
            prompts="detector:sam3+grid",
            detector_weights=sam3_dir,
            detector_score_threshold=0.0,
            detector_max_per_image=3,
            detector_concept_batch=2,
            keep_source_masks=True,
            select=SelectConfig(grid_size=3, grid_stability=0.0, grid_nms_iou=0.9),
        )
    )
    assert s.images_ok == 4 and s.images_error == 0
    from ovsam_ray.data.synthetic import shape_vocabulary_names
    from ovsam_ray.vocabulary import clean_class_name

    names = {clean_class_name(n) for n in shape_vocabulary_names()}
    for row in _rows(out):
        boxes = [i for i in row["instances"] if i["prompt_type"] == "box"]
        assert 1 <= len(boxes) <= 3
        for inst in boxes:  # the concept (the job's vocabulary), SAM 3's score and its own mask
            assert inst["detector_label"] in names and inst["detector_score"] is not None
            assert decode_rle(inst["detector_rle"]).shape == (row["height"], row["width"])
        assert all(i["detector_rle"] is None for i in row["instances"] if i["prompt_type"] == "grid")
