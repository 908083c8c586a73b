"""Exported LoRAs in a stock diffusers pipeline: `pipe.load_lora_weights(path)` on a fresh tiny SD1.5 pipeline
reproduces our own application exactly, for the diffusers and the kohya files, with alpha != rank."""
from __future__ import annotations

import copy

import pytest
import tiny_models
import torch

from tdm import lora as L

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    tmp = tmp_path_factory.mktemp("sd")
    tiny_models.save_pipeline(tiny_models.build("sd15"), tmp / "sd15")
    pipe = fresh_pipeline(tmp)
    net = copy.deepcopy(pipe.unet)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    inject_adapter_in_model(config, net, adapter_name="student")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora = L.from_peft(get_peft_model_state_dict(net, adapter_name="student"), config.to_dict())
    return tmp, lora


def fresh_pipeline(tmp):
    """A stock StableDiffusionPipeline loaded from the saved tiny SD1.5 folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp / "sd15", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe):
    return pipe("a photo of a cat", num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_stock_pipeline_loads_the_export_exactly(setup, fmt):
    tmp, lora = setup
    path = L.save_lora(lora, tmp / ("kohya.safetensors" if fmt == "kohya" else "diffusers"), fmt)
    ours = fresh_pipeline(tmp)
    L.attach(ours.unet, lora)
    theirs = fresh_pipeline(tmp)
    theirs.load_lora_weights(str(path))
    expected = _run(ours)
    assert torch.equal(_run(theirs), expected)
    assert not torch.allclose(_run(fresh_pipeline(tmp)), expected, atol=1e-2)  # the LoRA matters
    # diffusers' own scale and fuse agree with ours: scale 0 is the base; fused within float tolerance.
    theirs.set_adapters(theirs.get_active_adapters(), adapter_weights=[0.0])
    assert torch.equal(_run(theirs), _run(fresh_pipeline(tmp)))
    theirs.set_adapters(theirs.get_active_adapters(), adapter_weights=[1.0])
    theirs.fuse_lora(lora_scale=1.0)
    theirs.unload_lora_weights()
    torch.testing.assert_close(_run(theirs), expected, atol=1e-5, rtol=1e-4)


def test_pipeline_lora_reads_back_into_ours(setup):
    """A LoRA diffusers wrote (its own save_lora_weights) loads into tdm.lora unchanged."""
    from diffusers import StableDiffusionPipeline

    tmp, lora = setup
    state, config = L.to_peft(lora)
    StableDiffusionPipeline.save_lora_weights(tmp / "written_by_diffusers", unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config)
    back = L.load_lora(tmp / "written_by_diffusers")
    assert back.modules.keys() == lora.modules.keys()
    for name, m in lora.modules.items():
        assert torch.equal(back.modules[name].delta(), m.delta())
