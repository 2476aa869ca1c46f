"""Open-vocabulary detectors from Hugging Face ``transformers`` as prompt sources
(``--prompts detector:owlv2`` / ``detector:grounding-dino`` / ``detector:sam3``; ``pip install
ovsam_ray[detectors]``).

Weights are a folder in ``save_pretrained`` layout, local or under an ``s3://`` prefix (copied to
the local cache once); nothing is downloaded at run time. The folder holds ``config.json``, the
weights (``model.safetensors`` or ``pytorch_model.bin``), the image processor's settings
(``preprocessor_config.json`` or ``processor_config.json``) and the tokenizer's files
(``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` for OWLv2 / ``vocab.txt`` for Grounding
DINO) — what ``huggingface-cli download REPO --local-dir DIR`` fetches from the repos in
``PUBLISHED``. ``--detector-weights`` names that folder or one holding it as ``owlv2/``,
``grounding-dino/`` or ``sam3/``.

The detectors take the stage's (H, W, 3) uint8 images, preprocess them on the model's device with
the processor's settings (sizes, mean, std), run one forward per batch (bfloat16 autocast on CUDA)
and return boxes in the pixels of the images they were given:

- ``owlv2`` pads each image to a square (bottom/right, grey) before resizing it, so its
  normalised boxes are relative to the padded square: pixels = box * max(H, W). Without queries
  it proposes class-agnostic boxes scored by its objectness head; with queries each box gets the
  best query's score and name. Query embeddings are computed once, so a long query list costs
  nearly nothing per image.
- ``grounding-dino`` reads a text prompt ``"q1 . q2 . ..."``; a list longer than the model's token
  limit (``max_text_len``, 256) is split into prompts that fit, each a forward of its own, and the
  boxes of all are merged (the stage's NMS removes duplicates). A box's score for a query is the
  best of its tokens' scores; its label is the best query. Boxes are relative to the unpadded
  resized image: pixels = box * (W, H).
- ``sam3`` (SAM 3, "Segment Anything with Concepts") finds every instance of one concept (a
  short noun phrase) per forward. The image is resized to the model's square (1008, no padding)
  and encoded once (ViT + FPN); the concepts' text features are computed once at start; each
  batch of ``concept_batch`` concepts then runs the DETR encoder, decoder and mask decoder against
  the stored image encoding, so the cost is linear in the number of concepts
  (``sam3_flops`` counts it; a list above ``max_concepts`` is refused with the figure). A
  box's score is its query's score times the image's presence score for the concept; its label is
  the concept. Boxes are relative to the resized image: pixels = box * (W, H). With
  ``keep_masks`` each box also carries SAM 3's own mask (low-resolution logits over the whole
  image; the stage scales them to the original image).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovsam_ray import storage
from ovsam_ray.errors import ConfigError
from ovsam_ray.pipeline.detectors import seeded
from ovsam_ray.weights.files import WeightsError, local_dir

log = logging.getLogger(__name__)

__all__ = [
    "HF_DETECTORS",
    "PUBLISHED",
    "GroundingDinoDetector",
    "Owlv2Detector",
    "Sam3Detector",
    "check_available",
    "check_concept_count",
    "load_hf_detector",
    "check_folder",
    "query_names",
    "resolve_folder",
    "sam3_flops",
]

PUBLISHED = {
    "owlv2": "https://huggingface.co/google/owlv2-base-patch16-ensemble (or google/owlv2-large-patch14-ensemble)",
    "grounding-dino": "https://huggingface.co/IDEA-Research/grounding-dino-tiny (or IDEA-Research/grounding-dino-base)",
    "sam3": "https://huggingface.co/facebook/sam3 (gated: accept the SAM License on that page first, then log in)",
}
#: Which files a save_pretrained folder needs: (what, any one of these names).
REQUIRED_FILES = (
    ("the model config", ("config.json",)),
    ("the weights", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")),
    ("the image processor's settings", ("preprocessor_config.json", "processor_config.json")),
    ("the tokenizer", ("tokenizer.json", "vocab.json", "vocab.txt")),
)
#: OWLv2's prompt for a query (the single template of its model card's examples).
OWL_TEMPLATE = "a photo of a {}"
#: OWLv2's objectness cut when no query list is given and none is set.
DEFAULT_OBJECTNESS_THRESHOLD = 0.1
#: SAM 3: the most concepts accepted unless raised (--detector-max-concepts): each one is a pass
#: of the DETR encoder, decoder and mask decoder per image
DEFAULT_MAX_CONCEPTS = 100
#: SAM 3: concepts run together against one image encoding (--detector-concept-batch)
DEFAULT_CONCEPT_BATCH = 16


def check_available(name: str) -> None:
    """Raise ImportError with the install line unless ``transformers`` can be imported."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(f"detector:{name} needs Hugging Face transformers: pip install 'ovsam_ray[detectors]'")


def _expected(name: str, location: str) -> str:
    files = "; ".join(f"{what}: {' or '.join(names)}" for what, names in REQUIRED_FILES)
    return (
        f"detector:{name} needs a save_pretrained folder at {storage.redact(location)} (or its {name}/ subfolder) "
        f"holding {files}. Published at {PUBLISHED[name]}; fetch it once, e.g. hf download REPO "
        f"--local-dir DIR, and pass --detector-weights DIR (a local folder or an s3:// prefix)"
    )


def resolve_folder(
    location: str | None, name: str, *, s3_endpoint: str | None = None, need_weights: bool = True
) -> str:
    """A local folder in save_pretrained layout for detector ``name``: ``location`` itself or its
    ``name/`` subfolder; under ``s3://`` the folder is copied to the local cache once per version
    (``weights.local_dir``). Raises WeightsError naming the expected files (the weights file not
    among them when ``need_weights`` is False: a random init needs only the rest)."""
    return local_dir(
        check_folder(location, name, s3_endpoint=s3_endpoint, need_weights=need_weights), s3_endpoint=s3_endpoint
    )


def check_folder(location: str | None, name: str, *, s3_endpoint: str | None = None, need_weights: bool = True) -> str:
    """The folder (``location`` or its ``name/`` subfolder) that holds detector ``name``'s files,
    found by listing (nothing is read or copied); WeightsError naming the files it lacks."""
    if location is None:
        raise WeightsError(_expected(name, "--detector-weights (not given)"))
    for candidate in (location, storage.join(location, name)):
        files = {os.path.basename(u): u for u in storage.list_files(candidate, s3_endpoint=s3_endpoint)}
        if "config.json" in files:
            break
    else:
        raise WeightsError(_expected(name, location))
    required = [(what, names) for what, names in REQUIRED_FILES if need_weights or what != "the weights"]
    missing = [f"{what} ({' or '.join(names)})" for what, names in required if not set(names) & set(files)]
    if missing:
        raise WeightsError(f"{_expected(name, candidate)}; missing: {', '.join(missing)}")
    return candidate


def query_names(spec: str) -> list[str]:
    """The detector's query list: a vocabulary name or file (``load_vocabulary``'s specs: a .txt
    with one class per line, a .json), one query per class (its name, underscores as spaces)."""
    from ovsam_ray.vocabulary import clean_class_name, load_vocabulary

    return list(dict.fromkeys(clean_class_name(n) for n in load_vocabulary(spec).class_names))


class _HFDetector:
    """Loading and device handling shared by the two detectors."""

    name = ""
    model_class = ""

    def __init__(
        self,
        *,
        weights: str | None,
        device: str = "cpu",
        random_init: bool = False,
        s3_endpoint: str | None = None,
        bf16: bool = True,
    ) -> None:
        check_available(self.name)
        import transformers

        folder = resolve_folder(weights, self.name, s3_endpoint=s3_endpoint, need_weights=not random_init)
        cls = getattr(transformers, self.model_class, None)
        if cls is None:
            raise ImportError(
                f"detector:{self.name} needs a transformers with {self.model_class} (installed: "
                f"{transformers.__version__}): pip install -U 'ovsam_ray[detectors]'"
            )
        try:
            self.processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            if random_init:
                with seeded():  # every actor and every run: the same untrained weights
                    model = cls(transformers.AutoConfig.from_pretrained(folder, local_files_only=True))
            else:
                model = cls.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable folder becomes one clear error
            raise WeightsError(
                f"cannot load detector:{self.name} from {storage.redact(str(weights))}: {e}. "
                f"{_expected(self.name, str(weights))}"
            ) from e
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.mean = torch.tensor(self.processor.image_mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(self.processor.image_std, device=self.device).view(3, 1, 1)
        self.bf16 = bf16 and self.device.type == "cuda"

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _pixels(self, image: np.ndarray) -> torch.Tensor:
        """(3, H, W) float in [0, 1] on the device."""
        return torch.from_numpy(image).to(self.device).permute(2, 0, 1).float().div_(255.0)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


class Owlv2Detector(_HFDetector):
    """OWLv2: objectness proposals (no queries) or text-queried boxes."""

    name = "owlv2"
    model_class = "Owlv2ForObjectDetection"

    def __init__(
        self,
        *,
        queries: Sequence[str] | None = None,
        objectness_threshold: float | None = None,
        score_threshold: float = 0.3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.side = int(self.model.config.vision_config.image_size)
        self.queries = list(queries or [])
        self.objectness_threshold = objectness_threshold
        if not self.queries and objectness_threshold is None:
            self.objectness_threshold = DEFAULT_OBJECTNESS_THRESHOLD
        #: the cut the stage applies to the scores returned: objectness without queries
        self.score_threshold = score_threshold if self.queries else self.objectness_threshold
        self.query_embeds = self._embed_queries(self.queries) if self.queries else None

    @torch.no_grad()
    def _embed_queries(self, queries: list[str], chunk: int = 256) -> torch.Tensor:
        max_len = int(self.model.config.text_config.max_position_embeddings)
        out = []
        for start in range(0, len(queries), chunk):
            texts = [OWL_TEMPLATE.format(q) for q in queries[start : start + chunk]]
            tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
            with self._autocast():
                emb = self.model.owlv2.get_text_features(
                    input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
                )
            out.append((emb if isinstance(emb, torch.Tensor) else emb.pooler_output).float())
        return torch.cat(out)

    def _preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """Each image scaled so its longer side is the model's, on a grey (0.5) square: the same as
        padding to a square first and resizing that (the processor's order), at a fraction of the cost."""
        batch = self._normalise(torch.full((len(images), 3, self.side, self.side), 0.5, device=self.device))
        for k, im in enumerate(images):
            h, w = im.shape[:2]
            scale = self.side / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            x = F.interpolate(
                self._pixels(im)[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
            )[0]
            batch[k, :, :nh, :nw] = self._normalise(x.clamp_(0, 1))
        return batch

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        if not images:
            return []
        with self._autocast():
            feature_map = self.model.image_embedder(pixel_values=self._preprocess(images))[0]
            b, gh, gw, d = feature_map.shape
            feats = feature_map.reshape(b, gh * gw, d)
            boxes = self.model.box_predictor(feats, feature_map).float()
            objectness = self.model.objectness_predictor(feats).float().sigmoid()
            if self.query_embeds is not None:
                q = self.query_embeds.to(feats.dtype)[None].expand(b, -1, -1)
                probs = self.model.class_predictor(feats, q, None)[0].float().sigmoid()
                scores, labels = probs.max(dim=-1)
            else:
                scores, labels = objectness, None
        out = []
        for k, im in enumerate(images):
            h, w = im.shape[:2]
            xyxy = _cxcywh_to_xyxy(boxes[k]) * max(h, w)  # normalised to the padded square
            xyxy = torch.stack(
                [xyxy[:, 0].clamp(0, w), xyxy[:, 1].clamp(0, h), xyxy[:, 2].clamp(0, w), xyxy[:, 3].clamp(0, h)], dim=-1
            )
            keep = torch.ones_like(scores[k], dtype=torch.bool)
            if self.queries and self.objectness_threshold is not None:
                keep &= objectness[k] >= self.objectness_threshold
            idx = torch.nonzero(keep).flatten()
            out.append(
                {
                    "boxes": xyxy[idx].cpu().numpy(),
                    "scores": scores[k][idx].cpu().numpy(),
                    "labels": None if labels is None else [self.queries[int(j)] for j in labels[k][idx].cpu()],
                }
            )
        return out


class GroundingDinoDetector(_HFDetector):
    """Grounding DINO with a text prompt built from the query list (chunked to its token limit)."""

    name = "grounding-dino"
    model_class = "GroundingDinoForObjectDetection"

    def __init__(self, *, queries: Sequence[str], score_threshold: float = 0.3, **kwargs: Any) -> None:
        if not queries:
            raise ConfigError("detector:grounding-dino needs a query list (--detector-queries FILE|vocab-name)")
        super().__init__(**kwargs)
        self.queries = list(queries)
        self.score_threshold = score_threshold
        size = self.processor.size
        self.shortest = int(size["shortest_edge"])
        self.longest = int(size["longest_edge"] or 1333)
        self.chunks = self._chunks(int(self.model.config.max_text_len))

    def _chunks(self, max_len: int) -> list[tuple[torch.Tensor, list[tuple[int, int, int]]]]:
        """Prompts ``[CLS] q1 . q2 . ... [SEP]`` of at most ``max_len`` tokens: (input ids, per query
        (query index, first token, end token))."""
        tok = self.tokenizer
        dot = tok.convert_tokens_to_ids(".")
        chunks, ids = [], [tok.cls_token_id]
        spans: list[Any] = []

        def flush() -> None:
            if spans:
                chunks.append((torch.tensor(ids + [tok.sep_token_id]), list(spans)))

        for qi, q in enumerate(self.queries):
            # '.' separates queries in the prompt; one query always fits a prompt
            words = tok(q.replace(".", " "), add_special_tokens=False)["input_ids"][: max_len - 3]
            if not words:
                log.warning("grounding-dino: query %r has no tokens; skipped", q)
                continue
            if len(ids) + len(words) + 2 > max_len:
                flush()
                ids, spans = [tok.cls_token_id], []
            spans.append((qi, len(ids), len(ids) + len(words)))
            ids += words + [dot]
        flush()
        if len(chunks) > 1:
            log.info(
                "grounding-dino: %d queries in %d prompts of <= %d tokens (one forward each)",
                len(self.queries),
                len(chunks),
                max_len,
            )
        return chunks

    def _preprocess(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Resized (shortest edge, capped longest edge), normalised, padded bottom/right to the
        batch's largest size; the pixel mask marks the real pixels."""
        resized = []
        for im in images:
            h, w = im.shape[:2]
            scale = min(self.shortest / min(h, w), self.longest / max(h, w))
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            x = F.interpolate(
                self._pixels(im)[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
            )[0]
            resized.append(self._normalise(x.clamp_(0, 1)))
        hmax, wmax = max(x.shape[1] for x in resized), max(x.shape[2] for x in resized)
        pixels = torch.zeros((len(images), 3, hmax, wmax), device=self.device)
        mask = torch.zeros((len(images), hmax, wmax), dtype=torch.long, device=self.device)
        for k, x in enumerate(resized):
            pixels[k, :, : x.shape[1], : x.shape[2]] = x
            mask[k, : x.shape[1], : x.shape[2]] = 1
        return pixels, mask

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        if not images:
            return []
        pixels, mask = self._preprocess(images)
        b = len(images)
        parts: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in images]
        for ids, spans in self.chunks:
            input_ids = ids.to(self.device)[None].expand(b, -1)
            with self._autocast():
                out = self.model(
                    pixel_values=pixels,
                    pixel_mask=mask,
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    token_type_ids=torch.zeros_like(input_ids),
                )
            probs = out.logits.float().sigmoid()  # (B, queries, max_text_len); -inf (0) past the prompt
            per_query = torch.stack([probs[..., s:e].amax(dim=-1) for _, s, e in spans], dim=-1)
            scores, best = per_query.max(dim=-1)
            names = torch.tensor([qi for qi, _, _ in spans], device=best.device)[best]
            for k in range(b):
                keep = scores[k] >= self.score_threshold
                parts[k].append((out.pred_boxes[k][keep].float(), scores[k][keep], names[k][keep]))
        results = []
        for k, im in enumerate(images):
            h, w = im.shape[:2]
            boxes, scores, names = (torch.cat(x) for x in zip(*parts[k]))
            xyxy = (_cxcywh_to_xyxy(boxes) * torch.tensor([w, h, w, h], device=boxes.device)).clamp(min=0)
            xyxy = torch.minimum(xyxy, torch.tensor([w, h, w, h], device=boxes.device, dtype=xyxy.dtype))
            results.append(
                {
                    "boxes": xyxy.cpu().numpy(),
                    "scores": scores.cpu().numpy(),
                    "labels": [self.queries[int(i)] for i in names.cpu()],
                }
            )
        return results


def sam3_flops(config: Any = None, *, concepts: int = 1) -> tuple[float, float]:
    """(FLOPs of encoding one image, FLOPs per concept per image) of a SAM 3 of ``config``
    (default: the published size), counted by ``torch.utils.flop_counter``: the image's ViT + FPN
    on the meta device (no memory, no weights); the per-concept part (DETR encoder, decoder, mask
    decoder) runs for real on the CPU (its code reads feature sizes from tensors), against an
    image encoding of the right shapes from a one-layer stand-in backbone (random weights). Text
    features are excluded: they are computed once per job."""
    import copy

    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    config = config if config is not None else transformers.Sam3Config()
    backbone = config.vision_config.backbone_config
    side = backbone.image_size if isinstance(backbone.image_size, int) else backbone.image_size[0]
    with torch.device("meta"):
        vision_model = transformers.Sam3Model(config).vision_encoder.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            vision_model(torch.zeros(1, 3, side, side))
    image = float(counter.get_total_flops())
    small = copy.deepcopy(config)
    small.vision_config.backbone_config.hidden_size = 16
    small.vision_config.backbone_config.intermediate_size = 16
    small.vision_config.backbone_config.num_hidden_layers = 1
    small.vision_config.backbone_config.num_attention_heads = 1
    small.vision_config.backbone_config.global_attn_indexes = [0]
    small.text_config.num_hidden_layers = 1
    model = transformers.Sam3Model(small).eval()
    length = int(config.text_config.max_position_embeddings)
    text = torch.zeros(concepts, length, config.detr_encoder_config.hidden_size)
    with torch.no_grad():
        vision = model.get_vision_features(pixel_values=torch.zeros(1, 3, side, side))
        vision = _repeat_vision(vision, torch.zeros(concepts, dtype=torch.long))
        counter = FlopCounterMode(display=False)
        with counter:
            model(vision_embeds=vision, text_embeds=_text_output(text))
    return image, float(counter.get_total_flops()) / concepts


def check_concept_count(count: int, limit: int, *, flops: tuple[float, float] | None = None) -> None:
    """ConfigError when ``count`` concepts exceed ``limit``, with what they would cost: the
    FLOPs per concept per image (``flops``, default: counted for the published size)."""
    if count <= limit:
        return
    image, per_concept = flops if flops is not None else sam3_flops()
    raise ConfigError(
        f"detector:sam3 with {count} concepts: above the limit of {limit} (--detector-max-concepts). SAM 3 runs "
        f"one pass per concept: {per_concept / 1e9:.0f} GFLOPs per concept per image at the published size, "
        f"{count} concepts {count * per_concept / 1e12:.1f} TFLOPs per image on top of {image / 1e12:.1f} for "
        "encoding it (linear in the number of concepts). Shorten the list or raise --detector-max-concepts"
    )


def _text_output(features: torch.Tensor) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=features)


def _repeat_vision(vision: Any, index: torch.Tensor) -> Any:
    """The image encoding of images ``index`` (one per concept of a batch)."""
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    return Sam3VisionEncoderOutput(
        fpn_hidden_states=tuple(x[index] for x in vision.fpn_hidden_states),
        fpn_position_encoding=tuple(x[index] for x in vision.fpn_position_encoding),
    )


class Sam3Detector(_HFDetector):
    """SAM 3: every instance of each concept; the image encoded once, concepts in batches."""

    name = "sam3"
    model_class = "Sam3Model"

    def __init__(
        self,
        *,
        queries: Sequence[str],
        score_threshold: float = 0.3,
        concept_batch: int = DEFAULT_CONCEPT_BATCH,
        max_concepts: int = DEFAULT_MAX_CONCEPTS,
        keep_masks: bool = False,
        **kwargs: Any,
    ) -> None:
        if not queries:
            raise ConfigError("detector:sam3 needs a concept list (--detector-queries FILE|vocab-name)")
        if concept_batch < 1:
            raise ConfigError(f"detector:sam3: concept_batch={concept_batch}, must be >= 1")
        check_concept_count(len(queries), max_concepts)
        super().__init__(**kwargs)
        self.queries = list(queries)
        self.score_threshold = score_threshold
        self.concept_batch = concept_batch
        self.keep_masks = keep_masks
        size = self.processor.size
        self.side = (int(size["height"]), int(size["width"]))
        self.text, self.text_mask = self._embed_concepts()

    @torch.no_grad()
    def _embed_concepts(self, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Each concept's projected text features (K, tokens, d) and attention mask (K, tokens):
        the processor's padding (to the text encoder's 32 positions), computed once."""
        length = int(self.model.config.text_config.max_position_embeddings)
        feats, masks = [], []
        for start in range(0, len(self.queries), chunk):
            tok = self.tokenizer(
                self.queries[start : start + chunk],
                padding="max_length",
                truncation=True,
                max_length=length,
                return_tensors="pt",
            )
            ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            with self._autocast():
                feats.append(self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output)
            masks.append(mask)
        return torch.cat(feats), torch.cat(masks)

    def _preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """Each image resized to the model's square (the processor's plain resize), normalised."""
        batch = torch.empty((len(images), 3, *self.side), device=self.device)
        for k, im in enumerate(images):
            x = F.interpolate(
                self._pixels(im)[None], size=self.side, mode="bilinear", antialias=True, align_corners=False
            )
            batch[k] = self._normalise(x[0].clamp_(0, 1))
        return batch

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        if not images:
            return []
        b = len(images)
        with self._autocast():
            vision = self.model.get_vision_features(pixel_values=self._preprocess(images))
        parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in images]
        for start in range(0, len(self.queries), self.concept_batch):
            concepts = torch.arange(start, min(start + self.concept_batch, len(self.queries)), device=self.device)
            c = len(concepts)
            image_of_pair = torch.arange(b, device=self.device).repeat_interleave(c)  # image-major pairs
            concept_of_pair = concepts.repeat(b)
            with self._autocast():
                out = self.model(
                    vision_embeds=_repeat_vision(vision, image_of_pair),
                    text_embeds=_text_output(self.text[concept_of_pair]),
                    attention_mask=self.text_mask[concept_of_pair],
                )
            scores = out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid()  # (b*c, queries)
            for p in range(b * c):
                keep = torch.nonzero(scores[p] >= self.score_threshold).flatten()
                if len(keep) == 0:
                    continue
                part = [out.pred_boxes[p][keep].float(), scores[p][keep], concept_of_pair[p].expand(len(keep))]
                if self.keep_masks:
                    part.append(out.pred_masks[p][keep].float().cpu())
                parts[p // c].append(tuple(part))
        results = []
        for k, im in enumerate(images):
            h, w = im.shape[:2]
            scale = torch.tensor([w, h, w, h], device=self.device, dtype=torch.float32)
            if parts[k]:
                cols = [torch.cat(x) for x in zip(*parts[k])]
            else:
                cols = [torch.zeros((0, 4), device=self.device), torch.zeros(0), torch.zeros(0, dtype=torch.long)]
            xyxy = torch.minimum((cols[0] * scale).clamp(min=0), scale)  # normalised to the resized image
            det = {
                "boxes": xyxy.cpu().numpy(),
                "scores": cols[1].cpu().numpy(),
                "labels": [self.queries[int(i)] for i in cols[2].cpu()],
            }
            if self.keep_masks:
                det["masks"] = cols[3].numpy() if parts[k] else np.zeros((0, 1, 1), np.float32)
            results.append(det)
        return results


HF_DETECTORS = {"owlv2": Owlv2Detector, "grounding-dino": GroundingDinoDetector, "sam3": Sam3Detector}


def load_hf_detector(
    name: str,
    *,
    weights: str | None,
    device: str = "cpu",
    random_init: bool = False,
    score_threshold: float = 0.3,
    queries: Sequence[str] | None = None,
    objectness_threshold: float | None = None,
    s3_endpoint: str | None = None,
    bf16: bool = True,
    concept_batch: int = DEFAULT_CONCEPT_BATCH,
    max_concepts: int = DEFAULT_MAX_CONCEPTS,
    keep_masks: bool = False,
) -> _HFDetector:
    common: dict[str, Any] = {
        "weights": weights,
        "device": device,
        "random_init": random_init,
        "s3_endpoint": s3_endpoint,
        "bf16": bf16,
        "score_threshold": score_threshold,
    }
    if name == "owlv2":
        return Owlv2Detector(queries=queries, objectness_threshold=objectness_threshold, **common)
    if objectness_threshold is not None:
        raise ConfigError(f"--detector-objectness-threshold is OWLv2's (objectness head); detector:{name} has none")
    if name == "sam3":
        return Sam3Detector(
            queries=queries or [],
            concept_batch=concept_batch,
            max_concepts=max_concepts,
            keep_masks=keep_masks,
            **common,
        )
    return HF_DETECTORS[name](queries=queries or [], **common)
