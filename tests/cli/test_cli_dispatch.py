"""The CLI package: exporters and converters dispatched from their registries (every format's flags
bind to its function), unknown names fail listing the known ones, no import cycle, no import guard."""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest

import ovsam_ray
from ovsam_ray.cli import build_parser, main
from ovsam_ray.convert import CONVERTERS
from ovsam_ray.export import EXPORTERS

PACKAGE = pathlib.Path(ovsam_ray.__file__).parent

CONVERT_ARGS = {
    "coco": ["--annotations", "a.json", "--images", "img"],
    "lvis": ["--annotations", "a.json", "--images", "img"],
    "sa1b": ["--input", "in"],
    "imagenet": ["--input", "in"],
    "detections": ["--results", "r.json", "--annotations", "a.json", "--images", "img", "--no-ground-truth"],
}


def _subcommands(parser, *path):
    for name in path:
        action = next(a for a in parser._actions if a.dest in ("command", "format"))
        parser = action.choices[name]
    return set(next(a for a in parser._actions if a.dest == "format").choices)


def _recording(real, calls, result):
    def fake(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)  # TypeError on a flag it lacks
        return result

    return fake


class _Summary:
    shards: list[str] = []

    def to_dict(self):
        return {"images": 0}


def test_every_export_and_convert_subcommand_has_a_registry_entry_and_back():
    parser = build_parser()
    assert _subcommands(parser, "export") == set(EXPORTERS)
    assert _subcommands(parser, "convert") == set(CONVERTERS)


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_export_dispatches_from_the_registry(monkeypatch, fmt):
    calls = []
    monkeypatch.setitem(EXPORTERS, fmt, _recording(EXPORTERS[fmt], calls, {"images": 0}))
    assert main(["export", fmt, "--input", "labels", "--output", "out", "--min-score", "0.25"]) == 0
    assert calls == [{**calls[0], "labels": "labels", "output": "out", "min_score": 0.25}]


@pytest.mark.parametrize("fmt", sorted(CONVERTERS))
def test_convert_dispatches_from_the_registry(monkeypatch, tmp_path, fmt):
    monkeypatch.chdir(tmp_path)  # the CLI records what it wrote in ./out
    calls = []
    monkeypatch.setitem(CONVERTERS, fmt, _recording(CONVERTERS[fmt], calls, _Summary()))
    assert main(["convert", fmt, *CONVERT_ARGS[fmt], "--output", "out", "--limit", "7"]) == 0
    assert len(calls) == 1 and calls[0]["output"] == "out" and calls[0]["limit"] == 7
    if fmt == "detections":
        assert calls[0]["keep_ground_truth"] is False


@pytest.mark.parametrize("registry", [EXPORTERS, CONVERTERS], ids=["exporters", "converters"])
def test_unknown_name_lists_the_known_ones(registry):
    with pytest.raises(KeyError) as err:
        registry["parquet2"]
    assert "'parquet2'" in str(err.value)
    assert all(name in str(err.value) for name in registry)


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_cli_modules_never_import_the_cli_package():
    # The package (build_parser, main) imports every subcommand module; they import only each other's
    # leaves (common), so there is no cycle. __main__ alone imports the package.
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        assert "ovsam_ray.cli" not in _imports(ast.parse(path.read_text())), path.name


def test_no_import_error_guard_around_our_own_modules():
    # A broken import of ours must fail loudly, never drop a subcommand or a feature silently.
    guarded = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try):
                continue
            catches = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if not any("ImportError" in c or "ModuleNotFoundError" in c for c in catches):
                continue
            if any(name.startswith("ovsam_ray") for name in _imports(ast.Module(body=node.body, type_ignores=[]))):
                guarded.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert guarded == []
