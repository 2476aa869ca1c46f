"""What the printed config does not hold, against the reference (github.com/HarborYuan/ovsam):
the recognizer's initialisation, empty crops, the teacher features' dtype and the precision a
run trains in. (Prompt kinds and the resize filter: test_training_prompts.py; warm-up and
--print-config: test_training_recipes.py.)"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from ovsam_ray.errors import ConfigError
from ovsam_ray.model.clip2sam_recognizer import CLIP2SAMRecognizer
from ovsam_ray.training import stream
from ovsam_ray.training.augment import large_scale_jitter
from ovsam_ray.training.config import RunSpec
from ovsam_ray.training.loop import Runtime
from ovsam_ray.training.stream import CotrainSamples, DistillSamples

HEAD = "seg/models/heads/ovsam_head.py"
C2S_COCO = "seg/configs/clip2sam/clip2sam_coco_rn50x16.py"
LOADING = "seg/datasets/pipeliens/loading.py"
DUMP = "seg/models/detectors/sam_dump.py"
S12 = "seg/configs/_base_/schedules/schedule_12e.py"


def test_recognizer_starts_as_the_references():
    """FPN ({C2S_COCO}:62-67, mmdet FPN: init_cfg Xavier, uniform, gain 1, bias 0) and the RoI
    conv ({HEAD}:133-135, mmcv ConvModule: kaiming_init, fan_out, normal, relu)."""
    torch.manual_seed(0)
    rec = CLIP2SAMRecognizer(in_channels=(96, 192, 384, 768), fpn_channels=64, embed_dim=256)
    for conv in [*rec.fpn.lateral_convs, *rec.fpn.fpn_convs]:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = conv.weight.detach()
        assert torch.count_nonzero(conv.bias) == 0, f"{C2S_COCO}:62-67: FPN biases start at 0"
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    w = rec.roi_conv.weight.detach()
    fan_out = rec.roi_conv.out_channels  # 1x1 kernel
    assert rec.roi_conv.bias is None
    assert w.mean().abs().item() < 0.01 and w.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05), (
        f"{HEAD}:133-135: Kaiming normal, fan_out"
    )


def _cotrain_row(monkeypatch, crop_tries: int, calls: list) -> bytes | None:
    masks = np.zeros((2, 40, 60), bool)
    masks[:, 5:10, 5:10] = True

    def jitter(*args, **kwargs):
        calls.append(1)
        return large_scale_jitter(*args, **kwargs)

    monkeypatch.setattr(stream, "large_scale_jitter", jitter)
    monkeypatch.setattr(stream, "instances_from_annotations", lambda *a: (masks, np.array([0, 1]), None))
    samples = CotrainSamples(
        image_size=64, labels=[None], kinds=["segmentation"], min_mask_area=10_000, crop_tries=crop_tries
    )
    image = np.zeros((40, 60, 3), np.uint8)
    return samples.sample_row({"item": 0}, {"dataset": 0}, [0], image, stream._Meta("k", [], {}))


def test_an_empty_crop_drops_the_image_at_once(monkeypatch):
    """{LOADING}:299-300: FilterAnnotationsHB returns None when no instance is left, and mmengine's
    BaseDataset then draws another image: the stream drops this one (its next image follows)
    after one LSJ draw (crop_tries=1, the recipes); the tiny recipe re-jitters up to 3 times."""
    calls: list = []
    assert _cotrain_row(monkeypatch, 1, calls) is None and len(calls) == 1, f"{LOADING}:299-300"
    calls.clear()
    assert _cotrain_row(monkeypatch, 3, calls) is None and len(calls) == 3


def test_teacher_features_must_have_the_runs_dtype():
    """The reference caches fp32 features ({DUMP}:59-60): a run expecting float32 stops on float16
    ones with the fix in the message, and takes float32 ones."""
    samples = DistillSamples(image_size=64, teacher_dtype="float32")
    image = np.zeros((40, 60, 3), np.uint8)
    part = {"teacher": "features/shard-000000.tar"}
    with pytest.raises(ConfigError, match="--teacher-feature-dtype float16"):
        samples.sample_row({"item": 0}, part, [0], image, None, teacher=np.zeros((8, 4, 4), np.float16))
    assert samples.sample_row({"item": 0}, part, [0], image, None, teacher=np.zeros((8, 4, 4), np.float32))


def test_dump_teacher_writes_the_asked_dtype(tmp_shards, tmp_path):
    from ovsam_ray.training.distill import DumpTeacherConfig, TeacherShardWriter
    from ovsam_ray.training.stream import iter_teacher_features

    for dtype in ("float32", "float16"):
        cfg = DumpTeacherConfig(
            shards=tmp_shards[0], output=str(tmp_path / dtype), teacher="random_tiny", preset="ovsam_tiny"
        )
        cfg.feature_dtype = dtype
        assert DumpTeacherConfig(shards="s", output="o", teacher="random_tiny").feature_dtype == "float32"
        TeacherShardWriter(cfg)({"shard": tmp_shards[0]})
        (url,) = [str(p) for p in (tmp_path / dtype).iterdir()]
        assert {f.dtype for _, f in iter_teacher_features(url)} == {np.dtype(dtype)}
    with pytest.raises(ConfigError):
        DumpTeacherConfig(shards="s", output="o", teacher="random_tiny", feature_dtype="bfloat16")


def test_runs_train_in_fp32_unless_asked():
    """The reference trains in fp32 ({S12}:34-35: OptimWrapper, no AmpOptimWrapper): a run's
    default precision is fp32 on any device; bf16 is an explicit choice; auto is bf16 on CUDA only."""
    assert RunSpec(storage_path="/r", name="n").precision == "fp32"
    cuda = torch.device("cuda")
    assert isinstance(Runtime(device=cuda).autocast(), contextlib.nullcontext), "fp32 on a GPU too"
    assert isinstance(Runtime(device=cuda, precision="auto").autocast(), torch.autocast)
    with Runtime(precision="bf16").autocast():
        assert torch.is_autocast_enabled("cpu")
    with Runtime(precision="auto").autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ConfigError):
        RunSpec(storage_path="/r", name="n", precision="fp16")
