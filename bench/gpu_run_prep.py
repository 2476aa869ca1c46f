"""The small jobs of ``bench/gpu_run.py`` that are not benchmarks: each runs as its own command
inside its stage's time budget.

    python -m bench.gpu_run_prep env OUT.json              # versions, the GPU, every later stage's imports
    python -m bench.gpu_run_prep label WORK [--smoke]      # label shards
    python -m bench.gpu_run_prep train WORK [--smoke]      # training shards + their vocabulary

Sizes: a GPU run labels 2 shards x 32 images (640x480, 20 box prompts) with the built-in ``in21k``
vocabulary (21,841 ImageNet-21k classes from timm's offline ImageNetInfo; no file to download) and
trains on 24 generated images of shapes (640x480; the training input is 1024); ``--smoke`` makes
them tiny (the vocabulary stays the whole in21k).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

from bench.benchlib import machine_info, save_json, write_bench_shards

# The packages pinned in bench/gpu_kit.txt (what a GPU machine with only PyTorch installed lacks),
# then what such a machine already has; the submodules are the later stages' own imports (Ray Data
# for the label job, Ray Train for training, pydantic under Ray's APIs), so that a clash between
# the two sets fails here, in seconds, not minutes into a stage.
KIT_MODULES = {
    "ray": "ray",
    "ray.data": "ray",
    "ray.train": "ray",
    "ray.train.torch": "ray",
    "open_clip": "open_clip_torch",
    "segment_anything": "segment-anything",
    "webdataset": "webdataset",
    "pycocotools": "pycocotools",
    "pydantic": "pydantic",
    "ftfy": "ftfy",
}
IMAGE_MODULES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "pyarrow": "pyarrow",
    "pyarrow.parquet": "pyarrow",
    "pandas": "pandas",
    "fsspec": "fsspec",
    "PIL": "pillow",
    "numpy": "numpy",
    "pytest": "pytest",
}
#: The pins (name==version per line).
KIT_PINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_kit.txt")
LABEL_SIZES = {
    "gpu": {"num_images": 64, "images_per_shard": 32, "size": (640, 480), "prompts": 20},
    "smoke": {"num_images": 4, "images_per_shard": 2, "size": (160, 120), "prompts": 3},
}
TRAIN_SIZES = {
    "gpu": {"num_images": 24, "images_per_shard": 8, "image_size": (640, 480)},
    "smoke": {"num_images": 8, "images_per_shard": 4, "image_size": (128, 96)},
}


def pin_report() -> dict[str, dict[str, str | None]]:
    """{distribution: {"pinned": version, "installed": version or None}} for ``KIT_PINS``."""
    out = {}
    with open(KIT_PINS) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" not in line:
                continue
            name, version = line.split("==", 1)
            try:
                installed = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                installed = None
            out[name] = {"pinned": version, "installed": installed}
    return out


def probe_env(out: str) -> int:
    """Import every module the run needs, note versions and the GPU; exit 1 when one is missing."""
    modules = {}
    for module, dist in {**KIT_MODULES, **IMAGE_MODULES}.items():
        try:
            importlib.import_module(module)
            modules[module] = {"ok": True, "version": importlib.metadata.version(dist)}
        except Exception as e:  # noqa: BLE001 - a broken install raises anything
            modules[module] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    # the project's own heavy imports, as the stages make them
    for module in ("ovsam_ray.pipeline.label_job", "ovsam_ray.training.trainer"):
        try:
            importlib.import_module(module)
            modules[module] = {"ok": True, "version": None}
        except Exception as e:  # noqa: BLE001
            modules[module] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    info = {
        "machine": machine_info(),
        "modules": modules,
        "python": sys.executable,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "pins": pin_report(),
    }
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "count": torch.cuda.device_count(),
        }
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.used,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip()
    save_json(info, out)
    missing = [m for m, r in modules.items() if not r["ok"]]
    versions = {m: r.get("version") for m, r in modules.items() if r["ok"] and r.get("version")}
    print(json.dumps({"missing": missing, "gpu": info.get("gpu"), "versions": versions}))
    return 1 if missing else 0


def prepare_label(work: str, smoke: bool) -> int:
    sizes = LABEL_SIZES["smoke" if smoke else "gpu"]
    write_bench_shards(
        os.path.join(work, "label_shards"),
        num_images=sizes["num_images"],
        images_per_shard=sizes["images_per_shard"],
        size=sizes["size"],
        prompts=sizes["prompts"],
    )
    return 0


def prepare_train(work: str, smoke: bool) -> int:
    from ovsam_ray.data.synthetic import generate_shards, shape_vocabulary_names

    shutil.rmtree(os.path.join(work, "runs"), ignore_errors=True)  # a run found there would be resumed
    shards = os.path.join(work, "train_shards")
    if not os.path.isdir(shards):  # both training stages share them
        sizes = TRAIN_SIZES["smoke" if smoke else "gpu"]
        generate_shards(
            shards + ".tmp",
            num_images=sizes["num_images"],
            images_per_shard=sizes["images_per_shard"],
            image_size=sizes["image_size"],
            seed=3,
        )
        os.replace(shards + ".tmp", shards)
    with open(os.path.join(work, "shapes.json"), "w") as f:
        json.dump(shape_vocabulary_names(), f)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["env", "label", "train"])
    p.add_argument("path", help="env: the JSON to write; label/train: the work folder")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.what == "env":
        return probe_env(a.path)
    os.makedirs(a.path, exist_ok=True)
    return prepare_label(a.path, a.smoke) if a.what == "label" else prepare_train(a.path, a.smoke)


if __name__ == "__main__":
    sys.exit(main())
