"""tdm.lora on the digits denoiser: the adapter `tdm distill` writes, exported and reloaded in every format,
scaled, fused vs attached, and low-rank extraction of a full-mode student."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from tdm import lora as L
from tdm.roles import Roles

RANK, ALPHA = 4, 8.0  # alpha != rank: a reload that loses alpha would change the scale


@pytest.fixture(scope="module")
def student(tiny_digits, tmp_path_factory):
    """A LoRA-mode student with random (non-zero) adapter weights, saved as `tdm distill` saves it."""
    from safetensors.torch import save_file

    backbone = copy.copy(tiny_digits)
    backbone.net = copy.deepcopy(tiny_digits.net)
    roles = Roles(backbone, "lora", lora_rank=RANK, lora_alpha=ALPHA)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in roles.parameters("student"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("student_lora")
    save_file({k: v.contiguous() for k, v in roles.adapter_state_dict("student").items()}, folder / L.PEFT_WEIGHTS)
    (folder / L.PEFT_CONFIG).write_text(json.dumps(roles.lora_config.to_dict(), indent=2, default=list))
    return roles, folder


def _out(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([10, 400, 899])
    cond = torch.randn(3, 16, 64, generator=g)
    with torch.no_grad():
        return net(x, t, encoder_hidden_states=cond, return_dict=False)[0]


def _base(tiny_digits):
    return copy.deepcopy(tiny_digits.net)


def test_distill_adapter_fused_equals_the_merged_student(student, tiny_digits):
    roles, folder = student
    lora = L.load_lora(folder)
    assert lora.ranks == {RANK} and {m.alpha for m in lora.modules.values()} == {ALPHA}
    fused = L.fuse(_base(tiny_digits), lora)
    torch.testing.assert_close(_out(fused), _out(roles.merged_net("student")), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_out(fused), _out(tiny_digits.net), atol=1e-3)  # the LoRA does something


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft"])
def test_export_reload_gives_identical_outputs(student, tiny_digits, tmp_path, fmt):
    lora = L.load_lora(student[1])
    out = tmp_path / ("lora.safetensors" if fmt == "kohya" else "lora")
    L.save_lora(lora, out, fmt)
    back = L.load_lora(out)
    if fmt == "kohya":
        assert back.meta["flat_names"]
        with pytest.raises(ValueError, match="resolved"):
            L.save_lora(back, tmp_path / "again", "diffusers")
        back = back.resolved(tiny_digits.net)
    assert back.modules.keys() == lora.modules.keys()
    assert torch.equal(_out(L.fuse(_base(tiny_digits), back)), _out(L.fuse(_base(tiny_digits), lora)))


def test_scale_zero_is_the_base_and_scale_is_linear(student, tiny_digits):
    lora = L.load_lora(student[1])
    base = _out(tiny_digits.net)
    assert torch.equal(_out(L.fuse(_base(tiny_digits), lora, scale=0.0)), base)
    assert torch.equal(_out(L.fuse(_base(tiny_digits), lora.scaled(0.0))), base)
    name = next(iter(lora.modules))
    torch.testing.assert_close(lora.scaled(0.5).modules[name].delta(), 0.5 * lora.modules[name].delta())
    # A scaled LoRA keeps its scale through an export.
    assert L.to_peft(lora.scaled(0.5))[1]["lora_alpha"] == ALPHA * 0.5


def test_fused_equals_unfused(student, tiny_digits):
    lora = L.load_lora(student[1])
    for scale in (1.0, 0.7):
        fused = _out(L.fuse(_base(tiny_digits), lora, scale=scale))
        live = _out(L.attach(_base(tiny_digits), lora, scale=scale))
        torch.testing.assert_close(live, fused, atol=2e-5, rtol=1e-4)


def test_summary_lists_the_touched_modules(student, tiny_digits):
    lora = L.load_lora(student[1])
    rows = lora.summary()
    names = {r["module"] for r in rows}
    assert any(n.endswith("attn1.to_q") for n in names) and any(n.endswith("resnets.0.conv1") for n in names)
    conv = next(r for r in rows if r["module"].endswith("conv1"))
    assert conv["kind"] == "conv" and conv["rank"] == RANK
    layer = tiny_digits.net.get_submodule(conv["module"])
    assert conv["shape"] == list(layer.weight.shape)


def test_extract_recovers_a_low_rank_delta_and_reports_error(student, tiny_digits):
    lora = L.load_lora(student[1])
    tuned = L.fuse(_base(tiny_digits), lora)
    exact, report = L.extract(tiny_digits.net, tuned, rank=RANK)
    assert report["relative_error"] < 1e-4 and report["uncaptured_fraction"] < 1e-9
    torch.testing.assert_close(_out(L.fuse(_base(tiny_digits), exact)), _out(tuned), atol=1e-4, rtol=1e-4)
    # Lower rank: a real approximation error, reported; a changed bias is a delta no LoRA carries.
    with torch.no_grad():
        tuned.conv_in.bias.add_(0.1)
    _, low = L.extract(tiny_digits.net, tuned, rank=1)
    assert 0.05 < low["relative_error"] < 1 and low["uncaptured_fraction"] > 0


def test_bad_inputs_fail_with_clear_messages(student, tiny_digits, tmp_path):
    lora = L.load_lora(student[1])
    with pytest.raises(FileNotFoundError, match="not a LoRA folder"):
        L.load_lora(tmp_path)
    with pytest.raises(ValueError, match="one .safetensors file"):
        L.save_lora(lora, tmp_path / "x.bin", "kohya")
    with pytest.raises(ValueError, match="format must be one of"):
        L.save_lora(lora, tmp_path / "x", "ckpt")
    from tdm.backbones import DigitsArch, DigitsBackbone

    other = DigitsBackbone.create(DigitsArch(channels=(16, 16), text_layers=1, num_merges=2000)).net
    with pytest.raises(ValueError, match="does not match the layer's weight"):
        L.fuse(other, lora)
    with pytest.raises(ValueError, match="nothing to extract"):
        L.extract(tiny_digits.net, _base(tiny_digits), rank=2)
