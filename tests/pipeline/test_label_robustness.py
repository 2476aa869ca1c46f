"""The label job on messy input: prompt warnings and --max-prompts in the rows and statistics,
skipped tar members counted, non-UTF-8 shard names, log lines that data cannot forge, images
without prompts (and the shard|grid fallback), input/output checks, exit codes."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pytest

from ovsam_ray.data.synthetic import encode_image, tar_bytes
from ovsam_ray.inference import ModelConfig
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.records import InstanceColumns
from ovsam_ray.pipeline import parts
from ovsam_ray.pipeline.label_job import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, LabelConfig, LabelSummary, run_label
from ovsam_ray.pipeline.predict_stage import NO_PROMPTS_WARNING, RESULT_SCHEMA
from ovsam_ray.pipeline.prompting import PromptSources, image_prompt_set

FORGED = "\n2026-01-01 00:00:00 ERROR ovsam_ray: FORGED"


def _png(w: int = 32, h: int = 24) -> bytes:
    return encode_image(np.full((h, w, 3), 128, np.uint8), "png")


def _boxes(n: int, first: list | None = None) -> bytes:
    return json.dumps({"boxes": (first or []) + [[1, 1, 5 + i, 6] for i in range(n)]}).encode()


def _messy_shard(folder: str) -> str:
    """One shard whose file name is not UTF-8: an image with a NaN box and 5 good ones, an
    image without JSON, an undecodable image whose key holds a newline, and members the reader
    skips (a caption, a name without extension)."""
    os.makedirs(folder, exist_ok=True)
    path = os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9-0.tar"))
    members = [
        ("a.png", _png()),
        ("a.json", _boxes(5, [[None, 1, 2, 3]])),
        ("b.png", _png()),
        (f"bad{FORGED}.jpg", b"not an image"),
        ("a.txt", b"a caption"),
        ("README", b"x"),
    ]
    with open(path, "wb") as f:
        f.write(tar_bytes(members))
    return path


def _config(src: str, out: str, vocab: str, **kw) -> LabelConfig:
    return LabelConfig(
        input=src,
        output=out,
        baseline="box-fill",
        max_error_fraction=1.0,
        model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=vocab),
        **kw,
    )


def test_messy_shard_warnings_caps_skips_and_safe_logs(ray_local, shapes_vocab, tmp_path, caplog, monkeypatch):
    import ray.data

    src, out = str(tmp_path / "shards"), str(tmp_path / "labels")
    _messy_shard(src)
    # The URL must travel as typed Arrow, not through Ray's pickled-object fallback (which
    # clusters may disable and which hid the non-UTF-8 name behind a warning).
    monkeypatch.setattr(ray.data.DataContext.get_current(), "enable_fallback_to_arrow_object_ext_type", False)
    with caplog.at_level(logging.INFO):
        summary = run_label(_config(src, out, shapes_vocab, max_prompts=3))
    # the non-UTF-8 file name is labelled end to end, under its escaped name
    assert summary.shards_committed == 1 and not summary.shards_failed, summary
    rows = {r["key"]: r for r in pds.dataset(out, format="parquet").to_table().to_pylist()}
    assert set(rows) == {"a", "b", f"bad{FORGED}"} and {r["shard"] for r in rows.values()} == {"caf%E9-0"}
    # warnings: the dropped NaN box and the cap at --max-prompts reach the row
    a = rows["a"]
    assert len(a["instances"]) == 3
    assert any("box 0 dropped" in w for w in a["warnings"]), a["warnings"]
    assert any("max_prompts=3" in w for w in a["warnings"]), a["warnings"]
    assert rows["b"]["instances"] == [] and rows["b"]["warnings"] == [NO_PROMPTS_WARNING]
    assert rows[f"bad{FORGED}"]["status"] == "error" and rows[f"bad{FORGED}"]["warnings"] is None
    # ... the shard's statistics, its marker and the summary
    skipped = {"neither an image nor .json": 1, "no key or no extension": 1}
    shard_stats = json.load(open(os.path.join(out, "_stats", "caf%E9-0.json")))
    assert shard_stats["images_with_warnings"] == 2 and shard_stats["images_no_prompts"] == 1
    assert shard_stats["members_skipped"] == skipped
    marker = ShardCommitter(out).read_marker("caf%E9-0")["stats"]
    assert marker["members_skipped"] == skipped and marker["images_with_warnings"] == 2
    assert (summary.images_with_warnings, summary.images_no_prompts, summary.members_skipped) == (2, 1, skipped)
    run_stats = json.load(open(os.path.join(out, "_stats.json")))
    assert run_stats["members_skipped"] == skipped and run_stats["images_no_prompts"] == 1
    assert json.load(open(os.path.join(out, "_summary.json")))["members_skipped"] == skipped
    # ... and the log, where a key holding a newline cannot start a line of its own
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 images had no prompts" in m and "--prompts grid" in m for m in messages)
    assert any("prompt warnings" in m and "max_prompts=3" in m for m in messages)
    assert any("bad\\n2026" in m for m in messages)  # the error row was logged, escaped
    assert not [m for m in messages if "\n" in m]


def test_shard_or_grid_prompts_fill_in_images_without_boxes(ray_local, shapes_vocab, tmp_path):
    src, out = str(tmp_path / "shards"), str(tmp_path / "labels")
    os.makedirs(src)
    with open(os.path.join(src, "s.tar"), "wb") as f:
        f.write(tar_bytes([("a.png", _png()), ("a.json", _boxes(2)), ("b.png", _png())]))
    select = {"grid_size": 2}
    from ovsam_ray.pipeline.prompting import SelectConfig

    summary = run_label(_config(src, out, shapes_vocab, prompts="shard|grid", select=SelectConfig(**select)))
    rows = {r["key"]: r for r in pds.dataset(out, format="parquet").to_table().to_pylist()}
    assert [i["prompt_type"] for i in rows["a"]["instances"]] == ["box", "box"]
    assert [i["prompt_type"] for i in rows["b"]["instances"]] == ["grid"] * 4
    assert rows["b"]["warnings"] is None and summary.images_no_prompts == 0


def test_prompt_sources_fallback_parse_and_select():
    s = PromptSources.parse("shard|detector:my.mod:Det")
    assert s.shard and s.detector is None and s.fallback.detector == "my.mod:Det" and s.detector_name == "my.mod:Det"
    assert PromptSources.parse("shard,grid").fallback is None
    for bad in ("shard|grid|grid", "|grid", "shard|", "detector:a|detector:b"):
        with pytest.raises(ValueError, match="--prompts"):
            PromptSources.parse(bad)
    sources = PromptSources.parse("shard|grid")
    with_boxes = image_prompt_set({"boxes": [[0, 0, 4, 4]]}, sources, width=8, height=8, grid_size=2)
    assert with_boxes.types == ["box"]
    without = image_prompt_set({"boxes": []}, sources, width=8, height=8, grid_size=2)
    assert without.types == ["grid"] * 4 and without.prompts.points.shape == (4, 2)


def test_commit_task_logs_cannot_be_forged(tmp_path, caplog):
    out = str(tmp_path / "out")
    cols = InstanceColumns()
    cols.add_empty()
    cols.add_empty()
    batch = pa.table(
        {
            "key": [f"k{FORGED}", "ok"],
            "shard": [f"s{FORGED}"] * 2,
            "index": pa.array([0, 1], pa.int32()),
            "shard_total": pa.array([2, 2], pa.int32()),
            "shard_damage": ["", ""],
            "shard_skipped": ['{"x": 1}'] * 2,
            "image_id": pa.array([None, None], pa.string()),
            "width": pa.array([None, 4], pa.int32()),
            "height": pa.array([None, 4], pa.int32()),
            "status": ["error", "ok"],
            "error": [f"bad{FORGED}", None],
            "instances": cols.to_arrow(),
            "warnings": pa.array([None, [f"w{FORGED}"]], pa.list_(pa.string())),
            "num_prompts": pa.array([None, 0], pa.int32()),
        },
        schema=RESULT_SCHEMA,
    )
    shard = "s%0A2026-01-01 00:00:00 ERROR ovsam_ray: FORGED"  # shard_name escapes the newline itself
    batch = batch.set_column(1, "shard", pa.array([shard] * 2))
    meta = parts.write_parts(batch, output=out).to_pylist()
    assert meta[0]["skipped"] == '{"x": 1}'
    with caplog.at_level(logging.INFO):
        res = parts.commit_shard(out, shard, [meta[0]["part"]], 2, "", skipped=meta[0]["skipped"])
    assert (res["error"], res["warned"], res["no_prompts"], res["skipped"]) == (1, 1, 1, {"x": 1})
    messages = [r.getMessage() for r in caplog.records]
    assert any("error row" in m for m in messages) and any("prompt warnings" in m for m in messages)
    assert not [m for m in messages if "\n" in m]


_UNTRAINED = ModelConfig(random_init=True)


@pytest.mark.parametrize("output", ["SRC/./", "SRC/", "SRC//", "SRC/../in", "SRC/sub/..", "SRC/labels", "ALIAS"])
def test_output_must_not_be_the_input_in_any_spelling(tmp_path, output):
    src = tmp_path / "in"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    out = output.replace("SRC", str(src)).replace("ALIAS", str(tmp_path / "link"))
    with pytest.raises(ValueError, match="output"):
        LabelConfig(input=str(src), output=out, model=_UNTRAINED)
    with pytest.raises(ValueError, match="output"):
        LabelConfig(input="s3://b/in/shard-{0..9}.tar", output="s3://b/in/./", model=_UNTRAINED)
    with pytest.raises(ValueError, match="output"):
        LabelConfig(input="s3://b/in", output="S3A://b/x/../in/", model=_UNTRAINED)
    LabelConfig(input=str(src), output=str(tmp_path / "in-labels"), model=_UNTRAINED)  # a sibling is fine
    LabelConfig(input=f"{src}/*.tar", output=str(tmp_path / "labels"), model=_UNTRAINED)


def test_bad_s3_endpoint_and_max_prompts_are_refused():
    for endpoint in ("not a url", "localhost:9000", "http://", "ftp://host", "http://host:port"):
        with pytest.raises(ValueError, match="s3-endpoint"):
            LabelConfig(
                input="s3://b/in", output="s3://b/out", model=ModelConfig(random_init=True, s3_endpoint=endpoint)
            )
    LabelConfig(
        input="s3://b/in", output="s3://b/out", model=ModelConfig(random_init=True, s3_endpoint="http://127.0.0.1:9000")
    )
    with pytest.raises(ValueError, match="max_prompts"):
        LabelConfig(input="a", output="b", max_prompts=0, model=_UNTRAINED)


def test_exit_codes():
    assert LabelSummary(images_ok=3).exit_code(0.0) == EXIT_OK
    assert LabelSummary(images_ok=3, images_error=1).exit_code(0.0) == EXIT_FAILED
    assert LabelSummary(images_ok=3, images_error=1).exit_code(0.5) == EXIT_OK
    failed = LabelSummary(images_ok=3, shards_failed=[{"shard": "x", "error": "not a tar"}])
    assert failed.exit_code(1.0) == EXIT_INCOMPLETE and failed.exit_code(0.0) == EXIT_INCOMPLETE
    damaged = LabelSummary(images_ok=3, shards_damaged=[{"shard": "x", "error": "truncated"}])
    assert damaged.exit_code(0.0) == EXIT_FAILED and damaged.exit_code(1.0) == EXIT_OK


def test_cli_flags_reach_the_config(tmp_path):
    from ovsam_ray.cli import build_parser
    from ovsam_ray.cli.label import label_config

    args = build_parser().parse_args(
        [
            "label",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--baseline",
            "box-fill",
            "--max-prompts",
            "5",
            "--prompts",
            "shard|grid",
        ]
    )
    cfg = label_config(args)
    assert cfg.max_prompts == 5 and cfg.sources.fallback == PromptSources(shard=False, grid=True)
