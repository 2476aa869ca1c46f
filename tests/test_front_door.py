"""``import ovsam_ray``: what a user reaches for, cheap to import, and the README's quickstart runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ovsam_ray

README = Path(__file__).resolve().parent.parent / "README.md"


def test_import_and_the_exporters_and_converters_load_no_torch() -> None:
    code = (
        "import sys, ovsam_ray, ovsam_ray.export, ovsam_ray.convert, ovsam_ray.errors; "
        "print(sorted(m for m in ('torch', 'open_clip', 'segment_anything', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves() -> None:
    for name in ovsam_ray.__all__:
        assert getattr(ovsam_ray, name) is not None, name
    assert set(ovsam_ray.__all__) <= set(dir(ovsam_ray))
    assert "ovsam_tiny" in ovsam_ray.preset_names() and ovsam_ray.get_preset("ovsam_tiny").image_size == 256
    with pytest.raises(AttributeError):
        ovsam_ray.not_a_name  # noqa: B018
    with pytest.raises(KeyError, match="known presets"):
        ovsam_ray.get_preset("nope")


def test_load_predictor_carries_its_vocabulary(tmp_path: Path) -> None:
    vocab = tmp_path / "animals.txt"
    vocab.write_text("cat, kitty\ndog\nbird\n")
    predictor = ovsam_ray.load_predictor("ovsam_tiny", vocab=str(vocab), random_init=True, topk=2)
    assert isinstance(predictor, ovsam_ray.OVSAMPredictor)
    assert predictor.vocabulary.class_names == ("cat", "dog", "bird")
    assert tuple(predictor.text_embeddings.shape[:2]) == (3, 2)
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    boxes = np.array([[2, 3, 30, 20], [10, 10, 49, 39]], np.float32)
    pred = predictor([image], [ovsam_ray.ImagePrompts(boxes=boxes)])[0]
    assert pred.masks.shape == (2, 40, 50) and pred.topk_ids.shape == (2, 2)
    assert predictor.label_names(pred) == [predictor.vocabulary.class_names[i] for i in pred.labels]
    generator = ovsam_ray.OVSAMAutomaticMaskGenerator(predictor, points_per_side=2, stability_score_thresh=0.0)
    assert all(0 <= r["label"] < 3 for r in generator.generate(image))


def test_load_predictor_refuses_a_missing_model_with_our_error() -> None:
    with pytest.raises(ovsam_ray.ConfigError, match="random_init"):
        ovsam_ray.load_predictor("ovsam_tiny")


def _quickstart() -> str:
    text = README.read_text()
    head = text[: text.index("## Weights")]  # the quickstart comes before any detail
    blocks = re.findall(r"```python\n(.*?)```", head, re.S)
    assert len(blocks) == 1, "the README's quickstart has one Python block"
    return blocks[0]


def test_readme_quickstart_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    code = _quickstart()
    assert len(code.strip().splitlines()) <= 8
    # The released weights and a GPU are not here: the same lines with the tiny preset, untrained.
    swaps = {'"ovsam_rn50x16", weights="weights/"': '"ovsam_tiny", random_init=True', 'device="cuda"': 'device="cpu"'}
    for old, new in swaps.items():
        assert old in code, f"the quickstart no longer says {old}: update this test with it"
        code = code.replace(old, new)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(
        tmp_path / "photo.jpg"
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    assert "(1, 240, 320)" in printed


def _shell_quickstart() -> list[str]:
    """The commands of the README's first shell block (the quickstart), continuation lines joined,
    comments dropped."""
    head = README.read_text().split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", head, re.S).group(1).replace("\\\n", " ")
    return [line.split("  #")[0].split(" # ")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_shell_quickstart_runs_as_written(tmp_path: Path) -> None:
    """Every quickstart command that is cheap runs as written in a fresh clone: the activation, the
    version, the dry run over the demo's shards. The demo and the test suite themselves take
    minutes (``dev/demo.sh`` is what CI's demo step runs); their shards are generated here."""
    commands = _shell_quickstart()
    slow = ["bash dev/demo.sh", "bash dev/test.sh"]
    assert commands[:2] == slow, commands
    assert "source .venv/bin/activate" in commands and "ovsam-ray --version" in commands
    repo = README.parent
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
    (clone / ".venv").symlink_to(sys.prefix)  # what dev/setup.sh would have made
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("VIRTUAL_ENV", "RAY_"))}
    env["PYTHONPATH"] = str(clone)  # the clone's package, not the one the venv was installed from
    generate = "python -m ovsam_ray.cli demo-data --output demo_out/eval_shards --num-images 6 --images-per-shard 2"
    script = "\n".join(["set -euo pipefail", generate.replace("python", f"'{sys.executable}'", 1), *commands[2:]])
    proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ovsam-ray {ovsam_ray.__version__}" in proc.stdout
    plan = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert plan["dry_run"] is True and plan["shards"]["count"] == 3 and plan["output"]["state"] == "new"
    assert not (clone / "demo_out" / "labels2").exists()
