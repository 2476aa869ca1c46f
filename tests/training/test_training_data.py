"""Training data: work-item mixture, label spaces, shard -> rows, collation (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ovsam_ray import storage
from ovsam_ray.data.rle import annotation_mask
from ovsam_ray.data.synthetic import encode_image, generate_shards, tar_bytes
from ovsam_ray.errors import ConfigError
from ovsam_ray.model.functional import preprocess_image
from ovsam_ray.training.batching import (
    collate_cotrain,
    normalize_images,
    pack_masks,
    unpack_masks,
    unpack_sample,
)
from ovsam_ray.training.config import CotrainConfig, DatasetSpec, ModelSpec, RunSpec
from ovsam_ray.training.cotrain import sample_builder
from ovsam_ray.training.label_space import build_label_space, exported_seen_classes
from ovsam_ray.training.loop import row_batches
from ovsam_ray.training.stream import dataset_items, iter_local_rows, work_items

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "ellipse", "pentagon", "cross"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("training_data")
    seg = root / "seg"
    generate_shards(str(seg), num_images=6, images_per_shard=3, seed=3, image_size=(64, 48))
    vocab = root / "shapes.json"
    vocab.write_text(json.dumps(SHAPES))
    img = root / "img"
    img.mkdir()
    rng = np.random.default_rng(0)
    members = []
    metas = [{"label": "star"}, {"category_id": 1}, {"label": "unknown thing"}, {"class_name": "Cross"}]
    for i, meta in enumerate(metas):
        members += [
            (f"{i:04d}.jpg", encode_image(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))),
            (f"{i:04d}.json", json.dumps(meta).encode()),
        ]
    storage.atomic_write_bytes(str(img / "in22k-000000.tar"), tar_bytes(members))
    return {"seg": str(seg), "img": str(img), "vocab": str(vocab)}


def _config(data_root: dict[str, str], tmp_path, **kw) -> CotrainConfig:
    datasets = kw.pop("datasets", [DatasetSpec(shards=data_root["seg"], vocab=data_root["vocab"])])
    return CotrainConfig(
        run=RunSpec(storage_path=str(tmp_path), name="t"),
        datasets=datasets,
        model=ModelSpec(preset="ovsam_tiny", random_init=True),
        **kw,
    )


def test_work_items_follow_ratios_and_cover_every_shard():
    a, b = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]
    items = work_items([a, b], [3.0, 1.0], epochs=20, seed=0)
    assert len(items) == 400 and [it["item"] for it in items] == list(range(400))
    frac = np.mean([it["dataset"] == 0 for it in items])
    assert abs(frac - 0.75) < 0.06
    first_pass = [it["shard"] for it in items if it["dataset"] == 0][:10]
    assert sorted(first_pass) == sorted(a), "each pass visits every shard of a dataset once"
    assert items == work_items([a, b], [3.0, 1.0], epochs=20, seed=0)
    assert items != work_items([a, b], [3.0, 1.0], epochs=20, seed=1)
    with pytest.raises(ValueError):
        work_items([a], [1.0, 2.0], epochs=1, seed=0)


def test_label_space_union_and_mapping(tmp_path):
    (tmp_path / "a.json").write_text(
        json.dumps({"name": "a", "classes": [{"id": 7, "name": "Star"}, {"id": 9, "name": "circle"}]})
    )
    (tmp_path / "b.txt").write_text("circle, round thing\nhexagon\n")
    specs = [
        DatasetSpec(shards="x", vocab=str(tmp_path / "a.json")),
        DatasetSpec(shards="y", vocab=str(tmp_path / "b.txt")),
    ]
    space = build_label_space(specs)
    assert list(space.vocab.class_names) == ["Star", "circle", "hexagon"]
    assert space.seen_classes == ["Star", "circle", "hexagon"]
    a, b = space.datasets
    assert a.annotation_label({"category_id": 7}) == 0 and a.annotation_label({"category_id": 9}) == 1
    assert b.annotation_label({"category_id": 0}) == 1 and b.annotation_label({"category_id": 1}) == 2
    assert b.annotation_label({"category_name": "round_thing"}) == 1
    assert a.annotation_label({"category_id": 123}) == -1
    assert a.image_label({"label": "HEXAGON"}) == 2 and a.image_label({"label_id": 9}) == 1
    # an explicit training vocabulary: classes no dataset has are not seen
    (tmp_path / "t.txt").write_text("star\ncircle\nhexagon\ntriangle\n")
    space = build_label_space(specs, str(tmp_path / "t.txt"))
    assert space.seen_classes == ["star", "circle", "hexagon"]


def test_classes_only_corrections_train_stay_unseen_in_the_export(tmp_path):
    vocab = tmp_path / "shapes.json"
    classes = [{"name": n, "seen": i < 6} for i, n in enumerate(SHAPES)]
    vocab.write_text(json.dumps({"name": "shapes", "classes": classes}))
    replay = DatasetSpec(shards="replay", vocab=str(vocab))  # split=base: the six seen shapes
    corrections = DatasetSpec(shards="labels", corrections="only")  # every class it names
    space = build_label_space([replay, corrections], str(vocab))
    assert space.seen_classes == SHAPES, "every class trains"
    assert space.corrected_unseen == ["pentagon", "cross"]
    assert exported_seen_classes(space) == SHAPES[:6], "default: corrections alone keep a class unseen"
    assert exported_seen_classes(space, "seen") == SHAPES
    # corrections only: the six the vocabulary marks seen stay seen, the two others unseen
    alone = build_label_space([corrections], str(vocab))
    assert alone.corrected_unseen == ["pentagon", "cross"] and exported_seen_classes(alone) == SHAPES[:6]
    # a class another dataset trains is seen whatever the corrections do
    everything = DatasetSpec(shards="all", vocab=str(vocab), split="all")
    assert exported_seen_classes(build_label_space([everything, corrections], str(vocab))) == SHAPES
    with pytest.raises(ConfigError, match="corrected_classes"):
        exported_seen_classes(space, "maybe")


def test_annotation_mask_polygon_rle_and_bad():
    poly = {"segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]]}
    mask = annotation_mask(poly, 12, 14)
    assert mask.shape == (12, 14) and 40 <= mask.sum() <= 80
    assert annotation_mask({"segmentation": {"size": [5, 5], "counts": "0"}}, 12, 14) is None  # wrong size
    assert annotation_mask({"segmentation": [[1, 2]]}, 12, 14) is None
    assert annotation_mask({}, 12, 14) is None


def test_cotrain_rows_from_segmentation_shards(data_root, tmp_path):
    cfg = _config(data_root, tmp_path, num_prompts=8, lsj_range=(1.0, 1.0), flip_prob=0.0, min_mask_area=1)
    items = dataset_items(cfg.datasets, epochs=1, seed=0)
    rows = list(iter_local_rows(items, sample_builder(cfg)))
    assert len(rows) == 6 and {r["item"] for r in rows} == {0, 1}
    s = unpack_sample(rows[0]["sample"])
    assert s["image"].shape == (256, 256, 3) and s["has_masks"]
    # 8 prompts: 5 boxes then 3 points (ovsam_preprocessor.py:158: n // 2 + 1 boxes)
    assert len(s["prompt_instance"]) == 8 and s["prompt_is_point"].sum() == 3
    masks = unpack_masks(s["masks"], 256)
    assert masks.shape[0] == len(s["labels"]) and set(s["prompt_instance"]) == set(range(masks.shape[0]))
    for inst, (x, y), is_point in zip(s["prompt_instance"], s["prompt_points"], s["prompt_is_point"]):
        if is_point:
            assert masks[inst, int(y), int(x)]
    assert ((s["labels"] >= 0) & (s["labels"] < 8)).all()
    again = list(iter_local_rows(items, sample_builder(cfg)))
    assert [r["sample"] for r in again] == [r["sample"] for r in rows], "rows are deterministic"


def test_image_level_rows_one_whole_image_box(data_root, tmp_path):
    cfg = _config(
        data_root,
        tmp_path,
        datasets=[
            DatasetSpec(shards=data_root["seg"], vocab=data_root["vocab"]),
            DatasetSpec(shards=data_root["img"], kind="image", vocab=data_root["vocab"]),
        ],
        lsj_range=(1.0, 1.0),
        flip_prob=0.0,
    )
    builder = sample_builder(cfg)
    item = {"item": 0, "dataset": 1, "shard": storage.join(data_root["img"], "in22k-000000.tar")}
    samples = [unpack_sample(r["sample"]) for r in builder(item)]
    assert len(samples) == 3, "the sample with an unknown class is skipped"
    assert [int(s["labels"][0]) for s in samples] == [3, 1, 7]
    for s in samples:
        assert not s["has_masks"] and s["masks"].shape[0] == 0
        h, w = s["input_hw"]
        np.testing.assert_array_equal(s["prompt_boxes"], [[0, 0, w, h]])
    batch = collate_cotrain(samples[:2], "cpu")
    assert batch.target_masks.shape[0] == 0 and not batch.has_mask.any()
    assert batch.labels.tolist() == [3, 1]


def test_collate_and_normalize_match_inference_preprocessing(data_root, tmp_path):
    cfg = _config(data_root, tmp_path, num_prompts=6, lsj_range=(1.0, 1.0), flip_prob=0.0, min_mask_area=1)
    rows = list(iter_local_rows(dataset_items(cfg.datasets, epochs=1, seed=0)[:1], sample_builder(cfg)))
    samples = [unpack_sample(r["sample"]) for r in rows[:2]]
    batch = collate_cotrain(samples, "cpu")
    assert batch.images.shape == (2, 3, 256, 256) and len(batch.prompts) == 12
    assert batch.prompts.image_index.tolist() == [0] * 6 + [1] * 6
    n0 = len(samples[0]["labels"])
    assert batch.target_index[6:].min() >= n0, "the second image's prompts index its own masks"
    image = samples[0]["image"]
    h, w = samples[0]["input_hw"]
    expected, _ = preprocess_image(torch.from_numpy(np.ascontiguousarray(image[:h, :w])), 256)
    got = normalize_images(torch.from_numpy(image)[None], torch.tensor([[h, w]]))[0]
    assert torch.allclose(got, expected, atol=1e-4)


def test_pack_roundtrip_and_row_batches_skip_consumed_items():
    masks = np.random.default_rng(0).random((3, 20, 20)) > 0.5
    np.testing.assert_array_equal(unpack_masks(pack_masks(masks), 20), masks)
    assert unpack_masks(pack_masks(np.zeros((0, 20, 20), bool)), 20).shape == (0, 20, 20)
    from ovsam_ray.training.batching import pack_sample

    rows = [{"item": i // 2, "sample": pack_sample(x=np.array([i]))} for i in range(10)]
    batches = list(row_batches(iter(rows), 3, min_item=2))
    assert [[int(s["x"][0]) for s in b] for b, _ in batches] == [[4, 5, 6], [7, 8, 9]]
    assert [top for _, top in batches] == [3, 4]


def test_predicted_rois_are_the_mask_boxes_where_they_overlap_the_ground_truth(data_root, tmp_path):
    from ovsam_ray.model.functional import predicted_rois

    low_res = torch.full((3, 1, 16, 16), -10.0)
    low_res[0, 0, 2:6, 3:8] = 10.0  # on its object, a little smaller than the ground truth
    low_res[0, 0, 12, 14] = 10.0  # and one stray pixel far away: the box grows to it, as at inference
    low_res[1, 0, 2:6, 3:8] = 10.0  # not drawn for a predicted RoI
    low_res[2, 0, 12:14, 12:14] = 10.0  # nowhere near its object: keeps the ground truth
    gt = torch.tensor([[8.0, 4.0, 36.0, 28.0]] * 3)
    out = predicted_rois(low_res, gt, torch.tensor([True, False, True]))
    assert out[0].tolist() == [12.0, 8.0, 60.0, 52.0]  # low-res box x 4
    assert torch.equal(out[1:], gt[1:])
    with pytest.raises(ValueError, match="roi_from_prediction"):
        _config(data_root, tmp_path, roi_from_prediction=1.5)


def test_cotrain_step_with_predicted_rois_keeps_the_mask_losses(data_root, tmp_path, monkeypatch):
    from ovsam_ray.model import functional
    from ovsam_ray.training import loop
    from ovsam_ray.training.cotrain import cotrain_setup

    exact = _config(data_root, tmp_path, num_prompts=4, num_points=64, min_mask_area=1)
    items = dataset_items(exact.datasets, epochs=1, seed=0)
    samples = [unpack_sample(r["sample"]) for r in list(iter_local_rows(items, sample_builder(exact)))[:2]]
    net = cotrain_setup(exact, loop.Runtime()).net.eval()
    shifted = []

    def shift_all(low_res, gt, use, min_iou=0.1):  # stand-in: every drawn prompt gets a different RoI
        shifted.append(use)
        return torch.where(use[:, None], gt + 4.0, gt)

    monkeypatch.setattr(functional, "predicted_rois", shift_all)  # OVSAM.decode calls it
    losses = {}
    for fraction in (0.0, 1.0):
        cfg = _config(data_root, tmp_path, num_prompts=4, num_points=64, min_mask_area=1, roi_from_prediction=fraction)
        with torch.no_grad():
            losses[fraction], _ = loop.CotrainTask(net=net, cfg=cfg, device=torch.device("cpu")).losses(samples, 0, 0)
    assert len(shifted) == 1 and shifted[0].all() and len(shifted[0]) == 8  # only when asked; every prompt
    assert torch.equal(losses[0.0]["loss_mask"], losses[1.0]["loss_mask"])
    assert not torch.equal(losses[0.0]["loss_cls"], losses[1.0]["loss_cls"])


def test_cotrain_forward_decodes_through_the_models_own_decode(data_root, tmp_path, monkeypatch):
    """One decode path: CotrainNet calls OVSAM.decode (with the ground-truth RoIs), so a change to
    the decoder path reaches training and inference alike."""
    from ovsam_ray.model.ovsam import OVSAM
    from ovsam_ray.training import loop
    from ovsam_ray.training.cotrain import cotrain_setup

    cfg = _config(data_root, tmp_path, num_prompts=4, num_points=64, min_mask_area=1)
    rows = list(iter_local_rows(dataset_items(cfg.datasets, epochs=1, seed=0), sample_builder(cfg)))[:2]
    batch = collate_cotrain([unpack_sample(r["sample"]) for r in rows], "cpu")
    net = cotrain_setup(cfg, loop.Runtime()).net.eval()
    calls = []
    original = OVSAM.decode

    def spy(self, features, prompts, **kw):
        calls.append(kw)
        return original(self, features, prompts, **kw)

    monkeypatch.setattr(OVSAM, "decode", spy)
    with torch.no_grad():
        low_res, logits = net(batch.images, batch.prompts, batch.roi_boxes)
        features = net.model.embed(batch.images)
        out = original(net.model, features, batch.prompts, roi_boxes=batch.roi_boxes, clip_branch=False)
    assert len(calls) == 1 and torch.equal(calls[0]["roi_boxes"], batch.roi_boxes)
    torch.testing.assert_close(low_res, out.low_res_logits)
    from ovsam_ray.training.losses import class_logits

    torch.testing.assert_close(logits, class_logits(out.region_embeddings, net.text_embeddings, net.log_scale))
    assert out.clip_embeddings is None and torch.equal(out.roi_boxes, batch.roi_boxes)
