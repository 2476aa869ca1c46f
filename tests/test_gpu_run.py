"""The plumbing of bench/gpu_run.py, on a CPU and fast: every stage's arguments parse (GPU and smoke
sizes), a stage that hangs is killed with its children and recorded while the run goes on, a perf
stage cut short keeps its finished modes, the pytest stage reads JUnit XML, the smoke run's env
stage and fast path pass end to end on the CPU, and step times come out of the training log. The whole smoke run
(`bash bench/gpu_run.sh --smoke DIR`, minutes) is in bench/RESULTS.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from bench import gpu_run, gpu_run_checks, train_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_stage_command_parses_at_gpu_and_smoke_sizes(tmp_path, capsys):
    assert gpu_run.main(["--dry-run", "--work", str(tmp_path), str(tmp_path / "out")]) == 0
    assert gpu_run.main(["--dry-run", "--smoke", "--work", str(tmp_path), str(tmp_path / "out")]) == 0
    assert "all stage commands parse" in capsys.readouterr().out
    ctx = gpu_run.make_ctx(gpu_run.parse_args(["--work", str(tmp_path), str(tmp_path / "out")]))
    label = gpu_run._label(ctx)[1]
    assert label[label.index("--vocab") + 1] == "in21k" and label[label.index("--preset") + 1] == "ovsam_rn50x16"
    sam3 = gpu_run._sam3(ctx)[0]
    assert sam3[sam3.index("--device") + 1] == "cuda" and sam3[sam3.index("--concepts") + 1] == "1,16,80"
    assert "--size" not in sam3 and "--weights" not in sam3
    weighted = gpu_run.make_ctx(gpu_run.parse_args(["--sam3-weights", "/w/sam3", str(tmp_path / "out")]))
    sam3 = gpu_run._sam3(weighted)[0]
    assert sam3[sam3.index("--weights") + 1] == "/w/sam3"
    distill = gpu_run._train("distill")(ctx)
    assert any("write-sam-encoder" in c for c in distill)
    steps = distill[-1]
    assert {"--use-gpu", "--random-init"} <= set(steps) and steps[steps.index("--batch-size") + 1] == "2"
    # a typo in an argument only the GPU sizes use is caught without a GPU
    bad = [c if "--use-gpu" not in c else [a.replace("--use-gpu", "--use-gpus") for a in c] for c in distill]
    perf = [[a.replace("--stage-images", "--stage-imgs") for a in c] for c in gpu_run._perf(ctx)]
    errors = gpu_run_checks.validate_commands([("train_distill", bad), ("perf", perf)])
    assert len(errors) == 2 and "train_distill" in errors[0] and "perf" in errors[1]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_hanging_stage_is_killed_with_its_children_and_recorded(tmp_path):
    child = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
        "time.sleep(120)']); print('grandchild', p.pid, flush=True); time.sleep(120)"
    )
    stage = gpu_run.Stage("hang", (3, 3), lambda ctx: [[ctx.python, "-c", child]])
    ctx = gpu_run.make_ctx(gpu_run.parse_args(["--work", str(tmp_path), str(tmp_path / "out")]))
    t0 = time.time()
    r = gpu_run.run_stage(stage, ctx, deadline=time.time() + 600)
    assert time.time() - t0 < 20
    assert r["status"] == "timeout" and r["rc"] == 124 and r["timed_out"]
    assert [c["ok"] for c in r["checks"]] == [False, False]  # the budget, and no result to check
    pid = int(re.search(r"^grandchild (\d+)$", open(tmp_path / "hang.log").read(), re.M).group(1))
    deadline = time.time() + 5
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    skipped = gpu_run.run_stage(stage, ctx, deadline=time.time() + 0.5)
    assert skipped["status"] == "skipped" and "left" in skipped["reason"]
    table = gpu_run.summary_table({"hang": r, "late": skipped})
    assert "| hang | timeout |" in table and "| late | skipped |" in table and "- FAILED hang:" in table


def test_perf_cut_short_keeps_the_modes_that_finished(tmp_path):
    ctx = gpu_run.make_ctx(gpu_run.parse_args(["--work", str(tmp_path), str(tmp_path / "out")]))
    os.makedirs(ctx.path("perf_work"))
    for mode, ips in (("a", 5.0), ("c", 50.0)):
        with open(ctx.path(f"perf_work/{mode}.json"), "w") as f:
            json.dump({"images_per_s": ips, "samples": [1] * 100}, f)
    checks, figures, result = gpu_run_checks.CHECKS["perf"](ctx, "")
    ran = {c.name: c.ok for c in checks if c.name.startswith("mode ")}
    assert ran == {"mode a ran": True, "mode c ran": True, "mode d ran": False, "mode b ran": False}
    assert result["partial"] and figures["c img/s"] == 50.0 and "samples" not in result["rows"]["a"]


def test_pytest_stage_reads_junit_and_fails_skips_on_a_gpu(tmp_path):
    (tmp_path / "pytest_gpu.xml").write_text(
        '<testsuites><testsuite tests="4" failures="0" errors="0" skipped="1">'
        '<testcase classname="tests.test_gpu" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_gpu" name="test_b" time="0.1"><skipped message="needs CUDA"/></testcase>'
        "</testsuite></testsuites>"
    )
    for smoke, hard_ok in ((True, True), (False, False)):
        ctx = gpu_run.make_ctx(
            gpu_run.parse_args(["--work", str(tmp_path), str(tmp_path / "out")] + (["--smoke"] if smoke else []))
        )
        checks, figures, cases = gpu_run_checks.CHECKS["pytest_gpu"](ctx, "")
        assert all(c.ok for c in checks if c.hard) is hard_ok
        assert figures == {"passed": 3, "failed": 0, "skipped": 1}
        assert [c["outcome"] for c in cases] == ["passed", "skipped"]


def test_quick_smoke_runs_the_gpu_branches_on_the_cpu(tmp_path):
    """The smoke run's env stage and perf mode c end to end: every import the later stages need,
    and the fast path (bf16 autocast, channels_last, device RLE) on the CPU checked against fp32
    with what random weights can show. (The whole smoke run takes minutes: bench/RESULTS.md.)"""
    out = tmp_path / "gpu"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_run",
            "--smoke",
            "--stages",
            "env,perf,sam3",
            "--perf-modes",
            "c",
            "--work",
            str(tmp_path / "work"),
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["gpu_run.json", "gpu_run.log", "gpu_run.md"]
    r = json.loads((out / "gpu_run.json").read_text())
    assert r["ok"] and r["mode"] == "smoke" and r["random_init"] is True
    assert list(r["stages"]) == ["env", "perf", "sam3"] and r["stages"]["env"]["figures"]["torch"]
    env = r["stages"]["env"]["result"]["modules"]
    assert all(env[m]["ok"] for m in ("ray.data", "ray.train", "pydantic", "pyarrow", "ovsam_ray.pipeline.label_job"))
    perf = r["stages"]["perf"]["result"]
    c = perf["rows"]["c"]
    assert c["settings"]["fast"] and c["settings"]["rle_on_device"]
    assert c["fast_vs_fp32"]["ok"] and c["fast_vs_fp32"]["decoded"] == c["fast_vs_fp32"]["prompts"] > 0
    sam3 = r["stages"]["sam3"]
    assert [c["concepts"] for c in sam3["result"]["full"]["rows"]] == [1, 4]
    assert sam3["result"]["ovsam"]["preset"] == "ovsam_tiny" and sam3["figures"]["OV-SAM s/img"] > 0
    split = sam3["result"]["split"]["rows"]
    assert [x["concepts"] for x in split] == [1, 10, 20, 80, 100] and all(0 < x["sam3_share"] < 1 for x in split)
    assert "| stage |" in (out / "gpu_run.md").read_text() and "sam3 | ok" in (out / "gpu_run.md").read_text()
    assert "GPU split between the SAM 3 and the OV-SAM pools" in (out / "gpu_run.log").read_text()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("[gpu_run] ALL OK")


def test_step_times_from_the_training_log():
    line = (
        "\x1b[36m(RayTrainWorker pid=13247)\x1b[0m distill step 3: grad_norm=6.789 images=2 images_per_s=16.62 "
        "images_seen=6 loss=2.473 lr=1.024e-07 resume_item=1 step=3"
    )
    row = train_steps.parse_step_line(line)
    assert row["step"] == 3 and row["images"] == 2 and row["images_per_s"] == 16.62
    assert train_steps.parse_step_line("Reporting training result 3: TrainingReport(...)") is None
    rows = [
        {"step": s, "images": 2.0, "images_per_s": ips}
        for s, ips in [(1, 0.1), (2, 4.0), (3, 10.0), (4, 8.0), (5, 10.0), (3, 10.0)]
    ]
    t = train_steps.step_times(rows, warmup_steps=2)
    assert [s["step"] for s in t["steps"]] == [1, 2, 3, 4, 5]  # a step logged by two workers counts once
    assert t["first_step_s"] == 20.0 and t["steady_steps"] == 3 and t["steady_step_s"] == 0.2
    proj = train_steps.gpu_hours("cotrain", 4.0)
    assert proj["gpu_hours"] == round(12 * 118_287 / 4.0 / 3600, 1)
    assert train_steps.gpu_hours("cotrain", None) is None
