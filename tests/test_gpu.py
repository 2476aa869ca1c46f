"""GPU-path checks (skipped without CUDA): bf16 autocast + channels_last agree with fp32; the
fused AdamW kernel on CUDA; the label job's text embeddings computed on the GPU (TF32) agree with
the CPU's strict fp32 ones. ``bench/gpu_run.py`` runs these with ``pytest -m gpu``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.benchlib import fast_vs_fp32
from ovsam_ray.model.classifier import OpenVocabClassifier
from ovsam_ray.model.functional import resized_shape
from ovsam_ray.model.predictor import ImagePrompts, OVSAMPredictor
from ovsam_ray.model.presets import build_ovsam

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_fast_path_matches_fp32_labels_and_masks():
    """What random weights can show (``bench/benchlib.fast_vs_fp32``): logits within tolerance,
    masks equal away from the threshold, labels equal where fp32 is decided; IoU only reported."""
    torch.manual_seed(0)
    model = build_ovsam("ovsam_rn50_small")
    text = torch.nn.functional.normalize(torch.randn(20, 3, model.embed_dim), dim=-1)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(2)]
    prompts = [
        ImagePrompts(
            boxes=np.array([[10, 20, 300, 400], [100, 100, 200, 220]], np.float32),
            points=np.array([[320, 240]], np.float32),
        )
    ] * 2
    classifier = OpenVocabClassifier(text_embeddings=text)
    ref = OVSAMPredictor(model, classifier, device="cuda", fast=False, rle_on_device=False)(images, prompts)
    fast = OVSAMPredictor(model, classifier, device="cuda", fast=True, rle_on_device=True)(images, prompts)
    size = model.image_size
    agree = fast_vs_fp32(ref, fast, [resized_shape(480, 640, size)] * 2, size)
    assert agree["ok"], agree


def test_fused_adamw_on_cuda_matches_the_loop_kernel():
    from ovsam_ray.training.optim import adamw

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
    ref.load_state_dict(net.state_dict())
    fused = adamw(list(net.parameters()), lr=1e-2, weight_decay=0.05)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05, foreach=False, fused=False)
    x = torch.randn(32, 64, device="cuda")
    for _ in range(5):
        for model, opt in ((net, fused), (ref, loop)):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_label_job_text_embeddings_on_cuda_match_cpu():
    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.pipeline.text_embeddings import text_task as _text_task

    cfg = ModelConfig(preset="ovsam_rn50_small", random_init=True, vocab="coco_ov")
    gpu_text, vocab, _, info = _text_task(cfg, "cuda")
    cpu_text, _, _, cpu_info = _text_task(cfg, "cpu")
    assert info["device"] == "cuda" and cpu_info["device"] == "cpu" and info["num_classes"] == vocab.num_classes
    assert torch.get_float32_matmul_precision() == "highest"  # TF32 only inside the task
    gpu, cpu = gpu_text["embeddings"], cpu_text["embeddings"]
    assert gpu.device.type == "cpu" and gpu.shape == cpu.shape
    cos = torch.nn.functional.cosine_similarity(gpu, cpu, dim=-1)
    assert cos.min() > 0.9999, cos.min()
