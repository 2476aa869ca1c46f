"""Assembling a ready model from a weights location, and exporting ours in the released layout.

A weights location (local folder or ``s3://`` prefix) holds the standard file names below;
each file can also be given on its own. ``random_init=True`` builds without any file and says
so loudly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ovsam_ray.model.ovsam import OVSAM
from ovsam_ray.model.presets import CLIP_ARCHS, build_ovsam, create_clip_model
from ovsam_ray.weights import (
    CLIP2SAM,
    PROMPT_ENCODER,
    SAM2CLIP,
    WeightsError,
    WeightsFile,
    export_part,
    file_sha256,
    is_torchscript_archive,
    load_part,
    local_path,
    read_weights,
)

log = logging.getLogger(__name__)

# Short names used in the released file names (sam2clip_vith_<short>.pth, clip2sam_<vocab>_<short>.pth).
SHORT_NAMES = {
    "ovsam_rn50x16": "rn50x16",
    "ovsam_rn50x64": "rn50x64",
    "ovsam_convnext_large": "convnext_large",
    "ovsam_rn50_small": "rn50",
    "ovsam_tiny": "tiny",
}


def standard_file_names(preset: str, train_vocab: str = "coco") -> dict[str, list[str]]:
    """Candidate file names per part inside a weights location, first match wins."""
    short = SHORT_NAMES[preset]
    arch = CLIP_ARCHS[preset]
    clip_names = [f"clip_{short}.pth"]
    if isinstance(arch, str):
        base = arch.removesuffix("-quickgelu")
        # Our converted/exported file first: OpenAI's own {base}.pt is a TorchScript archive.
        clip_names = [*clip_names, f"{base}.pth", f"{base}.bin", f"{base}.safetensors", f"{base}.pt"]
    return {
        "sam": ["sam_vit_h_4b8939.pth", "sam_vit_h.pth", f"sam_prompt_encoder_{short}.pth"],
        "clip": clip_names,
        "sam2clip": [f"sam2clip_vith_{short}.pth"],
        "clip2sam": [f"clip2sam_{train_vocab}_{short}.pth"],
    }


def resolve_weights_dir(
    location: str, preset: str, *, train_vocab: str = "coco", s3_endpoint: str | None = None
) -> dict[str, str]:
    """Map each part to the first standard file present in ``location``; missing -> error."""
    from ovsam_ray.io import get_filesystem

    fs, root = get_filesystem(location, s3_endpoint=s3_endpoint)
    present = {os.path.basename(p) for p in fs.ls(root, detail=False)} if fs.exists(root) else set()
    prefix = location.rstrip("/")
    found, missing = {}, []
    for part, names in standard_file_names(preset, train_vocab).items():
        name = next((n for n in names if n in present), None)
        if name is None:
            missing.append(f"{part}: one of {names}")
        else:
            found[part] = f"{prefix}/{name}"
    if missing:
        raise WeightsError(f"weights location {location} lacks files for preset {preset}: " + "; ".join(missing))
    return found


@dataclass
class LoadedModel:
    """A model ready for inference plus what identifies its weights (for run records)."""

    preset: str
    model: OVSAM
    clip_model: nn.Module
    random_init: bool
    files: dict[str, dict] = field(default_factory=dict)  # part -> {"path", "sha256"}
    meta: dict = field(default_factory=dict)  # the clip2sam file's meta (ours) if any
    train_vocab: str = "coco"

    @property
    def clip_sha256(self) -> str:
        return self.files.get("clip", {}).get("sha256", "random")

    def identity(self) -> dict:
        return {
            "preset": self.preset,
            "random_init": self.random_init,
            "weights": {k: v["sha256"] for k, v in sorted(self.files.items())},
        }


def load_ovsam(
    preset: str,
    *,
    weights: str | None = None,
    sam: str | None = None,
    clip: str | None = None,
    sam2clip: str | None = None,
    clip2sam: str | None = None,
    train_vocab: str = "coco",
    random_init: bool = False,
    s3_endpoint: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build ``preset`` and load its weights: from ``weights`` (a location with the standard
    names) and/or explicit files. For inference only ``prompt_encoder.*`` of the SAM file is used."""
    if random_init:
        log.warning("=" * 72)
        log.warning("RANDOM INIT: %s runs with untrained weights; its labels are meaningless.", preset)
        log.warning("=" * 72)
        torch.manual_seed(seed)
        clip_model = create_clip_model(preset)
        return LoadedModel(preset, build_ovsam(preset, clip_model).eval(), clip_model, True, train_vocab=train_vocab)

    paths = resolve_weights_dir(weights, preset, train_vocab=train_vocab, s3_endpoint=s3_endpoint) if weights else {}
    explicit = {"sam": sam, "clip": clip, "sam2clip": sam2clip, "clip2sam": clip2sam}
    paths.update({k: v for k, v in explicit.items() if v})
    lacking = [k for k in explicit if k not in paths]
    if lacking:
        raise WeightsError(f"no weights given for {lacking}: pass --weights DIR or the files, or --random-init")

    clip_local = local_path(paths["clip"], s3_endpoint=s3_endpoint)
    if is_torchscript_archive(clip_local):
        raise WeightsError(
            f"{paths['clip']} is OpenAI's TorchScript CLIP archive, which cannot load with weights_only=True. "
            f"Convert it once: ovsam-ray convert-clip --input {paths['clip']} --output clip_{SHORT_NAMES[preset]}.pth "
            "(and use that file)"
        )
    try:
        clip_model = create_clip_model(preset, checkpoint=clip_local)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"cannot load CLIP weights {paths['clip']} for {preset} ({CLIP_ARCHS[preset]}): {e}") from e
    model = build_ovsam(preset, clip_model)
    files = {"clip": {"path": paths["clip"], "sha256": file_sha256(clip_local)}}
    meta: dict = {}
    for part_name, part in (("sam", PROMPT_ENCODER), ("sam2clip", SAM2CLIP), ("clip2sam", CLIP2SAM)):
        wf: WeightsFile = read_weights(paths[part_name], s3_endpoint=s3_endpoint, what=part_name)
        load_part(model, wf, part)
        files[part_name] = {"path": paths[part_name], "sha256": wf.sha256}
        if part_name == "clip2sam":
            meta = wf.meta
        del wf
    return LoadedModel(preset, model.eval(), clip_model, False, files=files, meta=meta, train_vocab=train_vocab)


def export_released(
    model: OVSAM, directory: str, preset: str, *, train_vocab: str, meta: dict, clip_model: nn.Module | None = None
) -> dict[str, str]:
    """Write our model in the released layout: sam2clip_vith_<short>.pth (neck_student.*),
    clip2sam_<vocab>_<short>.pth (fpn_neck.*, mask_decoder.*), the prompt encoder as a SAM-layout
    file, and (if given) the CLIP model as an open_clip state dict. Returns part -> path."""
    os.makedirs(directory, exist_ok=True)
    names = standard_file_names(preset, train_vocab)
    state = model.state_dict()
    out = {
        "sam2clip": (names["sam2clip"][0], export_part(state, SAM2CLIP)),
        "clip2sam": (names["clip2sam"][0], export_part(state, CLIP2SAM)),
        "sam": (names["sam"][-1], export_part(state, PROMPT_ENCODER)),
    }
    if clip_model is not None:
        out["clip"] = (names["clip"][0], {k: v.detach().cpu() for k, v in clip_model.state_dict().items()})
    written = {}
    for part, (name, sd) in out.items():
        path = os.path.join(directory, name)
        tmp = path + ".tmp"
        torch.save({"state_dict": sd, "meta": {**meta, "part": part, "preset": preset}}, tmp)
        os.replace(tmp, path)
        written[part] = path
    return written
