"""Every exporter writes, from a label output of an earlier schema version, the very bytes it wrote
when that output was new (``tests/golden/label_output_v*``, made by ``make_label_output.py``; the
digests were taken then). The fixture is read, never regenerated: a reader of a newer schema must
still read it as it was. A digest changes only with an exporter's output format, on purpose and
named in CHANGELOG.md: since the fixture was made, Label Studio's config lists the whole vocabulary
and its default image URL is Label Studio's local-files URL, SA-1B's ``image_id`` is an integer with
its per-annotation fields, and a YOLO line keeps every part of a multi-part mask."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from label_output_fixture import OLD_LABEL_OUTPUTS, export_all, old_label_output


@pytest.mark.parametrize("name", OLD_LABEL_OUTPUTS)
def test_old_label_output_exports_byte_for_byte(name, tmp_path, monkeypatch):
    fixture = old_label_output(name, str(tmp_path))
    # The run record names its shards and vocabulary relative to the folder the job ran in.
    monkeypatch.chdir(fixture["root"])
    with open(fixture["digests"]) as f:
        expected = json.load(f)
    got = export_all("labels", "shards", str(tmp_path / "exports"))
    assert got.keys() == expected.keys()
    for run in expected:
        assert got[run] == expected[run], f"{name}: export {run} differs from what it wrote before"


@pytest.mark.parametrize("name", OLD_LABEL_OUTPUTS)
def test_old_label_output_is_of_its_schema_version(name, tmp_path):
    fixture = old_label_output(name, str(tmp_path))
    version = name.rsplit("_v", 1)[1]
    parts = sorted(f for f in os.listdir(fixture["labels"]) if f.endswith(".parquet"))
    assert parts
    for part in parts:
        metadata = pq.read_schema(os.path.join(fixture["labels"], part)).metadata
        assert metadata[b"ovsam_ray.schema_version"] == version.encode()
