"""From user-facing settings to a ready ``OVSAMPredictor`` (shared by ``predict`` and the label job)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ovsam_ray.errors import ConfigError
from ovsam_ray.model.classifier import OpenVocabClassifier
from ovsam_ray.model.predictor import OVSAMPredictor
from ovsam_ray.model.presets import PRESETS, get_preset
from ovsam_ray.text_cache import embed_vocabulary, load_class_embeddings
from ovsam_ray.vocabulary import BUILTIN_VOCABULARIES, Vocabulary, load_vocabulary
from ovsam_ray.weights.released import LoadedModel, load_ovsam, resolve_files

# The training vocabulary of each released clip2sam file decides which classes are "seen".
TRAIN_VOCABS = {"coco": "coco_ov", "lvis": "lvis_v1"}


@dataclass
class ModelConfig:
    """Which model, weights and vocabulary to run. CLI flags map one to one onto fields (``cli/flags.py``)."""

    preset: str = field(default="ovsam_rn50x16", metadata={"help": "model preset: " + ", ".join(sorted(PRESETS))})
    weights: str | None = field(
        default=None, metadata={"help": "folder or s3:// prefix holding the standard weight file names"}
    )
    sam_checkpoint: str | None = field(
        default=None, metadata={"help": "SAM file (only prompt_encoder.* is used for inference)"}
    )
    clip_checkpoint: str | None = field(default=None, metadata={"help": "open_clip state dict or OpenAI's CLIP file"})
    sam2clip_checkpoint: str | None = field(default=None, metadata={"help": "SAM2CLIP adapter file"})
    clip2sam_checkpoint: str | None = field(default=None, metadata={"help": "CLIP2SAM decoder/recognizer file"})
    train_vocab: str = field(
        default="coco", metadata={"help": "vocabulary the clip2sam file was trained on (coco|lvis)"}
    )
    vocab: str | None = field(
        default=None,
        metadata={
            "help": f"{', '.join(BUILTIN_VOCABULARIES)}, or a .txt/.json file (default: the weights' own vocabulary)"
        },
    )
    class_embeddings: str | None = field(
        default=None, metadata={"help": "(C, S, D) text-embedding tensor file (reference format)"}
    )
    random_init: bool = field(default=False, metadata={"help": "untrained weights (smoke tests, benchmarks)"})
    topk: int = field(default=5, metadata={"help": "class labels kept per instance (its topk_ids, topk_scores)"})
    text_cache: str | None = field(
        default=None, metadata={"help": "text-embedding cache folder (default ~/.cache/ovsam_ray/text)"}
    )
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3-compatible endpoint URL (else AWS_ENDPOINT_URL)"}
    )

    def __post_init__(self) -> None:
        get_preset(self.preset)  # an unknown name: UnknownPresetError (a ConfigError) listing the known ones
        if not self.train_vocab.replace("_", "").isalnum():
            raise ConfigError(
                f"train_vocab={self.train_vocab!r}: use 'coco', 'lvis' or the name our export was trained with"
            )
        if self.topk < 1:
            raise ConfigError(f"topk={self.topk} must be >= 1")
        files = (self.sam_checkpoint, self.clip_checkpoint, self.sam2clip_checkpoint, self.clip2sam_checkpoint)
        if not self.random_init and not self.weights and not all(files):
            raise ConfigError(
                "no weights: pass weights=DIR|s3://prefix (standard file names), all four checkpoint "
                "files, or random_init=True for an untrained smoke run"
            )


def _seen_from_names(vocab: Vocabulary, seen_names: list[str]) -> Vocabulary:
    known = {n.lower().replace("_", " ") for n in seen_names}
    seen = tuple(
        any(s.lower().replace("_", " ") in known for s in (name, *syn))
        for name, syn in zip(vocab.class_names, vocab.synonyms)
    )
    return dataclasses.replace(vocab, seen=seen)


def resolve_vocabulary(cfg: ModelConfig, loaded: LoadedModel) -> Vocabulary:
    """The vocabulary to label with, its seen flags set from the checkpoint's training vocabulary."""
    meta_vocab = loaded.meta.get("vocabulary")
    spec = cfg.vocab
    if spec is None and meta_vocab is not None:
        vocab = Vocabulary.from_json(meta_vocab)
        return _seen_from_names(vocab, loaded.meta.get("seen_classes", list(vocab.class_names)))
    if spec is None:
        spec = TRAIN_VOCABS.get(cfg.train_vocab, "coco_ov")
    if "seen_classes" in loaded.meta:
        return _seen_from_names(load_vocabulary(spec), loaded.meta["seen_classes"])
    if spec in TRAIN_VOCABS.values():
        # Built-ins carry their own split (COCO-OV base/novel/excluded, LVIS f+c/r).
        return load_vocabulary(spec)
    return load_vocabulary(spec, seen=TRAIN_VOCABS.get(cfg.train_vocab))


def _vocab_from_embeddings(cfg: ModelConfig, embeddings: torch.Tensor) -> Vocabulary:
    if cfg.vocab is not None:
        vocab = load_vocabulary(cfg.vocab)
        if vocab.num_classes != embeddings.shape[0]:
            raise ConfigError(
                f"{cfg.class_embeddings} has {embeddings.shape[0]} classes but vocab {cfg.vocab} {vocab.num_classes}"
            )
        return vocab
    names = [f"class_{i}" for i in range(embeddings.shape[0])]
    return Vocabulary.from_json({"name": "embeddings", "classes": [{"id": i, "name": n} for i, n in enumerate(names)]})


def vocabulary_text(
    cfg: ModelConfig, loaded: LoadedModel, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, Vocabulary]:
    """(C, S, D) text embeddings (float32, CPU) and the vocabulary: from a file, the cache, or the
    CLIP text tower, run on ``device`` (the CLIP model goes there and back to where it was)."""
    if cfg.class_embeddings:
        text = load_class_embeddings(cfg.class_embeddings)
        return text, _vocab_from_embeddings(cfg, text)
    vocab = resolve_vocabulary(cfg, loaded)
    text = embed_vocabulary(
        vocab,
        loaded.clip_model,
        cfg.preset,
        device=device,
        cache_root=cfg.text_cache,
        clip_weights_sha256=None if loaded.random_init else loaded.clip_sha256,
    )
    return text, vocab


def make_predictor(
    cfg: ModelConfig,
    loaded: LoadedModel,
    text: torch.Tensor,
    vocab: Vocabulary,
    device: str | torch.device = "cpu",
    *,
    rle_on_device: bool | None = None,
    fast: bool | None = None,
) -> OVSAMPredictor:
    """Wrap a loaded model and a vocabulary's text embeddings in a predictor on ``device``;
    ``rle_on_device`` and ``fast`` as in ``OVSAMPredictor`` (None: on CUDA only)."""
    classifier = OpenVocabClassifier(
        text_embeddings=text,
        seen=vocab.seen_tensor(),
        excluded=vocab.excluded_tensor(),
        logit_scale=loaded.logit_scale,
    )
    return OVSAMPredictor(
        loaded.model, classifier, device=device, topk=cfg.topk, rle_on_device=rle_on_device, fast=fast, vocabulary=vocab
    )


def check_model_files(cfg: ModelConfig) -> dict[str, str]:
    """part -> the weights file :func:`load_model` would read, found by listing (nothing is read);
    {} for a random init. Raises the WeightsError loading would, and ConfigError for a vocabulary
    or class-embeddings file that is not there."""
    if cfg.vocab is not None:
        load_vocabulary(cfg.vocab)
    if cfg.class_embeddings is not None:
        from ovsam_ray import storage

        if not storage.exists(cfg.class_embeddings, s3_endpoint=cfg.s3_endpoint):
            raise ConfigError(f"class_embeddings file not found: {storage.redact(cfg.class_embeddings)}")
    if cfg.random_init:
        return {}
    explicit = {
        "sam": cfg.sam_checkpoint,
        "clip": cfg.clip_checkpoint,
        "sam2clip": cfg.sam2clip_checkpoint,
        "clip2sam": cfg.clip2sam_checkpoint,
    }
    return resolve_files(
        cfg.preset,
        weights=cfg.weights,
        explicit=explicit,
        train_vocab=cfg.train_vocab,
        s3_endpoint=cfg.s3_endpoint,
        check_exists=True,
    )


def load_model(cfg: ModelConfig) -> LoadedModel:
    return load_ovsam(
        cfg.preset,
        weights=cfg.weights,
        sam=cfg.sam_checkpoint,
        clip=cfg.clip_checkpoint,
        sam2clip=cfg.sam2clip_checkpoint,
        clip2sam=cfg.clip2sam_checkpoint,
        train_vocab=cfg.train_vocab,
        random_init=cfg.random_init,
        s3_endpoint=cfg.s3_endpoint,
    )


def build_predictor(
    cfg: ModelConfig, device: str | torch.device = "cpu", *, rle_on_device: bool | None = None
) -> tuple[OVSAMPredictor, Vocabulary, LoadedModel]:
    """Load weights, embed the vocabulary and wrap both in a predictor on ``device``."""
    loaded = load_model(cfg)
    text, vocab = vocabulary_text(cfg, loaded, device)
    return make_predictor(cfg, loaded, text, vocab, device, rle_on_device=rle_on_device), vocab, loaded


def load_predictor(
    preset: str = "ovsam_rn50x16",
    *,
    weights: str | None = None,
    vocab: str | None = None,
    device: str | torch.device = "cpu",
    random_init: bool = False,
    **options: Any,
) -> OVSAMPredictor:
    """An ``OVSAMPredictor`` ready to call: ``preset``'s model with ``weights`` (a folder or
    ``s3://`` prefix holding the released file names), labelling with ``vocab`` (``coco_ov``,
    ``lvis_v1``, or a ``.txt``/``.json`` file; default: the weights' own training vocabulary)
    on ``device``. ``random_init=True``: untrained weights, no files (tests, smoke runs).

    ``options``: the other fields of ``ModelConfig`` (``train_vocab``, ``class_embeddings``,
    ``topk``, ``text_cache``, ``s3_endpoint``, the four checkpoint files...). The predictor
    carries its ``vocabulary`` and ``text_embeddings``; its masks come back as full-size arrays
    (``ImagePrediction.masks``) on every device.

        predictor = load_predictor("ovsam_rn50x16", weights="weights/", vocab="coco_ov", device="cuda")
        pred = predictor([image], [ImagePrompts(boxes=np.array([[x0, y0, x1, y1]], np.float32))])[0]
        names = predictor.label_names(pred)
    """
    cfg = ModelConfig(preset=preset, weights=weights, vocab=vocab, random_init=random_init, **options)
    return build_predictor(cfg, device, rle_on_device=False)[0]
