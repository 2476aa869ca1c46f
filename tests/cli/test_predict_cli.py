"""``ovsam-ray predict`` end to end, in-process through ``ovsam_ray.cli.main``: random init with
the built-in vocabulary, class-embedding files with and without ``--vocab``, a .txt vocabulary,
and weights from an ``export_released`` folder."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from ovsam_ray.cli import main
from ovsam_ray.data.rle import boxes_from_binary_masks
from ovsam_ray.model.classifier import OpenVocabClassifier
from ovsam_ray.model.predictor import ImagePrompts, OVSAMPredictor
from ovsam_ray.model.presets import build_ovsam, create_clip_model
from ovsam_ray.vocabulary import load_vocabulary
from ovsam_ray.weights.released import export_released

H, W = 60, 90
PROMPTS = {
    "boxes": [[5, 5, 40, 30], [50, 10, 80, 50]],
    "points": [[20, 20], [70, 40]],
    "point_boxes": [[10, 10, 30, 30], None],
}
N = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict_cli")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    image = np.stack([x * 2, y * 3, (x + y) % 256], axis=-1) + rng.integers(0, 30, (H, W, 3))
    image[10:30, 20:50] = (240, 220, 30)
    image = image.clip(0, 255).astype(np.uint8)
    Image.fromarray(image).save(root / "image.png")
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    (root / "animals.txt").write_text("cat\ndog, puppy\n# a comment\n\nbird\n")
    return {
        "root": root,
        "image": root / "image.png",
        "prompts": root / "prompts.json",
        "txt": root / "animals.txt",
        "array": image,
    }


def _embeddings_file(path: Path, num_classes: int, seed: int) -> Path:
    emb = F.normalize(torch.randn(num_classes, 2, 64, generator=torch.Generator().manual_seed(seed)), dim=-1)
    torch.save(emb, path)
    return path


def _predict(inputs, tmp_path: Path, *extra: str) -> tuple[int, dict, dict[str, np.ndarray]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out, npz = tmp_path / "out.json", tmp_path / "logits.npz"
    argv = [
        "predict",
        "--image",
        str(inputs["image"]),
        "--prompts",
        str(inputs["prompts"]),
        "--output",
        str(out),
        "--save-logits",
        str(npz),
        "--preset",
        "ovsam_tiny",
        "--text-cache",
        str(tmp_path / "text"),
        *extra,
    ]
    rc = main(argv)
    if rc != 0:
        return rc, {}, {}
    with np.load(npz) as logits:
        return rc, json.loads(out.read_text()), dict(logits)


def _check_output(result: dict, logits: dict[str, np.ndarray], class_names: list[str]) -> None:
    c1 = len(class_names) + 1
    assert (result["width"], result["height"]) == (W, H)
    assert logits["low_res_logits"].shape == (N, 1, 64, 64)
    for name in ("head_logits", "clip_logits", "fused_logits"):
        assert logits[name].shape == (N, c1), name
    assert logits["labels"].shape == (N,)
    instances = result["instances"]
    assert [i["prompt_type"] for i in instances] == ["box", "box", "point", "point"]
    assert [i["prompt_box"] for i in instances[:2]] == [[float(v) for v in b] for b in PROMPTS["boxes"]]
    assert [i["point"] for i in instances[2:]] == [[float(v) for v in p] for p in PROMPTS["points"]]
    for inst, label in zip(instances, logits["labels"]):
        rle = inst["rle"]
        with warnings.catch_warnings():  # pycocotools vs NumPy 2's __array__(copy=...) deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)
        assert mask.shape == (H, W) and rle["size"] == [H, W]
        assert inst["area"] == int(mask.sum())
        assert inst["bbox"] == boxes_from_binary_masks(mask[None])[0].tolist()
        assert inst["label"] == class_names[int(label)] == inst["topk_labels"][0]
        assert inst["label_score"] == pytest.approx(inst["topk_scores"][0])
        assert len(inst["topk_labels"]) == len(inst["topk_scores"]) == min(5, len(class_names))
        assert all(0 < s <= 1 for s in inst["topk_scores"])
        assert inst["topk_scores"] == sorted(inst["topk_scores"], reverse=True)
    assert np.isfinite(logits["fused_logits"]).all()


def test_random_init_with_the_default_vocabulary(inputs, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        rc, result, logits = _predict(inputs, tmp_path, "--random-init", "--with-embedding")
    assert rc == 0
    assert "RANDOM INIT" in caplog.text
    assert result["random_init"] is True and result["model"]["random_init"] is True
    vocab = load_vocabulary("coco_ov")
    assert result["vocabulary"]["name"] == "coco_ov" and result["vocabulary"]["num_classes"] == 80
    _check_output(result, logits, list(vocab.class_names))
    for inst, label in zip(result["instances"], logits["labels"]):
        assert inst["label_id"] == vocab.class_ids[int(label)]
        assert len(inst["embedding"]) == 64
    # COCO-OV's 15 classes outside both splits are forced to -1000 and never predicted.
    excluded = np.array(vocab.excluded + (False,))
    assert excluded.sum() == 15
    np.testing.assert_array_equal(logits["fused_logits"][:, excluded], -1000.0)
    assert not excluded[logits["labels"]].any()


def test_class_embeddings_without_vocab(inputs, tmp_path) -> None:
    emb = _embeddings_file(tmp_path / "emb.pt", 7, seed=1)
    rc, result, logits = _predict(inputs, tmp_path, "--random-init", "--class-embeddings", str(emb))
    assert rc == 0
    _check_output(result, logits, [f"class_{i}" for i in range(7)])
    assert result["vocabulary"]["num_classes"] == 7


def test_class_embeddings_with_coco_ov_vocab(inputs, tmp_path) -> None:
    emb = _embeddings_file(tmp_path / "emb80.pt", 80, seed=2)
    rc, result, logits = _predict(
        inputs, tmp_path, "--random-init", "--class-embeddings", str(emb), "--vocab", "coco_ov"
    )
    assert rc == 0
    vocab = load_vocabulary("coco_ov")
    _check_output(result, logits, list(vocab.class_names))
    np.testing.assert_array_equal(logits["fused_logits"][:, np.array(vocab.excluded + (False,))], -1000.0)
    # The random-init model is seeded: the same masks as without a vocabulary.
    rc, _, other = _predict(inputs, tmp_path / "again", "--random-init", "--class-embeddings", str(emb))
    assert rc == 0
    np.testing.assert_array_equal(other["low_res_logits"], logits["low_res_logits"])


def test_class_embeddings_must_match_the_vocab_size(inputs, tmp_path, caplog) -> None:
    emb = _embeddings_file(tmp_path / "emb7.pt", 7, seed=3)
    with caplog.at_level(logging.ERROR):
        rc, _, _ = _predict(inputs, tmp_path, "--random-init", "--class-embeddings", str(emb), "--vocab", "coco_ov")
    assert rc == 2
    assert "7 classes" in caplog.text and "80" in caplog.text


def test_txt_vocabulary(inputs, tmp_path) -> None:
    rc, result, logits = _predict(inputs, tmp_path, "--random-init", "--vocab", str(inputs["txt"]))
    assert rc == 0
    _check_output(result, logits, ["cat", "dog", "bird"])
    assert result["vocabulary"]["name"] == "animals" and result["vocabulary"]["num_classes"] == 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(11)
    clip = create_clip_model("ovsam_tiny")
    model = build_ovsam("ovsam_tiny", clip).eval()
    directory = tmp_path_factory.mktemp("exported")
    export_released(model, str(directory), "ovsam_tiny", train_vocab="shapes", meta={"step": 1}, clip_model=clip)
    return model, directory


def test_weights_dir_from_export_released(inputs, tmp_path, exported) -> None:
    model, directory = exported
    emb_path = _embeddings_file(tmp_path / "emb.pt", 5, seed=4)
    rc, result, logits = _predict(
        inputs, tmp_path, "--weights", str(directory), "--train-vocab", "shapes", "--class-embeddings", str(emb_path)
    )
    assert rc == 0
    assert result["random_init"] is False
    assert set(result["model"]["weights"]) == {"sam", "clip", "sam2clip", "clip2sam"}
    _check_output(result, logits, [f"class_{i}" for i in range(5)])
    # The exported weights are what ran: the same outputs as the in-memory model.
    classifier = OpenVocabClassifier(text_embeddings=torch.load(emb_path, weights_only=True))
    prompts = ImagePrompts(
        boxes=np.array(PROMPTS["boxes"], np.float32),
        points=np.array(PROMPTS["points"], np.float32),
        point_boxes=np.array([PROMPTS["point_boxes"][0], [np.nan] * 4], np.float32),
    )
    direct = OVSAMPredictor(model, classifier, fast=False)([inputs["array"]], [prompts])[0]
    np.testing.assert_allclose(logits["low_res_logits"], direct.low_res_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits["fused_logits"], direct.fused_logits, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(logits["labels"], direct.labels)


def test_weights_dir_with_the_wrong_train_vocab_fails_clearly(inputs, tmp_path, exported, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        rc, _, _ = _predict(inputs, tmp_path, "--weights", str(exported[1]), "--train-vocab", "coco")
    assert rc == 2
    assert "clip2sam_coco_tiny.pth" in caplog.text


def test_no_weights_and_no_random_init_fails_clearly(inputs, tmp_path, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        rc, _, _ = _predict(inputs, tmp_path)
    assert rc == 2
    assert "random_init" in caplog.text
    assert not (tmp_path / "out.json").exists()


def _grid_argv(inputs, out: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--image",
        str(inputs["image"]),
        "--output",
        str(out),
        "--preset",
        "ovsam_tiny",
        "--random-init",
        "--vocab",
        str(inputs["txt"]),
        *extra,
    ]


def test_grid_segments_everything_with_the_generator(inputs, tmp_path) -> None:
    from ovsam_ray.data.rle import decode_rle
    from ovsam_ray.inference import ModelConfig, build_predictor
    from ovsam_ray.model.amg import grid_points
    from ovsam_ray.model.automatic_mask_generator import OVSAMAutomaticMaskGenerator
    from ovsam_ray.predict import PredictConfig, run_predict

    out = tmp_path / "grid.json"
    assert main(_grid_argv(inputs, out, "--grid", "3")) == 0
    result = json.loads(out.read_text())
    assert (result["width"], result["height"]) == (W, H)
    # The generator's defaults (SAM's stability 0.95) keep no mask of random weights: an empty list.
    assert result["instances"] == []

    # With the stability filter off: the generator's masks and labels, as grid instances.
    model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab=str(inputs["txt"]))
    result = run_predict(
        PredictConfig(
            image=str(inputs["image"]),
            prompts=None,
            output=str(tmp_path / "g.json"),
            model=model,
            grid=3,
            grid_options={"stability_score_thresh": 0.0},
        )
    )
    predictor, vocab, _ = build_predictor(model)
    records = OVSAMAutomaticMaskGenerator(predictor, points_per_side=3, stability_score_thresh=0.0).generate(
        inputs["array"]
    )
    instances = result["instances"]
    assert len(instances) == len(records) > 0
    grid = grid_points(3, H, W).tolist()
    for inst, record in zip(instances, records):
        assert inst["prompt_type"] == "grid" and inst["point"] in grid
        assert [inst["point"]] == record["point_coords"]
        np.testing.assert_array_equal(decode_rle(inst["rle"]), record["segmentation"])
        assert inst["bbox"] == record["bbox"] and inst["area"] == record["area"]
        assert inst["label"] == vocab.class_names[record["label"]]
        assert inst["label_score"] == pytest.approx(record["score"])


def test_grid_or_prompts_one_of_them(inputs, tmp_path, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(_grid_argv(inputs, tmp_path / "none.json")) == 2
        assert main(_grid_argv(inputs, tmp_path / "both.json", "--grid", "2", "--prompts", str(inputs["prompts"]))) == 2
        assert main(_grid_argv(inputs, tmp_path / "zero.json", "--grid", "0")) == 2
    assert "--prompts FILE or --grid N" in caplog.text and "--grid 0" in caplog.text
    assert not list(tmp_path.glob("*.json"))


def test_overlay_draws_the_prediction_on_the_image(inputs, tmp_path, capsys) -> None:
    from ovsam_ray.show import render_overlay

    out, png = tmp_path / "out.json", tmp_path / "out.png"
    common = ["predict", "--image", str(inputs["image"]), "--prompts", str(inputs["prompts"]), "--output", str(out)]
    assert main([*common, "--preset", "ovsam_tiny", "--random-init", "--overlay", str(png)]) == 0
    assert f"overlay -> {png}" in capsys.readouterr().out
    drawn = np.asarray(Image.open(png).convert("RGB"))
    instances = json.loads(out.read_text())["instances"]
    assert drawn.shape == (H, W, 3) and len(instances) == N
    np.testing.assert_array_equal(drawn, np.asarray(render_overlay(inputs["array"], instances)))
    assert not np.array_equal(drawn, inputs["array"])  # something was drawn


def test_overlay_must_be_a_png_checked_before_the_model_runs(inputs, tmp_path, caplog) -> None:
    out = tmp_path / "out.json"
    common = ["predict", "--image", str(inputs["image"]), "--prompts", str(inputs["prompts"]), "--output", str(out)]
    assert main([*common, "--preset", "ovsam_tiny", "--random-init", "--overlay", str(tmp_path / "o.jpg")]) == 2
    assert "give a .png file name" in caplog.text and not out.exists()
