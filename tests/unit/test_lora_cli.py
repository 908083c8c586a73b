"""`tdm lora export|info|fuse|extract` on a tiny digits teacher and a LoRA student of it."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from tdm import lora as L
from tdm.cli import main
from tdm.roles import Roles


@pytest.fixture(scope="module")
def saved(tiny_digits, tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("lora_cli")
    tiny_digits.save(root / "teacher")
    backbone = copy.copy(tiny_digits)
    backbone.net = copy.deepcopy(tiny_digits.net)
    roles = Roles(backbone, "lora", lora_rank=4, lora_alpha=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in roles.parameters("student"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    (root / "student_lora").mkdir()
    save_file({k: v.contiguous() for k, v in roles.adapter_state_dict("student").items()},
              root / "student_lora" / L.PEFT_WEIGHTS)
    (root / "student_lora" / L.PEFT_CONFIG).write_text(json.dumps(roles.lora_config.to_dict(), default=list))
    return root


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def _out(net):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return net(torch.randn(2, 1, 8, 8, generator=g), torch.tensor([5, 700]),
                   encoder_hidden_states=torch.randn(2, 16, 64, generator=g), return_dict=False)[0]


def test_info_export_fuse_extract(saved, tiny_digits, capsys):
    lora_dir = str(saved / "student_lora")
    assert main(["lora", "info", lora_dir]) == 0
    info = _json(capsys)
    assert info["ranks"] == [4] and info["modules"] > 10
    assert "down_blocks.*.resnets.*.conv1" in info["touches"]
    assert any(p.endswith("attn2.to_out.*") for p in info["touches"])

    kohya = str(saved / "student.safetensors")
    assert main(["lora", "export", lora_dir, "--format", "kohya", "--out", kohya, "--scale", "0.5"]) == 0
    capsys.readouterr()
    # kohya -> diffusers needs the model to recover module paths; the error says so before any work.
    assert main(["lora", "export", kohya, "--format", "diffusers", "--out", str(saved / "d")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["lora", "export", kohya, "--format", "diffusers", "--out", str(saved / "d"),
                 "--model", str(saved / "teacher")]) == 0
    capsys.readouterr()
    lora = L.load_lora(lora_dir)
    half = L.load_lora(saved / "d")
    name = next(iter(lora.modules))
    torch.testing.assert_close(half.modules[name].delta(), 0.5 * lora.modules[name].delta())

    assert main(["lora", "fuse", lora_dir, "--model", str(saved / "teacher"), "--out", str(saved / "merged")]) == 0
    capsys.readouterr()
    from tdm.backbones import load_backbone

    merged = load_backbone(saved / "merged")
    assert torch.equal(_out(merged.net), _out(L.fuse(copy.deepcopy(tiny_digits.net), lora)))

    # A "full-mode student" (the merged model) back to a LoRA: exact at the LoRA's rank, error reported.
    assert main(["lora", "extract", "--base", str(saved / "teacher"), "--student", str(saved / "merged"),
                 "--rank", "4", "--out", str(saved / "extracted")]) == 0
    report = _json(capsys)
    assert report["relative_error"] < 1e-3 and (saved / "extracted" / "tdm_extraction.json").is_file()
    back = L.fuse(copy.deepcopy(tiny_digits.net), L.load_lora(saved / "extracted"))
    torch.testing.assert_close(_out(back), _out(merged.net), atol=1e-4, rtol=1e-4)
