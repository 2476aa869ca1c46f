"""The label job checks its flags, weights and detector before it lists, writes or starts anything,
with the code the actors load them with; ``--dry-run`` reports what the job would do and does none
of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import error_lines, run_cli

from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.errors import ConfigError, MissingInputError, OVSAMRayError
from ovsam_ray.inference import ModelConfig
from ovsam_ray.pipeline.detectors import DetectorStage, check_detector, load_detector
from ovsam_ray.pipeline.label_job import LabelConfig, check_before_start, plan_label, run_label
from ovsam_ray.weights.files import WeightsError

TINY = ["--preset", "ovsam_tiny", "--random-init"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("start") / "shards")
    generate_shards(root, num_images=7, images_per_shard=1, seed=3, image_size=(32, 24))
    return root


def _cfg(shards: str, output: str, **kw) -> LabelConfig:
    model = kw.pop("model", None) or ModelConfig(preset="ovsam_tiny", random_init=True)
    return LabelConfig(input=shards, output=output, model=model, **kw)


def _no_ray(monkeypatch) -> None:
    import ray

    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)


# --- the checks, the same code as the actors ---------------------------------------------------


def test_an_unknown_detector_is_refused_by_the_check_and_by_the_actor_with_one_message(shards, tmp_path) -> None:
    cfg = _cfg(shards, str(tmp_path / "out"), prompts="detector:owl")
    with pytest.raises(ConfigError, match="unknown detector 'owl'.*fasterrcnn_resnet50_fpn_v2") as checked:
        check_before_start(cfg)
    with pytest.raises(ConfigError) as loaded:
        DetectorStage(spec="owl", random_init=True, device="cpu")
    assert str(checked.value) == str(loaded.value)


def test_a_torchvision_detector_without_its_weights_file(shards, tmp_path) -> None:
    weights = tmp_path / "w"
    weights.mkdir()
    model = ModelConfig(preset="ovsam_tiny", random_init=True)
    with pytest.raises(WeightsError, match=r"no fasterrcnn_resnet50_fpn_v2\.pth"):
        check_detector("fasterrcnn_resnet50_fpn_v2", weights=str(weights))
    with pytest.raises(WeightsError, match=r"no fasterrcnn_resnet50_fpn_v2\.pth"):
        load_detector("fasterrcnn_resnet50_fpn_v2", weights=str(weights), device="cpu")
    (weights / "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth").write_bytes(b"")
    found = check_before_start(
        _cfg(shards, str(tmp_path / "out"), model=model, prompts="detector:fasterrcnn_resnet50_fpn_v2")
    )
    assert found["detector"]["random_init"] is True  # the job's --random-init covers the detector too
    assert check_detector("fasterrcnn_resnet50_fpn_v2", weights=str(weights))["weights"].endswith("dd69338a.pth")


def test_an_incomplete_hf_detector_folder_names_what_is_missing(shards, tmp_path) -> None:
    pytest.importorskip("transformers")
    folder = tmp_path / "det" / "owlv2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    cfg = _cfg(shards, str(tmp_path / "out"), prompts="detector:owlv2", detector_weights=str(tmp_path / "det"))
    cfg.model.random_init = False
    cfg.model.weights = str(tmp_path / "ovsam")  # not checked first: the detector's message is the one
    with pytest.raises(WeightsError, match=r"missing: the image processor's settings .*processor_config\.json"):
        check_detector("owlv2", weights=str(tmp_path / "det"))
    with pytest.raises(WeightsError, match="lacks files for preset ovsam_tiny"):
        check_before_start(cfg)


def test_a_user_detector_that_cannot_be_imported(shards, tmp_path) -> None:
    cfg = _cfg(shards, str(tmp_path / "out"), prompts="detector:no_such_module:Det")
    with pytest.raises(ConfigError, match="cannot import 'Det' from 'no_such_module'"):
        check_before_start(cfg)
    assert check_detector("user_detector:HalfBoxes", weights=None)["user"] is True  # tests/helpers


def test_missing_model_weights_and_vocabulary_files(shards, tmp_path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    with pytest.raises(WeightsError, match="lacks files for preset ovsam_tiny.*clip_tiny.pth"):
        check_before_start(_cfg(shards, "out", model=ModelConfig(preset="ovsam_tiny", weights=str(weights))))
    vocab = ModelConfig(preset="ovsam_tiny", random_init=True, vocab=str(tmp_path / "nope.txt"))
    with pytest.raises(MissingInputError, match="nope.txt"):
        check_before_start(_cfg(shards, "out", model=vocab))
    files = {k: str(tmp_path / f"{k}.pth") for k in ("sam", "clip", "sam2clip")}
    for path in files.values():
        Path(path).write_bytes(b"")
    explicit = ModelConfig(
        preset="ovsam_tiny", **{f"{k}_checkpoint": v for k, v in files.items()}, clip2sam_checkpoint="gone.pth"
    )
    with pytest.raises(WeightsError, match="weights file not found: gone.pth"):
        check_before_start(_cfg(shards, "out", model=explicit))
    # a baseline needs no weights at all
    assert "weights" not in check_before_start(
        _cfg(shards, "out", model=ModelConfig(preset="ovsam_tiny", weights=str(weights)), baseline="box-fill")
    )


def test_run_label_refuses_before_it_writes_or_connects(shards, tmp_path) -> None:
    out = tmp_path / "out"
    called = []
    with pytest.raises(OVSAMRayError):
        run_label(_cfg(shards, str(out), prompts="detector:owl"), connect=lambda: called.append(1))
    assert not out.exists() and not called


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--prompts", "detector:owl"], "unknown detector 'owl'"),
        (["--prompts", "detector:owlv2", "--detector-weights", "{tmp}"], "detector:owlv2 needs a save_pretrained"),
        (["--prompts", "bogus"], "--prompts 'bogus'"),
    ],
)
def test_cli_bad_prompts_or_detector_exit_2_one_line_nothing_written(
    shards, tmp_path, caplog, monkeypatch, flags, expected
) -> None:
    pytest.importorskip("transformers")
    _no_ray(monkeypatch)
    out = tmp_path / "out"
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert run_cli("label", "--input", shards, "--output", str(out), *TINY, *flags) == 2
    errors = error_lines(caplog)
    assert len(errors) == 1 and expected in errors[0], errors
    assert not out.exists()


# --- --dry-run ---------------------------------------------------------------------------------


def test_dry_run_new_output_prints_the_plan_writes_nothing_starts_no_ray(shards, tmp_path, capsys, monkeypatch) -> None:

    _no_ray(monkeypatch)
    out = tmp_path / "labels"
    assert run_cli("label", "--input", shards, "--output", str(out), *TINY, "--dry-run", "--limit", "2") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["shards"]["count"] == 7 and plan["shards"]["to_do"] == 2
    assert len(plan["shards"]["first"]) == 6 and plan["shards"]["first"][-1] == "... and 2 more"
    assert plan["output"]["state"] == "new" and plan["weights"] == "random init (untrained)"
    assert plan["config"]["model"]["preset"] == "ovsam_tiny" and plan["config"]["limit"] == 2
    assert not out.exists()  # and ray.init was never called (_no_ray)


def test_dry_run_refused_output_exit_2_and_the_folder_unchanged(shards, tmp_path, capsys, caplog) -> None:
    out = tmp_path / "labels"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    assert run_cli("label", "--input", shards, "--output", str(out), *TINY, "--dry-run") == 2
    plan = json.loads(capsys.readouterr().out)
    assert plan["output"]["state"] == "refused" and "notes.txt" in plan["output"]["reason"]
    assert any("would stop" in line and "notes.txt" in line for line in error_lines(caplog))
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_dry_run_bad_weights_is_the_same_one_line_exit_2(shards, tmp_path, caplog, capsys) -> None:
    out = tmp_path / "labels"
    code = run_cli(
        "label",
        "--input",
        shards,
        "--output",
        str(out),
        "--preset",
        "ovsam_tiny",
        "--weights",
        str(tmp_path),
        "--dry-run",
    )
    assert code == 2 and capsys.readouterr().out == ""
    assert len(error_lines(caplog)) == 1 and "lacks files" in error_lines(caplog)[0]
    assert not out.exists()


def test_run_label_does_not_take_a_dry_run(shards, tmp_path) -> None:
    with pytest.raises(ConfigError, match="plan_label"):
        run_label(_cfg(shards, str(tmp_path / "o"), dry_run=True))


@pytest.mark.slow
def test_dry_run_after_a_run_resumable_refused_or_overwritten(ray_local, shards, tmp_path) -> None:
    out = str(tmp_path / "labels")
    cfg = _cfg(shards, out, baseline="box-fill", limit=3)
    assert run_label(cfg).shards_committed == 3
    snapshot = sorted((p, os.path.getsize(p)) for p in Path(out).rglob("*") if p.is_file())
    plan = plan_label(_cfg(shards, out, baseline="box-fill", dry_run=True))
    assert plan["output"]["state"] == "resumable" and plan["output"]["committed"] == 3
    assert plan["shards"]["to_do"] == 4
    changed = plan_label(_cfg(shards, out, baseline="box-fill", max_prompts=5, dry_run=True))["output"]
    assert changed["state"] == "refused" and changed["differs"] == ["max_prompts: 1000 -> 5"]
    again = plan_label(_cfg(shards, out, baseline="box-fill", max_prompts=5, overwrite=True, dry_run=True))
    assert again["output"]["state"] == "overwrite"
    assert sorted((p, os.path.getsize(p)) for p in Path(out).rglob("*") if p.is_file()) == snapshot
