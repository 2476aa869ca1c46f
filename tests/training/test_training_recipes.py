"""The named recipes equal the reference configs value for value (each row names the reference's
file and line, in github.com/HarborYuan/ovsam), epochs become steps, the lr scales with the
global batch, every flag still overrides, and --print-config prints the resolved config."""

from __future__ import annotations

import argparse
import json
import logging
import os

import pytest
import torch

from ovsam_ray.cli.train import add_train_subcommands, cotrain_config_from_args, distill_config_from_args
from ovsam_ray.model.presets import get_preset
from ovsam_ray.training.config import DatasetSpec
from ovsam_ray.training.recipes import RECIPES, build_config, dataset_images, get_recipe, resolve_steps

SD = "seg/configs/_base_/schedules/schedule_distillation.py"
S12 = "seg/configs/_base_/schedules/schedule_12e.py"
SAM_IMG = "seg/configs/_base_/datasets/sam_img.py"
S2C = "seg/configs/sam2clip/sam2clip_vith_rn50x16.py"
COCO = "seg/configs/_base_/datasets/coco_ov_instance_lsj.py"
LVIS = "seg/configs/_base_/datasets/lvis_norare.py"
C2S_COCO = "seg/configs/clip2sam/clip2sam_coco_rn50x16.py"
C2S_LVIS = "seg/configs/clip2sam/clip2sam_lvis_rn50x16.py"
HEAD = "seg/models/heads/ovsam_head.py"
PRE = "seg/models/data_preprocessor/ovsam_preprocessor.py"
LOADING = "seg/datasets/pipeliens/loading.py"
DUMP = "seg/models/detectors/sam_dump.py"

# (field, reference value, where the reference sets it)
DISTILL = [
    ("optim.lr", 1e-4, f"{SD}:38"),
    ("optim.betas", (0.9, 0.999), f"{SD}:41"),
    ("optim.eps", 1e-8, f"{SD}:40"),
    ("optim.weight_decay", 0.05, f"{SD}:39"),
    ("optim.no_decay", ("norm",), f"{SD}:43-45 (paramwise_cfg: norm_decay_mult=0.0 only)"),
    ("optim.grad_clip", 5.0, f"{SD}:46"),
    ("optim.warmup_steps", 500, f"{SD}:21 (LinearLR end=500, by_epoch=False)"),
    ("optim.warmup_factor", 0.001, f"{SD}:18"),
    ("optim.schedule", "cosine", f"{SD}:24"),
    ("optim.min_lr_factor", 0.01, f"{SD}:29 (eta_min_ratio)"),
    ("optim.base_batch_size", 16, f"{SD}:53 (auto_scale_lr enable=True)"),
    ("epochs", 24, f"{SD}:8"),
    ("run.batch_size", 2, f"{SAM_IMG}:40"),
    ("run.num_workers", 8, f"{SD}:52 ((8 GPUs) x (2 samples per GPU))"),
    ("image_size", 1024, f"{S2C}:15"),
    ("flip_prob", 0.0, f"{SAM_IMG}:17-25 (no RandomFlip)"),
    ("teacher", "vit_h", f"{S2C}:46"),
    ("model.preset", "ovsam_rn50x16", f"{S2C}:55"),
    ("run.precision", "fp32", f"{SD}:34-35 (OptimWrapper, not AmpOptimWrapper: fp32)"),
    ("teacher_feature_dtype", "float32", f"{DUMP}:59-60 (torch.save of the fp32 feature)"),
]

_COTRAIN = [
    ("optim.lr", 1e-4, f"{S12}:38"),
    ("optim.betas", (0.9, 0.999), f"{S12}:41"),
    ("optim.eps", 1e-8, f"{S12}:40"),
    ("optim.weight_decay", 0.05, f"{S12}:39"),
    ("optim.no_decay", ("norm", "query_embed", "query_feat", "level_embed"), f"{S12}:44-50"),
    ("optim.grad_clip", 0.01, f"{S12}:52"),
    ("optim.warmup_steps", 500, f"{S12}:21"),
    ("optim.warmup_factor", 0.001, f"{S12}:18"),
    ("optim.schedule", "step", f"{S12}:24 (MultiStepLR)"),
    ("optim.lr_milestones", (8 / 12, 11 / 12), f"{S12}:26-28 (end=12, milestones=[8, 11])"),
    ("optim.lr_gamma", 0.1, f"{S12}:29"),
    ("optim.base_batch_size", 16, f"{S12}:59"),
    ("epochs", 12, f"{S12}:8"),
    ("run.num_workers", 8, f"{S12}:52 ((8 GPUs) x (2 samples per GPU))"),
    ("image_size", 1024, f"{C2S_COCO}:17"),
    ("num_prompts", 40, f"{C2S_COCO}:30 (num_proposals)"),
    ("cls_weight", 2.0, f"{C2S_COCO}:96"),
    ("mask_weight", 5.0, f"{C2S_COCO}:103"),
    ("dice_weight", 5.0, f"{C2S_COCO}:112"),
    ("background_weight", 0.1, f"{HEAD}:108"),
    ("logit_scale", 4.6052, f"{HEAD}:97"),
    ("learn_logit_scale", False, f"{HEAD}:99 (a buffer)"),
    ("num_points", 12544, f"{HEAD}:125"),
    ("oversample_ratio", 3.0, f"{HEAD}:126"),
    ("importance_sample_ratio", 0.75, f"{HEAD}:127"),
    ("train_adapter", False, f"{C2S_COCO}:55 (neck fix=True)"),
    ("roi_from_prediction", 0.0, f"{HEAD}:43 (gen_box=False: ground-truth RoIs in training)"),
    ("model.preset", "ovsam_rn50x16", f"{C2S_COCO}:40"),
    ("run.precision", "fp32", f"{S12}:34-35 (OptimWrapper, not AmpOptimWrapper: fp32)"),
    ("instance_selection", "first", f"{PRE}:152 (gt_instances[:num_proposals])"),
    ("crop_tries", 1, f"{LOADING}:299-300 (None: mmengine's BaseDataset draws another image)"),
]
COTRAIN = {
    "clip2sam_coco_rn50x16": _COTRAIN
    + [
        ("train_vocab", "coco_ov", f"{C2S_COCO}:81 (RN50x16_CocoOVDataset)"),
        ("lsj_range", (0.9, 2.0), f"{COCO}:34"),
        ("flip_prob", 0.5, f"{COCO}:29"),
        ("min_mask_area", 32, f"{COCO}:46"),
        ("run.batch_size", 2, f"{COCO}:52"),
    ],
    "clip2sam_lvis_rn50x16": _COTRAIN
    + [
        ("train_vocab", "lvis_v1", f"{C2S_LVIS}:81 (RN50x16_LVISV1Dataset)"),
        ("lsj_range", (0.1, 2.0), f"{LVIS}:33"),
        ("flip_prob", 0.5, f"{LVIS}:28"),
        ("min_mask_area", 32, f"{LVIS}:46"),
        ("run.batch_size", 2, f"{LVIS}:51"),
    ],
}
TABLE = [("sam2clip_vith_rn50x16", *row) for row in DISTILL] + [
    (name, *row) for name, rows in COTRAIN.items() for row in rows
]


def _value(cfg, path: str):
    if path == "image_size":
        return get_preset(cfg.model.preset).image_size
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("recipe, path, expected, where", TABLE, ids=[f"{r}-{p}" for r, p, *_ in TABLE])
def test_recipe_equals_the_reference(recipe, path, expected, where):
    stage = get_recipe(recipe).stage
    extra = {"teacher_checkpoint": "sam_vit_h.pth"} if stage == "distill" else {}
    cfg = build_config(
        stage, recipe=recipe, datasets=[DatasetSpec(shards="s")], run={"storage_path": "/tmp/r", "name": "n"}, **extra
    )
    value = _value(cfg, path)
    if isinstance(expected, tuple):
        assert value == pytest.approx(expected), f"{recipe} {path}: reference {where}"
    else:
        assert value == expected, f"{recipe} {path}: reference {where}"


def test_every_recipe_has_rows_and_the_prompt_split_is_the_references():
    assert {r for r, *_ in TABLE} == set(RECIPES)
    # reference: {PRE}:158 bp = arange(2).repeat_interleave(n // 2 + 1)[:n]: 0 = box, 1 = point,
    # so 40 prompts are 21 boxes then 19 points (not half and half)
    import numpy as np

    from ovsam_ray.training.prompt_sampling import sample_prompts

    masks = torch.zeros(3, 16, 16, dtype=torch.bool).numpy()
    masks[:, 2:8, 2:8] = True
    p = sample_prompts(masks, np.random.default_rng(0), 40)
    reference = torch.arange(2).repeat_interleave(40 // 2 + 1)[:40].numpy().astype(bool)
    assert len(p) == 40 and int(p.is_point.sum()) == 19 == int(reference.sum()), f"{PRE}:158"
    np.testing.assert_array_equal(p.is_point, reference)


def _mmengine_linear_lr(start_factor: float, end: int, steps: int) -> list[float]:
    """mmengine's LinearLR(begin=0, end=end) factors, its chained form as written there
    (total_iters = end - begin - 1; the lr changes only while last_step < end)."""
    total = end - 1
    out, factor = [start_factor], start_factor
    for step in range(1, steps):
        if step <= total:
            factor *= 1.0 + (1.0 - start_factor) / (total * start_factor + (step - 1) * (1.0 - start_factor))
        out.append(factor)
    return out


def test_warmup_ends_at_iteration_499_as_mmengine_linear_lr():
    """{S12}:16-22 and {SD}:16-22: LinearLR(start_factor=0.001, begin=0, end=500, by_epoch=False);
    mmengine sets total_iters = end - begin - 1, so the lr is full at iteration 499, not 500."""
    from ovsam_ray.training.optim import lr_factor

    for name in ("clip2sam_coco_rn50x16", "sam2clip_vith_rn50x16"):
        stage = get_recipe(name).stage
        extra = {"teacher_checkpoint": "t.pth"} if stage == "distill" else {}
        cfg = build_config(
            stage, recipe=name, datasets=[DatasetSpec(shards="s")], run={"storage_path": "/r", "name": "n"}, **extra
        ).optim
        reference = _mmengine_linear_lr(cfg.warmup_factor, cfg.warmup_steps, 600)
        ours = [lr_factor(step, 0.0, cfg) for step in range(600)]
        assert ours == pytest.approx(reference, rel=1e-9), f"{name}: {S12}:16-22"
        assert ours[498] < 1.0 and ours[499] == 1.0


def test_print_config_states_every_fact_a_recipe_run_depends_on(capsys):
    """--print-config's ``behaviour``: prompt kinds ({PRE}:158), instance selection ({PRE}:152),
    precision ({S12}:34-35), teacher features ({DUMP}:59-60), recognizer init ({HEAD}:133-135,
    mmdet FPN), resize filter ({COCO}:30-36), empty crops ({LOADING}:299-300), warm-up end."""
    args = _parser().parse_args(
        ["train", "cotrain", "--recipe", "clip2sam_coco_rn50x16", "--storage-path", "/r", "--name", "n"]
        + ["--dataset", "s|vocab=coco_ov", "--epoch-images", "160", "--print-config"]
    )
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    said = printed["behaviour"]
    assert "21 boxes + 19 points" in said["prompt_kinds"]
    assert said["instance_selection"].startswith("the first 40 instances in annotation order")
    assert said["precision"].startswith("fp32") and printed["config"]["run"]["precision"] == "fp32"
    assert "Xavier-uniform" in said["recognizer_init"] and "Kaiming-normal, fan_out" in said["recognizer_init"]
    assert "without antialiasing" in said["resize_filter"] and "cv2 INTER_LINEAR" in said["resize_filter"]
    assert "next image" in said["empty_crop"] and "step 499" in said["warmup"]
    args = _parser().parse_args(
        ["train", "cotrain", "--recipe", "clip2sam_coco_rn50x16", "--storage-path", "/r", "--name", "n"]
        + ["--dataset", "s|vocab=coco_ov", "--epoch-images", "160", "--print-config"]
        + ["--precision", "bf16", "--instance-selection", "random", "--crop-tries", "3"]
    )
    assert args.func(args) == 0
    said = json.loads(capsys.readouterr().out)["behaviour"]
    assert "deviation" in said["instance_selection"] and "deviation" in said["empty_crop"]
    assert "not the reference's" in said["precision"]
    args = _parser().parse_args(
        ["train", "distill", "--recipe", "sam2clip_vith_rn50x16", "--storage-path", "/r", "--name", "n"]
        + ["--dataset", "s", "--teacher-checkpoint", "t.pth", "--epoch-images", "160", "--print-config"]
    )
    assert args.func(args) == 0
    said = json.loads(capsys.readouterr().out)["behaviour"]
    assert said["teacher_features"].startswith("float32") and said["precision"].startswith("fp32")


def test_frozen_parts_and_weight_decay_exemptions_follow_the_reference():
    """Distillation trains the adapter only ({S2C}:47,56: teacher and CLIP fix=True); co-training
    the decoder (label token/MLP included) and the recognizer ({C2S_COCO}:41,55,71 fix=True, :88
    fix=False). mmengine's norm_decay_mult covers torch's norm layers, not SAM's LayerNorm2d, and
    biases keep their decay."""
    from ovsam_ray.model.presets import build_ovsam
    from ovsam_ray.training.networks import CotrainNet, DistillNet
    from ovsam_ray.training.optim import build_optimizer, no_decay_names

    distill = DistillNet(build_ovsam("ovsam_tiny"))
    assert {n.split(".")[1] for n, p in distill.named_parameters() if p.requires_grad} == {"adapter"}
    text = torch.nn.functional.normalize(torch.randn(3, 1, 64), dim=-1)
    cotrain = CotrainNet(build_ovsam("ovsam_tiny"), text_embeddings=text, logit_scale=4.6052)
    assert {n.split(".")[1] for n, p in cotrain.named_parameters() if p.requires_grad} == {"decoder", "recognizer"}
    recipe = get_recipe("clip2sam_coco_rn50x16")
    exempt = no_decay_names(cotrain, tuple(recipe.optim["no_decay"]))
    modules = dict(cotrain.named_modules())
    assert exempt and all(isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.LayerNorm) for n in exempt)
    assert not any("output_upscaling" in n for n in exempt), "SAM's LayerNorm2d decays in the reference"
    biases = [n for n, p in cotrain.named_parameters() if p.requires_grad and n.endswith(".bias")]
    assert any(n not in exempt for n in biases), "biases decay in the reference"
    opt = build_optimizer(
        cotrain,
        build_config(
            "cotrain",
            recipe=recipe.name,
            datasets=[DatasetSpec(shards="s")],
            run={"storage_path": "/tmp/r", "name": "n"},
        ).optim,
    )
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}
    assert all(g["eps"] == 1e-8 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)


def test_epochs_become_steps_and_the_lr_scales_with_the_global_batch(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    (tmp_path / "shard-000001.tar").write_bytes(b"")
    (tmp_path / "_convert.json").write_text(json.dumps({"shards": 4, "images": 4000}))
    ds = DatasetSpec(shards=str(tmp_path / "shard-{000000..000001}.tar"))
    assert dataset_images(ds) == 2000, "counted for the shards listed"
    cfg = build_config(
        "cotrain",
        recipe="clip2sam_coco_rn50x16",
        datasets=[ds],
        run={"storage_path": "/tmp/r", "name": "n", "num_workers": 2},
    )
    resolved = resolve_steps(cfg)
    assert resolved.run.max_steps == 12 * 500 and resolved.epoch_images == 2000  # 2 workers x 2 images
    assert cfg.optim.scaled_lr(resolved.run.global_batch) == pytest.approx(1e-4 * 4 / 16)
    given = build_config(
        "cotrain",
        recipe="clip2sam_coco_rn50x16",
        datasets=[ds],
        epoch_images=107761,
        run={"storage_path": "/tmp/r", "name": "n"},
    )
    assert resolve_steps(given).run.max_steps == 12 * 6736  # ceil(107761 / 16): ~80k, as the reference
    explicit = build_config(
        "cotrain",
        recipe="clip2sam_coco_rn50x16",
        datasets=[ds],
        run={"storage_path": "/tmp/r", "name": "n", "max_steps": 7},
    )
    assert resolve_steps(explicit).run.max_steps == 7
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "s-000000.tar").write_bytes(b"")  # no _convert.json beside it
    with pytest.raises(ValueError, match="--epoch-images"):
        resolve_steps(
            build_config(
                "cotrain",
                datasets=[DatasetSpec(shards=str(tmp_path / "bare"))],
                run={"storage_path": "/tmp/r", "name": "n"},
            )
        )


def test_an_epoch_counts_only_the_images_that_keep_a_trained_class(tmp_path, caplog):
    """COCO-OV's base split drops the images without a base class (the reference trains 107,761 of
    train2017's 118,287): the converter's _image_classes.parquet lets the step count see that."""
    import numpy as np

    from ovsam_ray.convert import convert_coco
    from ovsam_ray.data.synthetic import encode_image
    from ovsam_ray.training.label_space import build_label_space

    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
    # image -> (category id, iscrowd): base = person, car; novel = cat, dog
    objects = {1: [(1, 0)], 2: [(17, 0)], 3: [(1, 1)], 4: [], 5: [(3, 0), (18, 0)], 6: [(18, 0), (18, 0)]}
    (tmp_path / "images").mkdir()
    images, anns = [], []
    for image_id, objs in objects.items():
        name = f"{image_id}.png"
        (tmp_path / "images" / name).write_bytes(encode_image(np.zeros((8, 8, 3), np.uint8), "png"))
        images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
        for cat, crowd in objs:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "iscrowd": crowd,
                    "bbox": [1, 1, 4, 4],
                    "area": 16.0,
                    "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]],
                }
            )
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    out = str(tmp_path / "shards")
    convert_coco(str(tmp_path / "ann.json"), str(tmp_path / "images"), out, images_per_shard=2)

    def count(split: str, shards: str = out) -> int:
        spec = DatasetSpec(shards=shards, vocab="coco_ov", split=split)
        return dataset_images(spec, build_label_space([spec]).datasets[0])

    assert count("base") == 2  # images 1 and 5; 3 is a crowd, 2 and 6 novel only, 4 empty
    assert count("all") == 4  # + images 2 and 6
    assert count("base", out + "/shard-000000.tar") == 1, "only the shards listed"
    assert dataset_images(DatasetSpec(shards=out, vocab="coco_ov")) == 6, "without labels: every image converted"
    os.rename(os.path.join(out, "_image_classes.parquet"), str(tmp_path / "moved.parquet"))
    with caplog.at_level(logging.WARNING, logger="ovsam_ray.training.recipes"):
        assert count("base") == 6, "shards converted before the file existed: every image, with a warning"
    assert "reconvert or pass --epoch-images" in caplog.text
    os.rename(str(tmp_path / "moved.parquet"), os.path.join(out, "_image_classes.parquet"))
    cfg = build_config(
        "cotrain",
        recipe="clip2sam_coco_rn50x16",
        datasets=[DatasetSpec(shards=out, vocab="coco_ov")],
        run={"storage_path": "/tmp/r", "name": "n", "num_workers": 1, "batch_size": 1},
    )
    resolved = resolve_steps(cfg)
    assert resolved.epoch_images == 2 and resolved.run.max_steps == 12 * 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovsam-ray")
    add_train_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_flags_override_the_recipe_and_print_config_shows_the_resolved_config(capsys):
    args = _parser().parse_args(
        [
            "train",
            "cotrain",
            "--recipe",
            "clip2sam_lvis_rn50x16",
            "--storage-path",
            "/tmp/r",
            "--name",
            "n",
            "--dataset",
            "s3://b/lvis/|vocab=lvis_v1",
            "--lsj-range",
            "0.5",
            "2.0",
            "--num-workers",
            "4",
            "--grad-clip",
            "none",
            "--epoch-images",
            "1600",
            "--print-config",
        ]
    )
    cfg = cotrain_config_from_args(args)
    assert cfg.lsj_range == (0.5, 2.0) and cfg.run.num_workers == 4 and cfg.optim.grad_clip is None
    assert cfg.num_prompts == 40 and cfg.train_vocab == "lvis_v1", "the rest is the recipe's"
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["run"]["max_steps"] == 12 * 1600 // 8 and printed["derived"]["global_batch"] == 8
    assert printed["derived"]["lr"] == pytest.approx(1e-4 * 8 / 16)
    args = _parser().parse_args(
        [
            "train",
            "distill",
            "--recipe",
            "sam2clip_vith_rn50x16",
            "--storage-path",
            "/r",
            "--name",
            "n",
            "--dataset",
            "s",
            "--teacher-checkpoint",
            "t.pth",
            "--epochs",
            "6",
        ]
    )
    cfg = distill_config_from_args(args)
    assert cfg.epochs == 6 and cfg.optim.grad_clip == 5.0 and cfg.optim.min_lr_factor == 0.01
    with pytest.raises(SystemExit):
        _parser().parse_args(
            [
                "train",
                "distill",
                "--recipe",
                "clip2sam_coco_rn50x16",
                "--storage-path",
                "/r",
                "--name",
                "n",
                "--dataset",
                "s",
            ]
        )
    with pytest.raises(ValueError, match="known"):
        get_recipe("nope")
