"""A label output of an earlier schema version resumes: the label job started again on it
(``tests/golden/label_output_v*``, as the job left it) accepts its run record, skips every
committed shard and writes nothing but the summary of this run (``_summary.json``)."""

from __future__ import annotations

import json
import os

import pytest
from label_output_fixture import OLD_LABEL_OUTPUTS, old_label_output

from ovsam_ray.inference import ModelConfig
from ovsam_ray.pipeline.label_job import LabelConfig, run_label


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


@pytest.mark.parametrize("name", OLD_LABEL_OUTPUTS)
def test_old_label_output_resumes_without_writing(name, ray_local, tmp_path, monkeypatch):
    fixture = old_label_output(name, str(tmp_path))
    monkeypatch.chdir(fixture["root"])  # the command as it was run: relative --input/--output/--vocab
    before = _files(fixture["labels"])
    model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab="shapes.txt")
    summary = run_label(LabelConfig(input="shards", output="labels", model=model))
    committed = sorted(n for n in before if n.startswith("_committed" + os.sep))
    assert summary.shards_total == summary.shards_skipped == len(committed) == 2
    assert summary.shards_committed == 0 and summary.shards_failed == []
    after = _files(fixture["labels"])
    changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    # _summary.json is this run's; _stats.json (the output's statistics, recomputed from the
    # markers) may gain counters added since, never change one it had.
    assert set(changed) <= {"_summary.json", "_stats.json"}, f"{name}: resuming changed {changed}"
    if "_stats.json" in changed:
        old_stats, new_stats = json.loads(before["_stats.json"]), json.loads(after["_stats.json"])
        assert {k: new_stats.get(k) for k in old_stats} == old_stats, f"{name}: resuming changed the statistics"
        assert all(not new_stats[k] for k in new_stats.keys() - old_stats.keys())  # new counters: 0
    latest = json.loads(after["_summary.json"])
    assert (latest["shards_skipped"], latest["shards_committed"]) == (2, 0)
