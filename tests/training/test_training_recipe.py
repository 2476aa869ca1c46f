"""The tiny recipe: stage 0 (``clip_pretrain``: batches, the auxiliary shape loss, fixed steps) and the
whole recipe at toy sizes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ovsam_ray.data.synthetic import shape_vocabulary_names
from ovsam_ray.model.presets import clip_tokenizer, create_clip_model
from ovsam_ray.training.clip_pretrain import grid_batch, pretrain_clip, render_crop_pool
from ovsam_ray.vocabulary import load_templates

NAMES = shape_vocabulary_names()


def test_grid_batch_labels_every_crop_with_the_shape_its_caption_names() -> None:
    pool = render_crop_pool(48, seed=0, class_names=NAMES, size=32)
    images, captions, kinds = grid_batch(
        pool, np.random.default_rng(0), class_names=NAMES, colours_per_batch=2, templates=load_templates()
    )
    assert images.shape == (2 * len(NAMES), 32, 32, 3) and len(captions) == len(kinds) == 2 * len(NAMES)
    assert sorted(kinds.tolist()) == sorted(list(range(len(NAMES))) * 2)
    for caption, k in zip(captions, kinds):
        assert NAMES[k] in caption


def _pretrained(shape_loss_weight: float) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    clip = create_clip_model("ovsam_tiny")
    result = pretrain_clip(
        clip,
        clip_tokenizer("ovsam_tiny"),
        class_names=NAMES,
        steps=4,
        pool_size=24,
        seed=0,
        shape_loss_weight=shape_loss_weight,
    )
    return clip, result


@pytest.mark.slow
def test_pretrain_runs_the_fixed_number_of_steps_and_the_shape_loss_changes_the_image_tower() -> None:
    torch.manual_seed(0)
    before = create_clip_model("ovsam_tiny").visual.state_dict()
    with_aux, result = _pretrained(1.0)
    without_aux, _ = _pretrained(0.0)
    assert result.steps == 4 and np.isfinite(result.first_loss) and np.isfinite(result.last_loss)
    assert not with_aux.training  # left in eval mode, frozen
    assert not any(p.requires_grad for p in with_aux.parameters())
    a, b = with_aux.visual.state_dict(), without_aux.visual.state_dict()
    changed = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], before[k])]
    assert changed, "stage 0 did not train the image tower"
    assert any(not torch.equal(a[k], b[k]) for k in changed), "the auxiliary shape loss had no effect"


def test_scene_batch_boxes_are_the_objects_mask_boxes_in_model_input_pixels() -> None:
    from ovsam_ray.data.rle import boxes_from_binary_masks
    from ovsam_ray.data.synthetic import render_image
    from ovsam_ray.training.clip_pretrain import render_scene_batch

    batch = render_scene_batch(
        np.random.default_rng(3), 3, class_names=NAMES, image_size=128, scene_sizes=((96, 64), (160, 120))
    )
    assert batch.images.shape == (3, 3, 128, 128)
    assert len(batch.boxes) == len(batch.image_index) == len(batch.kinds) > 0
    assert sorted(set(batch.image_index.tolist())) == [0, 1, 2]
    # the same draws by hand: size, scene, mirror flag
    rng = np.random.default_rng(3)
    expected = []
    for _ in range(3):
        width, height = int(rng.integers(96, 161)), int(rng.integers(64, 121))
        _, names, masks = render_image(rng, width, height, 1, 4)
        if rng.random() < 0.5:
            masks = masks[:, :, ::-1]
        scale = 128 / max(width, height)
        expected.append(boxes_from_binary_masks(np.ascontiguousarray(masks)) * scale)
    np.testing.assert_allclose(batch.boxes.numpy(), np.concatenate(expected), atol=0.5)
    assert batch.kinds.max() < len(NAMES)


@pytest.mark.slow
def test_scene_stage_trains_the_tower_on_whole_scenes_and_refreshes_batchnorm() -> None:
    from ovsam_ray.training.clip_pretrain import pretrain_clip_regions

    torch.manual_seed(0)
    clip = create_clip_model("ovsam_tiny")
    before = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    result = pretrain_clip_regions(
        clip,
        clip_tokenizer("ovsam_tiny"),
        class_names=NAMES,
        steps=3,
        image_size=128,
        scene_sizes=((96, 64), (128, 96)),
        batch_size=2,
        seed=0,
    )
    assert result.steps == 3 and np.isfinite(result.last_loss)
    after = clip.visual.state_dict()
    assert not torch.equal(after["attnpool.c_proj.weight"], before["attnpool.c_proj.weight"])  # the CLIP branch head
    assert not torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])  # the trunk
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])  # scene statistics
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())
    # trained in channels_last (faster on CPU), handed back in the default layout
    assert all(p.is_contiguous() for p in clip.visual.parameters())


@pytest.mark.slow
def test_tiny_recipe_end_to_end_at_toy_sizes_exports_weights_the_label_job_loads(tmp_path) -> None:
    from ovsam_ray.inference import ModelConfig, build_predictor
    from ovsam_ray.model.predictor import ImagePrompts
    from ovsam_ray.training.tiny_recipe import TinyRecipe, run_tiny_recipe

    recipe = TinyRecipe(
        train_images=4,
        images_per_shard=4,
        image_size=((96, 72), (128, 96)),
        stage0_steps=2,
        stage0_pool=64,
        stage0_colours=2,
        stage0_scene_steps=2,
        stage0_scene_batch=2,
        cotrain_steps=2,
        batch_size=2,
        num_prompts=2,
        num_points=64,
        warmup_steps=1,
    )
    weights = run_tiny_recipe(str(tmp_path), seed=3, recipe=recipe)
    (checkpoint,) = (tmp_path / "runs" / "tiny-cotrain-seed3").glob("checkpoint_*")
    with open(checkpoint / "config.json") as f:
        config = json.load(f)
    assert config["run"]["max_steps"] == 2 and config["num_prompts"] == 2
    predictor, vocab, _ = build_predictor(ModelConfig(preset="ovsam_tiny", weights=weights, train_vocab="shapes"))
    assert list(vocab.class_names) == NAMES
    from ovsam_ray.training.tiny_recipe import HELD_OUT

    assert len(HELD_OUT) == 2 and set(HELD_OUT) < set(NAMES)
    assert [n for n, s in zip(vocab.class_names, vocab.seen) if not s] == list(HELD_OUT), (
        "the held-out shapes are unseen: co-training never trains them, inference fuses them with beta"
    )
    image = np.random.default_rng(0).integers(0, 255, (72, 96, 3), dtype=np.uint8)
    out = predictor([image], [ImagePrompts(boxes=np.array([[4, 4, 50, 40]], np.float32))])[0]
    assert out.labels.shape == (1,) and 0 <= int(out.labels[0]) < len(NAMES)
    # run again: every stage is found done, nothing retrains
    before = os.path.getmtime(tmp_path / "clip_tiny_stage0.pth")
    assert run_tiny_recipe(str(tmp_path), seed=3, recipe=recipe) == weights
    assert os.path.getmtime(tmp_path / "clip_tiny_stage0.pth") == before
