"""The layer contract (docs/DESIGN.md §1): lower layers never import higher ones.

Every ``import ovsam_ray...`` and ``from ovsam_ray... import`` (relative ones too) of every module
of the package, at module level or inside a function, is checked against ``LAYERS``: a module may
import its own layer's package and any lower layer, never a higher one, and never a sibling
package of its own layer. A private name (``_x``) is never imported from another module, and a
private module (``_paths``) only from inside its own package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ovsam_ray"

#: The package's layers, low to high. A layer's entries are module prefixes (a package, or a
#: module; a tuple of prefixes is one entry); a module belongs to the longest prefix that matches
#: it. Entries of one layer are siblings: they import lower layers only, never each other.
LAYERS: tuple[tuple[str | tuple[str, ...], ...], ...] = (
    ("errors",),  # the error base classes
    ("storage", "registry"),  # every storage path; the name registry
    ("locations", "written"),  # canonical locations; what a command may replace
    ("data",),  # shards, decoding, RLE, ground-truth prompts, the tar writer
    ("vocabulary", "weights.files"),  # class names and vocabularies; finding weights files
    ("model",),  # OV-SAM in plain PyTorch
    ("weights", "text_cache"),  # released files -> a model (weights.released); class text embeddings
    ("inference",),  # ModelConfig -> a predictor
    ("labels",),  # the label format, instance scoring, category lists
    ("labelling",),  # decode -> prompts -> predict -> instances, in process
    ("convert", "export"),  # datasets -> shards; label output -> other formats
    # the label job on Ray Data; the review loop (picks instances from label outputs, writes
    # review tasks with the exporters' writers, reads reviewed exports into overlays)
    ("pipeline", "review"),
    ("evaluation",),  # the paper's evaluations (they may run the label job)
    ("training",),  # the training stages on Ray Train
    ("demo", "predict", "show"),  # the commands' code
    # The command line (``cli/train.py`` holds the ``train`` subcommands) and the front door
    # (``ovsam_ray/__init__.py``, ""): only its ``__version__`` may be imported from below.
    (("cli", "__main__", ""),),
)

#: Downward imports that are still wrong: (importer prefix, imported prefix, why).
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    ("evaluation", "export", "evaluation scores label outputs; categories live in labels/"),
    ("training", "convert", "shard-folder facts live in data/"),
)

#: Known violations still to be moved: (importer module, imported module). Empty: keep it so.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


def _layer_of(module: str) -> tuple[int, str]:
    """(layer index, entry) of a module name relative to the package ("" = __init__); an entry of
    several prefixes is named by its first."""
    best: tuple[int, str, str] | None = None
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            for prefix in (entry,) if isinstance(entry, str) else entry:
                if module == prefix or (prefix and module.startswith(prefix + ".")) or (not prefix and not module):
                    if best is None or len(prefix) > len(best[2]):
                        best = (index, entry if isinstance(entry, str) else entry[0], prefix)
    assert best is not None, f"ovsam_ray.{module} is in no layer: add it to LAYERS"
    return best[0], best[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_module(name: str) -> bool:
    return name in MODULES


def _imports(module: str, path: Path):
    """(line, imported module, imported names) for every import of our package in a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ovsam_ray" or alias.name.startswith("ovsam_ray."):
                    yield node.lineno, alias.name.removeprefix("ovsam_ray").lstrip("."), ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "ovsam_ray" or (node.module or "").startswith("ovsam_ray."):
                target = node.module.removeprefix("ovsam_ray").lstrip(".")
            else:
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}".lstrip(".") for n in names if _is_module(f"{target}.{n}".lstrip("."))]
            if submodules:  # ``from ovsam_ray import io``: the submodule is what is imported
                for sub in submodules:
                    yield node.lineno, sub, ()
                names = [n for n in names if f"{target}.{n}".lstrip(".") not in submodules]
                if not names:
                    continue
            yield node.lineno, target, tuple(names)


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}"


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        _layer_of(module)


def test_no_upward_or_sideways_import() -> None:
    problems = []
    for module, path in MODULES.items():
        low, own = _layer_of(module)
        for line, target, names in _imports(module, path):
            if (module, target) in ALLOWED or (target == "" and names == ("__version__",)):
                continue
            high, theirs = _layer_of(target)
            if theirs == own:
                continue
            if high > low:
                problems.append(
                    f"{_where(module, line)}: ovsam_ray.{module} (layer {own or '__init__'!r}) imports "
                    f"ovsam_ray.{target} (higher layer {theirs!r})"
                )
            elif high == low:
                problems.append(
                    f"{_where(module, line)}: ovsam_ray.{module} ({own!r}) imports ovsam_ray.{target} "
                    f"(its sibling {theirs!r})"
                )
            for importer, imported, why in FORBIDDEN:
                if _layer_of(module)[1] == importer and _layer_of(target)[1] == imported:
                    problems.append(f"{_where(module, line)}: ovsam_ray.{module} imports ovsam_ray.{target}: {why}")
    assert not problems, "\n".join(problems)


def test_allow_list_holds_no_fixed_violation() -> None:
    found = {(module, target) for module, path in MODULES.items() for _, target, _ in _imports(module, path)}
    assert ALLOWED <= found, f"fixed, drop from ALLOWED: {sorted(ALLOWED - found)}"


def test_no_private_name_crosses_a_module() -> None:
    problems = []
    for module, path in MODULES.items():
        for line, target, names in _imports(module, path):
            if target == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and (module, target) not in ALLOWED:
                problems.append(f"{_where(module, line)}: imports private {private} from ovsam_ray.{target}")
            parts = target.split(".")
            for depth, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:depth])
                    if not (module == owner or module.startswith(owner + ".")) and (module, target) not in ALLOWED:
                        problems.append(f"{_where(module, line)}: imports private module ovsam_ray.{target}")
    assert not problems, "\n".join(problems)


def test_the_contract_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    found = {(m, t) for m, p in MODULES.items() for _, t, _ in _imports(m, p)}
    assert ("data.decode", "storage") in found  # ``from ovsam_ray import storage``
    # The package imports absolutely; a relative or function-level import is still seen.
    module = tmp_path / "stages.py"
    module.write_text(
        "from .faults import maybe_fail\ndef f():\n    from ..cli import flags\n    from ...ovsam_ray import storage\n"
    )
    seen = {t for _, t, _ in _imports("pipeline.stages", module)}
    assert {"pipeline.faults", "cli.flags"} <= seen
    assert _layer_of("cli.train") == _layer_of("") == (len(LAYERS) - 1, "cli")
    assert _layer_of("training.loop") == (_layer_of("training")[0], "training")
    assert _layer_of("weights.files")[0] < _layer_of("model")[0] < _layer_of("weights.released")[0]


def test_exporters_converters_and_data_import_without_torch() -> None:
    names = [f"ovsam_ray.{m}" for m in MODULES if m.split(".")[0] in ("export", "convert", "data", "vocabulary")]
    code = (
        f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n)\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'segment_anything') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
