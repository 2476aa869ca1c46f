"""``ovsam-ray train distill|cotrain|export|dump-teacher|tiny-recipe``: flags -> config -> run_*().

Flags map one to one onto config fields (``--max-steps`` -> ``RunSpec.max_steps``...). A dataset
is ``--dataset SHARDS`` with optional ``|key=value`` fields of ``DatasetSpec``, e.g.
``--dataset 's3://b/coco/{000000..000099}.tar|vocab=coco_ov' --dataset 's3://b/in22k/|kind=image|ratio=0.25'``
(or a JSON object of the fields); repeat it for a mixture.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ovsam_ray.training.config import CotrainConfig, DatasetSpec, DistillConfig, ModelSpec, OptimConfig, RunSpec
from ovsam_ray.training.label_space import CORRECTED_CLASSES

log = logging.getLogger(__name__)


def parse_dataset(text: str) -> DatasetSpec:
    """``SHARDS|key=value|...`` or a JSON object -> DatasetSpec."""
    if text.lstrip().startswith("{"):
        return DatasetSpec(**json.loads(text))
    shards, *fields = text.split("|")
    kwargs: dict[str, Any] = {}
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"dataset field {item!r}: write key=value")
        kwargs[key.strip()] = float(value) if key.strip() == "ratio" else value
    try:
        return DatasetSpec(shards=shards, **kwargs)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from e


_NESTED = ("run", "datasets", "model", "optim")


def _add_fields(parser: argparse.ArgumentParser, cls: type, *, title: str) -> None:
    """One flag per field. Defaults are not set here (``argparse.SUPPRESS``): a flag not given
    leaves its field to the recipe or the stage's default (``recipes.build_config``)."""
    from ovsam_ray.cli.flags import add_flags  # here: the cli package imports this module

    add_flags(parser, cls, title=title, skip=_NESTED, suppress=True, none_word=True, negatable=True)


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    from ovsam_ray.cli.flags import given_fields

    return given_fields(args, cls, skip=_NESTED)


def _add_common(parser: argparse.ArgumentParser, stage: str) -> None:
    from ovsam_ray.training.recipes import RECIPES

    known = sorted(n for n, f in RECIPES.items() if f().stage == stage)
    parser.add_argument(
        "--recipe",
        choices=known,
        help="start from a named recipe of the paper (every flag still overrides); see README 'Training'",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (recipe + flags, steps from epochs) and exit",
    )
    parser.add_argument(
        "--dataset",
        dest="datasets",
        action="append",
        type=parse_dataset,
        required=True,
        help="SHARDS[|kind=segmentation|box|image][|split=base|all][|ratio=R][|vocab=V][|name=N]"
        "[|teacher_features=DIR]; repeatable. A label output with its review corrections: "
        "LABELS[|corrections=only|all][|images=SHARDS]",
    )
    _add_fields(parser, RunSpec, title="run (Ray Train)")
    _add_fields(parser, ModelSpec, title="model and starting weights")
    _add_fields(parser, OptimConfig, title="optimiser")


def _config_from_args(stage: str, args: argparse.Namespace, cls: type) -> CotrainConfig | DistillConfig:
    from ovsam_ray.training.recipes import build_config

    return build_config(
        stage,
        datasets=args.datasets,
        recipe=getattr(args, "recipe", None),
        run=_given(args, RunSpec),
        model=_given(args, ModelSpec),
        optim=_given(args, OptimConfig),
        **_given(args, cls),
    )


def cotrain_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="train_cotrain", description="CLIP2SAM co-training on Ray Train")
    _add_common(parser, "cotrain")
    _add_fields(parser, CotrainConfig, title="co-training")
    return parser


def cotrain_config_from_args(args: argparse.Namespace) -> CotrainConfig:
    cfg = _config_from_args("cotrain", args, CotrainConfig)
    assert isinstance(cfg, CotrainConfig)
    return cfg


def distill_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="train_distill", description="SAM2CLIP distillation on Ray Train")
    _add_common(parser, "distill")
    _add_fields(parser, DistillConfig, title="distillation")
    return parser


def distill_config_from_args(args: argparse.Namespace) -> DistillConfig:
    cfg = _config_from_args("distill", args, DistillConfig)
    assert isinstance(cfg, DistillConfig)
    return cfg


def print_config(cfg: CotrainConfig | DistillConfig) -> None:
    """The resolved config as JSON (steps from epochs where the data tells its size)."""
    from ovsam_ray.training.recipes import describe, resolve_steps

    try:
        cfg = resolve_steps(cfg)
    except ValueError as e:
        log.warning("%s", e)
    print(json.dumps(describe(cfg), indent=1))


def _cotrain(args: argparse.Namespace) -> int:
    from ovsam_ray.training.cotrain import run_cotrain

    cfg = cotrain_config_from_args(args)
    if args.print_config:
        print_config(cfg)
        return 0
    result = run_cotrain(cfg)
    print(f"co-training finished: {result.metrics}; checkpoint {result.checkpoint}")
    return 0 if result.error is None else 1


def _distill(args: argparse.Namespace) -> int:
    from ovsam_ray.training.distill import run_distill

    cfg = distill_config_from_args(args)
    if args.print_config:
        print_config(cfg)
        return 0
    result = run_distill(cfg)
    print(f"distillation finished: {result.metrics}; checkpoint {result.checkpoint}")
    return 0 if result.error is None else 1


@dataclass(frozen=True)
class ExportRunConfig:
    """``train export``: the arguments of ``training.release.export_checkpoint`` (``run`` is its ``source``)."""

    run: str = field(metadata={"help": "storage_path/name of the run, or one checkpoint_* folder"})
    output: str = field(metadata={"help": "local folder for the weight files"})
    train_vocab: str | None = field(
        default=None, metadata={"help": "name in clip2sam_<name>_<preset>.pth (default: the vocabulary's name)"}
    )
    include_clip: bool | None = field(
        default=None,
        metadata={"help": "copy the CLIP weights beside the export (default: unless the preset's CLIP is published)"},
    )
    corrected_classes: str = field(
        default="unseen",
        metadata={
            "help": "a class only review corrections trained: 'unseen' keeps the training vocabulary's unseen flag "
            "(inference fuses it mostly with CLIP, as before the fine-tune), 'seen' marks it seen (the head decides)",
            "choices": CORRECTED_CLASSES,
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace the weight files of an earlier export in --output (never anyone else's files)"},
    )
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3-compatible endpoint URL (else AWS_ENDPOINT_URL)"}
    )


@dataclass(frozen=True)
class TinyRecipeConfig:
    """``train tiny-recipe``: ``training.tiny_recipe.run_tiny_recipe`` and, with ``eval_images``, a held-out score."""

    work_dir: str = field(metadata={"help": "folder for the generated data, the runs and the weights"})
    seed: int = field(default=0, metadata={"help": "seed of the data and the training"})
    time_budget: float | None = field(
        default=None,
        metadata={"help": "cap on the seconds for stages 0-2 (default: none; the recipe runs fixed step counts)"},
    )
    use_ray: bool = field(default=False, metadata={"help": "run stage 2 through Ray Train (slower start)"})
    eval_images: int = field(default=0, metadata={"help": "then evaluate on this many held-out images"})


def _export(args: argparse.Namespace) -> int:
    from ovsam_ray.cli.flags import config_from_args
    from ovsam_ray.locations import check_disjoint
    from ovsam_ray.training.release import export_checkpoint

    options = dataclasses.asdict(config_from_args(args, ExportRunConfig))
    run, output = options.pop("run"), options.pop("output")
    check_disjoint([("--run", run)], [("--output", output)])
    written = export_checkpoint(run, output, **options)
    for part, path in sorted(written.items()):
        print(f"{part}: {path}")
    return 0


def _dump_teacher(args: argparse.Namespace) -> int:
    from ovsam_ray.cli.flags import config_from_args
    from ovsam_ray.training.distill import DumpTeacherConfig, dump_teacher

    print(json.dumps(dump_teacher(config_from_args(args, DumpTeacherConfig))))
    return 0


def _tiny_recipe(args: argparse.Namespace) -> int:
    from ovsam_ray.cli.flags import config_from_args
    from ovsam_ray.training.tiny_recipe import PRESET, TRAIN_VOCAB, run_tiny_recipe

    cfg = config_from_args(args, TinyRecipeConfig)
    weights = run_tiny_recipe(cfg.work_dir, seed=cfg.seed, time_budget_s=cfg.time_budget, use_ray=cfg.use_ray)
    print(f"weights: {weights} (preset {PRESET}, train_vocab {TRAIN_VOCAB})")
    if cfg.eval_images:
        import os

        from ovsam_ray.data.synthetic import generate_shards
        from ovsam_ray.training.heldout import evaluate_weights

        held_out = os.path.join(cfg.work_dir, "data", f"eval-seed{cfg.seed + 1000}")
        generate_shards(held_out, num_images=cfg.eval_images, images_per_shard=50, seed=cfg.seed + 1000)
        metrics = evaluate_weights(weights, held_out, preset=PRESET, train_vocab=TRAIN_VOCAB)
        print(json.dumps(metrics, indent=1))
    return 0


def add_train_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train {distill,cotrain,export,dump-teacher,tiny-recipe}`` to a CLI's subparsers."""
    from ovsam_ray.cli.flags import add_flags  # here: the cli package imports this module
    from ovsam_ray.training.distill import DumpTeacherConfig

    train = subparsers.add_parser("train", help="OV-SAM training on Ray Train (distill, cotrain, export)")
    sub = train.add_subparsers(dest="train_command", required=True)

    p = sub.add_parser("cotrain", help="CLIP2SAM co-training (Ray Train; resumes a run started again)")
    cotrain_parser(p).set_defaults(func=_cotrain)

    p = sub.add_parser("distill", help="SAM2CLIP distillation (Ray Train; resumes a run started again)")
    distill_parser(p).set_defaults(func=_distill)

    p = sub.add_parser("export", help="a run's latest checkpoint -> the released weights layout")
    add_flags(p, ExportRunConfig)
    p.set_defaults(func=_export)

    p = sub.add_parser("dump-teacher", help="precompute SAM teacher features for distillation")
    add_flags(p, DumpTeacherConfig)
    p.set_defaults(func=_dump_teacher)

    p = sub.add_parser("tiny-recipe", help="train ovsam_tiny from nothing on generated shapes (CPU minutes)")
    add_flags(p, TinyRecipeConfig)
    p.set_defaults(func=_tiny_recipe)
    return train
