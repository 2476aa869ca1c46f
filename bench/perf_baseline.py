"""Mode b of ``bench/perf.py``: the SAM + CLIP image-crop baseline (OV-SAM paper, Fig. 2a).

Per batch of images: SAM's image encoder on the batch, SAM's prompt encoder + mask decoder per
image for its boxes (one mask per box, as SAM's predictor does), masks upsampled to the original
size and RLE-encoded exactly as our fast path does it (so that post-processing costs the same);
then every box is cropped from the original image, resized to the CLIP input size and encoded
by a CLIP image tower (all crops of the batch together), and classified against random text
embeddings with the vocabulary's number of classes. segment_anything and open_clip modules are
used as they are (random weights), with bf16 autocast and channels_last CLIP on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.benchlib import StageTimer
from bench.perf_modes import BASELINE_STAGES, _measure, _sync, count_flops, load_samples


class CropBaseline:
    """SAM masks + CLIP crop labels for box prompts; ``__call__`` returns per image
    ``[[label, rle], ...]`` and charges its stages to a ``StageTimer``."""

    def __init__(
        self,
        *,
        sam: torch.nn.Module,
        clip_visual: torch.nn.Module,
        text: torch.Tensor,
        device: torch.device,
        fast: bool,
        rle_on_device: bool,
        crop_chunk: int = 256,
    ) -> None:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam, self.clip, self.text, self.device = sam, clip_visual, text, device
        self.fast, self.rle_on_device, self.crop_chunk = fast, rle_on_device, crop_chunk
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        size = clip_visual.image_size
        self.clip_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1) * 255
        if fast:
            self.clip.to(memory_format=torch.channels_last)

    def _autocast(self) -> Any:
        if self.fast and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _rles(self, masks: torch.Tensor) -> list[dict[str, Any]]:
        """(N, H, W) bool -> compressed COCO RLEs, run lengths on the device or pycocotools on the host."""
        from ovsam_ray.data.rle import compress_rles, encode_masks
        from ovsam_ray.model.rle_torch import mask_run_lengths

        if not self.rle_on_device:
            return encode_masks(masks.cpu().numpy())
        counts, lengths = mask_run_lengths(masks)
        runs = np.split(counts.cpu().numpy(), np.cumsum(lengths.cpu().numpy())[:-1]) if len(masks) else []
        return compress_rles([{"size": list(masks.shape[1:]), "counts": c} for c in runs])

    def _crops(self, image: torch.Tensor, boxes: np.ndarray) -> list[torch.Tensor]:
        h, w = image.shape[-2:]
        out = []
        for x0, y0, x1, y1 in np.asarray(boxes, np.float64):
            x0, y0 = min(int(x0), w - 1), min(int(y0), h - 1)
            x1, y1 = max(int(np.ceil(x1)), x0 + 1), max(int(np.ceil(y1)), y0 + 1)
            crop = image[None, :, y0:y1, x0:x1]
            out.append(F.interpolate(crop, self.clip_size, mode="bilinear", align_corners=False, antialias=True))
        return out

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], boxes: list[np.ndarray], timer: StageTimer) -> list[list]:
        sam, dev = self.sam, self.device
        with timer.stage("preprocess"):
            pixels = [torch.as_tensor(im).to(dev).permute(2, 0, 1).float() for im in images]
            resized = [self.transform.apply_image_torch(p[None])[0] for p in pixels]
            x = torch.stack([sam.preprocess(r) for r in resized])
        with timer.stage("sam_encoder"), self._autocast():
            embeddings = sam.image_encoder(x)
        lows = []
        with timer.stage("sam_decoder"), self._autocast():
            image_pe = sam.prompt_encoder.get_dense_pe()
            for i, b in enumerate(boxes):
                b = self.transform.apply_boxes_torch(torch.as_tensor(b, device=dev), pixels[i].shape[-2:])
                sparse, dense = sam.prompt_encoder(points=None, boxes=b, masks=None)
                low, _ = sam.mask_decoder(
                    image_embeddings=embeddings[i : i + 1],
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                lows.append(low)
        with timer.stage("post"):
            rles = []
            for low, r, p in zip(lows, resized, pixels):
                masks = sam.postprocess_masks(low.float(), tuple(r.shape[-2:]), tuple(p.shape[-2:]))[:, 0]
                rles.append(self._rles(masks > sam.mask_threshold))
        with timer.stage("crop"):
            crops = torch.cat([c for p, b in zip(pixels, boxes) for c in self._crops(p, b)])
            crops = ((crops - self.mean) / self.std).contiguous(
                memory_format=torch.channels_last if self.fast else torch.contiguous_format
            )
        with timer.stage("clip"), self._autocast():
            step = self.crop_chunk
            feats = torch.cat([self.clip(crops[j : j + step]) for j in range(0, len(crops), step)])
        with timer.stage("classify"):
            probs = (100.0 * F.normalize(feats.float(), dim=-1) @ self.text.T).softmax(dim=-1)
            labels = probs.argmax(dim=-1).tolist()
        out, start = [], 0
        for r in rles:
            out.append([[labels[start + j], rle] for j, rle in enumerate(r)])
            start += len(r)
        return out


def _baseline_pass(model: CropBaseline, samples: list[dict], batch: int, timer: StageTimer) -> dict[str, list]:
    from ovsam_ray.data.decode import decode_sample

    preds: dict[str, list] = {}
    for i in range(0, len(samples), batch):
        with timer.stage("jpeg_decode"):
            decoded = [decode_sample(s) for s in samples[i : i + batch]]
        out = model([d.image for d in decoded], [d.prompts.boxes for d in decoded], timer)
        preds.update({d.key: o for d, o in zip(decoded, out)})
    return preds


def build_baseline(args: dict[str, Any], work: str, device: torch.device) -> CropBaseline:
    import open_clip
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry[args["sam_arch"]](checkpoint=None).to(device).eval().requires_grad_(False)
    clip_visual = open_clip.create_model(args["crop_clip"]).visual.to(device).eval().requires_grad_(False)
    with open(os.path.join(work, "vocab.txt")) as f:
        num_classes = sum(1 for line in f if line.strip())
    text = F.normalize(torch.randn(num_classes, clip_visual.output_dim), dim=-1).to(device)
    cuda = device.type == "cuda"
    rle_on_device = cuda if args["rle_on_device"] is None else args["rle_on_device"]
    return CropBaseline(
        sam=sam, clip_visual=clip_visual, text=text, device=device, fast=cuda, rle_on_device=rle_on_device
    )


def run_baseline(args: dict[str, Any], work: str) -> dict[str, Any]:
    """Mode b: build, count one image's FLOPs (the warm-up), time a pass, then per-stage times."""
    device = torch.device(args["device"])
    model = build_baseline(args, work, device)
    batch = args["batch_size"] if device.type == "cuda" else 1
    samples = load_samples(work, args["baseline_images"])
    from ovsam_ray.data.decode import decode_sample

    d = decode_sample(samples[0])
    flops = count_flops(lambda: model([d.image], [d.prompts.boxes], StageTimer()))
    sync = _sync(device)
    if sync is not None and batch > 1:
        _baseline_pass(model, samples[:batch], batch, StageTimer())
    timer = StageTimer()  # no sync: on a CPU it costs nothing, on a GPU this pass only gives throughput
    m = _measure(device, lambda: _baseline_pass(model, samples, batch, timer))
    m.pop("result")
    stage_images = len(samples)
    if sync is not None:
        stage_images = min(len(samples), args["stage_images"])
        timer = StageTimer(sync)
        _baseline_pass(model, samples[:stage_images], batch, timer)
    stages = {k: round(1e3 * timer.seconds.get(k, 0.0) / stage_images, 3) for k in BASELINE_STAGES}
    settings = {
        "sam_arch": args["sam_arch"],
        "crop_clip": args["crop_clip"],
        "clip_input": list(model.clip_size),
        "batch_size": batch,
        "bf16": model.fast and device.type == "cuda",
        "rle_on_device": model.rle_on_device,
        "threads": torch.get_num_threads(),
    }
    return {
        **m,
        "images": len(samples),
        "images_per_s": round(len(samples) / m["wall_s"], 3),
        "ms_per_image": round(1e3 * m["wall_s"] / len(samples), 2),
        "stages_ms": stages,
        "stage_images": stage_images,
        "flops_per_image": flops,
        "settings": settings,
    }
