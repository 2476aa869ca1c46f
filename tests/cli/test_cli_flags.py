"""CLI flags are generated from config fields (``cli/flags.py``): every parser of ``ovsam-ray`` (and
``jobs/label.py``'s) is walked, and each flag's default must be its field's, each field must have a flag
or be marked ``cli: False``, and ``--help`` must show the defaults."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from ovsam_ray import __version__
from ovsam_ray.cli import build_parser, main
from ovsam_ray.cli.flags import add_flags, config_from_args, field_default, flag_fields, flag_name
from ovsam_ray.cli.label import label_config, label_parser
from ovsam_ray.cli.train import ExportRunConfig, TinyRecipeConfig
from ovsam_ray.demo import DemoConfig, DemoDataConfig
from ovsam_ray.evaluation.run_eval import EvalConfig
from ovsam_ray.export import EXPORTERS
from ovsam_ray.export.options import EXPORT_OPTIONS, options_config
from ovsam_ray.inference import ModelConfig
from ovsam_ray.pipeline.dataset import DECODE_CHUNK, DECODE_CHUNK_NO_PIXELS
from ovsam_ray.pipeline.label_job import LabelConfig
from ovsam_ray.pipeline.prompting import SelectConfig
from ovsam_ray.pipeline.relabel import RelabelConfig
from ovsam_ray.predict import PredictConfig
from ovsam_ray.show import ShowConfig
from ovsam_ray.training.config import CotrainConfig, DistillConfig, ModelSpec, OptimConfig, RunSpec
from ovsam_ray.training.distill import DumpTeacherConfig

_TRAIN = (RunSpec, ModelSpec, OptimConfig)
_TRAIN_SKIP = ("run", "datasets", "model", "optim")

#: Subcommand path -> the configs its flags are generated from (and whether the defaults are left to
#: a recipe: argparse.SUPPRESS, the field's default shown in the help).
from ovsam_ray.review import ImportConfig, ReviewSelectConfig  # noqa: E402

GENERATED: dict[tuple[str, ...], tuple[tuple[type, ...], bool]] = {
    ("label",): ((LabelConfig,), False),
    ("relabel",): ((RelabelConfig,), False),
    ("predict",): ((PredictConfig,), False),
    ("eval",): ((EvalConfig, ModelConfig), False),
    **{("export", fmt): ((EXPORT_OPTIONS[fmt],), False) for fmt in EXPORTERS},
    ("train", "cotrain"): ((*_TRAIN, CotrainConfig), True),
    ("train", "distill"): ((*_TRAIN, DistillConfig), True),
    ("train", "dump-teacher"): ((DumpTeacherConfig,), False),
    ("review", "select"): ((ReviewSelectConfig,), False),
    ("review", "import"): ((ImportConfig,), False),
    ("train", "export"): ((ExportRunConfig,), False),
    ("train", "tiny-recipe"): ((TinyRecipeConfig,), False),
    ("show",): ((ShowConfig,), False),
    ("demo",): ((DemoConfig,), False),
    ("demo-data",): ((DemoDataConfig,), False),
}


#: Subcommands whose flags are still written by hand (no config dataclass of their own, or one the
#: CLI assembles from several flags); their model flags, where they have some, are generated.
HAND_WRITTEN = {("convert-clip",), ("reshard",)}

#: The flags (in --help order) and defaults of the subcommands whose flags were written by hand
#: before they were generated: the same names, the same defaults.
WERE_HAND_WRITTEN = {
    ("demo",): [("--work-dir", "demo_out"), ("--quick", False), ("--num-images", 176), ("--seed", 0)],
    ("demo-data",): [
        ("--output", None),
        ("--num-images", 64),
        ("--images-per-shard", 16),
        ("--seed", 0),
        ("--s3-endpoint", None),
    ],
    ("show",): [
        ("--input", None),
        ("--output", None),
        ("-n", 8),
        ("--shards", None),
        ("--seed", 0),
        ("--min-score", 0.0),
        ("--sheet", False),
        ("--overwrite", False),
        ("--s3-endpoint", None),
        ("--raw", False),
    ],
    ("train", "export"): [
        ("--run", None),
        ("--output", None),
        ("--train-vocab", None),
        (("--include-clip", "--no-include-clip"), None),
        ("--corrected-classes", "unseen"),
        ("--overwrite", False),
        ("--s3-endpoint", None),
    ],
    ("train", "tiny-recipe"): [
        ("--work-dir", None),
        ("--seed", 0),
        ("--time-budget", None),
        ("--use-ray", False),
        ("--eval-images", 0),
    ],
}


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


def _check_parser(parser: argparse.ArgumentParser, classes: tuple[type, ...], suppressed: bool) -> int:
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    checked = 0
    for cls in classes:
        for owner, f, _ in flag_fields(cls, _TRAIN_SKIP if suppressed else ()):
            where = f"{owner.__name__}.{f.name} ({flag_name(f)})"
            action = by_flag.get(flag_name(f))
            assert action is not None, f"{where}: no flag"
            assert action.dest == f.name, where
            default = field_default(f)
            if default is dataclasses.MISSING:
                assert action.required, f"{where}: a field without a default is a required flag"
            elif suppressed:
                assert action.default is argparse.SUPPRESS and repr(default) in action.help, where
            else:
                assert action.default == default and type(action.default) is type(default), (
                    f"{where}: flag default {action.default!r}, field default {default!r}"
                )
                if default is not None and default is not False:
                    assert "%(default)s" in action.help, f"{where}: --help does not show the default"
            if "help" in f.metadata:
                assert f.metadata["help"].replace("%", "%%") in action.help, where
            checked += 1
    return checked


def test_every_generated_parser_has_its_fields_defaults_and_help():
    parsers = dict(_subparsers(build_parser()))
    assert set(GENERATED) <= set(parsers)
    leaves = {
        path for path, p in parsers.items() if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
    }
    convert = {path for path in leaves if path[0] == "convert"}  # flags of each converter: cli/convert.py
    assert leaves - convert - HAND_WRITTEN <= set(GENERATED), "a new subcommand: generate its flags or list it"
    for p in parsers.values():
        p.format_help()  # a stray % in a help text fails here, not in a user's --help
    for path, (classes, suppressed) in GENERATED.items():
        assert _check_parser(parsers[path], classes, suppressed) > 0, path


def test_generated_flags_keep_the_names_and_defaults_they_had_by_hand():
    parsers = dict(_subparsers(build_parser()))
    for path, flags in WERE_HAND_WRITTEN.items():
        actions = [a for a in parsers[path]._actions if not isinstance(a, argparse._HelpAction)]
        got = [
            (a.option_strings[0] if len(a.option_strings) == 1 else tuple(a.option_strings), a.default) for a in actions
        ]
        assert got == flags, path


def test_tri_state_bool_field_gets_both_forms():
    args = build_parser().parse_args(["train", "export", "--run", "r", "--output", "o"])
    assert args.include_clip is None
    args = build_parser().parse_args(["train", "export", "--run", "r", "--output", "o", "--no-include-clip"])
    assert config_from_args(args, ExportRunConfig) == ExportRunConfig(run="r", output="o", include_clip=False)


def test_jobs_label_uses_the_same_parser():
    parser = label_parser()
    _check_parser(parser, (LabelConfig,), False)
    label = dict(_subparsers(build_parser()))[("label",)]
    assert [a.option_strings for a in parser._actions] == [a.option_strings for a in label._actions]


@pytest.mark.parametrize(
    "cls",
    [
        LabelConfig,
        ModelConfig,
        SelectConfig,
        RelabelConfig,
        EvalConfig,
        PredictConfig,
        ShowConfig,
        DemoConfig,
        DemoDataConfig,
        ExportRunConfig,
        TinyRecipeConfig,
        *EXPORT_OPTIONS.values(),
    ],
    ids=lambda c: c.__name__,
)
def test_every_field_is_a_flag_or_marked_not_one(cls):
    flags = {f.name for _, f, _ in flag_fields(cls)}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        nested = dataclasses.is_dataclass(hints[f.name])
        assert f.name in flags or nested or f.metadata.get("cli") is False, f"{cls.__name__}.{f.name}"
        if f.name in flags:
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}: a flag without a help text"


def test_label_flags_left_out_give_the_configs_defaults():
    args = label_parser().parse_args(["--input", "in", "--output", "out", "--random-init"])
    assert label_config(args) == LabelConfig(input="in", output="out", model=ModelConfig(random_init=True))
    args = label_parser().parse_args(
        ["--input", "in", "--output", "out", "--baseline", "box-fill", "--concurrency", "1,8", "--dedup-iou", "0.5"]
    )
    cfg = label_config(args)
    assert cfg.actors == (1, 8) and cfg.model.random_init and cfg.select.dedup_iou == 0.5


def test_eval_flags_give_the_config():
    from ovsam_ray.cli.evaluate import eval_config

    args = build_parser().parse_args(
        ["eval", "--input", "gt", "--output", "ev", "--labels", "lab", "--concurrency", "1,4", "--max-dets", "300"]
    )
    assert eval_config(args) == EvalConfig(input="gt", output="ev", labels="lab", concurrency=(1, 4), max_dets=300)
    args = build_parser().parse_args(["eval", "--input", "gt", "--output", "ev", "--random-init", "--mode", "detector"])
    assert eval_config(args) == EvalConfig(
        input="gt", output="ev", mode="detector", model=ModelConfig(random_init=True)
    )


def test_dump_teacher_flags_give_the_config():
    args = build_parser().parse_args(
        [
            "train",
            "dump-teacher",
            "--shards",
            "s",
            "--output",
            "o",
            "--teacher",
            "random_tiny",
            "--use-gpu",
            "--batch-size",
            "2",
        ]
    )
    assert config_from_args(args, DumpTeacherConfig) == DumpTeacherConfig(
        shards="s", output="o", teacher="random_tiny", use_gpu=True, batch_size=2
    )


def test_decode_chunk_help_names_the_numbers_the_job_uses():
    help_text = LabelConfig.__dataclass_fields__["decode_chunk"].metadata["help"]
    assert str(DECODE_CHUNK) in help_text and str(DECODE_CHUNK_NO_PIXELS) in help_text


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 4)" in out and "(default: ovsam_rn50x16)" in out and "(default: 30.0)" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ovsam-ray {__version__}"


# -- the generator itself ---------------------------------------------------------------------------


def _parse(text: str) -> int:
    return int(text) * 10


@dataclasses.dataclass
class _Inner:
    depth: int = dataclasses.field(default=2, metadata={"help": "how deep"})


@dataclasses.dataclass
class _Demo:
    name: str = dataclasses.field(metadata={"help": "required"})
    ratio: float | None = dataclasses.field(default=None, metadata={"help": "optional"})
    sizes: tuple[int, ...] = dataclasses.field(default=(1, 2), metadata={"help": "several"})
    on: bool = dataclasses.field(default=True, metadata={"help": "on by default"})
    off: bool = dataclasses.field(default=False, metadata={"help": "off by default"})
    tens: int = dataclasses.field(default=0, metadata={"help": "parsed", "parse": _parse, "flag": "--x10"})
    kind: str = dataclasses.field(default="a", metadata={"help": "a or b", "choices": ("a", "b")})
    inner: _Inner = dataclasses.field(default_factory=_Inner, metadata={"group": "inner"})
    hidden: int = dataclasses.field(default=7, metadata={"cli": False})


def test_add_flags_types_and_round_trip():
    p = argparse.ArgumentParser()
    add_flags(p, _Demo)
    assert config_from_args(p.parse_args(["--name", "n"]), _Demo) == _Demo(name="n")
    cfg = config_from_args(
        p.parse_args(
            [
                "--name",
                "n",
                "--ratio",
                "0.5",
                "--sizes",
                "3",
                "4",
                "--no-on",
                "--off",
                "--x10",
                "3",
                "--kind",
                "b",
                "--depth",
                "5",
            ]
        ),
        _Demo,
    )
    assert cfg == _Demo(name="n", ratio=0.5, sizes=[3, 4], on=False, off=True, tens=30, kind="b", inner=_Inner(depth=5))
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "n", "--kind", "c"])
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name is required
    assert "--hidden" not in {s for a in p._actions for s in a.option_strings}
    assert [g.title for g in p._action_groups if any(a.dest == "depth" for a in g._group_actions)] == ["inner"]


def test_one_or_a_pair():
    p = label_parser()
    args = ["--input", "in", "--output", "out", "--random-init", "--concurrency"]
    assert label_config(p.parse_args([*args, "3"])).concurrency == 3
    assert label_config(p.parse_args([*args, "2,5"])).concurrency == (2, 5)
    with pytest.raises(SystemExit):
        p.parse_args([*args, "1,2,3"])


def test_add_flags_refuses_a_type_it_cannot_parse():
    @dataclasses.dataclass
    class Bad:
        pair: int | str = 1

    with pytest.raises(TypeError, match="Bad.pair"):
        add_flags(argparse.ArgumentParser(), Bad)


def test_export_options_are_the_exporters_keywords():
    import inspect

    assert set(EXPORT_OPTIONS) == set(EXPORTERS)
    for fmt, export in EXPORTERS.items():
        keywords = {
            p.name: p.default
            for p in inspect.signature(export).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        assert {f.name: f.default for f in dataclasses.fields(EXPORT_OPTIONS[fmt])} == keywords, fmt


def test_an_exporter_keyword_without_help_is_refused():
    def export_new(labels: str, output: str, *, brand_new: int = 1) -> dict:
        return {}

    with pytest.raises(KeyError, match="brand_new"):
        options_config(export_new)
