"""The GPU fast path run on a CPU: bf16 autocast, channels_last and on-device RLE through the
predictor, the automatic mask generator, the label job's model stage and co-training's step.
A CUDA run takes the same branches (``torch.autocast(device.type, ...)``), so these are its CI.

Random weights put many mask logits near the threshold and many label scores near a tie, so
the comparisons with fp32 are where fp32 is decided: labels where its top-1 margin is not tiny,
mask pixels where its logit is not within the logits' tolerance of the threshold
(``bench/benchlib.fast_vs_fp32``, the rule the GPU run applies too)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.benchlib import _masks, fast_vs_fp32
from ovsam_ray.model.automatic_mask_generator import OVSAMAutomaticMaskGenerator
from ovsam_ray.model.classifier import OpenVocabClassifier
from ovsam_ray.model.functional import resized_shape
from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts, OVSAMPredictor
from ovsam_ray.model.presets import build_ovsam


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)]


PROMPTS = [
    ImagePrompts(
        boxes=np.array([[10, 20, 100, 100], [50, 50, 150, 110], [0, 0, 160, 120]], np.float32),
        points=np.array([[60, 60], [120, 30]], np.float32),
    ),
    ImagePrompts(boxes=np.array([[5, 5, 60, 80]], np.float32), points=np.array([[30, 40]], np.float32)),
]


def _predictor(fast: bool, rle_on_device: bool) -> OVSAMPredictor:
    torch.manual_seed(0)
    model = build_ovsam("ovsam_tiny").eval()
    text = F.normalize(torch.randn(12, 2, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    return OVSAMPredictor(
        copy.deepcopy(model),
        OpenVocabClassifier(text_embeddings=text),
        device="cpu",
        fast=fast,
        rle_on_device=rle_on_device,
    )


@pytest.fixture(scope="module")
def ref() -> list[ImagePrediction]:
    return _predictor(False, False)(_images(), PROMPTS)


def _assert_close_to_fp32(ref: list[ImagePrediction], fast: list[ImagePrediction], size: int) -> None:
    inputs = [resized_shape(*im.shape[:2], size) for im in _images()]
    agree = fast_vs_fp32(ref, fast, inputs, size)
    assert agree["ok"], agree
    assert agree["decoded"] == sum(len(p) for p in PROMPTS) and agree["near_threshold_fraction"] < 0.75, agree
    for f in fast:
        assert len(f.rles) == len(f.labels)
        assert f.areas.tolist() == [int(m.sum()) for m in _masks(f)]


def test_fast_path_on_cpu_runs_bf16_and_matches_fp32(ref):
    pred = _predictor(True, True)
    seen = []
    pred.model.decoder.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    convs = [p for p in pred.model.backbone.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    fast = pred(_images(), PROMPTS)
    assert seen and all(d == torch.bfloat16 for d in seen), f"the decoder ran in {seen}, not under bf16 autocast"
    _assert_close_to_fp32(ref, fast, pred.model.image_size)
    for f in fast:
        assert f.masks is None and all(a.dtype == np.float32 for a in (f.fused_logits, f.region_embeddings))


def test_predictor_inside_a_callers_autocast(ref):
    """The crash chain: prompt tokens index-assigned bf16 into fp32, then bf16 tensors to numpy."""
    pred = _predictor(False, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = pred(_images(), PROMPTS)
    _assert_close_to_fp32(ref, fast, pred.model.image_size)


def test_automatic_mask_generator_on_the_fast_path():
    pred = _predictor(True, True)
    records = OVSAMAutomaticMaskGenerator(
        pred, points_per_side=4, stability_score_thresh=0.0, mask_nms_thresh=1.0
    ).generate(_images()[0])
    assert records and all(r["segmentation"].shape == (120, 160) for r in records)
    assert all(r["area"] == int(r["segmentation"].sum()) for r in records)


def test_runtime_precision():
    from ovsam_ray.training.loop import Runtime

    assert not isinstance(Runtime().autocast(), torch.autocast), "fp32 on a CPU unless asked"
    assert isinstance(Runtime(precision="bf16").autocast(), torch.autocast)
    with pytest.raises(ValueError, match="precision"):
        Runtime(precision="fp16")


def test_cotraining_step_under_cpu_bf16(tmp_path):
    import json

    from ovsam_ray.data.synthetic import generate_shards
    from ovsam_ray.training import loop
    from ovsam_ray.training.batching import unpack_sample
    from ovsam_ray.training.config import CotrainConfig, DatasetSpec, ModelSpec, RunSpec
    from ovsam_ray.training.cotrain import cotrain_setup, sample_builder
    from ovsam_ray.training.stream import iter_local_rows

    shards = generate_shards(str(tmp_path / "seg"), num_images=2, images_per_shard=2, seed=1, image_size=(64, 48))
    (tmp_path / "c.json").write_text(json.dumps(["circle", "square", "triangle"]))
    cfg = CotrainConfig(
        run=RunSpec(storage_path=str(tmp_path / "runs"), name="k"),
        datasets=[DatasetSpec(shards=str(tmp_path / "seg"), vocab=str(tmp_path / "c.json"))],
        model=ModelSpec(preset="ovsam_tiny", random_init=True),
        num_prompts=6,
        num_points=64,
        min_mask_area=1,
    )
    items = [{"item": 0, "dataset": 0, "shard": s} for s in shards]
    samples = [unpack_sample(r["sample"]) for r in iter_local_rows(items, sample_builder(cfg))]
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        runtime = loop.Runtime(precision=precision)
        net = cotrain_setup(cfg, runtime).net
        task = loop.CotrainTask(net=net, cfg=cfg, device=runtime.device)
        with runtime.autocast():
            terms, _ = task.losses(samples, 0, 0)
        loss = sum(terms.values())
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
        losses[precision] = {k: float(v.detach()) for k, v in terms.items()}
    for k, v in losses["fp32"].items():
        assert losses["bf16"][k] == pytest.approx(v, rel=0.05, abs=0.05), k


@pytest.mark.slow
def test_label_model_stage_on_the_fast_path_has_no_error_rows(tmp_path):
    import pyarrow as pa

    from ovsam_ray.data.synthetic import generate_shards
    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.pipeline.predict_stage import PredictStage
    from ovsam_ray.pipeline.stages import encode_url, read_and_decode
    from ovsam_ray.pipeline.text_embeddings import text_task

    shards = generate_shards(str(tmp_path), num_images=3, images_per_shard=3, seed=2, image_size=(96, 64))
    urls = pa.table({"url": [encode_url(s) for s in shards]})
    cfg = ModelConfig(preset="ovsam_tiny", random_init=True, vocab="coco_ov")
    decoded = pa.concat_tables(read_and_decode(urls, image_size=256))
    text = text_task(cfg, "cpu")[0]
    out = {}
    for fast in (False, True):
        stage = PredictStage(model_config=vars(cfg), text=text, device="cpu", fast=fast)
        out[fast] = stage(decoded).to_pylist()
    assert [r["status"] for r in out[True]] == ["ok"] * 3
    for r, f in zip(out[False], out[True]):
        assert len(f["instances"]) == len(r["instances"]) == r["num_prompts"] > 0


def test_resize_on_the_model_device_gives_the_cpu_resize_inputs_and_labels(tmp_path):
    """The decode task ships the decoded image and the model's device resizes it (the same float
    antialiased function): identical model inputs and labels to resizing in the decode task, in
    batches that mix both; images above the size cap are still resized in the task."""
    import pyarrow as pa

    from ovsam_ray.data.synthetic import generate_shards
    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.pipeline.predict_stage import PredictStage
    from ovsam_ray.pipeline.stages import DEVICE_RESIZE_MAX_FACTOR, encode_url, image_of, read_and_decode
    from ovsam_ray.pipeline.text_embeddings import text_task

    sizes = ((120, 90), (200, 160))  # (W, H) from, to
    shards = generate_shards(str(tmp_path), num_images=4, images_per_shard=4, seed=3, image_size=sizes)
    urls = pa.table({"url": [encode_url(s) for s in shards]})
    on_cpu = pa.concat_tables(read_and_decode(urls, image_size=256, resize_on_cpu=True))
    shipped = pa.concat_tables(read_and_decode(urls, image_size=256))
    assert (shipped["in_h"].to_pylist(), shipped["in_w"].to_pylist()) == (
        shipped["height"].to_pylist(),
        shipped["width"].to_pylist(),
    ), "shipped as decoded"
    assert on_cpu["in_h"].to_pylist() != on_cpu["height"].to_pylist()
    capped = pa.concat_tables(read_and_decode(urls, image_size=48))  # >= 120x90 > 4 x 48 x 48 pixels
    assert DEVICE_RESIZE_MAX_FACTOR * 48**2 < 120 * 90
    assert all(max(h, w) == 48 for h, w in zip(capped["in_h"].to_pylist(), capped["in_w"].to_pylist()))

    cfg = ModelConfig(preset="ovsam_tiny", random_init=True, vocab="coco_ov")
    stage = PredictStage(model_config=vars(cfg), text=text_task(cfg, "cpu")[0], device="cpu")
    hw = [(on_cpu["height"][i].as_py(), on_cpu["width"][i].as_py()) for i in range(4)]
    a = stage.predictor.embed([image_of(on_cpu, i) for i in range(4)], original_sizes=hw)
    mixed = [image_of(shipped, 0), image_of(on_cpu, 1), image_of(shipped, 2), image_of(shipped, 3)]
    b = stage.predictor.embed(mixed, original_sizes=hw)
    assert a.input_sizes == b.input_sizes and a.original_sizes == b.original_sizes
    assert torch.equal(a.features.image_embeddings, b.features.image_embeddings)
    old, new = stage(on_cpu).to_pylist(), stage(shipped).to_pylist()
    assert [r["status"] for r in new] == ["ok"] * 4
    assert [[i["label_id"] for i in r["instances"]] for r in new] == [
        [i["label_id"] for i in r["instances"]] for r in old
    ]
    assert [r["instances"] for r in new] == [r["instances"] for r in old]
    with pytest.raises(ValueError, match="neither its original size"):
        stage.predictor.embed([image_of(shipped, 0)[:50]], original_sizes=hw[:1])


@pytest.mark.slow
def test_fast_path_rule_at_a_full_size_preset():
    """``tests/test_gpu.py``'s check at ``ovsam_rn50_small`` (1024 input), on the CPU: a random
    full-size decoder's logits reach ~0.2, bf16 moves them ~0.004 against a tolerance of 0.02
    (~20 s on 2 cores)."""
    torch.manual_seed(0)
    model = build_ovsam("ovsam_rn50_small").eval()
    text = F.normalize(torch.randn(20, 3, model.embed_dim), dim=-1)
    images = [np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)]
    prompts = [
        ImagePrompts(
            boxes=np.array([[10, 20, 300, 400], [100, 100, 200, 220]], np.float32),
            points=np.array([[320, 240]], np.float32),
        )
    ]
    classifier = OpenVocabClassifier(text_embeddings=text)
    ref = OVSAMPredictor(copy.deepcopy(model), classifier, device="cpu", fast=False, rle_on_device=False)
    fast = OVSAMPredictor(model, classifier, device="cpu", fast=True, rle_on_device=True)
    agree = fast_vs_fp32(ref(images, prompts), fast(images, prompts), [resized_shape(480, 640, 1024)], 1024)
    assert agree["ok"] and agree["decoded"] == 3, agree
