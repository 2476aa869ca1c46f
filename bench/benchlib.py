"""Shared helpers of the benchmarks in ``bench/`` (not a test, not part of the package).

- ``machine_info``: what a result was measured on (CPU model, cores, GPU, versions, load).
- ``write_bench_shards``: JPEG WebDataset shards with an exact number of box prompts per image,
  generated in parallel so that a GPU run does not spend its device time drawing shapes.
- ``TreeSampler``: peak memory (PSS, so that shared pages of Ray's processes are not counted
  twice) and CPU time of a process and all its descendants, plus the GPU's used memory.
- ``StageTimer``: wall time per named stage; with ``sync`` (``torch.cuda.synchronize``) at
  every boundary so that asynchronous CUDA work is charged to the stage that queued it.
- ``peak_bf16_tflops``: the dense bf16 peak of a GPU by name, for MFU.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s. Most specific
# name first: "H100 NVL" and "H100 PCIe" must not match the SXM entry. Override with --peak-tflops.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
)


def peak_bf16_tflops(gpu_name: str | None) -> float | None:
    """Dense bf16 peak of ``gpu_name`` (as ``torch.cuda.get_device_name`` says it), or None."""
    if not gpu_name:
        return None
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in gpu_name.lower():
            return peak
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model and cores, GPU name, library versions and the load average at the start: the
    CPU figures of this project are taken on a shared 2-core machine, so the load says how shared."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if gpu else None,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if gpu:  # torch's defaults, which every mode keeps (no TF32 for matmuls, TF32 for convolutions)
        info["tf32"] = {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def save_json(obj: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


# --- shards ---------------------------------------------------------------------------------------


def _extra_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """``n`` random XYXY boxes, 5-50% of each side, inside the image."""
    if n <= 0:
        return np.zeros((0, 4), np.float32)
    size = rng.uniform(0.05, 0.5, (n, 2)) * [width, height]
    x0 = rng.uniform(0, 1, n) * (width - size[:, 0])
    y0 = rng.uniform(0, 1, n) * (height - size[:, 1])
    return np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], axis=1).astype(np.float32)


def _write_shard(
    path: str, start: int, stop: int, seed: int, size: tuple[int, int], prompts: int, objects: tuple[int, int]
) -> str:
    """One shard of images ``start..stop-1``: the shapes' visible boxes first, then random boxes
    until every image has exactly ``prompts`` box prompts (real detectors give many, overlapping)."""
    from ovsam_ray.data.rle import boxes_from_binary_masks
    from ovsam_ray.data.synthetic import encode_image, render_image, tar_bytes

    members = []
    for index in range(start, stop):
        rng = np.random.default_rng([seed, index])
        image, _, masks = render_image(rng, size[0], size[1], objects[0], objects[1])
        boxes = boxes_from_binary_masks(masks)[:prompts]
        boxes = np.concatenate([boxes, _extra_boxes(rng, prompts - len(boxes), size[0], size[1])])
        key = f"{index:09d}"
        meta = {"image_id": index, "boxes": boxes.round(2).tolist()}
        members += [(f"{key}.jpg", encode_image(image, "jpg")), (f"{key}.json", json.dumps(meta).encode())]
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    with open(tmp, "wb") as f:
        f.write(tar_bytes(members))
    os.replace(tmp, path)
    return path


def write_bench_shards(
    out_dir: str,
    *,
    num_images: int,
    images_per_shard: int,
    size: tuple[int, int],
    prompts: int,
    objects: tuple[int, int] = (3, 6),
    seed: int = 0,
    workers: int | None = None,
) -> list[str]:
    """Write ``shard-%06d.tar`` files of ``size`` = (W, H) JPEGs with ``prompts`` boxes each; image
    ``i`` depends only on ``(seed, i)``. Returns the shard paths in order."""
    os.makedirs(out_dir, exist_ok=True)
    jobs = [
        (os.path.join(out_dir, f"shard-{k:06d}.tar"), start, min(start + images_per_shard, num_images))
        for k, start in enumerate(range(0, num_images, images_per_shard))
    ]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        return [_write_shard(p, a, b, seed, size, prompts, objects) for p, a, b in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_write_shard, p, a, b, seed, size, prompts, objects) for p, a, b in jobs]
        return [f.result() for f in futures]


# --- memory and CPU of a process tree -------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (a local Ray cluster started by ``ray.init`` is a
    subtree of its driver: GCS, raylet, and the workers under the raylet)."""
    children, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pss_mib(pid: int) -> float:
    """PSS of one process in MiB (0 if it is gone)."""
    return memory_kib(pid)["pss"] / 1024


def memory_kib(pid: int) -> dict[str, int]:
    """``pss`` (proportional set size: shared pages split among their users) and ``anon`` (its
    private heap part, Pss_Anon) in KiB, from smaps_rollup; RSS for both where that is missing;
    zeros if the process is gone. Shared memory (the object store's mapping) is pss - anon."""
    out = {"pss": 0, "anon": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["pss"] = int(line.split()[1])
                elif line.startswith("Pss_Anon:"):
                    out["anon"] = int(line.split()[1])
        return out
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        return {"pss": rss, "anon": rss}
    except OSError:
        return out


def process_name(pid: int) -> str:
    """A short name: Ray's process title (``ray::MapWorker(...)``) or the executable's base name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    name = first if first.startswith("ray::") else os.path.basename(first.split()[0] if first else "?")
    if name.startswith("python") and len(argv) > 1 and argv[1]:
        name += " " + os.path.basename(argv[1].decode(errors="replace"))
    return name[:60]


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def gpu_used_mib() -> float | None:
    """Device-wide used memory of GPU 0 from nvidia-smi (all processes: Ray actors included)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


class TreeSampler:
    """Samples a process tree every ``interval_s`` in a thread: total PSS (peak and series), CPU
    seconds (per pid, the last value seen, so that exited workers still count up to their last
    sample), optionally the GPU's used memory and extra fields from ``probe()``."""

    def __init__(
        self,
        root: int | None = None,
        *,
        interval_s: float = 0.5,
        gpu: bool = False,
        probe: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.root = root or os.getpid()
        self.interval_s = interval_s
        self.gpu = gpu
        self.probe = probe
        self.samples: list[dict[str, Any]] = []
        self.peak_pss_mib = 0.0
        self.peak_gpu_mib: float | None = None
        self._cpu: dict[int, float] = {}
        self._cpu_base = 0.0
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, Any]:
        pids = process_tree(self.root)
        mem = {p: memory_kib(p) for p in pids}
        pss = sum(m["pss"] for m in mem.values()) / 1024
        largest = max(pids, key=lambda p: mem[p]["pss"])
        for p in pids:
            cpu = _cpu_seconds(p)
            if cpu is not None:
                self._cpu[p] = cpu
        row: dict[str, Any] = {
            "t_s": round(time.time() - self.t0, 2),
            "processes": len(pids),
            "pss_mib": round(pss, 1),
            "pss_anon_mib": round(sum(m["anon"] for m in mem.values()) / 1024, 1),
            "largest_process": process_name(largest),
            "largest_process_pss_mib": round(mem[largest]["pss"] / 1024, 1),
            "largest_process_anon_mib": round(mem[largest]["anon"] / 1024, 1),
            "cpu_s": round(self.cpu_seconds, 2),
        }
        if self.gpu:
            row["gpu_used_mib"] = gpu_used_mib()
            if row["gpu_used_mib"] is not None:
                self.peak_gpu_mib = max(self.peak_gpu_mib or 0.0, row["gpu_used_mib"])
        if self.probe is not None:
            row.update(self.probe())
        self.peak_pss_mib = max(self.peak_pss_mib, pss)
        self.samples.append(row)
        return row

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of the tree since ``start``."""
        return sum(self._cpu.values()) - self._cpu_base

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> TreeSampler:
        self.t0 = time.time()
        self.sample()
        self._cpu_base = sum(self._cpu.values())
        self.samples[-1]["cpu_s"] = 0.0
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def __enter__(self) -> TreeSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CommitWatcher:
    """Images committed so far by a label job, from its commit markers (``<output>/_committed/``,
    written last and atomically); keeps the time of each commit for the steady-state rate."""

    def __init__(self, output: str) -> None:
        self.folder = os.path.join(output, "_committed")
        self.rows: dict[str, int] = {}
        self.events: list[tuple[float, int]] = []

    def probe(self) -> dict[str, Any]:
        try:
            names = [n for n in os.listdir(self.folder) if n.endswith(".json") and not n.startswith(".")]
        except FileNotFoundError:
            names = []
        for name in sorted(set(names) - set(self.rows)):
            try:
                with open(os.path.join(self.folder, name)) as f:
                    self.rows[name] = int(json.load(f)["num_rows"])
            except (OSError, ValueError, KeyError):
                continue
            self.events.append((time.time(), self.rows[name]))
        return {"images_committed": sum(self.rows.values()), "shards_committed": len(self.rows)}

    def steady_images_per_s(self, min_span_s: float = 5.0) -> float | None:
        """Images committed after the first commit / time from the first commit to the last: the
        job's rate once it streams, without its start-up (model loads, actor start). None when
        the commits came in too few bursts or too short a span to say (a short run)."""
        times = sorted({t for t, _ in self.events})
        if len(times) < 3 or times[-1] - times[0] < min_span_s:
            return None
        return sum(r for t, r in self.events if t > times[0]) / (times[-1] - times[0])


# --- stage timing ---------------------------------------------------------------------------------


class StageTimer:
    """Accumulated wall seconds per stage name. ``sync`` runs at every stage boundary
    (``torch.cuda.synchronize`` on a GPU; None on a CPU, where the work is synchronous)."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self._open: dict[str, float] = {}

    def begin(self, name: str) -> None:
        if self.sync:
            self.sync()
        self._open[name] = time.perf_counter()

    def end(self, name: str) -> None:
        if self.sync:
            self.sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._open.pop(name)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def hook_module(self, module: Any, name: str) -> None:
        """Charge every ``module(...)`` call to ``name`` (forward pre/post hooks)."""
        module.register_forward_pre_hook(lambda *_: self.begin(name))
        module.register_forward_hook(lambda *_: self.end(name))

    def wrap_method(self, obj: Any, attr: str, name: str) -> None:
        """Charge every ``obj.attr(...)`` call to ``name`` (an instance attribute shadows the method)."""
        method = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return method(*args, **kwargs)

        object.__setattr__(obj, attr, timed)

    def ms_per(self, count: int) -> dict[str, float]:
        return {k: round(1e3 * v / max(count, 1), 3) for k, v in self.seconds.items()}


def rle_iou(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Agreement of two predictions (compressed COCO RLEs of the same size): their IoU
    (``evaluation.table1.mask_iou``), except that two empty masks agree (1.0) — unlike a score
    against ground truth, where an empty pair scores 0."""
    from ovsam_ray.data.rle import decode_rle
    from ovsam_ray.evaluation.table1 import mask_iou

    ma, mb = decode_rle(a), decode_rle(b)
    return 1.0 if not (ma.any() or mb.any()) else mask_iou(ma, mb)


def compare_predictions(ref: dict[str, list], other: dict[str, list]) -> dict[str, Any]:
    """Per prompt of the images both hold (``{key: [[label_id, rle], ...]}``): the fraction of
    equal labels and the min/mean mask IoU."""
    same, ious, skipped = 0, [], 0
    for key in sorted(set(ref) & set(other)):
        if len(ref[key]) != len(other[key]):
            skipped += 1
            continue
        for (la, ra), (lb, rb) in zip(ref[key], other[key]):
            same += int(la == lb)
            ious.append(rle_iou(ra, rb))
    n = len(ious)
    return {
        "images": len(set(ref) & set(other)) - skipped,
        "prompts": n,
        "labels_equal_fraction": round(same / n, 5) if n else None,
        "mask_iou_min": round(min(ious), 5) if n else None,
        "mask_iou_mean": round(float(np.mean(ious)), 5) if n else None,
        "images_with_prompt_count_mismatch": skipped,
    }


# The fast path (bf16 autocast) against fp32 with the same weights. Random weights put most mask
# logits within a few hundredths of the threshold and many label scores near a tie, so mask IoU
# is reported, not held to a bar; what must hold is what random weights can show.
LOGIT_RTOL = 0.1  # max |fast - fp32| low-res logit, as a fraction of the image's max |fp32 logit|
LABEL_MARGIN = 0.05  # fp32 top-1 minus top-2 probability above which labels must agree


def fast_vs_fp32(ref: list, fast: list, input_sizes: list[tuple[int, int]], image_size: int) -> dict[str, Any]:
    """Agreement of two predictors' ``ImagePrediction`` lists for the same images and prompts
    (``ref``: fp32, full masks or RLEs). Hard figures (``ok``): every prompt decoded; low-res
    logits within ``LOGIT_RTOL``; mask pixels equal wherever the fp32 logit is farther than that
    tolerance from the threshold; labels equal where fp32's top-1 margin exceeds ``LABEL_MARGIN``.
    Reported only: mask IoU min/mean, the fraction of pixels near the threshold, label agreement."""
    import torch

    from ovsam_ray.model.functional import upscale_mask_logits

    out = {
        "images": len(ref),
        "prompts": 0,
        "decoded": 0,
        "logit_max_abs_diff": 0.0,
        "logit_tol": 0.0,
        "mask_pixels_off": 0,
        "near_threshold_fraction": [],
        "labels_decided": 0,
        "labels_decided_equal": 0,
        "labels_equal": 0,
        "mask_iou": [],
    }
    for r, f, inp in zip(ref, fast, input_sizes):
        n = len(r.labels)
        out["prompts"] += n
        out["decoded"] += min(n, len(f.labels))
        if n == 0 or len(f.labels) != n:
            continue
        diff = float(np.abs(f.low_res_logits - r.low_res_logits).max())
        tol = LOGIT_RTOL * float(np.abs(r.low_res_logits).max())
        out["logit_max_abs_diff"] = max(out["logit_max_abs_diff"], diff)
        out["logit_tol"] = max(out["logit_tol"], tol)
        out["logits_within_tol"] = out.get("logits_within_tol", True) and diff <= tol
        hw = _masks(r).shape[1:]
        logits = upscale_mask_logits(torch.from_numpy(r.low_res_logits), image_size, inp, hw)[:, 0].numpy()
        away = np.abs(logits) > tol
        out["mask_pixels_off"] += int((_masks(f) != (logits > 0))[away].sum())
        out["near_threshold_fraction"].append(float(1 - away.mean()))
        out["mask_iou"] += [_iou(a, b) for a, b in zip(_masks(r), _masks(f))]
        top2 = np.sort(r.topk_scores, axis=1)[:, ::-1][:, :2]
        decided = (top2[:, 0] - top2[:, 1] > LABEL_MARGIN) if top2.shape[1] > 1 else np.ones(n, bool)
        out["labels_decided"] += int(decided.sum())
        out["labels_decided_equal"] += int((f.labels == r.labels)[decided].sum())
        out["labels_equal"] += int((f.labels == r.labels).sum())
    ious, near = out.pop("mask_iou"), out.pop("near_threshold_fraction")
    out.update(
        mask_iou_min=round(min(ious), 5) if ious else None,
        mask_iou_mean=round(float(np.mean(ious)), 5) if ious else None,
        near_threshold_fraction=round(float(np.mean(near)), 4) if near else None,
        labels_equal_fraction=round(out["labels_equal"] / max(out["prompts"], 1), 5),
    )
    out["ok"] = bool(
        out["decoded"] == out["prompts"]
        and out.get("logits_within_tol", True)
        and out["mask_pixels_off"] == 0
        and out["labels_decided_equal"] == out["labels_decided"]
    )
    return out


def _masks(pred: Any) -> np.ndarray:
    if pred.masks is not None:
        return pred.masks
    from ovsam_ray.model.automatic_mask_generator import _rle_to_mask

    return np.stack([_rle_to_mask(r) for r in pred.rles]) if pred.rles else np.zeros((0, 0, 0), bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
