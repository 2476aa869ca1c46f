"""The checks that guard every commit: the pre-commit hooks run exactly the checks of dev/test.sh
(ruff, ruff format, mypy), offline, and mypy's configuration covers the whole package with the
model, the data formats and the label-output schema held to --strict."""

from __future__ import annotations

import os
import shlex

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRICT_MODULES = {"ovsam_ray.model.*", "ovsam_ray.data.*", "ovsam_ray.labels.*"}
# mypy's --strict, flag by flag (its config takes `strict` only globally); the two flags left out
# are named, with the reason, in pyproject.toml.
STRICT_FLAGS = {
    "disallow_subclassing_any",
    "disallow_untyped_calls",
    "disallow_untyped_defs",
    "disallow_incomplete_defs",
    "disallow_untyped_decorators",
    "no_implicit_reexport",
    "strict_equality",
    "extra_checks",
}


def _test_sh_commands() -> list[str]:
    with open(os.path.join(REPO, "dev", "test.sh")) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def _hooks() -> list[dict]:
    with open(os.path.join(REPO, ".pre-commit-config.yaml")) as f:
        config = yaml.safe_load(f)
    return [hook for repo in config["repos"] for hook in repo["hooks"]]


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_hook_is_a_check_of_test_sh_and_needs_no_network():
    commands = _test_sh_commands()
    hooks = _hooks()
    assert {h["id"] for h in hooks} == {"ruff", "ruff-format", "mypy"}
    for hook in hooks:
        # `repo: local` + `language: system`: the project's own .venv, nothing to download at commit time
        assert hook["language"] == "system", hook
        assert hook["pass_filenames"] is False, hook  # the whole tree, as dev/test.sh checks it
        assert hook["entry"] in commands, f"{hook['id']}: {hook['entry']!r} is not a command of dev/test.sh"
        assert shlex.split(hook["entry"])[0] == ".venv/bin/python"


def test_test_sh_runs_ruff_the_formatter_and_mypy():
    commands = _test_sh_commands()
    assert ".venv/bin/python -m ruff check ovsam_ray jobs tests bench" in commands
    assert ".venv/bin/python -m ruff format --check ovsam_ray jobs tests bench" in commands
    assert ".venv/bin/python -m mypy" in commands
    # the checks run before the tests
    pytest_line = next(i for i, c in enumerate(commands) if "-m pytest" in c)
    assert commands.index(".venv/bin/python -m mypy") < pytest_line


def test_mypy_checks_the_package_and_holds_model_data_labels_to_strict():
    project = _pyproject()
    mypy = project["tool"]["mypy"]
    assert mypy["packages"] == ["ovsam_ray"]
    assert mypy["check_untyped_defs"] is True
    strict = [o for o in mypy["overrides"] if set(o["module"]) == STRICT_MODULES]
    assert len(strict) == 1
    assert all(strict[0].get(flag) is True for flag in STRICT_FLAGS), strict[0]
    assert any(req.startswith("mypy") for req in project["project"]["optional-dependencies"]["test"])
    with open(os.path.join(REPO, "ovsam_ray", "py.typed")) as f:
        assert f.read() == ""
