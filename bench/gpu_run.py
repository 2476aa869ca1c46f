"""The GPU run: every check and figure the README's GPU claims need, in one command (560 s budget on an H200).

    bash bench/gpu_run.sh RESULTS_DIR                      # on a machine with an NVIDIA GPU
    bash bench/gpu_run.sh --smoke /tmp/gpu_smoke           # any CPU, tiny sizes, the GPU's branches
    python -m bench.gpu_run --dry-run /tmp/x               # only check every stage's arguments

Stages, in this order (what matters most first), each with its own commands, time budget and
checks. A stage that fails or runs out of time is recorded and the next one runs; the exit status
is 1 when any check failed.

  env            imports everything the later stages import (ray, ray.data, ray.train, pydantic,
                 open_clip, segment_anything, webdataset, pycocotools, torch, timm, pyarrow, ...;
                 the label job's and the trainer's modules), the installed versions against the
                 pins (``bench/gpu_kit.txt``, reported, not required), the GPU: a clash fails in seconds
  perf           ``bench.perf`` modes c, d, a, b with ``ovsam_rn50x16`` (128 images; a on 8, b on
                 16): the fast path's rate and its check against fp32 with the same weights (logits
                 within tolerance, masks equal away from the threshold, labels equal where fp32 is
                 decided; mask IoU reported), the label job end to end, then the two baselines
  pytest_gpu     ``pytest -m gpu``: the same fast-vs-fp32 rule at ``ovsam_rn50_small``; device RLE
                 byte-identical to pycocotools; fused AdamW on CUDA; the label job's text embeddings
                 on CUDA equal the CPU's. On a GPU none may be skipped.
  label_in21k    the label job (``jobs/label.py``) with ``--vocab in21k`` (21,841 classes, 40,737
                 names, the package's built-in from timm): the text embeddings are computed once
                 for the run, on the GPU (the job's summary says where and how long; exactly one
                 such log line)
  train_cotrain  12 steps of ``train cotrain`` / ``train distill`` at ``ovsam_rn50x16`` (``--precision bf16``, batch 2
  train_distill  per GPU, Ray Train, one worker; distillation with a random ViT-H teacher): the
                 steady step time and the GPU-hours it projects for the paper's recipes
  sam3           ``detector:sam3`` (``bench/sam3_cost.py --full``): the label job's ``Sam3Detector``
                 at the published size (random weights, or ``--sam3-weights DIR``) on 4 images of
                 1024x768, seconds per image at 1, 16 and 80 concepts (16 per call): the encoding's
                 and each concept's seconds; the OV-SAM pool (``ovsam_rn50x16``) on the same images
                 with SAM 3's boxes; and the GPU split rule between the two pools (each pool's
                 share of the GPUs, actors per GPU and the label job's flags) at 1-100 concepts

Only when named (``--stages env,train_precision``): ``train_precision``, fp32 against bf16 training
(``bench/train_precision.py``: 300 steps of the tiny co-training each, same data and seed; loss
curves and held-out accuracy). The recipes train in fp32, as the reference; bf16 is not recommended
before this has run on a GPU.

``--smoke`` runs the same stages at tiny sizes on a CPU through the GPU's branches: perf mode c
with ``--fast on --rle-on-device on`` (CPU bf16 autocast, channels_last, device RLE), training
with ``--precision bf16``, and the label job with the whole in21k vocabulary.

Random weights everywhere (``--random-init``; nothing is downloaded): speeds and checks are real,
labels are meaningless; the JSON says so. The results folder receives three files:
``gpu_run.json`` (every stage: status, seconds, checks, figures, its own full result),
``gpu_run.md`` (the summary table, also printed last) and ``gpu_run.log`` (every command's output).
Shards, checkpoints and the random teacher go to ``--work`` (default: a temporary folder, a few
GiB at GPU sizes), which is not part of the results. The Python environment is the caller's
(``bench/gpu_run.sh``; ``dev/wheelhouse.sh`` installs one without internet). The smoke run took
306 s on 2 busy CPU cores on 2026-12-05 (``bench/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.benchlib import REPO, machine_info, now_iso, process_tree, save_json
from bench.gpu_run_checks import CHECKS, Check, StageCtx

GPU_BUDGET_S = 560.0  # the whole run, from the start of bench/gpu_run.sh (it passes its start time)
SMOKE_BUDGET_S = 1800.0
LOG_KEEP = (300_000, 1_200_000)  # per stage in gpu_run.log: head and tail characters kept


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: tuple[float, float]  # (GPU, smoke)
    commands: Callable[[StageCtx], list[list[str]]]


def _py(ctx: StageCtx, *args: str) -> list[str]:
    return [ctx.python, *args]


def _env(ctx: StageCtx) -> list[list[str]]:
    return [_py(ctx, "-m", "bench.gpu_run_prep", "env", ctx.path("env.json"))]


def gpu_test_files() -> list[str]:
    """Test files holding ``pytest.mark.gpu`` tests (collecting only these keeps moto & co. out)."""
    files = []
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py"))):
        with open(path) as f:
            if "mark.gpu" in f.read():
                files.append(os.path.relpath(path, REPO))
    return files


def _pytest(ctx: StageCtx) -> list[list[str]]:
    return [
        _py(
            ctx,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=-ra",
            "--junitxml",
            ctx.path("pytest_gpu.xml"),
            *gpu_test_files(),
        )
    ]


def _perf(ctx: StageCtx) -> list[list[str]]:
    if ctx.smoke:
        size = [
            "--device",
            "cpu",
            "--preset",
            "ovsam_tiny",
            "--sam-arch",
            "vit_b",
            "--crop-clip",
            "RN50",
            "--num-images",
            "4",
            "--ref-images",
            "2",
            "--baseline-images",
            "1",
            "--images-per-shard",
            "2",
            "--batch-size",
            "2",
            "--prompts",
            "3",
            "--width",
            "160",
            "--height",
            "120",
            "--fast",
            "on",
            "--rle-on-device",
            "on",
        ]  # the GPU's branches, in CPU bf16
    else:
        size = [
            "--device",
            "cuda",
            "--preset",
            "ovsam_rn50x16",
            "--sam-arch",
            "vit_h",
            "--crop-clip",
            "RN50x16",
            "--num-images",
            "128",
            "--ref-images",
            "8",
            "--baseline-images",
            "16",
            "--stage-images",
            "16",
            "--images-per-shard",
            "32",
            "--batch-size",
            "8",
        ]
    # c (the fast path, with its check against fp32) and d (the label job end to end) first; the
    # baselines a and b after (b last: SAM ViT-H is the slowest to build). --work: each mode's row
    # is there as soon as the mode ends, so a stage cut short keeps the ones that finished.
    return [
        _py(
            ctx,
            "-m",
            "bench.perf",
            "--modes",
            ctx.perf_modes,
            *size,
            "--work",
            ctx.path("perf_work"),
            "--out",
            ctx.path("perf.json"),
        )
    ]


def _label(ctx: StageCtx) -> list[list[str]]:
    smoke = ["--smoke"] if ctx.smoke else []
    # the whole in21k vocabulary in the smoke run too: 570k prompt texts are what a GPU run meets
    preset, vocab = ("ovsam_tiny" if ctx.smoke else "ovsam_rn50x16"), "in21k"
    job = [
        "jobs/label.py",
        "--input",
        ctx.path("label_shards"),
        "--output",
        ctx.path("labels"),
        "--preset",
        preset,
        "--random-init",
        "--vocab",
        vocab,
        "--num-gpus",
        "0" if ctx.smoke else "1",
        "--concurrency",
        "1",
        "--batch-size",
        "2" if ctx.smoke else "8",
        "--overwrite",
    ]
    return [_py(ctx, "-m", "bench.gpu_run_prep", "label", ctx.work, *smoke), _py(ctx, *job)]


def _train(stage: str):
    def commands(ctx: StageCtx) -> list[list[str]]:
        prep = _py(ctx, "-m", "bench.gpu_run_prep", "train", ctx.work, *(["--smoke"] if ctx.smoke else []))
        dataset = ctx.path("train_shards") + ("|vocab=" + ctx.path("shapes.json") if stage == "cotrain" else "")
        run = [
            "--storage-path",
            ctx.path("runs"),
            "--name",
            stage,
            "--dataset",
            dataset,
            "--random-init",
            "--num-workers",
            "1",
            "--batch-size",
            "2",
            "--log-every",
            "1",
            "--checkpoint-every",
            "1000",
            "--max-failures",
            "0",
        ]
        out = []
        if ctx.smoke:
            run += [
                "--preset",
                "ovsam_tiny",
                "--max-steps",
                "4",
                "--cpus-per-worker",
                "1",
                "--data-cpus",
                "0.5",
                "--precision",
                "bf16",
            ]  # the GPU's autocast branch, on the CPU
            run += ["--teacher", "random_tiny"] if stage == "distill" else ["--num-prompts", "8", "--num-points", "256"]
        else:
            # bf16 as measured before (the recipes train in fp32; train_precision compares the two)
            run += ["--preset", "ovsam_rn50x16", "--max-steps", "12", "--use-gpu", "--precision", "bf16"]
            if stage == "distill":
                teacher = ctx.path("sam_vit_h_random.pth")
                out.append(
                    _py(ctx, "-m", "bench.train_steps", "write-sam-encoder", "--kind", "vit_h", "--out", teacher)
                )
                run += ["--teacher", "vit_h", "--teacher-checkpoint", teacher]
        steps = _py(ctx, "-m", "bench.train_steps", stage, "--out", ctx.path(f"train_{stage}.json"), "--", *run)
        return [prep, *out, steps]

    return commands


def _sam3(ctx: StageCtx) -> list[list[str]]:
    """SAM 3 (``detector:sam3``) end to end at 1, 16 and 80 concepts and the OV-SAM pool on the
    same images, then the split rule between the two pools (``bench/sam3_cost.py``)."""
    if ctx.smoke:
        size = ["--size", "tiny", "--device", "cpu", "--batch", "2", "--concepts", "1,4", "--concept-batch", "2"]
        size += ["--repeats", "1", "--width", "160", "--height", "120", "--ovsam-preset", "ovsam_tiny"]
        size += ["--ovsam-prompts", "20"]
    else:
        size = ["--device", "cuda", "--batch", "4", "--concepts", "1,16,80", "--concept-batch", "16"]
        size += ["--repeats", "3", "--ovsam-preset", "ovsam_rn50x16"]
    weights = ["--weights", ctx.sam3_weights] if ctx.sam3_weights else []
    run = ["-m", "bench.sam3_cost", "--full", "--skip-flops", *size, *weights, "--out", ctx.path("sam3.json")]
    return [_py(ctx, *run)]


def _precision_compare(ctx: StageCtx) -> list[list[str]]:
    size = ["--steps", "4", "--device", "cpu", "--train-images", "40", "--eval-images", "8", "--log-every", "2"]
    gpu = ["--steps", "300", "--device", "cuda"]
    out = ctx.path("train_precision")
    return [
        _py(
            ctx,
            "-m",
            "bench.train_precision",
            "--out",
            out,
            "--work",
            ctx.path("precision"),
            *(size if ctx.smoke else gpu),
        )
    ]


# Stages in the order of what their figures are worth: the label job's rate at ovsam_rn50x16 and
# the fast path's check against fp32 first (perf: c, d, then the baselines a, b), the GPU tests,
# the 21k vocabulary, then training's step times. Budgets are caps, (GPU s, smoke s): the run's
# deadline caps each stage too, so time a stage leaves goes to the later ones, and a late stage
# squeezed below a quarter of its cap is skipped and recorded. Expected use on an H200 (docs/DESIGN.md
# Appendix A plus process and model start-up): 10 env, 150 perf, 40 pytest, 60 label
# (text tokens ~7 s of one core now, ~40 s before), 75 + 75 training: ~410 s of the 560, ~150 s spare,
# which sam3 uses last (published-size SAM 3 and OV-SAM built with random weights, then 3 x 3 timed
# calls: an estimate of ~100 s, not a measurement).
STAGES = [
    Stage("env", (25, 90), _env),
    Stage("perf", (200, 420), _perf),
    Stage("pytest_gpu", (60, 180), _pytest),
    Stage("label_in21k", (100, 600), _label),  # smoke: ~5 min of tiny text tower on 2 busy cores
    Stage("train_cotrain", (90, 240), _train("cotrain")),
    Stage("train_distill", (85, 240), _train("distill")),
    Stage("sam3", (120, 300), _sam3),
]

# Not in the default run (its budget would not fit): ``--stages env,train_precision`` compares fp32
# with bf16 training (bench/train_precision.py: the same co-training, data and seed twice; loss
# curves and held-out accuracy) before anything recommends bf16; ~300 s of its 480 on a GPU.
EXTRA_STAGES = [Stage("train_precision", (480, 420), _precision_compare)]
ALL_STAGES = STAGES + EXTRA_STAGES


# --- running a stage --------------------------------------------------------------------------------


def _kill_tree(pid: int) -> None:
    """SIGKILL a command and everything under it (a local Ray cluster is a subtree of its driver)."""
    for p in reversed(process_tree(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_commands(commands: list[list[str]], *, timeout_s: float, log_path: str, env: dict[str, str]) -> dict:
    """Run ``commands`` one after the other (stop at the first failure) within ``timeout_s`` in all;
    their output goes to ``log_path``. Returns rc (124 on timeout), timed_out and seconds."""
    t0 = time.time()
    rc, timed_out = 0, False
    with open(log_path, "a") as log:
        for argv in commands:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            left = timeout_s - (time.time() - t0)
            if left <= 1:
                rc, timed_out = 124, True
                break
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                proc.wait()
                rc, timed_out = 124, True
                log.write(f"\n[gpu_run] killed after the stage's {timeout_s:.0f} s budget\n")
            if rc != 0:
                break
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.time() - t0, 1)}


def _tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def run_stage(stage: Stage, ctx: StageCtx, deadline: float) -> dict[str, Any]:
    budget = stage.budget_s[1 if ctx.smoke else 0]
    timeout = min(budget, deadline - time.time())
    commands = stage.commands(ctx)
    record: dict[str, Any] = {"budget_s": budget, "commands": [" ".join(c) for c in commands]}
    if timeout < min(30.0, 0.25 * budget):
        return {
            **record,
            "status": "skipped",
            "seconds": 0.0,
            "checks": [],
            "reason": f"{max(timeout, 0):.0f} s left of the run's time budget",
        }
    log_path = ctx.path(f"{stage.name}.log")
    if os.path.exists(log_path):
        os.remove(log_path)
    ran = run_commands(commands, timeout_s=timeout, log_path=log_path, env=ctx.env)
    text = open(log_path, errors="replace").read()
    try:
        checks, figures, result = CHECKS[stage.name](ctx, text)
    except Exception as e:  # noqa: BLE001 - a missing or odd result file is a failed check, not a crash
        checks, figures, result = [Check("result readable", False, f"{type(e).__name__}: {e}")], {}, None
    checks.insert(
        0,
        Check(
            "commands exit 0 within the budget",
            ran["rc"] == 0 and not ran["timed_out"],
            f"rc {ran['rc']}" + (" (timed out)" if ran["timed_out"] else ""),
        ),
    )
    ok = all(c.ok for c in checks if c.hard)
    status = "ok" if ok else ("timeout" if ran["timed_out"] else "failed")
    out = {
        **record,
        **ran,
        "status": status,
        "checks": [dataclasses.asdict(c) for c in checks],
        "figures": figures,
        "result": result,
    }
    if not ok:
        out["output_tail"] = _tail(log_path)
    return out


def append_log(main_log: str, stage: str, stage_log: str) -> None:
    text = open(stage_log, errors="replace").read() if os.path.exists(stage_log) else ""
    head, tail = LOG_KEEP
    if len(text) > head + tail:
        text = text[:head] + f"\n[... {len(text) - head - tail} characters left out ...]\n" + text[-tail:]
    with open(main_log, "a") as f:
        f.write(f"\n{'=' * 30} {stage} {'=' * 30}\n{text}")


# --- summary ----------------------------------------------------------------------------------------


def summary_table(stages: dict[str, dict]) -> str:
    lines = ["| stage | status | s (budget) | figures |", "|---|---|---|---|"]
    for name, r in stages.items():
        figs = "; ".join(f"{k} {v}" for k, v in (r.get("figures") or {}).items()) or r.get("reason", "")
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.0f} ({r['budget_s']:.0f}) | {figs} |")
    failed = [(n, c) for n, r in stages.items() for c in r["checks"] if not c["ok"]]
    for name, c in failed:
        expect = f" (expected {c['expect']})" if c["expect"] is not None else ""
        lines.append(f"- {'FAILED' if c['hard'] else 'note'} {name}: {c['name']}: {c['value']}{expect}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="results folder: gpu_run.json, gpu_run.md, gpu_run.log")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU, the same stages and checks")
    p.add_argument("--stages", default=",".join(s.name for s in STAGES), help="comma-separated subset, in order")
    p.add_argument("--perf-modes", default="c,d,a,b", help="bench/perf.py's modes, in order (CI's quick smoke: c)")
    p.add_argument("--work", default=None, help="work folder (default: a new temporary folder)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (560 GPU / 1800 smoke)")
    p.add_argument("--started-at", type=float, default=None, help="epoch seconds the run began (gpu_run.sh passes it)")
    p.add_argument("--dry-run", action="store_true", help="only check every stage's arguments with the real parsers")
    p.add_argument("--sam3-weights", default=None, help="sam3 stage: a SAM 3 save_pretrained folder (default: random)")
    return p.parse_args(argv)


def make_ctx(a: argparse.Namespace) -> StageCtx:
    work = os.path.abspath(a.work or tempfile.mkdtemp(prefix="ovsam_gpu_run_"))
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # progress bars would fill the log
    if a.smoke:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return StageCtx(
        smoke=a.smoke, work=work, python=sys.executable, env=env, perf_modes=a.perf_modes, sam3_weights=a.sam3_weights
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = a.started_at or time.time()
    wanted = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {s.name for s in ALL_STAGES})
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; known: {[s.name for s in ALL_STAGES]}")
    ctx = make_ctx(a)
    if a.dry_run:
        from bench.gpu_run_checks import validate_commands

        errors = validate_commands([(s.name, s.commands(ctx)) for s in ALL_STAGES if s.name in wanted])
        print("\n".join(errors) or f"all stage commands parse ({'smoke' if a.smoke else 'GPU'} sizes)")
        return 1 if errors else 0
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    main_log = os.path.join(out, "gpu_run.log")
    budget = a.time_budget or (SMOKE_BUDGET_S if a.smoke else GPU_BUDGET_S)
    deadline = t0 + budget
    print(
        f"[gpu_run] {'smoke (CPU, tiny sizes)' if a.smoke else 'GPU'} run, {budget:.0f} s budget, "
        f"work {ctx.work}, results {out}; RANDOM WEIGHTS everywhere (--random-init)",
        flush=True,
    )
    stages: dict[str, dict] = {}
    result = {
        "benchmark": "gpu_run",
        "mode": "smoke" if a.smoke else "gpu",
        "date": now_iso(),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "ok": False,
        "time_budget_s": budget,
        "random_init": True,
        "weights": "random everywhere (--random-init): no real weights exist here; "
        "speeds and checks are real, labels meaningless",
        "work": ctx.work,
        "stages": stages,
    }
    for stage in (s for s in ALL_STAGES if s.name in wanted):
        print(f"[gpu_run] {stage.name} ... ({deadline - time.time():.0f} s left)", flush=True)
        try:
            stages[stage.name] = r = run_stage(stage, ctx, deadline)
        except Exception as e:  # noqa: BLE001 - the harness's own failure is one stage's, not the run's
            stages[stage.name] = r = {
                "status": "failed",
                "seconds": 0.0,
                "budget_s": 0.0,
                "checks": [dataclasses.asdict(Check("the stage could be run", False, f"{type(e).__name__}: {e}"))],
            }
        append_log(main_log, stage.name, ctx.path(f"{stage.name}.log"))
        print(f"[gpu_run] {stage.name}: {r['status']} in {r['seconds']:.0f} s", flush=True)
        if r["status"] not in ("ok", "skipped"):
            print(r.get("output_tail", "")[-1500:], flush=True)
        result["wall_s"] = round(time.time() - t0, 1)
        save_json(result, os.path.join(out, "gpu_run.json"))  # after every stage: a killed run keeps the rest
    result["wall_s"] = round(time.time() - t0, 1)
    result["ok"] = ok = all(r["status"] == "ok" for r in stages.values()) and len(stages) == len(wanted)
    table = summary_table(stages)
    save_json(result, os.path.join(out, "gpu_run.json"))
    with open(os.path.join(out, "gpu_run.md"), "w") as f:
        f.write(table + "\n")
    print(f"\n{table}\n\n[gpu_run] {'ALL OK' if ok else 'FAILED'} in {result['wall_s']:.0f} s; results in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
