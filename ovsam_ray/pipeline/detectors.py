"""Detector prompts: an actor pool between decode and OV-SAM (``--prompts detector:NAME``).

Built in: torchvision detection models by name (``fasterrcnn_resnet50_fpn_v2``,
``retinanet_resnet50_fpn_v2``, ``fcos_resnet50_fpn``, ...), weights from the weights location
(``<name>.pth`` or torchvision's own file name, e.g. ``fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth``)
or random init. Boxes become class-agnostic prompts after a score threshold, NMS and a per-image
cap; each keeps its detector label and score.

Open-vocabulary: ``detector:owlv2`` and ``detector:grounding-dino`` (Hugging Face ``transformers``,
see ``pipeline/hf_detectors.py``): weights a ``save_pretrained`` folder, optionally a query list.

User detectors: ``detector:my_pkg.module:MyDetector`` — a class whose constructor takes keyword
arguments (``device``, ``weights``, ``random_init``) and whose instances are called with a list of
(H, W, 3) uint8 RGB images and return, per image, ``{"boxes": (N, 4) XYXY float in that image's
pixels, "scores": (N,), "labels": N strings or None}``. The stage passes the decoded images as
resized for OV-SAM and maps the boxes back to original-image pixels.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torchvision
from torchvision.ops import batched_nms, nms

from ovsam_ray.errors import ConfigError
from ovsam_ray.pipeline.stages import image_of

log = logging.getLogger(__name__)


class TorchvisionDetector:
    """A torchvision detection model as a class-agnostic box proposer."""

    def __init__(
        self,
        *,
        name: str,
        device: str = "cpu",
        weights: str | None = None,
        random_init: bool = False,
        score_threshold: float = 0.3,
        s3_endpoint: str | None = None,
    ) -> None:
        builders = torchvision.models.detection.__dict__
        if name not in builders or not callable(builders[name]):
            known = sorted(k for k, v in builders.items() if callable(v) and k[0].islower() and "_" in k)
            raise ConfigError(f"unknown torchvision detector {name!r}; known: {', '.join(known)}")
        self.categories = _coco_categories(name)
        model = builders[name](
            weights=None, weights_backbone=None, num_classes=len(self.categories), box_score_thresh=score_threshold
        )
        if not random_init:
            path = _find_weights(weights, name, s3_endpoint)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        self.model = model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        tensors = [torch.from_numpy(im).to(self.device).permute(2, 0, 1).float() / 255.0 for im in images]
        outputs = self.model(tensors) if tensors else []
        return [
            {
                "boxes": o["boxes"].cpu().numpy(),
                "scores": o["scores"].cpu().numpy(),
                "labels": [self.categories[int(i)] for i in o["labels"].cpu()],
            }
            for o in outputs
        ]


def _coco_categories(name: str) -> list[str]:
    """Category names of torchvision's COCO weights for ``name`` (offline metadata)."""
    weights_enum = torchvision.models.get_model_weights(name)
    return list(next(iter(weights_enum)).meta["categories"])


def _find_weights(location: str | None, name: str, s3_endpoint: str | None = None) -> str:
    """A local copy of detector ``name``'s weights file: ``location`` itself (a .pth/.pt file) or
    ``name.pth`` / ``name_*.pth`` (torchvision's file name) in the folder or prefix ``location``."""
    from ovsam_ray.weights.files import WeightsError, find_files, local_path

    if location is None:
        raise WeightsError(
            f"detector {name}: pass --weights DIR holding {name}.pth (or torchvision's {name}_*.pth), or --random-init"
        )
    if location.endswith((".pth", ".pt")):
        return local_path(location, s3_endpoint=s3_endpoint)
    found = find_files(location, {name: [f"{name}.pth", f"{name}_*.pth"]}, s3_endpoint=s3_endpoint)
    if name not in found:
        raise WeightsError(f"detector {name}: no {name}.pth or {name}_*.pth in {location}")
    return local_path(found[name], s3_endpoint=s3_endpoint)


def load_detector(
    spec: str,
    *,
    queries: list[str] | None = None,
    objectness_threshold: float | None = None,
    s3_endpoint: str | None = None,
    **kwargs: Any,
) -> Any:
    """``module.path:ClassName`` -> a user detector instance; ``owlv2`` / ``grounding-dino`` -> a
    Hugging Face detector; another plain name -> TorchvisionDetector."""
    from ovsam_ray.pipeline.hf_detectors import HF_DETECTORS, load_hf_detector

    if spec in HF_DETECTORS:
        return load_hf_detector(
            spec, queries=queries, objectness_threshold=objectness_threshold, s3_endpoint=s3_endpoint, **kwargs
        )
    if queries or objectness_threshold is not None:
        raise ConfigError(
            f"detector:{spec} takes no query list or objectness threshold (detector:owlv2 and "
            "detector:grounding-dino do)"
        )
    if ":" in spec:
        module, _, cls = spec.partition(":")
        factory = getattr(importlib.import_module(module), cls)
        return factory(**{k: v for k, v in kwargs.items() if k in ("device", "weights", "random_init")})
    return TorchvisionDetector(name=spec, s3_endpoint=s3_endpoint, **kwargs)


def postprocess_detections(
    det: dict[str, Any], *, score_threshold: float, nms_iou: float, max_per_image: int, class_agnostic: bool = True
) -> dict[str, Any]:
    """Threshold, NMS (class-agnostic by default) and cap one image's detections."""
    boxes = torch.as_tensor(np.asarray(det.get("boxes", []), np.float32)).reshape(-1, 4)
    scores = torch.as_tensor(np.asarray(det.get("scores", []), np.float32)).reshape(-1)
    labels = list(det.get("labels") or [None] * len(boxes))
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores) & (scores >= score_threshold)
    idx = torch.nonzero(finite).flatten()
    boxes, scores, labels = boxes[idx], scores[idx], [labels[i] for i in idx.tolist()]
    if class_agnostic:
        keep = nms(boxes, scores, nms_iou)
    else:
        ids = {name: i for i, name in enumerate(dict.fromkeys(labels))}
        keep = batched_nms(boxes, scores, torch.tensor([ids[x] for x in labels], dtype=torch.long), nms_iou)
    keep = keep[:max_per_image].tolist()
    return {"boxes": boxes[keep].tolist(), "scores": scores[keep].tolist(), "labels": [labels[i] for i in keep]}


class DetectorStage:
    """map_batches actor: adds each ok row's detector boxes (original pixels), scores and labels.

    ``queries`` / ``objectness_threshold``: the Hugging Face detectors' query list and OWLv2's
    objectness cut. A detector with a ``score_threshold`` attribute sets the cut its own scores
    are thresholded at (OWLv2 without queries: the objectness threshold)."""

    def __init__(
        self,
        *,
        spec: str,
        weights: str | None = None,
        random_init: bool = False,
        score_threshold: float = 0.3,
        nms_iou: float = 0.5,
        max_per_image: int = 100,
        device: str | None = None,
        queries: list[str] | None = None,
        objectness_threshold: float | None = None,
        s3_endpoint: str | None = None,
    ) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        extra: dict[str, Any] = {
            "queries": queries,
            "objectness_threshold": objectness_threshold,
            "s3_endpoint": s3_endpoint,
        }
        self.detector = load_detector(
            spec, device=self.device, weights=weights, random_init=random_init, score_threshold=score_threshold, **extra
        )
        score_threshold = getattr(self.detector, "score_threshold", score_threshold)
        self.post: dict[str, Any] = {
            "score_threshold": score_threshold,
            "nms_iou": nms_iou,
            "max_per_image": max_per_image,
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        """DECODED rows in; the same rows plus ``det_boxes`` (flat XYXY, original pixels),
        ``det_scores`` and ``det_labels`` out (empty lists for rows that are not ok)."""
        status = batch.column("status").to_pylist()
        error = batch.column("error").to_pylist()
        ok = [i for i, s in enumerate(status) if s == "ok"]
        dets: dict[int, dict[str, Any]] = {}
        if ok:
            try:
                detections = self.detector([image_of(batch, i) for i in ok])
            except Exception as e:  # noqa: BLE001 - a failing detector batch becomes error rows
                log.exception("detector failed on a batch of %d images", len(ok))
                for i in ok:
                    status[i], error[i] = "error", f"detector failed: {type(e).__name__}: {e}"
            else:
                sizes = {c: batch.column(c).to_pylist() for c in ("width", "height", "in_w", "in_h")}
                for i, det in zip(ok, detections):
                    det = postprocess_detections(det, **self.post)
                    scale = np.array(
                        [sizes["width"][i] / sizes["in_w"][i], sizes["height"][i] / sizes["in_h"][i]] * 2, np.float32
                    )
                    det["boxes"] = (np.asarray(det["boxes"], np.float32).reshape(-1, 4) * scale).reshape(-1)
                    dets[i] = det
        empty = {"boxes": np.zeros(0, np.float32), "scores": [], "labels": []}
        rows = [dets.get(i, empty) for i in range(batch.num_rows)]
        out = batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
        out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
        out = out.append_column("det_boxes", pa.array([r["boxes"] for r in rows], pa.list_(pa.float32())))
        out = out.append_column("det_scores", pa.array([r["scores"] for r in rows], pa.list_(pa.float32())))
        return out.append_column("det_labels", pa.array([r["labels"] for r in rows], pa.list_(pa.string())))
