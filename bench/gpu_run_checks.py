"""What ``bench/gpu_run.py`` checks after each stage, the figures it reports, and ``validate_commands``:
every stage's command line parsed by the real parsers, so that a GPU run cannot fail on a typo in
arguments only the GPU sizes use. A check with ``hard=False`` is reported, never fails the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

# The built-in in21k vocabulary (timm's ImageNet-22k "fall11" synsets).
IN21K_CLASSES = 21_841
TEXT_LOG_LINE = "text embeddings of "  # the label job logs it once per run (pipeline/label_job.py)


@dataclasses.dataclass
class StageCtx:
    smoke: bool
    work: str
    python: str
    env: dict[str, str]
    perf_modes: str = "c,d,a,b"
    sam3_weights: str | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    value: Any = None
    expect: Any = None
    hard: bool = True


Result = tuple[list[Check], dict[str, Any], Any]


def _load(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def check_env(ctx: StageCtx, log: str) -> Result:
    r = _load(ctx.path("env.json"))
    missing = sorted(m for m, v in r["modules"].items() if not v["ok"])
    off = sorted(
        f"{n} {p['installed']} (pinned {p['pinned']})"
        for n, p in (r.get("pins") or {}).items()
        if p["installed"] != p["pinned"]
    )
    checks = [
        Check("every module imports", not missing, missing or "all", "none missing"),
        # reported: other versions may still work, and the run says which
        Check(
            "installed versions are the pinned ones (bench/gpu_kit.txt)",
            not off,
            off or "all",
            "all pinned",
            hard=False,
        ),
    ]
    if not ctx.smoke:
        checks.append(Check("a CUDA GPU is visible to torch", "gpu" in r, (r.get("gpu") or {}).get("name"), "a GPU"))
    mods = r["modules"]
    figures = {
        "gpu": (r.get("gpu") or {}).get("name", "none"),
        "torch": mods["torch"].get("version"),
        "ray": mods["ray"].get("version"),
        "pyarrow": mods["pyarrow"].get("version"),
        "pydantic": mods["pydantic"].get("version"),
        "python": r["machine"].get("python"),
    }
    return checks, figures, r


def check_pytest(ctx: StageCtx, log: str) -> Result:
    suite = ET.parse(ctx.path("pytest_gpu.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = [
        {
            "test": f"{c.get('classname')}::{c.get('name')}",
            "time_s": float(c.get("time", 0)),
            "outcome": next((x.tag for x in c if x.tag in ("failure", "error", "skipped")), "passed"),
        }
        for c in suite.iter("testcase")
    ]
    checks = [
        Check("gpu tests collected", n["tests"] >= 4, n["tests"], ">= 4"),
        Check("no failures or errors", n["failures"] + n["errors"] == 0, n["failures"] + n["errors"], 0),
    ]
    if not ctx.smoke:
        checks.append(Check("none skipped (CUDA present)", n["skipped"] == 0, n["skipped"], 0))
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return checks, {"passed": passed, "failed": n["failures"] + n["errors"], "skipped": n["skipped"]}, cases


def _partial_perf(ctx: StageCtx) -> dict[str, Any]:
    """The rows of the modes that finished when perf.py itself did not (its work folder keeps them)."""
    rows = {}
    for mode in "acdb":
        path = ctx.path(os.path.join("perf_work", f"{mode}.json"))
        if os.path.exists(path):
            row = _load(path)
            row.pop("samples", None)
            rows[mode] = row
    return {"rows": rows, "checks": {}, "partial": True}


def check_perf(ctx: StageCtx, log: str) -> Result:
    r = _load(ctx.path("perf.json")) if os.path.exists(ctx.path("perf.json")) else _partial_perf(ctx)
    rows = r["rows"]
    checks = [
        Check(f"mode {m} ran", m in rows and "error" not in rows[m], (rows.get(m) or {}).get("error", "ok"))
        for m in ctx.perf_modes.split(",")
    ]
    fast = r["checks"].get("fast_vs_reference") or {}
    exact = r["checks"].get("fast_vs_fp32") or (rows.get("c") or {}).get("fast_vs_fp32") or {}
    job = r["checks"].get("job_vs_model_alone") or {}
    # Random weights: mask logits sit within a few hundredths of the threshold, so IoU is a figure,
    # not a bar; the hard check is what they can show (bench/benchlib.fast_vs_fp32).
    if ctx.smoke:
        settings = (rows.get("c") or {}).get("settings") or {}
        checks.append(
            Check(
                "mode c ran the GPU's branches on the CPU (bf16 autocast, device RLE)",
                bool(settings.get("fast") and settings.get("rle_on_device")),
                settings.get("fast"),
                True,
            )
        )
    checks += [
        Check(
            "fast path vs fp32 (same weights): logits within tolerance, masks equal away from the threshold, "
            "labels equal where decided",
            bool(exact.get("ok")),
            {
                k: exact.get(k)
                for k in (
                    "logit_max_abs_diff",
                    "logit_tol",
                    "mask_pixels_off",
                    "labels_decided",
                    "labels_decided_equal",
                )
            },
            "ok",
        ),
        Check(
            "fast path vs fp32: mean mask IoU (reported)",
            (fast.get("mask_iou_mean") or 0) >= 0.99,
            fast.get("mask_iou_mean"),
            ">= 0.99",
            hard=False,
        ),
        Check(
            "fast path vs fp32: labels equal (random weights: near-ties may flip)",
            (fast.get("labels_equal_fraction") or 0) >= 0.8,
            fast.get("labels_equal_fraction"),
            ">= 0.8",
            hard=False,
        ),
        Check(
            "label job vs model alone: every image with all its instances",
            bool(job) and job.get("images_with_prompt_count_mismatch") == 0,
            job.get("images_with_prompt_count_mismatch"),
            0,
            hard="d" in ctx.perf_modes.split(","),
        ),
        Check(
            "label job vs model alone: labels equal (batching may move bf16 near-ties)",
            (job.get("labels_equal_fraction") or 0) >= 0.99,
            job.get("labels_equal_fraction"),
            ">= 0.99",
            hard=False,
        ),
        Check(
            "label job vs model alone: mean mask IoU (reported)",
            (job.get("mask_iou_mean") or 0) >= 0.99,
            job.get("mask_iou_mean"),
            ">= 0.99",
            hard=False,
        ),
    ]
    figures = {f"{m} img/s": rows[m]["images_per_s"] for m in "abcd" if m in rows and "error" not in rows[m]}
    if "c" in rows and "mfu" in rows["c"]:
        figures["c MFU"] = rows["c"]["mfu"]
    figures["d/c"] = r.get("ray_overhead_ratio")
    figures["c vs fp32: logits max |diff| (tol)"] = f"{exact.get('logit_max_abs_diff')} ({exact.get('logit_tol')})"
    figures["c vs fp32: mask IoU mean"] = exact.get("mask_iou_mean")
    return checks, figures, r


def check_label(ctx: StageCtx, log: str) -> Result:
    summary = _load(ctx.path(os.path.join("labels", "_summary.json")))
    text = summary.get("text_embeddings") or {}
    lines = [ln for ln in log.splitlines() if TEXT_LOG_LINE in ln]
    from gpu_run_prep import LABEL_SIZES

    images = LABEL_SIZES["smoke" if ctx.smoke else "gpu"]["num_images"]
    classes = IN21K_CLASSES
    device = "cpu" if ctx.smoke else "cuda"
    checks = [
        Check(
            "every image labelled",
            summary["images_ok"] == images and summary["images_error"] == 0,
            f"{summary['images_ok']} ok, {summary['images_error']} errors",
            f"{images} ok",
        ),
        Check(
            "text embeddings computed on the GPU" if device == "cuda" else "text embeddings on the CPU (smoke)",
            text.get("device") == device,
            text.get("device"),
            device,
        ),
        Check("vocabulary size", text.get("num_classes") == classes, text.get("num_classes"), classes),
        Check("text embeddings computed once (one log line for the run)", len(lines) == 1, len(lines), 1),
        Check("random init recorded", summary.get("random_init") is True, summary.get("random_init"), True),
    ]
    figures = {
        "classes": text.get("num_classes"),
        "names": text.get("synonyms"),
        "text on": text.get("device"),
        "text s": text.get("seconds"),
        "job img/s": summary.get("images_per_s"),
        "job s": round(summary.get("wall_time_s", 0), 1),
    }
    return checks, figures, {"summary": summary, "text_log_lines": lines}


def _check_train(stage: str) -> Callable[[StageCtx, str], Result]:
    def check(ctx: StageCtx, log: str) -> Result:
        r = _load(ctx.path(f"train_{stage}.json"))
        checks = [
            Check("no training error", r["error"] is None, r["error"]),
            Check("every step ran", r["steps_done"] == r["max_steps"], r["steps_done"], r["max_steps"]),
            Check("steady step time measured", bool(r.get("steady_step_s")), r.get("steady_step_s")),
        ]
        if not ctx.smoke:
            checks.append(
                Check(
                    "on the GPU, bf16",
                    r["use_gpu"] and r["precision"] == "bf16 autocast",
                    r["precision"],
                    "bf16 autocast",
                )
            )
        else:
            checks.append(
                Check(
                    "the GPU's bf16 branch, on the CPU",
                    r["precision"] == "bf16 autocast (CPU)",
                    r["precision"],
                    "bf16 autocast (CPU)",
                )
            )
        proj = r.get("recipe_projection") or {}
        figures = {
            "preset": r["preset"],
            "batch/GPU": r["batch_size_per_worker"],
            "step s": r.get("steady_step_s"),
            "first step s": r.get("first_step_s"),
            "img/s/GPU": r.get("images_per_s_per_gpu"),
            "recipe GPU-h (projection)": proj.get("gpu_hours"),
        }
        return checks, figures, r

    return check


def check_precision(ctx: StageCtx, log: str) -> Result:
    r = _load(os.path.join(ctx.path("train_precision"), "train_precision.json"))
    runs, comp = r["runs"], r["comparison"]
    checks = [
        Check(f"{p}: every step ran", runs[p]["steps"] == r["steps"], runs[p]["steps"], r["steps"])
        for p in ("fp32", "bf16")
    ]
    checks.append(Check("both loss curves recorded", all(runs[p]["curve"] for p in ("fp32", "bf16"))))
    checks.append(
        Check("on the GPU" if not ctx.smoke else "on the CPU", r["device"] == ("cpu" if ctx.smoke else "cuda"))
    )
    box = {p: ((comp[p].get("metrics") or {}).get("box") or {}) for p in ("fp32", "bf16")}
    figures = {
        "steps": r["steps"],
        "loss fp32": comp["fp32"]["last_loss"],
        "loss bf16": comp["bf16"]["last_loss"],
        "mean |gap|": comp.get("mean_abs_loss_gap"),
        "box acc seen fp32": box["fp32"].get("accuracy_base"),
        "box acc seen bf16": box["bf16"].get("accuracy_base"),
    }
    return checks, figures, r


def check_sam3(ctx: StageCtx, log: str) -> Result:
    r = _load(ctx.path("sam3.json"))
    full, ovsam, split = r.get("full") or {}, r.get("ovsam") or {}, r.get("split") or {}
    device = "cpu" if ctx.smoke else "cuda"
    rows = split.get("rows") or []
    checks = [
        Check("on the GPU" if device == "cuda" else "on the CPU (smoke)", r["device"] == device, r["device"], device),
        Check(
            "SAM 3 timed at every concept count",
            len(full.get("rows") or []) >= 2 and all(x["s_per_image"] for x in full["rows"]),
            [x["concepts"] for x in full.get("rows") or []],
        ),
        Check("OV-SAM timed on the same images", bool(ovsam.get("s_per_image")), ovsam.get("s_per_image")),
        Check(
            "split rule printed",
            bool(rows) and "GPU split between the SAM 3 and the OV-SAM pools" in log,
            len(rows),
        ),
    ]
    figures: dict[str, Any] = {
        "SAM 3 encode s/img": full.get("t_image_s"),
        "s/concept/img": full.get("t_concept_s"),
        "OV-SAM s/img": min(ovsam["s_per_image"]) if ovsam.get("s_per_image") else None,
    }
    if "peak_gpu_mib" in full:
        figures["SAM 3 peak MiB"] = full["peak_gpu_mib"]
    for row in rows:
        if row["concepts"] in (10, 80):
            a = row["actors_per_gpu"]
            figures[f"{row['concepts']} concepts: SAM 3 share (actors)"] = (
                f"{row['sam3_share']} ({a['sam3']}:{a['ovsam']})"
            )
    return checks, figures, r


CHECKS: dict[str, Callable[[StageCtx, str], Result]] = {
    "sam3": check_sam3,
    "train_precision": check_precision,
    "env": check_env,
    "pytest_gpu": check_pytest,
    "perf": check_perf,
    "label_in21k": check_label,
    "train_distill": _check_train("distill"),
    "train_cotrain": _check_train("cotrain"),
}


# --- arguments --------------------------------------------------------------------------------------


def _validate(argv: list[str]) -> None:
    """Parse one command's arguments with its entry point's own parser (and build its config)."""
    script, args = (argv[2], argv[3:]) if argv[1] == "-m" else (argv[1], argv[2:])
    if script == "bench.perf":
        from bench import perf

        perf.resolve(perf.parse_args(args))
    elif script == "jobs/label.py":
        import argparse

        from ovsam_ray.cli.label import add_label_args, label_config

        parser = argparse.ArgumentParser()
        add_label_args(parser)
        label_config(parser.parse_args(args))
    elif script == "bench.train_steps" and args[0] in ("distill", "cotrain"):
        from ovsam_ray.cli import train as train_cli

        train = args[args.index("--") + 1 :]
        if args[0] == "distill":
            train_cli.distill_config_from_args(train_cli.distill_parser().parse_args(train))
        else:
            train_cli.cotrain_config_from_args(train_cli.cotrain_parser().parse_args(train))
    elif script == "bench.train_steps":
        if args[:1] != ["write-sam-encoder"] or "--out" not in args:
            raise ValueError("write-sam-encoder --kind K --out FILE")
    elif script == "bench.sam3_cost":
        from bench import sam3_cost

        sam3_cost.parse_args(args)
    elif script == "bench.train_precision":
        from bench import train_precision

        train_precision.parse_args(args)
    elif script == "bench.gpu_run_prep":
        if args[0] not in ("env", "label", "train") or len([a for a in args if not a.startswith("--")]) != 2:
            raise ValueError("gpu_run_prep.py {env,label,train} PATH [--smoke]")
    elif script != "pytest":
        raise ValueError(f"no validator for {script}")


def validate_commands(stages: list[tuple[str, list[list[str]]]]) -> list[str]:
    """Errors (empty: all fine) of every command of every stage."""
    errors = []
    for name, commands in stages:
        for argv in commands:
            try:
                _validate(argv)
            except SystemExit as e:  # argparse's way of saying no
                errors.append(f"{name}: {' '.join(argv[1:3])}: arguments rejected (exit {e.code})")
            except Exception as e:  # noqa: BLE001 - a config's own validation
                errors.append(f"{name}: {' '.join(argv[1:3])}: {type(e).__name__}: {e}")
    return errors
