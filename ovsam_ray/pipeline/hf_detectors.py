"""Open-vocabulary detectors from Hugging Face ``transformers`` as prompt sources
(``--prompts detector:owlv2`` / ``detector:grounding-dino``; ``pip install ovsam_ray[detectors]``).

Weights are a folder in ``save_pretrained`` layout, local or under an ``s3://`` prefix (copied to
the local cache once); nothing is downloaded at run time. The folder holds ``config.json``, the
weights (``model.safetensors`` or ``pytorch_model.bin``), the image processor's settings
(``preprocessor_config.json`` or ``processor_config.json``) and the tokenizer's files
(``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` for OWLv2 / ``vocab.txt`` for Grounding
DINO) — what ``huggingface-cli download REPO --local-dir DIR`` fetches from the repos in
``PUBLISHED``. ``--detector-weights`` names that folder or one holding it as ``owlv2/`` or
``grounding-dino/``.

Both detectors take the stage's (H, W, 3) uint8 images, preprocess them on the model's device with
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
from ovsam_ray.weights.files import WeightsError, local_dir

log = logging.getLogger(__name__)

__all__ = [
    "HF_DETECTORS",
    "PUBLISHED",
    "GroundingDinoDetector",
    "Owlv2Detector",
    "check_available",
    "load_hf_detector",
    "query_names",
    "resolve_folder",
]

PUBLISHED = {
    "owlv2": "https://huggingface.co/google/owlv2-base-patch16-ensemble (or google/owlv2-large-patch14-ensemble)",
    "grounding-dino": "https://huggingface.co/IDEA-Research/grounding-dino-tiny (or IDEA-Research/grounding-dino-base)",
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


def check_available(name: str) -> None:
    """Raise ImportError with the install line unless ``transformers`` can be imported."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(f"detector:{name} needs Hugging Face transformers: pip install 'ovsam_ray[detectors]'")


def _expected(name: str, location: str) -> str:
    files = "; ".join(f"{what}: {' or '.join(names)}" for what, names in REQUIRED_FILES)
    return (
        f"detector:{name} needs a save_pretrained folder at {storage.redact(location)} (or its {name}/ subfolder) "
        f"holding {files}. Published at {PUBLISHED[name]}; fetch it once, e.g. huggingface-cli download REPO "
        f"--local-dir DIR, and pass --detector-weights DIR (a local folder or an s3:// prefix)"
    )


def resolve_folder(
    location: str | None, name: str, *, s3_endpoint: str | None = None, need_weights: bool = True
) -> str:
    """A local folder in save_pretrained layout for detector ``name``: ``location`` itself or its
    ``name/`` subfolder; under ``s3://`` the folder is copied to the local cache once per version
    (``weights.local_dir``). Raises WeightsError naming the expected files (the weights file not
    among them when ``need_weights`` is False: a random init needs only the rest)."""
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
    return local_dir(candidate, s3_endpoint=s3_endpoint)


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
        cls = getattr(transformers, self.model_class)
        try:
            self.processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            if random_init:
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


HF_DETECTORS = {"owlv2": Owlv2Detector, "grounding-dino": GroundingDinoDetector}


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
    return HF_DETECTORS[name](queries=queries or [], **common)
