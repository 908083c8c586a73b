"""The lora_transfer stage on a real family: a TDM LoRA of a tiny SD1.5 base applied to a "fine-tune" of it given
as a folder and as an offline hub id, its rows written for `tdm evaluate` (no reference set: FID there comes
from evaluate.fid_reference)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import tiny_models

from tdm import lora as L
from tdm.artifacts import load_samples
from tdm.config import StagePaths, parse


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    root = tmp_path_factory.mktemp("sd15_transfer")
    base = tiny_models.build("sd15", seed=0)
    custom = copy.deepcopy(base)  # a "fine-tune": the base with its UNet nudged
    with torch.no_grad():
        for p in custom.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    tiny_models.save_pipeline(custom, root / "custom")
    tiny_models.copy_as_hub_cache(root / "custom", root / "hub", "tdm-test/tiny-sd15-finetune")

    net = copy.deepcopy(base.unet)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    inject_adapter_in_model(config, net, adapter_name="student")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora = L.from_peft(get_peft_model_state_dict(net, adapter_name="student"), config.to_dict())
    L.save_lora(lora, root / "tdm_lora", "diffusers")  # the format users share
    (root / "student").mkdir()
    from tdm.student import RECORD_FILE, StudentRecord

    (root / "student" / RECORD_FILE).write_text(StudentRecord(family="sd15", k=2, total_steps=900).to_json())
    (root / "prompts.txt").write_text("a photo of a cat\na red car\n")
    return root


def test_real_family_rows_from_folder_and_hub_id(sd_run, tmp_path, monkeypatch):
    from huggingface_hub import constants as hf_constants

    from tdm import lora_transfer

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(sd_run / "hub"))
    cfg = parse({"lora_transfer": {
        "lora": str(sd_run / "tdm_lora"), "student": str(sd_run / "student"),
        "custom_models": [str(sd_run / "custom"), "tdm-test/tiny-sd15-finetune"], "prompts": str(sd_run / "prompts.txt"),
        "n": 2, "custom_steps": 3, "few_steps": 2, "batch_size": 2}})
    paths = StagePaths(tmp_path / "out", tmp_path / "metrics.json")
    result = lora_transfer.run(cfg, paths, progress=False)

    rows = json.loads((paths.out_dir / "manifest.json").read_text())["rows"]
    assert [(r["model"], r["steps"], r["nfe"]) for r in rows] == [
        (str(sd_run / "custom"), 3, 6), (str(sd_run / "custom"), 2, 4), (str(sd_run / "custom") + "+tdm_lora", 2, 2),
        ("tdm-test/tiny-sd15-finetune", 3, 6), ("tdm-test/tiny-sd15-finetune", 2, 4),
        ("tdm-test/tiny-sd15-finetune+tdm_lora", 2, 2)]
    assert all("reference" not in r for r in rows) and all(r["metrics"] == {} for r in result["rows"])
    images = {r["model"]: load_samples(r["samples"]) for r in rows if r["steps"] == 2}
    folder_lora, prompts = images[str(sd_run / "custom") + "+tdm_lora"]
    assert folder_lora.shape[0] == 2 and folder_lora.shape[-1] == 3 and prompts == ["a photo of a cat", "a red car"]
    # The same weights by folder and by hub id give the same images.
    assert np.array_equal(folder_lora, images["tdm-test/tiny-sd15-finetune+tdm_lora"][0])


def test_a_lora_of_another_architecture_fails_naming_the_module(sd_run, tmp_path, tiny_digits):
    """A digits LoRA on an SD1.5 model: refused before any sampling."""
    from tdm import lora_transfer
    from tdm.roles import Roles

    backbone = copy.copy(tiny_digits)
    backbone.net = copy.deepcopy(tiny_digits.net)
    roles = Roles(backbone, "lora", lora_rank=2)
    lora = L.from_peft(roles.adapter_state_dict("student"), roles.lora_config.to_dict())
    L.save_lora(lora, tmp_path / "digits_lora", "peft")
    cfg = parse({"lora_transfer": {"lora": str(tmp_path / "digits_lora"), "student": str(sd_run / "student"),
                                   "custom_models": [str(sd_run / "custom")], "n": 2}})
    with pytest.raises(ValueError, match="LoRA module .* (is not a Linear/Conv2d layer|does not match)"):
        lora_transfer.run(cfg, StagePaths(tmp_path / "out", tmp_path / "m.json"), progress=False)
    assert not (tmp_path / "out" / "samples").exists()
