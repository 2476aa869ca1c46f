"""Loading a model resolves its files once and builds once: one preset lookup, one listing of the
weights location, one read of each file, one CLIP model and one OV-SAM."""

from __future__ import annotations

import collections

import torch

from ovsam_ray.model import presets
from ovsam_ray.weights import released
from ovsam_ray.weights.released import export_released, load_ovsam


class _CountingPresets(dict):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lookups = 0

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)


def _spy(monkeypatch, module, name: str, calls: collections.Counter) -> None:
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls[(name, args[0] if args and isinstance(args[0], str) else None)] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def test_load_ovsam_resolves_and_builds_once(tmp_path, monkeypatch):
    source = load_ovsam("ovsam_tiny", random_init=True)
    weights = str(tmp_path / "weights")
    written = export_released(
        source.model, weights, "ovsam_tiny", train_vocab="coco", meta={}, clip_model=source.clip_model
    )

    counting = _CountingPresets(presets.PRESETS)
    monkeypatch.setattr(presets, "PRESETS", counting)
    calls: collections.Counter = collections.Counter()
    for name in ("find_files", "read_weights", "local_path", "create_clip_model", "build_ovsam"):
        _spy(monkeypatch, released, name, calls)

    loaded = load_ovsam("ovsam_tiny", weights=weights)

    assert counting.lookups == 1
    assert sum(n for (name, _), n in calls.items() if name == "find_files") == 1
    assert {url: n for (name, url), n in calls.items() if name == "read_weights"} == {
        written[part]: 1 for part in ("sam", "sam2clip", "clip2sam")
    }
    assert {url: n for (name, url), n in calls.items() if name == "local_path"} == {written["clip"]: 1}
    assert sum(n for (name, _), n in calls.items() if name == "create_clip_model") == 1
    assert sum(n for (name, _), n in calls.items() if name == "build_ovsam") == 1
    # and it is the exported model
    expected = source.model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_random_init_looks_the_preset_up_once(monkeypatch):
    counting = _CountingPresets(presets.PRESETS)
    monkeypatch.setattr(presets, "PRESETS", counting)
    load_ovsam("ovsam_tiny", random_init=True)
    assert counting.lookups == 1
