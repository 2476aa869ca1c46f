"""ovsam_ray: Open-Vocabulary SAM pre-labelling and training on Ray.

    import numpy as np
    import ovsam_ray

    predictor = ovsam_ray.load_predictor("ovsam_rn50x16", weights="weights/", vocab="coco_ov", device="cuda")
    pred = predictor([image], [ovsam_ray.ImagePrompts(boxes=np.array([[10, 20, 200, 240]], np.float32))])[0]
    print(predictor.label_names(pred), pred.scores, pred.masks.shape)

The model-backed names (``load_predictor``, ``OVSAMPredictor``, ``build_ovsam``, the presets...)
are imported on first use, so that ``import ovsam_ray`` stays cheap: the exporters and converters
run without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ovsam_ray.errors import ConfigError, OVSAMRayError

__version__ = "0.3.0"

# name -> the module that defines it, imported on first access (PEP 562).
_LAZY = {
    "load_predictor": "ovsam_ray.inference",
    "ModelConfig": "ovsam_ray.inference",
    "OVSAMPredictor": "ovsam_ray.model.predictor",
    "ImagePrompts": "ovsam_ray.model.predictor",
    "ImagePrediction": "ovsam_ray.model.predictor",
    "OVSAMAutomaticMaskGenerator": "ovsam_ray.model.automatic_mask_generator",
    "OVSAM": "ovsam_ray.model.ovsam",
    "build_ovsam": "ovsam_ray.model.presets",
    "create_clip_model": "ovsam_ray.model.presets",
    "get_preset": "ovsam_ray.model.presets",
    "preset_names": "ovsam_ray.model.presets",
    "PRESETS": "ovsam_ray.model.presets",
    "Preset": "ovsam_ray.model.presets",
    "Vocabulary": "ovsam_ray.vocabulary",
    "load_vocabulary": "ovsam_ray.vocabulary",
    "read_image": "ovsam_ray.data.decode",
}

__all__ = [
    "OVSAM",
    "PRESETS",
    "ConfigError",
    "ImagePrediction",
    "ImagePrompts",
    "ModelConfig",
    "OVSAMAutomaticMaskGenerator",
    "OVSAMPredictor",
    "OVSAMRayError",
    "Preset",
    "Vocabulary",
    "__version__",
    "build_ovsam",
    "create_clip_model",
    "get_preset",
    "load_predictor",
    "load_vocabulary",
    "preset_names",
    "read_image",
]

if TYPE_CHECKING:
    from ovsam_ray.data.decode import read_image
    from ovsam_ray.inference import ModelConfig, load_predictor
    from ovsam_ray.model.automatic_mask_generator import OVSAMAutomaticMaskGenerator
    from ovsam_ray.model.ovsam import OVSAM
    from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts, OVSAMPredictor
    from ovsam_ray.model.presets import PRESETS, Preset, build_ovsam, create_clip_model, get_preset, preset_names
    from ovsam_ray.vocabulary import Vocabulary, load_vocabulary


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ovsam_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
