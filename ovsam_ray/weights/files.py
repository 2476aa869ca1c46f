"""The one place that finds, reads, converts, checks and writes weights files (DESIGN §3).

Finding: ``find_files`` maps parts to the first candidate name present in a weights location (a
local folder or an ``s3://`` prefix); ``local_path`` / ``local_dir`` give a local copy of a
file / of a whole location (remote ones are copied once into a local cache), for any loader.
Reading: released files load as they are, strictly, with ``torch.load(weights_only=True)``: a
bare state dict or an mmengine-style dict with ``state_dict``; keys outside the prefixes a part
needs are ignored. Our own exports use the same layout plus a ``meta`` dict describing
themselves. Every failure is a ``WeightsError`` naming the file.

``ovsam_ray.weights.released`` assembles an OV-SAM model from these files (released weights);
training checkpoints (a run's resumable state) are another thing, kept in ``training/trainer.py``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ovsam_ray.errors import OVSAMRayError

PUBLISHED = {
    "sam": "https://github.com/facebookresearch/segment-anything#model-checkpoints "
    "(e.g. https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth)",
    "sam2clip": "https://huggingface.co/HarborYuan/ovsam_models (sam2clip_vith_rn50x16.pth)",
    "clip2sam": "https://huggingface.co/HarborYuan/ovsam_models (clip2sam_coco_rn50x16.pth, clip2sam_lvis_rn50x16.pth)",
    "clip": "open_clip's pretrained registry (open_clip.get_pretrained_url(name, tag)), e.g. OpenAI's RN50x16.pt",
}


class WeightsError(OVSAMRayError, RuntimeError):
    """A weights file is missing, unreadable, or does not fit the model part it is for."""


@dataclass(frozen=True)
class Part:
    """A model part and the key renames between a file's layout and the model's state dict.

    file_to_model / model_to_file: ordered (regex, replacement) rules; the first match wins and
    keys matching no rule are outside the part.
    """

    name: str
    model_prefixes: tuple[str, ...]
    file_to_model: tuple[tuple[str, str], ...]
    model_to_file: tuple[tuple[str, str], ...]
    published: str = ""


SAM2CLIP = Part(
    name="sam2clip",
    model_prefixes=("adapter.",),
    file_to_model=((r"^neck_student\.", "adapter."),),
    model_to_file=((r"^adapter\.", "neck_student."),),
    published=PUBLISHED["sam2clip"],
)
CLIP2SAM = Part(
    name="clip2sam",
    model_prefixes=("recognizer.", "decoder."),
    file_to_model=(
        (r"^fpn_neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.", r"recognizer.fpn.\1.\2."),
        (r"^mask_decoder\.roi_conv\.0\.conv\.", "recognizer.roi_conv."),
        (r"^mask_decoder\.mask_decoder\.", "decoder."),
        (r"^mask_decoder\.(label_token|label_mlp)\.", r"decoder.\1."),
    ),
    model_to_file=(
        (r"^recognizer\.fpn\.(lateral_convs|fpn_convs)\.(\d+)\.", r"fpn_neck.\1.\2.conv."),
        (r"^recognizer\.roi_conv\.", "mask_decoder.roi_conv.0.conv."),
        (r"^decoder\.(label_token|label_mlp)\.", r"mask_decoder.\1."),
        (r"^decoder\.", "mask_decoder.mask_decoder."),
    ),
    published=PUBLISHED["clip2sam"],
)
PROMPT_ENCODER = Part(
    name="sam prompt encoder",
    model_prefixes=("prompt_encoder.",),
    file_to_model=((r"^prompt_encoder\.", "prompt_encoder."),),
    model_to_file=((r"^prompt_encoder\.", "prompt_encoder."),),
    published=PUBLISHED["sam"],
)
# SAM's own mask decoder as the initialisation of ours: the first mask token only, no IoU head.
SAM_DECODER_INIT = Part(
    name="sam mask decoder",
    model_prefixes=(
        "decoder.transformer.",
        "decoder.mask_tokens.",
        "decoder.output_upscaling.",
        "decoder.output_hypernetworks_mlps.",
    ),
    file_to_model=((r"^mask_decoder\.(?!iou_)(?!output_hypernetworks_mlps\.[1-9])", "decoder."),),
    model_to_file=((r"^decoder\.", "mask_decoder."),),
    published=PUBLISHED["sam"],
)


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


# ---------------------------------------------------------------- reading files


@dataclass
class WeightsFile:
    """A loaded checkpoint: its state dict, its ``meta`` (ours) and identity."""

    path: str
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    sha256: str = ""


_LOCAL_CACHE = Path(os.environ.get("OVSAM_RAY_CACHE", Path.home() / ".cache" / "ovsam_ray")) / "weights"


def _local(url: str) -> str | None:
    """The local path ``url`` names (a plain path or ``file://``), or None for a remote URL."""
    return url.removeprefix("file://") if "://" not in url or url.startswith("file://") else None


def local_path(url: str, *, s3_endpoint: str | None = None) -> str:
    """A local file for ``url``: the path itself, or a cached copy of a remote object."""
    path = _local(url)
    if path is not None:
        if not os.path.isfile(path):
            raise WeightsError(f"weights file not found: {path}")
        return path
    from ovsam_ray.storage import get_filesystem

    fs, remote = get_filesystem(url, s3_endpoint=s3_endpoint)
    try:
        info = fs.info(remote)
    except FileNotFoundError as e:
        raise WeightsError(f"weights file not found: {url}") from e
    version = f"{url}:{info.get('size')}:{info.get('ETag', info.get('mtime', ''))}"
    tag = hashlib.sha256(version.encode()).hexdigest()[:16]
    target = _LOCAL_CACHE / f"{tag}-{os.path.basename(remote)}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        os.close(fd)
        fs.get(remote, tmp)
        os.replace(tmp, target)
    return str(target)


def list_location(location: str, *, s3_endpoint: str | None = None) -> list[str]:
    """Sorted names of the entries directly inside a local folder or ``s3://`` prefix (none when
    it does not exist)."""
    from ovsam_ray.storage import get_filesystem

    fs, root = get_filesystem(location, s3_endpoint=s3_endpoint)
    if not fs.exists(root):
        return []
    return sorted({os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)})


def find_files(
    location: str, candidates: Mapping[str, Sequence[str]], *, s3_endpoint: str | None = None
) -> dict[str, str]:
    """part -> URL of the first of its candidate names present in ``location``. A candidate may
    be a glob pattern (``clip2sam_*.pth``: the first match in sorted order); parts with no
    candidate present are left out (the caller decides which are required)."""
    present = list_location(location, s3_endpoint=s3_endpoint)
    prefix = location.rstrip("/")
    found: dict[str, str] = {}
    for part, names in candidates.items():
        match = next((m for pattern in names for m in fnmatch.filter(present, pattern)), None)
        if match is not None:
            found[part] = f"{prefix}/{match}"
    return found


def local_dir(location: str, *, s3_endpoint: str | None = None) -> str:
    """A local folder holding the files of ``location``, for loaders that read a whole folder
    (``from_pretrained``): a local folder as it is; an ``s3://`` (any fsspec) prefix copied, with
    its sub-folders, into the local cache once per version of its listing (names, sizes, ETags)."""
    path = _local(location)
    if path is not None:
        if not os.path.isdir(path):
            raise WeightsError(f"weights folder not found: {path}")
        return path
    from ovsam_ray.storage import get_filesystem, safe_join

    fs, root = get_filesystem(location, s3_endpoint=s3_endpoint)
    root = root.rstrip("/")
    try:
        listing = fs.find(root, detail=True)
    except FileNotFoundError:
        listing = {}
    files = sorted((p[len(root) :].lstrip("/"), info) for p, info in listing.items() if p.startswith(root + "/"))
    if not files:
        raise WeightsError(f"weights location {location} holds no files")
    stamps = [(rel, info.get("size"), str(info.get("ETag", info.get("mtime", "")))) for rel, info in files]
    version = json.dumps([location.rstrip("/"), stamps])
    target = _LOCAL_CACHE / f"{hashlib.sha256(version.encode()).hexdigest()[:16]}-{os.path.basename(root)}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=target.parent, suffix=".part")
        try:
            for rel, _ in files:
                dst = safe_join(tmp, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                fs.get_file(f"{root}/{rel}", dst)
            os.rename(tmp, target)
        except OSError:
            if not target.exists():  # not a concurrent copy that finished first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_weights(url: str, *, s3_endpoint: str | None = None, what: str = "") -> WeightsFile:
    """Load a checkpoint with ``weights_only=True``: a bare state dict or {'state_dict': ...}."""
    path = local_path(url, s3_endpoint=s3_endpoint)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one clear error
        hint = f" ({what}: {PUBLISHED.get(what, '')})" if what else ""
        raise WeightsError(f"cannot read weights file {url}{hint}: {e}") from e
    meta: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = obj.get("meta") or {}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{url} is not a state dict of tensors")
    return WeightsFile(path=url, state_dict=obj, meta=meta if isinstance(meta, dict) else {}, sha256=file_sha256(path))


def is_torchscript_archive(path: str) -> bool:
    """OpenAI's released CLIP files are TorchScript archives (a zip with code/ and constants.pkl)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def convert_torchscript_clip(src: str, dst: str) -> int:
    """One-time conversion of OpenAI's TorchScript CLIP file into a plain state dict that loads
    with ``weights_only=True``. Runs ``torch.jit.load`` on ``src``: use it on files you trust."""
    module = torch.jit.load(src, map_location="cpu")
    state = {
        k: v for k, v in module.state_dict().items() if k not in ("input_resolution", "context_length", "vocab_size")
    }
    tmp = dst + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, dst)
    return len(state)


# ---------------------------------------------------------------- converting


def convert_part(state_dict: dict[str, torch.Tensor], part: Part) -> dict[str, torch.Tensor]:
    """File layout -> model keys for one part; keys outside the part are dropped."""
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, part.file_to_model)
        if new is not None:
            out[new] = value
    if part is SAM_DECODER_INIT and "decoder.mask_tokens.weight" in out:
        out["decoder.mask_tokens.weight"] = out["decoder.mask_tokens.weight"][:1]
    return out


def export_part(model_state: dict[str, torch.Tensor], part: Part) -> dict[str, torch.Tensor]:
    """Model keys -> the released file layout for one part."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        if key.startswith(part.model_prefixes):
            name = _rename(key, part.model_to_file)
            assert name is not None, f"{key}: the {part.name} rules rename every key under its prefixes"
            out[name] = value.detach().cpu().contiguous()
    return out


def load_part(model: nn.Module, weights: WeightsFile, part: Part) -> None:
    """Strictly load ``part`` of ``model`` from ``weights``; one readable error on mismatch."""
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(part.model_prefixes)}
    got = convert_part(weights.state_dict, part)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(
        f"{_rename(k, part.model_to_file) or k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(got) & set(expected)
        if got[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:

        def _show(keys: list[str]) -> str:
            inverse = [_rename(k, part.model_to_file) or k for k in keys]
            more = f" ... (+{len(inverse) - 12} more)" if len(inverse) > 12 else ""
            return ", ".join(inverse[:12]) + more

        lines = [f"weights file {weights.path} does not fit the {part.name} part of the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_show(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {'; '.join(shapes[:6])}")
        lines.append(f"  the released file is published at {part.published}")
        raise WeightsError("\n".join(lines))
    model.load_state_dict(got, strict=False)
