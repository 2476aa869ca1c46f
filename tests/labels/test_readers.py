"""Every reader the README names loads a label output folder as it lies (side files included) in
the form the README shows; the README's pandas snippet runs as written, also when the first row
has no instance."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest
from coco_fixture import rle_str

from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.schema import rows_to_table

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


@pytest.fixture
def label_folder(tmp_path, monkeypatch):
    """``labels/`` in the working directory: two committed shards, the first row of each without
    instances, and the JSON side files a label job writes."""
    mask = np.zeros((8, 10), bool)
    mask[2:5, 3:7] = True
    inst = {"prompt_type": "box", "bbox": [3, 2, 7, 5], "area": 12, "rle": rle_str(mask), "label": "cat"}
    out = tmp_path / "labels"
    committer = ShardCommitter(str(out))
    for shard in ("shard-000000", "shard-000001"):
        rows = [
            {"key": "empty", "shard": shard, "width": 10, "height": 8, "status": "ok", "instances": []},
            {
                "key": "x",
                "shard": shard,
                "width": 10,
                "height": 8,
                "status": "ok",
                "instances": [dict(inst, label_score=0.7)],
            },
            {"key": "bad", "shard": shard, "status": "error", "error": "cannot decode"},
        ]
        committer.commit(shard, rows_to_table(rows), {})
    for name in ("_run.json", "_summary.json", "_stats.json", "_stats/shard-000000.json"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(json.dumps({"x": 1}))
    monkeypatch.chdir(tmp_path)
    return out


def _readme_snippet(start: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    return next(b for b in blocks if b.startswith(start))


def test_readme_pandas_snippet_runs_as_written(label_folder, capsys):
    exec(compile(_readme_snippet("import pandas as pd"), "README.md", "exec"), {})
    key, label, score, *_ = capsys.readouterr().out.split()
    assert (key, label, float(score)) == ("x", "cat", pytest.approx(0.7))


def _table_rows(n: int) -> None:
    assert n == 6


def test_pyarrow_and_pandas_read_the_folder(label_folder):
    import pandas as pd
    import pyarrow.dataset as pds
    import pyarrow.parquet as pq

    _table_rows(len(pd.read_parquet("labels/")))
    _table_rows(pds.dataset("labels/", format="parquet").to_table().num_rows)
    _table_rows(pq.read_table("labels/").num_rows)


def test_polars_reads_the_parquet_pattern(label_folder):
    pl = pytest.importorskip("polars")
    df = pl.read_parquet("labels/*.parquet")
    _table_rows(df.height)
    assert df.filter(pl.col("status") == "ok")["instances"].list.len().to_list() == [0, 1, 0, 1]


def test_datasets_reads_the_parquet_pattern(label_folder):
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("Hugging Face datasets is not installed")
    from datasets import load_dataset

    _table_rows(load_dataset("parquet", data_files="labels/*.parquet", split="train").num_rows)


def test_duckdb_reads_the_parquet_pattern(label_folder):
    if importlib.util.find_spec("duckdb") is None:
        pytest.skip("duckdb is not installed")
    import duckdb

    _table_rows(duckdb.sql("SELECT count(*) FROM 'labels/*.parquet'").fetchall()[0][0])


def test_readme_names_the_tested_forms():
    text = open(README).read()
    for form in (
        'pl.read_parquet("labels/*.parquet")',
        'load_dataset("parquet", data_files="labels/*.parquet", split="train")',
        "duckdb.sql(\"SELECT * FROM 'labels/*.parquet'\")",
        'pyarrow.dataset.dataset("labels/", format="parquet")',
    ):
        assert form in text


def test_readme_mixed_schema_snippet_reads_older_shards_with_nulls(label_folder):
    """A shard written before ``source``/``shard_label`` beside one written after: the README's
    forms give every row, the older one's new fields null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ovsam_ray.labels.schema import INSTANCE_TYPE, OUTPUT_SCHEMA

    pytest.importorskip("polars")
    new = pq.read_table(label_folder / "shard-000001.parquet")
    older = pa.struct([f for f in INSTANCE_TYPE if f.name not in ("source", "shard_label")])
    schema = pa.schema([f.with_type(pa.list_(older)) if f.name == "instances" else f for f in OUTPUT_SCHEMA])
    old = pa.Table.from_pylist(
        [
            dict(r, instances=[{k: v for k, v in i.items() if k in older.names} for i in r["instances"] or []])
            for r in pq.read_table(label_folder / "shard-000000.parquet").to_pylist()
        ],
        schema=schema,
    )
    pq.write_table(old, label_folder / "shard-000000.parquet")
    rows = new.num_rows + old.num_rows
    scope: dict = {}
    exec(compile(_readme_snippet("import polars as pl\nimport pyarrow.dataset"), "README.md", "exec"), scope)
    assert scope["table"].num_rows == scope["df"].height == rows
    assert scope["table"].schema.field("instances").type == OUTPUT_SCHEMA.field("instances").type
    assert "source" in scope["df"]["instances"].explode().struct.fields
