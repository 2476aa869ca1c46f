"""Detector prompts: an actor pool between decode and OV-SAM (``--prompts detector:NAME``).

Built in: torchvision detection models by name (``fasterrcnn_resnet50_fpn_v2``,
``retinanet_resnet50_fpn_v2``, ``fcos_resnet50_fpn``, ...), weights from the weights location
(``<name>.pth`` or torchvision's own file name, e.g. ``fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth``)
or random init. Boxes become class-agnostic prompts after a score threshold, NMS and a per-image
cap; each keeps its detector label and score.

Open-vocabulary: ``detector:owlv2``, ``detector:grounding-dino`` and ``detector:sam3`` (Hugging Face
``transformers``, see ``pipeline/hf_detectors.py``): weights a ``save_pretrained`` folder, optionally
a query list (SAM 3: a concept list, required). A detector may return each box's own mask
(``"masks"``: (N, h, w) logits over the whole image it was given, any h, w); with
``keep_masks`` the stage stores them as COCO RLE at the original size (``det_masks``).

User detectors: ``detector:my_pkg.module:MyDetector`` — a class whose constructor takes keyword
arguments (``device``, ``weights``, ``random_init``) and whose instances are called with a list of
(H, W, 3) uint8 RGB images and return, per image, ``{"boxes": (N, 4) XYXY float in that image's
pixels, "scores": (N,), "labels": N strings or None}``. The stage passes the decoded images as
resized for OV-SAM and maps the boxes back to original-image pixels.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torchvision
from torchvision.ops import batched_nms, nms

from ovsam_ray import storage
from ovsam_ray.errors import ConfigError
from ovsam_ray.labels.schema import RLE_TYPE
from ovsam_ray.pipeline.stages import image_of

log = logging.getLogger(__name__)

#: The seed of a detector's random initialisation (``--random-init``).
INIT_SEED = 0


@contextlib.contextmanager
def seeded(seed: int = INIT_SEED) -> Iterator[None]:
    """Torch's CPU random generator seeded with ``seed`` inside, restored after: a model built
    inside gets the same random weights in every process and run (the caller's stream is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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
        builder = torchvision_builder(name)
        self.categories = _coco_categories(name)
        with seeded():  # random init: the same weights in every actor and every run
            model = builder(
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


def torchvision_builder(name: str) -> Callable[..., Any]:
    """torchvision's builder of detection model ``name``; ConfigError listing the known ones."""
    builders = torchvision.models.detection.__dict__
    if name in builders and callable(builders[name]) and not isinstance(builders[name], type):
        try:
            torchvision.models.get_model_weights(name)
        except (ValueError, KeyError):
            pass
        else:
            return builders[name]
    known = sorted(k for k in _TORCHVISION_NAMES if k in builders)
    raise ConfigError(
        f"unknown detector {name!r}: use a torchvision detection model ({', '.join(known)}), owlv2, grounding-dino "
        "or your own as my_pkg.module:MyDetector"
    )


_TORCHVISION_NAMES = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
)


def _coco_categories(name: str) -> list[str]:
    """Category names of torchvision's COCO weights for ``name`` (offline metadata)."""
    weights_enum = torchvision.models.get_model_weights(name)
    return list(next(iter(weights_enum)).meta["categories"])


def _find_weights(location: str | None, name: str, s3_endpoint: str | None = None) -> str:
    """A local copy of detector ``name``'s weights file (see :func:`torchvision_weights_url`)."""
    from ovsam_ray.weights.files import local_path

    return local_path(torchvision_weights_url(location, name, s3_endpoint), s3_endpoint=s3_endpoint)


def torchvision_weights_url(location: str | None, name: str, s3_endpoint: str | None = None) -> str:
    """Where detector ``name``'s weights file is, found by listing (nothing is read): ``location``
    itself (a .pth/.pt file) or ``name.pth`` / ``name_*.pth`` (torchvision's file name) in the
    folder or prefix ``location``. WeightsError naming what is missing."""
    from ovsam_ray.weights.files import WeightsError, find_files

    if location is None:
        raise WeightsError(
            f"detector {name}: pass --detector-weights (or --weights) DIR holding {name}.pth (or torchvision's "
            f"{name}_*.pth), or --random-init"
        )
    if location.endswith((".pth", ".pt")):
        if not storage.exists(location, s3_endpoint=s3_endpoint):
            raise WeightsError(f"detector {name}: weights file not found: {storage.redact(location)}")
        return location
    found = find_files(location, {name: [f"{name}.pth", f"{name}_*.pth"]}, s3_endpoint=s3_endpoint)
    if name not in found:
        raise WeightsError(f"detector {name}: no {name}.pth or {name}_*.pth in {storage.redact(location)}")
    return found[name]


def user_detector_class(spec: str) -> Callable[..., Any]:
    """The class named by ``my_pkg.module:MyDetector``; ConfigError when it cannot be imported."""
    module, _, cls = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"detector:{spec}: cannot import {cls!r} from {module!r}: {type(e).__name__}: {e}") from e
    if not callable(factory):
        raise ConfigError(f"detector:{spec}: {cls!r} in {module!r} is not a class")
    return factory


def check_detector(
    spec: str,
    *,
    weights: str | None,
    random_init: bool = False,
    queries: list[str] | None = None,
    objectness_threshold: float | None = None,
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """What :func:`load_detector` checks before it loads anything, without loading: the spec names
    a detector, its weights are where it will look (listing only), the options fit it. Raises the
    same ConfigError / WeightsError the detector actors would; returns what was found."""
    from ovsam_ray.pipeline.hf_detectors import HF_DETECTORS, check_folder

    if spec in HF_DETECTORS:
        folder = check_folder(weights, spec, s3_endpoint=s3_endpoint, need_weights=not random_init)
        if spec != "owlv2" and objectness_threshold is not None:
            raise ConfigError(f"--detector-objectness-threshold is OWLv2's (objectness head); detector:{spec} has none")
        return {"detector": spec, "weights": storage.redact(folder), "random_init": random_init}
    if queries or objectness_threshold is not None:
        raise ConfigError(
            f"detector:{spec} takes no query list or objectness threshold (detector:owlv2 and "
            "detector:grounding-dino do)"
        )
    if ":" in spec:
        user_detector_class(spec)
        return {"detector": spec, "weights": storage.redact(weights) if weights else None, "user": True}
    torchvision_builder(spec)
    url = None if random_init else torchvision_weights_url(weights, spec, s3_endpoint)
    return {"detector": spec, "weights": storage.redact(url) if url else None, "random_init": random_init}


def load_detector(
    spec: str,
    *,
    queries: list[str] | None = None,
    objectness_threshold: float | None = None,
    s3_endpoint: str | None = None,
    concepts: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``module.path:ClassName`` -> a user detector instance; ``owlv2`` / ``grounding-dino`` /
    ``sam3`` -> a Hugging Face detector (``concepts``: SAM 3's ``concept_batch``,
    ``max_concepts``, ``keep_masks``); another plain name -> TorchvisionDetector."""
    from ovsam_ray.pipeline.hf_detectors import HF_DETECTORS, load_hf_detector

    if spec in HF_DETECTORS:
        extra = (concepts or {}) if spec == "sam3" else {}
        return load_hf_detector(
            spec, queries=queries, objectness_threshold=objectness_threshold, s3_endpoint=s3_endpoint, **extra, **kwargs
        )
    if queries or objectness_threshold is not None:
        raise ConfigError(
            f"detector:{spec} takes no query list or objectness threshold (detector:owlv2, "
            "detector:grounding-dino and detector:sam3 do)"
        )
    if ":" in spec:
        factory = user_detector_class(spec)
        return factory(**{k: v for k, v in kwargs.items() if k in ("device", "weights", "random_init")})
    return TorchvisionDetector(name=spec, s3_endpoint=s3_endpoint, **kwargs)


def postprocess_detections(
    det: dict[str, Any], *, score_threshold: float, nms_iou: float, max_per_image: int, class_agnostic: bool = True
) -> dict[str, Any]:
    """Threshold, NMS (class-agnostic by default) and cap one image's detections; ``index``: the
    kept detections' positions in ``det`` (to pick their masks)."""
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
    return {
        "boxes": boxes[keep].tolist(),
        "scores": scores[keep].tolist(),
        "labels": [labels[i] for i in keep],
        "index": idx[keep].tolist(),
    }


def masks_to_rles(logits: np.ndarray, *, height: int, width: int) -> list[dict[str, Any]]:
    """(N, h, w) mask logits over a whole image -> N COCO RLEs at (height, width) (bilinear, > 0)."""
    from ovsam_ray.data.rle import encode_masks

    x = torch.as_tensor(np.asarray(logits, np.float32))
    if len(x) == 0:
        return []
    up = torch.nn.functional.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return encode_masks((up > 0).numpy())


class DetectorStage:
    """map_batches actor: adds each ok row's detector boxes (original pixels), scores and labels.

    ``queries`` / ``objectness_threshold``: the Hugging Face detectors' query list and OWLv2's
    objectness cut; ``concepts``: SAM 3's settings (``concept_batch``, ``max_concepts``);
    ``keep_masks``: also the detector's own masks (``det_masks``, COCO RLE at original size;
    SAM 3 only). A detector with a ``score_threshold`` attribute sets the cut its own scores
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
        concepts: dict[str, Any] | None = None,
        keep_masks: bool = False,
    ) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if keep_masks and spec != "sam3":
            raise ConfigError(f"keep_masks: detector:{spec} returns no masks of its own (detector:sam3 does)")
        concepts = {**(concepts or {}), **({"keep_masks": True} if keep_masks else {})}
        extra: dict[str, Any] = {
            "queries": queries,
            "objectness_threshold": objectness_threshold,
            "s3_endpoint": s3_endpoint,
            "concepts": concepts,
        }
        self.keep_masks = keep_masks
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
        ``det_scores`` and ``det_labels`` out (empty lists for rows that are not ok); with
        ``keep_masks`` also ``det_masks`` (one COCO RLE per box, original size)."""
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
                for i, raw in zip(ok, detections):
                    det = postprocess_detections(raw, **self.post)
                    scale = np.array(
                        [sizes["width"][i] / sizes["in_w"][i], sizes["height"][i] / sizes["in_h"][i]] * 2, np.float32
                    )
                    det["boxes"] = (np.asarray(det["boxes"], np.float32).reshape(-1, 4) * scale).reshape(-1)
                    if self.keep_masks:
                        det["masks"] = masks_to_rles(
                            np.asarray(raw["masks"])[det["index"]], height=sizes["height"][i], width=sizes["width"][i]
                        )
                    dets[i] = det
        empty = {"boxes": np.zeros(0, np.float32), "scores": [], "labels": [], "masks": []}
        rows = [dets.get(i, empty) for i in range(batch.num_rows)]
        out = batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
        out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
        out = out.append_column("det_boxes", pa.array([r["boxes"] for r in rows], pa.list_(pa.float32())))
        out = out.append_column("det_scores", pa.array([r["scores"] for r in rows], pa.list_(pa.float32())))
        out = out.append_column("det_labels", pa.array([r["labels"] for r in rows], pa.list_(pa.string())))
        if self.keep_masks:
            out = out.append_column("det_masks", pa.array([r["masks"] for r in rows], pa.list_(RLE_TYPE)))
        return out
