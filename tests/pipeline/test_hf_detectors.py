"""Open-vocabulary detectors (OWLv2, Grounding DINO from transformers) as prompt sources: the
stage's contract, the weights loader, ``A+B`` prompts, label jobs end to end. Tiny random models
built here from small configs (tests/helpers/hf_detector_fixture.py); nothing is downloaded."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pyarrow.dataset as pds
import pytest
import torch

pytest.importorskip("transformers")

from hf_detector_fixture import boxes_of, decoded_batch, noise, save_tiny_grounding_dino, save_tiny_owlv2  # noqa: E402

from ovsam_ray.data.rle import decode_rle  # noqa: E402
from ovsam_ray.inference import ModelConfig  # noqa: E402
from ovsam_ray.model.predictor import ImagePrediction  # noqa: E402
from ovsam_ray.pipeline import hf_detectors  # noqa: E402
from ovsam_ray.pipeline.detectors import DetectorStage  # noqa: E402
from ovsam_ray.pipeline.hf_detectors import GroundingDinoDetector, resolve_folder  # noqa: E402
from ovsam_ray.pipeline.label_job import LabelConfig, run_label  # noqa: E402
from ovsam_ray.pipeline.prompting import PromptSources, SelectConfig, image_prompt_set, select_predictions  # noqa: E402
from ovsam_ray.weights.files import WeightsError  # noqa: E402


@pytest.fixture(scope="session")
def owl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_owlv2(str(tmp_path_factory.mktemp("owlv2")))


@pytest.fixture(scope="session")
def gd_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # max_text_len 16: a handful of queries already needs several prompts
    return save_tiny_grounding_dino(str(tmp_path_factory.mktemp("gdino")), max_text_len=16)


def test_owlv2_stage_objectness_boxes_in_original_pixels(owl_dir):
    stage = DetectorStage(spec="owlv2", weights=owl_dir, device="cpu", objectness_threshold=0.5)
    model = stage.detector.model
    patches = model.box_bias.shape[0]

    def boxes(feats, feature_map):  # every patch: the top-left quarter of the padded square
        return torch.tensor([0.25, 0.25, 0.5, 0.5]).expand(len(feats), patches, 4).clone()

    def objectness(feats):  # one confident patch in images 0 and 1, nothing in image 2
        logits = torch.full((len(feats), patches), -5.0)
        logits[:2, 0] = 2.0
        return logits

    model.box_predictor, model.objectness_predictor = boxes, objectness
    # resized 40x80 (original 160x80), 100x30 (original size), an error row, 48x48 with nothing found
    batch = decoded_batch(
        [noise(40, 80), noise(100, 30), noise(8, 8), noise(48, 48)],
        [(160, 80), (30, 100), (8, 8), (48, 48)],
        ["ok", "ok", "error", "ok"],
    )
    out = stage(batch)
    # the square is max(H, W) wide: 80 -> [0, 0, 40, 40] in the resized image, x2 in the original;
    # 100 -> [0, 0, 50, 50], clipped to the 30-pixel width
    assert boxes_of(out, 0).tolist() == [[0, 0, 80, 80]]
    assert boxes_of(out, 1).tolist() == [[0, 0, 30, 50]]
    assert out.column("det_scores")[0].as_py() == pytest.approx([torch.sigmoid(torch.tensor(2.0)).item()])
    assert out.column("det_labels")[0].as_py() == [None]  # class-agnostic proposals
    assert boxes_of(out, 2).size == 0 and boxes_of(out, 3).size == 0
    assert out.column("status").to_pylist() == ["ok", "ok", "error", "ok"]


def test_owlv2_text_queries_label_and_objectness_cut(owl_dir):
    stage = DetectorStage(
        spec="owlv2",
        weights=owl_dir,
        device="cpu",
        queries=["cat", "traffic light"],
        objectness_threshold=0.5,
        score_threshold=0.3,
        max_per_image=10,
    )
    det = stage.detector
    assert det.query_embeds.shape[0] == 2 and det.score_threshold == 0.3
    patches = det.model.box_bias.shape[0]

    def objectness(feats):  # patches 0 and 1 pass the objectness cut, the rest do not
        logits = torch.full((len(feats), patches), -5.0)
        logits[:, :2] = 5.0
        return logits

    def classes(feats, query_embeds, query_mask):
        logits = torch.full((len(feats), patches, query_embeds.shape[1]), -5.0)
        logits[:, 0, 1] = 3.0  # patch 0: traffic light
        logits[:, 1, 0] = 1.0  # patch 1: cat
        logits[:, 2, 0] = 9.0  # patch 2: a confident cat, but no object by the objectness head
        return logits, None

    det.model.objectness_predictor, det.model.class_predictor = objectness, classes
    out = stage(decoded_batch([noise(32, 64), noise(64, 32)], [(64, 32), (32, 64)], ["ok", "ok"]))
    for i, (w, h) in enumerate([(64, 32), (32, 64)]):
        labels = out.column("det_labels")[i].as_py()
        scores = out.column("det_scores")[i].as_py()
        assert sorted(labels) == ["cat", "traffic light"] or labels == ["traffic light"]  # NMS may merge them
        assert labels[0] == "traffic light" and scores[0] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
        b = boxes_of(out, i)
        assert (b >= 0).all() and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all()


def test_grounding_dino_chunks_merge_and_original_pixels(gd_dir):
    queries = ["cat", "dog", "traffic light", "person", "hair drier", "zebra", "kite", "..."]
    stage = DetectorStage(
        spec="grounding-dino", weights=gd_dir, device="cpu", queries=queries, score_threshold=0.5, max_per_image=10
    )
    det = stage.detector
    assert len(det.chunks) >= 2 and all(len(ids) <= 16 for ids, _ in det.chunks)
    # every query once, but "..." (no tokens once '.', the prompt's separator, is taken out)
    assert sorted(qi for _, spans in det.chunks for qi, _, _ in spans) == list(range(len(queries) - 1))
    tok = det.tokenizer
    for ids, spans in det.chunks:  # each span is its query's tokens
        for qi, s, e in spans:
            assert tok.decode(ids[s:e].tolist()).replace(" ", "") == queries[qi].replace(" ", "")
    seen_masks = []
    last = {qi: (ids, s) for ids, spans in det.chunks for qi, s, _ in spans}

    def forward(*, pixel_values, pixel_mask, input_ids, **kwargs):
        seen_masks.append(pixel_mask.clone())
        b = len(pixel_values)
        logits = torch.full((b, 3, 16), -10.0)
        boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]).expand(b, 3, 4)
        for qi, pos in ((5, 0), (1, 1)):  # box 0: zebra, box 1: dog (the query's first token in its prompt)
            ids, s = last[qi]
            if torch.equal(input_ids[0], ids):
                logits[:, pos, s] = 4.0
        return SimpleNamespace(logits=logits, pred_boxes=boxes.clone())

    det.model = forward
    out = stage(decoded_batch([noise(40, 80), noise(60, 30)], [(160, 80), (30, 60)], ["ok", "ok"]))
    assert len(seen_masks) == len(det.chunks)
    mask = seen_masks[0]  # padded to the batch's largest size; the pixel mask marks the real pixels
    assert mask.shape[0] == 2 and mask[0].sum() < mask[0].numel() and mask[1].sum() < mask[1].numel()
    for i, (w, h) in enumerate([(160, 80), (30, 60)]):
        labels = out.column("det_labels")[i].as_py()
        assert sorted(labels) == ["dog", "zebra"]  # from two different prompts, merged
        got = dict(zip(labels, boxes_of(out, i).tolist()))
        assert got["zebra"] == pytest.approx([w / 4, h / 4, 3 * w / 4, 3 * h / 4], abs=1e-3)
        assert got["dog"] == pytest.approx([0, 0, w / 2, h / 2], abs=1e-3)


def test_real_forwards_on_mixed_sizes(owl_dir, gd_dir):
    """Unpatched tiny models: one batch of mixed sizes, every box inside its original image."""
    batch = decoded_batch(
        [noise(40, 80), noise(64, 24), noise(30, 30)], [(80, 40), (48, 128), (30, 30)], ["ok", "ok", "ok"]
    )
    for spec, kwargs in (("owlv2", {"objectness_threshold": 0.0}), ("grounding-dino", {"queries": ["cat", "dog"]})):
        out = DetectorStage(
            spec=spec,
            weights=gd_dir if spec == "grounding-dino" else owl_dir,
            device="cpu",
            score_threshold=0.0,
            max_per_image=5,
            **kwargs,
        )(batch)
        for i, (w, h) in enumerate([(80, 40), (48, 128), (30, 30)]):
            b = boxes_of(out, i)
            assert 1 <= len(b) <= 5 and len(out.column("det_scores")[i].as_py()) == len(b)
            assert (b >= 0).all() and (b[:, [0, 2]] <= w + 1e-3).all() and (b[:, [1, 3]] <= h + 1e-3).all()
            if spec == "grounding-dino":
                assert set(out.column("det_labels")[i].as_py()) <= {"cat", "dog"}


def test_weights_folder_errors_and_layouts(owl_dir, tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match=r"config\.json.*IDEA-Research/grounding-dino-tiny"):
        resolve_folder(None, "grounding-dino")
    with pytest.raises(WeightsError, match=r"model\.safetensors.*google/owlv2-base-patch16-ensemble"):
        resolve_folder(str(tmp_path), "owlv2")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"missing: the weights .*the image processor's settings"):
        resolve_folder(str(partial), "owlv2")
    nested = tmp_path / "models"
    nested.mkdir()
    os.symlink(owl_dir, nested / "owlv2")  # DIR/owlv2/ is found from DIR
    assert resolve_folder(str(nested), "owlv2") == str(nested / "owlv2")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in os.listdir(owl_dir):
        if name != "model.safetensors":
            os.symlink(os.path.join(owl_dir, name), no_weights / name)
    with pytest.raises(WeightsError, match=r"missing: the weights \(model\.safetensors"):
        resolve_folder(str(no_weights), "owlv2")
    random = DetectorStage(spec="owlv2", weights=str(no_weights), random_init=True, device="cpu").detector
    assert random.model.config.vision_config.image_size == 64  # config and tokenizer suffice for a random init
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(owl_dir):
        (broken / name).write_bytes(
            b"not this" if name == "model.safetensors" else open(os.path.join(owl_dir, name), "rb").read()
        )
    with pytest.raises(WeightsError, match="cannot load detector:owlv2"):
        DetectorStage(spec="owlv2", weights=str(broken), device="cpu")
    monkeypatch.setattr(hf_detectors.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"ovsam_ray\[detectors\]"):
        hf_detectors.check_available("owlv2")


def test_weights_from_s3_prefix(owl_dir, s3_bucket, s3_server, tmp_path, monkeypatch):
    from ovsam_ray import storage

    monkeypatch.setenv("OVSAM_RAY_CACHE", str(tmp_path / "cache"))
    for name in os.listdir(owl_dir):
        with open(os.path.join(owl_dir, name), "rb") as f:
            storage.atomic_write_bytes(f"s3://{s3_bucket}/detectors/owlv2/{name}", f.read(), s3_endpoint=s3_server)
    folder = resolve_folder(f"s3://{s3_bucket}/detectors", "owlv2", s3_endpoint=s3_server)
    assert sorted(os.listdir(folder)) == sorted(os.listdir(owl_dir))
    assert resolve_folder(f"s3://{s3_bucket}/detectors", "owlv2", s3_endpoint=s3_server) == folder  # cached once
    det = DetectorStage(
        spec="owlv2", weights=f"s3://{s3_bucket}/detectors", s3_endpoint=s3_server, device="cpu"
    ).detector
    ref = DetectorStage(spec="owlv2", weights=owl_dir, device="cpu").detector
    for (k, a), b in zip(det.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(a, b), k  # the published weights, not a random init


def test_options_checked_before_the_job(tmp_shards, shapes_vocab, gd_dir, tmp_path):
    src, model = os.path.dirname(tmp_shards[0]), ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab)
    with pytest.raises(ValueError, match="query list"):
        LabelConfig(
            input=src,
            output=str(tmp_path / "a"),
            model=model,
            prompts="detector:fcos_resnet50_fpn",
            detector_queries="coco_ov",
        )
    with pytest.raises(ValueError, match="objectness"):
        LabelConfig(
            input=src,
            output=str(tmp_path / "b"),
            model=model,
            prompts="detector:grounding-dino",
            detector_objectness_threshold=0.2,
        )
    with pytest.raises(ValueError, match="needs a query list"):
        GroundingDinoDetector(queries=[], weights=gd_dir)


def test_cli_flags_map_onto_the_config(tmp_shards, shapes_vocab, tmp_path):
    import argparse

    from ovsam_ray.cli.label import add_label_args, label_config

    p = argparse.ArgumentParser()
    add_label_args(p)
    cfg = label_config(
        p.parse_args(
            [
                "--input",
                os.path.dirname(tmp_shards[0]),
                "--output",
                str(tmp_path / "out"),
                "--preset",
                "ovsam_tiny",
                "--random-init",
                "--vocab",
                shapes_vocab,
                "--prompts",
                "shard|detector:owlv2+grid",
                "--detector-queries",
                "coco_ov",
                "--detector-objectness-threshold",
                "0.2",
                "--source-dedup-iou",
                "0.6",
            ]
        )
    )
    assert (cfg.detector_queries, cfg.detector_objectness_threshold) == ("coco_ov", 0.2)
    assert cfg.select.source_dedup_iou == 0.6 and cfg.sources.detector_name == "owlv2"


# -- A+B prompts: union, deduplicated across sources ------------------------------------------------


def test_plus_prompts_parse():
    s = PromptSources.parse("detector:owlv2+grid")
    assert (s.shard, s.detector, s.grid) == (False, "owlv2", True)
    assert s.tiers == (frozenset({"detector"}), frozenset({"grid"}))
    s = PromptSources.parse("shard,detector:owlv2+grid")
    assert s.tiers == (frozenset({"shard", "detector"}), frozenset({"grid"}))
    s = PromptSources.parse("shard|detector:grounding-dino+grid")
    assert s.tiers == () and s.fallback.tiers and s.detector_name == "grounding-dino"
    for bad in ("grid+grid", "detector:owlv2+", "shard,grid+grid"):
        with pytest.raises(ValueError, match=r"\+"):
            PromptSources.parse(bad)


def _pred(low: np.ndarray, scores: list[float]) -> ImagePrediction:
    n = len(low)
    z = np.zeros((n, 3), np.float32)
    labels = np.zeros(n, np.int64)
    return ImagePrediction(
        masks=low > 0,
        mask_boxes=np.zeros((n, 4), np.float32),
        low_res_logits=low[:, None],
        head_logits=z,
        clip_logits=z,
        fused_logits=z,
        labels=labels,
        scores=np.asarray(scores, np.float32),
        head_labels=labels,
        topk_ids=labels[:, None],
        topk_scores=np.asarray(scores, np.float32)[:, None],
        region_embeddings=z,
        clip_embeddings=z,
        clip_valid=np.ones(n, bool),
        is_point=np.zeros(n, bool),
    )


def test_plus_prompts_dedup_across_sources_keeps_the_earlier_source():
    spec = {
        "boxes": [],
        "detector": {"boxes": [[0, 0, 4, 4], [0, 0, 4, 5]], "scores": [0.5, 0.4], "labels": ["a", "b"]},
    }
    ps = image_prompt_set(spec, PromptSources.parse("detector:x+grid"), width=8, height=8, grid_size=2)
    assert ps.types == ["box", "box", "grid", "grid", "grid", "grid"] and ps.tiers == [0, 0, 1, 1, 1, 1]
    low = np.full((6, 8, 8), -10.0, np.float32)
    low[0, :4, :4] = 10  # detector box a
    low[1, :5, :4] = 10  # detector box b, overlapping a: same source, not deduplicated here
    low[2, :4, :4] = 10  # grid: a again (higher predicted score: still the detector's mask wins)
    low[3, 4:, 4:] = 10  # grid: something the detector missed
    low[4, :4, :5] = 10  # grid: nearly a (IoU 0.8)
    low[5, 4:, :3] = 10  # grid: another new object
    pred = _pred(low, [0.5, 0.5, 0.99, 0.9, 0.95, 0.9])
    cfg = SelectConfig(grid_stability=0.0, grid_nms_iou=0.99)
    assert select_predictions(pred, ps.types, cfg, tiers=ps.tiers).tolist() == [0, 1, 3, 5]
    assert select_predictions(
        pred, ps.types, SelectConfig(grid_stability=0.0, grid_nms_iou=0.99, source_dedup_iou=0.9), tiers=ps.tiers
    ).tolist() == [0, 1, 3, 4, 5]
    union = image_prompt_set(spec, PromptSources.parse("detector:x,grid"), width=8, height=8, grid_size=2)
    assert union.tiers == [] and select_predictions(pred, union.types, cfg, tiers=union.tiers).tolist() == list(
        range(6)
    )
    # shard boxes where the image has some, else the detector + grid
    fallback = PromptSources.parse("shard|detector:x+grid")
    with_boxes = image_prompt_set({**spec, "boxes": [[1, 1, 3, 3]]}, fallback, width=8, height=8, grid_size=2)
    assert with_boxes.types == ["box"] and with_boxes.tiers == []
    without = image_prompt_set(spec, fallback, width=8, height=8, grid_size=2)
    assert without.tiers == [0, 0, 1, 1, 1, 1] and without.detector_labels == ["a", "b"]


# -- label jobs end to end -----------------------------------------------------------------------------


def _rows(out: str) -> list[dict]:
    return pds.dataset(out, format="parquet").to_table().to_pylist()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 0.0 if union == 0 else np.logical_and(a, b).sum() / union


def test_label_job_owlv2_plus_grid(ray_local, tmp_shards, shapes_vocab, owl_dir, tmp_path):
    out = str(tmp_path / "owl")
    s = run_label(
        LabelConfig(
            input=os.path.dirname(tmp_shards[0]),
            output=out,
            limit=1,
            model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
            prompts="detector:owlv2+grid",
            detector_weights=owl_dir,
            detector_objectness_threshold=0.0,
            detector_max_per_image=3,
            select=SelectConfig(grid_size=3, grid_stability=0.0, grid_nms_iou=0.9, source_dedup_iou=0.5),
        )
    )
    assert s.images_ok == 4 and s.images_error == 0
    for row in _rows(out):
        insts = row["instances"]
        boxes = [i for i in insts if i["prompt_type"] == "box"]
        grid = [i for i in insts if i["prompt_type"] == "grid"]
        assert 1 <= len(boxes) <= 3 and all(i["detector_score"] is not None for i in boxes)
        for g in grid:  # no grid mask repeats a detector mask (dedup ran on low-res masks: a margin)
            assert all(_iou(decode_rle(g["rle"]), decode_rle(b["rle"])) <= 0.6 for b in boxes)
    record = json.loads(open(os.path.join(out, "_run.json")).read())
    assert record["identity"]["select"]["source_dedup_iou"] == 0.5
    assert record["identity"]["detector"]["objectness_threshold"] == 0.0


def test_label_job_shard_boxes_else_grounding_dino(ray_local, shapes_vocab, gd_dir, tmp_path):
    from ovsam_ray.data.synthetic import generate_shards, shape_vocabulary_names
    from ovsam_ray.vocabulary import clean_class_name

    src = str(tmp_path / "shards")
    generate_shards(src, num_images=6, images_per_shard=6, seed=3, image_size=(64, 48), min_objects=0, max_objects=1)
    out = str(tmp_path / "gd")
    s = run_label(
        LabelConfig(
            input=src,
            output=out,
            model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
            prompts="shard|detector:grounding-dino",
            detector_weights=gd_dir,
            detector_score_threshold=0.0,
            detector_max_per_image=2,
        )
    )
    assert s.images_ok == 6 and s.images_error == 0
    names = {clean_class_name(n) for n in shape_vocabulary_names()}
    kinds = set()
    for row in _rows(out):
        scores = {i["detector_score"] is None for i in row["instances"]}
        assert len(scores) == 1  # all from the shard, or all from the detector
        kinds |= scores
        if scores == {False}:  # the job's vocabulary is the default query list
            assert {i["detector_label"] for i in row["instances"]} <= names
    assert kinds == {True, False}  # the seed gives images with and without shard boxes


def test_random_init_detectors_are_the_same_in_every_run(owl_dir):
    """--random-init builds the detector from a fixed seed: two actors (or two runs) find the same
    boxes whatever torch's global random state, and that state is left as it was."""
    images = [noise(48, 64, seed=1)]
    batch = decoded_batch(images, [(64, 48)], ["ok"])
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        stage = DetectorStage(spec="owlv2", weights=owl_dir, random_init=True, score_threshold=0.0)
        after = torch.rand(1)
        torch.manual_seed(seed)
        assert torch.equal(after, torch.rand(1))  # the caller's random stream is untouched
        outs.append(stage(batch))
    assert outs[0].column("det_boxes").to_pylist() == outs[1].column("det_boxes").to_pylist()
    assert outs[0].column("det_scores").to_pylist() == outs[1].column("det_scores").to_pylist()
    assert len(outs[0].column("det_scores")[0]) > 0


@pytest.mark.slow
def test_two_label_runs_with_a_random_init_detector_write_the_same_table(
    ray_local, tmp_shards, shapes_vocab, owl_dir, tmp_path
):
    src = os.path.dirname(tmp_shards[0])
    tables = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        run_label(
            LabelConfig(
                input=src,
                output=out,
                limit=1,
                model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
                prompts="detector:owlv2",
                detector_weights=owl_dir,
                detector_objectness_threshold=0.0,
                detector_max_per_image=5,
            )
        )
        tables.append(
            pds.dataset(out, format="parquet").to_table().sort_by([("shard", "ascending"), ("key", "ascending")])
        )
    assert tables[0].num_rows == 4 and sum(len(r["instances"]) for r in tables[0].to_pylist()) > 0
    assert tables[0].equals(tables[1])
    assert {i["source"] for r in tables[0].to_pylist() for i in r["instances"]} == {"detector:owlv2"}
