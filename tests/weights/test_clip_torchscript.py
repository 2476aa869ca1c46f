"""OpenAI's CLIP files are TorchScript archives: refused at load time with a fix, converted once."""

from __future__ import annotations

import pytest
import torch

from ovsam_ray.cli import main
from ovsam_ray.model.presets import create_clip_model
from ovsam_ray.weights.files import WeightsError, is_torchscript_archive
from ovsam_ray.weights.released import load_ovsam


def test_torchscript_clip_is_refused_then_converted(tmp_path):
    torch.manual_seed(0)
    clip = create_clip_model("ovsam_tiny")
    state = clip.state_dict()
    # A TorchScript archive holding the same tensors under the open_clip names (like OpenAI's file).
    holder = torch.nn.Module()
    for k, v in state.items():
        holder.register_buffer(k.replace(".", "__"), v)
    scripted = torch.jit.script(holder)
    ts = tmp_path / "clip.pt"
    scripted.save(str(ts))
    assert is_torchscript_archive(str(ts))
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    assert not is_torchscript_archive(str(plain))
    with pytest.raises(WeightsError, match="convert-clip"):
        load_ovsam("ovsam_tiny", sam=str(plain), clip=str(ts), sam2clip=str(plain), clip2sam=str(plain))
    out = tmp_path / "converted.pth"
    assert main(["convert-clip", "--input", str(ts), "--output", str(out)]) == 0
    converted = torch.load(out, weights_only=True)
    assert len(converted) == len(state)
    assert all(torch.equal(converted[k.replace(".", "__")], v) for k, v in state.items())
