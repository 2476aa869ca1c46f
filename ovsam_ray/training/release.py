"""``export``: a training checkpoint -> the released weights layout (DESIGN §3).

Rebuilds the model the run trained (same preset, weights and seed), loads the checkpoint's
trainable part and writes ``sam2clip_vith_<short>.pth``, ``clip2sam_<vocab>_<short>.pth``, the
prompt encoder as ``sam_prompt_encoder_<short>.pth`` and, for a preset whose CLIP has no
released weights or a CLIP that started random, the CLIP model. The clip2sam file's ``meta``
carries the training vocabulary, the seen classes and the classifier's ``logit_scale``, which
``load_ovsam`` / the label job read. A class that only a label output's corrections trained is
recorded unseen where the training vocabulary has it unseen (``corrected_classes="unseen"``, the
default; ``"seen"``: every trained class), so inference keeps fusing it with the unseen-class
weight (``training.label_space.exported_seen_classes``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile

import torch

from ovsam_ray import storage
from ovsam_ray.errors import ConfigError, MissingInputError
from ovsam_ray.model.presets import get_preset
from ovsam_ray.training.config import CotrainConfig
from ovsam_ray.training.label_space import CORRECTED_CLASSES, build_label_space, exported_seen_classes
from ovsam_ray.training.networks import CotrainNet, DistillNet, build_training_model
from ovsam_ray.training.trainer import CONFIG_FILE, STATE_FILE, config_from_dict, latest_checkpoint, read_checkpoint
from ovsam_ray.weights.released import export_released, standard_file_names
from ovsam_ray.written import writing

log = logging.getLogger(__name__)


def _checkpoint_url(source: str, s3_endpoint: str | None) -> str:
    if storage.exists(storage.join(source, STATE_FILE), s3_endpoint=s3_endpoint):
        return source
    found = latest_checkpoint(source, s3_endpoint=s3_endpoint)
    if found is None:
        raise MissingInputError(
            f"no checkpoint under {storage.redact(source)}: give a run folder (storage_path/name) "
            "or a checkpoint_* folder"
        )
    return found[0]


def vocab_file_tag(name: str) -> str:
    """A vocabulary name as it appears in ``clip2sam_<tag>_<short>.pth`` (letters, digits, _)."""
    tag = re.sub(r"[^0-9a-zA-Z_]+", "_", name).strip("_").lower()
    return tag or "custom"


def released_file_names(preset: str, train_vocab: str, include_clip: bool) -> list[str]:
    """The files :func:`~ovsam_ray.weights.released.export_released` writes (and their temporaries)."""
    names = standard_file_names(preset, train_vocab)
    chosen = [names["sam2clip"][0], names["clip2sam"][0], names["sam"][-1]]
    chosen += [names["clip"][0]] if include_clip else []
    return [n + suffix for n in chosen for suffix in ("", ".tmp")]


def export_checkpoint(
    source: str,
    output: str,
    *,
    train_vocab: str | None = None,
    include_clip: bool | None = None,
    corrected_classes: str = "unseen",
    overwrite: bool = False,
    s3_endpoint: str | None = None,
) -> dict[str, str]:
    """Export the checkpoint at ``source`` (a run folder: its latest checkpoint; or one
    checkpoint folder) into ``output`` (a local folder). Returns part -> written path. A weight
    file already in ``output`` is refused unless an earlier export wrote it and ``overwrite``
    (see :mod:`ovsam_ray.written`). ``corrected_classes``: how a class that only corrections
    trained is recorded (module docstring)."""
    if corrected_classes not in CORRECTED_CLASSES:
        raise ConfigError(f"corrected_classes={corrected_classes!r}: use one of {', '.join(CORRECTED_CLASSES)}")
    url = _checkpoint_url(source, s3_endpoint)
    with tempfile.TemporaryDirectory() as tmp:
        if storage.is_remote(url):
            fs, path = storage.get_filesystem(url, s3_endpoint=s3_endpoint)
            fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
            local = tmp
        else:
            local = url
        with open(os.path.join(local, STATE_FILE)) as f:
            state = json.load(f)
        with open(os.path.join(local, CONFIG_FILE)) as f:
            config = json.load(f)
        stage = state["stage"]
        cfg = config_from_dict(stage, config)
        model, clip_model, files = build_training_model(
            cfg.model, stage=stage, seed=cfg.run.seed, s3_endpoint=s3_endpoint or cfg.run.s3_endpoint
        )
        meta = {"stage": stage, "step": int(state["step"]), "versions": state.get("versions", {}), "config": config}
        net: CotrainNet | DistillNet
        if isinstance(cfg, CotrainConfig):
            net = CotrainNet(
                model,
                text_embeddings=torch.zeros(1, 1, model.embed_dim),
                logit_scale=cfg.logit_scale,
                learn_logit_scale=cfg.learn_logit_scale,
                train_adapter=cfg.train_adapter,
                logit_scale_lr=cfg.logit_scale_lr,
                recognizer_lr=cfg.recognizer_lr,
            )
            read_checkpoint(local, net=net)
            space = build_label_space(cfg.datasets, cfg.train_vocab)
            seen = exported_seen_classes(space, corrected_classes)
            kept_unseen = [n for n in space.seen_classes if n not in seen]
            flags = tuple(n in seen for n in space.vocab.class_names)
            meta.update(
                vocabulary=dataclasses.replace(space.vocab, seen=flags).to_json(),
                seen_classes=seen,
                corrected_classes={"mode": corrected_classes, "kept_unseen": kept_unseen},
                logit_scale=float(net.log_scale.detach()),
            )
            tag = train_vocab or vocab_file_tag(space.vocab.name)
        else:
            net = DistillNet(model)
            read_checkpoint(local, net=net)
            tag = train_vocab or "coco"
    if include_clip is None:
        include_clip = not get_preset(cfg.model.preset).clip_published or "clip" not in files
    if not include_clip:
        log.info("CLIP weights not copied: place %s beside the export", files.get("clip"))
    with writing(output, "train export", released_file_names(cfg.model.preset, tag, include_clip), overwrite=overwrite):
        written = export_released(
            model.eval(),
            output,
            cfg.model.preset,
            train_vocab=tag,
            meta=meta,
            clip_model=clip_model if include_clip else None,
        )
    log.info("exported %s step %d to %s: %s", stage, meta["step"], output, sorted(written))
    return written
