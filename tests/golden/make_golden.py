"""Golden outputs of a fixed-seed ``ovsam_tiny`` on a fixed synthetic image and prompts.

``tests/model/test_model_presets.py::test_ovsam_tiny_seed0_matches_golden`` recomputes
``golden_outputs()`` and compares it with the stored ``ovsam_tiny_seed0.npz``. The model is
``torch.manual_seed(0); build_ovsam("ovsam_tiny")`` (random init), the classifier a seeded
random (5, 2, 64) vocabulary; everything runs in float32 on the CPU and is compared in float64
with a tolerance of ~1e-4.

Regenerate (only after an intended change of the model's numerics, or when a new torch /
open_clip / segment_anything changes its parameter initialisation — the npz records the versions
it was made with) from the repository root:

    .venv/bin/python tests/golden/make_golden.py

and commit the new ``tests/golden/ovsam_tiny_seed0.npz`` together with the change that explains it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import torch

GOLDEN_PATH = Path(__file__).with_name("ovsam_tiny_seed0.npz")
LOW_RES_STRIDE = 8  # keep every 8th low-res logit: (N, 1, 8, 8) instead of (N, 1, 64, 64)
VERSIONED = ("torch", "open_clip_torch", "segment-anything", "timm")


def synthetic_image() -> np.ndarray:
    """A 180x240 RGB uint8 image without randomness: gradients, a bright box and a dark disc."""
    h, w = 180, 240
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    image = np.stack([x / w * 200 + 20, y / h * 180 + 40, (x + y) / (h + w) * 120 + 60], axis=-1)
    image[30:100, 40:120] = (230, 210, 40)
    image[((y - 120) ** 2 + (x - 180) ** 2) < 35**2] = (20, 30, 90)
    return np.rint(image).astype(np.uint8)


def synthetic_prompts():
    from ovsam_ray.model.predictor import ImagePrompts

    return ImagePrompts(
        boxes=np.array(
            [[40.0, 30.0, 120.0, 100.0], [140.0, 80.0, 225.0, 165.0], [10.0, 150.0, 10.0, 170.0]], np.float32
        ),
        points=np.array([[80.0, 60.0], [180.0, 120.0]], np.float32),
        point_boxes=np.array([[40.0, 30.0, 120.0, 100.0], [np.nan] * 4], np.float32),
    )


def class_embeddings() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(5, 2, 64, generator=g), dim=-1)


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def golden_outputs() -> dict[str, np.ndarray]:
    """Run the fixed-seed tiny model; float64 arrays (labels int64, clip_valid bool)."""
    from ovsam_ray.model.classifier import OpenVocabClassifier
    from ovsam_ray.model.predictor import OVSAMPredictor
    from ovsam_ray.model.presets import build_ovsam

    torch.manual_seed(0)
    model = build_ovsam("ovsam_tiny").eval()
    classifier = OpenVocabClassifier(
        text_embeddings=class_embeddings(),
        seen=torch.tensor([True, True, True, False, False]),
        excluded=torch.tensor([False, False, False, False, True]),
    )
    predictor = OVSAMPredictor(model, classifier, device="cpu", fast=False)
    embedded = predictor.embed([synthetic_image()])
    pred = predictor.predict(embedded, [synthetic_prompts()])[0]
    low = pred.low_res_logits.astype(np.float64)
    # The random model's masks are large, so its mask-derived RoI boxes look alike: also pin the
    # recognizer and the CLIP branch on fixed boxes, one per FPN level (tiny: finest scale 14).
    feats = embedded.features
    boxes = torch.tensor(
        [[8.0, 8.0, 18.0, 18.0], [20.0, 30.0, 50.0, 60.0], [10.0, 10.0, 70.0, 80.0], [0.0, 0.0, 256.0, 192.0]]
    )
    index = torch.zeros(len(boxes), dtype=torch.long)
    with torch.no_grad():
        region_fixed = model.recognizer.region_embeddings(feats.fpn_feats, boxes, index)
        clip_fixed = model.backbone.embed_regions(feats.clip_feats, boxes, index, torch.zeros(len(boxes), 1, 64, 64))
    return {
        "image_embeddings_sub": feats.image_embeddings[:, :, ::4, ::4].double().numpy(),
        "region_embeddings_fixed_boxes": region_fixed.double().numpy(),
        "clip_embeddings_fixed_boxes": clip_fixed.double().numpy(),
        "low_res_logits_sub": low[:, :, ::LOW_RES_STRIDE, ::LOW_RES_STRIDE],
        "low_res_logits_mean": low.mean(axis=(1, 2, 3)),
        "low_res_logits_abs_mean": np.abs(low).mean(axis=(1, 2, 3)),
        "region_embeddings": pred.region_embeddings.astype(np.float64),
        "clip_embeddings": pred.clip_embeddings.astype(np.float64),
        "head_logits": pred.head_logits.astype(np.float64),
        "clip_logits": pred.clip_logits.astype(np.float64),
        "fused_logits": pred.fused_logits.astype(np.float64),
        "labels": pred.labels.astype(np.int64),
        "clip_valid": pred.clip_valid.astype(bool),
        "mask_areas": pred.masks.reshape(len(pred.masks), -1).sum(axis=1).astype(np.int64),
    }


def main() -> None:
    outputs = golden_outputs()
    meta = np.array([f"{k}=={v}" for k, v in versions().items()])
    np.savez_compressed(GOLDEN_PATH, versions=meta, **outputs)
    print(f"wrote {GOLDEN_PATH} ({GOLDEN_PATH.stat().st_size} bytes): {', '.join(outputs)}")


if __name__ == "__main__":
    main()
