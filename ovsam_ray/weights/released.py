"""Released weights -> a ready OV-SAM model, and ours -> the released layout.

"Checkpoints" here are weights files in the released layout, the ones inference and the start of
training read (``load_ovsam``, ``build_training_model``) and ``export`` writes; a training run's
resumable state is something else and lives in ``training/trainer.py``.

A weights location (local folder or ``s3://`` prefix) holds the standard file names below;
each file can also be given on its own. ``random_init=True`` builds without any file and says
so loudly. Finding and reading single files is ``ovsam_ray.weights.files``'s job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ovsam_ray.model.classifier import RELEASED_LOGIT_SCALE
from ovsam_ray.model.ovsam import OVSAM
from ovsam_ray.model.presets import Preset, build_ovsam, create_clip_model, get_preset
from ovsam_ray.weights.files import (
    CLIP2SAM,
    PROMPT_ENCODER,
    SAM2CLIP,
    SAM_DECODER_INIT,
    WeightsError,
    export_part,
    file_sha256,
    find_files,
    is_torchscript_archive,
    load_part,
    local_path,
    read_weights,
)

log = logging.getLogger(__name__)


def standard_file_names(preset: str | Preset, train_vocab: str = "coco") -> dict[str, list[str]]:
    """Candidate file names per part inside a weights location, first match wins."""
    p = get_preset(preset)
    short = p.short_name
    clip_names = [f"clip_{short}.pth"]
    if isinstance(p.clip_arch, str):
        base = p.clip_arch.removesuffix("-quickgelu")
        # Our converted/exported file first: OpenAI's own {base}.pt is a TorchScript archive.
        clip_names = [*clip_names, f"{base}.pth", f"{base}.bin", f"{base}.safetensors", f"{base}.pt"]
    return {
        "sam": ["sam_vit_h_4b8939.pth", "sam_vit_h.pth", f"sam_prompt_encoder_{short}.pth"],
        "clip": clip_names,
        "sam2clip": [f"sam2clip_vith_{short}.pth"],
        "clip2sam": [f"clip2sam_{train_vocab}_{short}.pth"],
    }


def resolve_weights_dir(
    location: str, preset: str | Preset, *, train_vocab: str = "coco", s3_endpoint: str | None = None
) -> dict[str, str]:
    """Map each part to the first standard file present in ``location``; missing -> error."""
    names = standard_file_names(preset, train_vocab)
    found = find_files(location, names, s3_endpoint=s3_endpoint)
    missing = [f"{part}: one of {candidates}" for part, candidates in names.items() if part not in found]
    if missing:
        name = preset.name if isinstance(preset, Preset) else preset
        raise WeightsError(f"weights location {location} lacks files for preset {name}: " + "; ".join(missing))
    return found


def resolve_files(
    preset: str | Preset,
    *,
    weights: str | None = None,
    explicit: Mapping[str, str | None] | None = None,
    train_vocab: str = "coco",
    s3_endpoint: str | None = None,
    check_exists: bool = False,
) -> dict[str, str]:
    """Part (``sam``, ``clip``, ``sam2clip``, ``clip2sam``) -> the one file to load it from: the
    standard names found in ``weights`` (one listing), overridden by the ``explicit`` files given.
    Every part must end up with a file (WeightsError otherwise); with ``check_exists``, an explicit
    file that is not there is a WeightsError too (what a job checks before it starts)."""
    paths = resolve_weights_dir(weights, preset, train_vocab=train_vocab, s3_endpoint=s3_endpoint) if weights else {}
    explicit = explicit or {}
    paths.update({k: v for k, v in explicit.items() if v})
    lacking = [k for k in ("sam", "clip", "sam2clip", "clip2sam") if k not in paths]
    if lacking:
        raise WeightsError(f"no weights given for {lacking}: pass --weights DIR or the files, or --random-init")
    if check_exists:
        from ovsam_ray import storage

        for part, url in explicit.items():
            if url and not storage.exists(url, s3_endpoint=s3_endpoint):
                raise WeightsError(f"weights file not found: {storage.redact(url)} (the {part} file)")
    return paths


def load_clip(preset: str | Preset, url: str | None, *, s3_endpoint: str | None = None) -> tuple[nn.Module, str | None]:
    """(the open_clip model of ``preset``, the sha256 of its file): from ``url``, or random
    (sha None) without one. OpenAI's TorchScript archive and unloadable files are WeightsErrors."""
    p = get_preset(preset)
    if url is None:
        return create_clip_model(p), None
    path = local_path(url, s3_endpoint=s3_endpoint)
    if is_torchscript_archive(path):
        raise WeightsError(
            f"{url} is OpenAI's TorchScript CLIP archive, which cannot load with weights_only=True. "
            f"Convert it once: ovsam-ray convert-clip --input {url} --output clip_{p.short_name}.pth "
            "(and use that file)"
        )
    try:
        clip_model = create_clip_model(p, checkpoint=path)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"cannot load CLIP weights {url} for {p.name} ({p.clip_arch}): {e}") from e
    return clip_model, file_sha256(path)


def load_parts(
    model: OVSAM, files: Mapping[str, str], *, init_decoder_from_sam: bool = False, s3_endpoint: str | None = None
) -> tuple[dict[str, dict], dict]:
    """Strictly load the parts ``files`` names (``sam``: the prompt encoder, ``sam2clip``,
    ``clip2sam``) into ``model``, in that order. With ``init_decoder_from_sam`` a SAM file that
    holds a mask decoder also initialises ours (training: CLIP2SAM then continues from it).
    Returns ({part: {"path", "sha256"}}, the clip2sam file's ``meta``)."""
    loaded: dict[str, dict] = {}
    meta: dict = {}
    for part_name, part in (("sam", PROMPT_ENCODER), ("sam2clip", SAM2CLIP), ("clip2sam", CLIP2SAM)):
        if part_name not in files:
            continue
        wf = read_weights(files[part_name], s3_endpoint=s3_endpoint, what=part_name)
        load_part(model, wf, part)
        has_decoder = any(k.startswith("mask_decoder.") for k in wf.state_dict)
        if part is PROMPT_ENCODER and init_decoder_from_sam and has_decoder:
            load_part(model, wf, SAM_DECODER_INIT)
            log.info("mask decoder initialised from %s", files[part_name])
        loaded[part_name] = {"path": files[part_name], "sha256": wf.sha256}
        if part is CLIP2SAM:
            meta = wf.meta
        del wf
    return loaded, meta


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

    @property
    def logit_scale(self) -> float:
        """The classifier's logit scale (log): our export's learnt one, else the released models'."""
        return float(self.meta.get("logit_scale", RELEASED_LOGIT_SCALE))

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
    names) and/or explicit files. For inference only ``prompt_encoder.*`` of the SAM file is used.

    The preset is looked up once and the files resolved once (:func:`resolve_files`), before
    anything is built; then the CLIP model and OV-SAM around it are built once and each file read once."""
    p = get_preset(preset)
    if random_init:
        log.warning("=" * 72)
        log.warning("RANDOM INIT: %s runs with untrained weights; its labels are meaningless.", preset)
        log.warning("=" * 72)
        torch.manual_seed(seed)
        clip_model = create_clip_model(p)
        return LoadedModel(preset, build_ovsam(p, clip_model).eval(), clip_model, True, train_vocab=train_vocab)

    explicit = {"sam": sam, "clip": clip, "sam2clip": sam2clip, "clip2sam": clip2sam}
    paths = resolve_files(p, weights=weights, explicit=explicit, train_vocab=train_vocab, s3_endpoint=s3_endpoint)
    clip_model, clip_sha = load_clip(p, paths["clip"], s3_endpoint=s3_endpoint)
    model = build_ovsam(p, clip_model)
    parts, meta = load_parts(model, paths, s3_endpoint=s3_endpoint)
    files = {"clip": {"path": paths["clip"], "sha256": clip_sha}, **parts}
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
