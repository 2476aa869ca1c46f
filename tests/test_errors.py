"""The error contract: our errors derive from ``OVSAMRayError`` and stop the CLI with one line and
exit 2; any other exception is a bug and keeps its traceback (exit 1)."""

from __future__ import annotations

import ast
import importlib
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ovsam_ray.cli import EXIT_STOPPED, main
from ovsam_ray.errors import ConfigError, OVSAMRayError

PACKAGE = Path(__file__).resolve().parent.parent / "ovsam_ray"


def _error_classes() -> list[tuple[str, str]]:
    """(module, class name) of every ``class ...Error`` defined at the top of a package module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found.append((module, node.name))
    return found


ERRORS = _error_classes()


def test_the_package_defines_its_errors() -> None:
    names = {name for _, name in ERRORS}
    assert {
        "OVSAMRayError",
        "ConfigError",
        "UnknownPresetError",
        "WeightsError",
        "JobStartError",
        "LeaseHeldError",
        "ForeignFilesError",
        "OverlappingLocationsError",
        "ConvertError",
        "UnsafePathError",
        "ShardSpecError",
    } <= names


@pytest.mark.parametrize(("module", "name"), ERRORS, ids=[n for _, n in ERRORS])
def test_every_error_class_derives_from_the_base(module: str, name: str) -> None:
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, OVSAMRayError)


def test_builtin_bases_are_kept_for_callers_that_catch_them() -> None:
    from ovsam_ray.locations import OverlappingLocationsError
    from ovsam_ray.model.presets import UnknownPresetError
    from ovsam_ray.weights.files import WeightsError

    assert issubclass(ConfigError, ValueError) and issubclass(OverlappingLocationsError, ValueError)
    assert issubclass(UnknownPresetError, KeyError) and issubclass(UnknownPresetError, ValueError)
    assert issubclass(WeightsError, RuntimeError)
    assert str(UnknownPresetError("unknown preset 'x'")) == "unknown preset 'x'"  # no KeyError quotes


def test_bad_config_values_raise_our_config_error(tmp_path: Path) -> None:
    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.pipeline.label_job import LabelConfig
    from ovsam_ray.training.config import OptimConfig

    with pytest.raises(ConfigError, match="topk"):
        ModelConfig(random_init=True, topk=0)
    with pytest.raises(ConfigError, match="batch_size"):
        LabelConfig(input=str(tmp_path), output=str(tmp_path / "o"), model=ModelConfig(random_init=True), batch_size=0)
    with pytest.raises(ConfigError, match="lr="):
        OptimConfig(lr=0)


def _boom(exc: BaseException):
    def run_predict(cfg):
        raise exc

    return run_predict


ARGV = [
    "predict",
    "--image",
    "x.png",
    "--prompts",
    "p.json",
    "--output",
    "o.json",
    "--preset",
    "ovsam_tiny",
    "--random-init",
]


@pytest.mark.parametrize(("module", "name"), ERRORS, ids=[n for _, n in ERRORS])
def test_each_of_our_errors_stops_with_one_line_and_exit_2(monkeypatch, caplog, module: str, name: str) -> None:
    cls = getattr(importlib.import_module(module), name)
    monkeypatch.setattr("ovsam_ray.predict.run_predict", _boom(cls("the reason, in one line")))
    with caplog.at_level(logging.DEBUG, logger="ovsam_ray"):
        assert main(ARGV) == EXIT_STOPPED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].getMessage() == "the reason, in one line"
    assert errors[0].exc_info is None  # the traceback only at DEBUG level


@pytest.mark.parametrize(
    "exc",
    [ValueError("shape mismatch"), RuntimeError("CUDA error"), OSError("disk")],
    ids=["ValueError", "RuntimeError", "OSError"],
)
def test_any_other_exception_is_not_taken_for_a_bad_flag(monkeypatch, exc: BaseException) -> None:
    monkeypatch.setattr("ovsam_ray.predict.run_predict", _boom(exc))
    with pytest.raises(type(exc), match=str(exc)):
        main(ARGV)


def test_a_plain_value_error_from_deep_inside_keeps_its_traceback_and_exits_1(tmp_path: Path) -> None:
    # A bug deep in the model (as a torch shape error would be), in a real process.
    script = textwrap.dedent(f"""
        import sys
        import ovsam_ray.model.predictor as predictor
        from ovsam_ray.cli import main

        def embed(self, *args, **kwargs):
            raise ValueError("a shape bug deep inside")

        predictor.OVSAMPredictor.embed = embed
        sys.exit(main({ARGV!r}))
    """)
    from PIL import Image

    Image.new("RGB", (32, 24)).save(tmp_path / "x.png")
    (tmp_path / "p.json").write_text('{"boxes": [[1, 1, 10, 10]]}')
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "ValueError: a shape bug deep inside" in proc.stderr
    assert "in embed" in proc.stderr  # where it happened
    assert not (tmp_path / "o.json").exists()


def test_argparse_errors_still_exit_2() -> None:
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--no-such-flag"])
    assert stop.value.code == 2


@pytest.mark.parametrize(
    ("flag", "name"),
    [("--image", "nope.png"), ("--prompts", "nope.json"), ("--vocab", "nope.txt"), ("--class-embeddings", "nope.pt")],
)
def test_a_file_named_by_a_flag_that_is_not_there_is_one_line_exit_2(
    tmp_path: Path, monkeypatch, caplog, flag: str, name: str
) -> None:
    from PIL import Image

    Image.new("RGB", (32, 24)).save(tmp_path / "x.png")
    (tmp_path / "p.json").write_text('{"boxes": [[1, 1, 10, 10]]}')
    monkeypatch.chdir(tmp_path)
    flags = {"--image": "x.png", "--prompts": "p.json", "--output": "o.json", "--preset": "ovsam_tiny", flag: name}
    argv = ["predict", "--random-init", *(x for item in flags.items() for x in item)]
    with caplog.at_level(logging.ERROR, logger="ovsam_ray"):
        assert main(argv) == EXIT_STOPPED
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and name in errors[0] and "no such file" in errors[0]
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("text", ["x", "1,2,3", "", "1,"])
def test_a_bad_concurrency_is_a_flag_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from ovsam_ray.cli.label import label_parser

    parser = label_parser()
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--input", "in", "--output", "out", "--concurrency", text])
    assert stop.value.code == 2 and "--concurrency" in capsys.readouterr().err
    ok = parser.parse_args(["--input", "in", "--output", "out", "--concurrency", "1,8"])
    assert ok.concurrency == (1, 8)
