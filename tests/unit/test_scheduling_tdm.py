"""TDMScheduler: a stock diffusers pipeline with `pipe.scheduler = TDMScheduler.from_config(...)` takes exactly the
steps of our own student sampler (`tdm.sampler.student_sample`): same timesteps, same images, bit for bit."""
from __future__ import annotations

import pytest
import torch
import tiny_models

from tdm.sampler import student_sample
from tdm.scheduling_tdm import TDMScheduler
from tdm.schedule import student_timesteps


@pytest.mark.parametrize("k", [4, 1])
def test_stock_pipeline_matches_our_student_sampler_exactly(tmp_path, k):
    from diffusers import StableDiffusionPipeline

    from tdm.backbones import load_backbone

    folder = tiny_models.save_pipeline(tiny_models.build("sd15"), tmp_path / "sd15")
    backbone = load_backbone(folder)  # our sampler's view of the model (the SD1.5 adapter)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)  # a fresh, stock pipeline
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TDMScheduler.from_config(pipe.scheduler.config, total_steps=900)
    prompts = ["a photo of a cat", "a red car"]
    noise = torch.randn((2, *backbone.sample_shape), generator=torch.Generator().manual_seed(0))

    ours = student_sample(backbone, backbone.net, backbone.encode_prompts(prompts), noise, student_timesteps(k, 900))
    theirs = pipe(prompts, num_inference_steps=k, guidance_scale=1.0, latents=noise.clone(), output_type="latent").images
    assert pipe.scheduler.timesteps.tolist() == student_timesteps(k, 900).tolist()
    assert torch.equal(theirs, ours)
    # ... and so the decoded images are the same too.
    images = pipe(prompts, num_inference_steps=k, guidance_scale=1.0, latents=noise.clone(), output_type="np").images
    decoded = pipe.image_processor.postprocess(
        pipe.vae.decode(ours / pipe.vae.config.scaling_factor, return_dict=False)[0].detach(), output_type="np")
    assert (images == decoded).all()


def test_digits_student_loop_matches_with_x0_clipping(tiny_digits):
    """Pixel-space models clip x0 (clip_sample=True), as our sampler does for the digits family."""
    scheduler = TDMScheduler.from_config(tiny_digits.scheduler.config, clip_sample=True, total_steps=900)
    cond = tiny_digits.encode_prompts(["a handwritten digit seven", "a handwritten digit two"])
    noise = torch.randn((2, *tiny_digits.sample_shape), generator=torch.Generator().manual_seed(1))
    ours = student_sample(tiny_digits, tiny_digits.net, cond, noise, student_timesteps(4, 900))

    scheduler.set_timesteps(4)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = tiny_digits.net(x, t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]
            x = scheduler.step(out, t, x).prev_sample
    assert torch.equal(x, ours)
    assert x.abs().max() <= 1.0


def test_config_round_trip_and_errors(tmp_path):
    from diffusers import DDIMScheduler

    sd = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                       clip_sample=False)  # (DDIM's default clip_sample=True is refused unless said explicitly)
    scheduler = TDMScheduler.from_config(sd.config, total_steps=1000)
    torch.testing.assert_close(scheduler.alphas_cumprod, sd.alphas_cumprod, rtol=0, atol=0)
    scheduler.save_pretrained(tmp_path)
    again = TDMScheduler.from_pretrained(tmp_path)
    assert again.config.total_steps == 1000 and again.config.beta_schedule == "scaled_linear"
    again.set_timesteps(4)
    assert again.timesteps.tolist() == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="not on the student grid"):
        again.step(torch.zeros(1, 4, 8, 8), 500, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="set_timesteps"):
        TDMScheduler().step(torch.zeros(1, 1, 2, 2), 899, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="total_steps"):
        TDMScheduler(total_steps=2000)
    with pytest.raises(ValueError, match="prediction_type"):
        TDMScheduler(prediction_type="flow")


# -- the failing inputs (shared/cases 01 and 02), with the right values --------------------------------
def test_case01_cogvideox_keeps_its_snr_shift(tmp_path):
    """TDMScheduler.from_config(<CogVideoXPipeline's scheduler config>) used to drop `snr_shift_scale` (diffusers only
    warned): alphas_cumprod[500] 0.241 instead of 0.0953, latents 0.34 off. Right: identical alphas_cumprod, and
    the stock pipeline's latents equal student_sample's (max diff 0)."""
    from diffusers import CogVideoXPipeline

    from tdm.backbones import load_backbone

    folder = tiny_models.save_pipeline(tiny_models.build("cogvideox"), tmp_path / "cog")
    pipe = CogVideoXPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    cog_acp = pipe.scheduler.alphas_cumprod.clone()
    scheduler = TDMScheduler.from_config(pipe.scheduler.config, total_steps=900)
    assert scheduler.config.snr_shift_scale == 3.0
    assert scheduler.alphas_cumprod.dtype == cog_acp.dtype and torch.equal(scheduler.alphas_cumprod, cog_acp)
    assert round(float(scheduler.alphas_cumprod[500]), 4) == 0.0953
    backbone = load_backbone(folder)
    noise = torch.randn((1, *backbone.sample_shape), generator=torch.Generator().manual_seed(0))
    ours = student_sample(backbone, backbone.net, backbone.encode_prompts(["a photo of a cat"]), noise,
                          student_timesteps(2, 900))
    pipe.scheduler = scheduler
    theirs = pipe(["a photo of a cat"], num_inference_steps=2, guidance_scale=1.0, latents=noise.clone(), num_frames=9,
                  height=16, width=16, output_type="latent", max_sequence_length=16).frames
    assert (ours - theirs).abs().max().item() == 0.0


def test_case02_flow_matching_config_refused_by_the_vp_scheduler_and_run_by_the_flow_one(tmp_path):
    """TDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3).config) used to build a linear/epsilon VP
    schedule (the stock SD3 pipeline then differed from our student by ~550). Right: a ValueError naming what is
    wrong, and TDMFlowScheduler reproducing student_sample exactly."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from tdm.backbones import load_backbone
    from tdm.scheduling_tdm import TDMFlowScheduler

    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler.*use TDMFlowScheduler"):
        TDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3).config, total_steps=1000)
    folder = tiny_models.save_pipeline(tiny_models.build("sd3"), tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="_class_name 'FlowMatchEulerDiscreteScheduler'.*use TDMFlowScheduler"):
        TDMScheduler.from_config(pipe.scheduler.config, total_steps=1000)
    with pytest.raises(ValueError, match=r"the keys of FlowMatchHeunDiscreteScheduler.*use TDMFlowScheduler"):
        TDMScheduler.from_config({"num_train_timesteps": 1000, "shift": 3.0}, total_steps=1000)
    backbone = load_backbone(folder)
    noise = torch.randn((1, *backbone.sample_shape), generator=torch.Generator().manual_seed(0))
    ours = student_sample(backbone, backbone.net, backbone.encode_prompts(["a photo of a cat"]), noise,
                          student_timesteps(2, 1000))
    pipe.scheduler = TDMFlowScheduler.from_config(pipe.scheduler.config, total_steps=1000)
    theirs = pipe(["a photo of a cat"], num_inference_steps=2, guidance_scale=1.0, latents=noise.clone(),
                  output_type="latent", height=16, width=16, max_sequence_length=16).images
    assert pipe.scheduler.timesteps.tolist() == [999.0, 499.0]
    assert (ours - theirs).abs().max().item() == 0.0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_zimage_pipelines_set_timesteps_call_is_the_students_grid(k):
    """ZImagePipeline always calls `retrieve_timesteps(scheduler, K, sigmas=linspace(1, 1/K, K), mu=calculate_shift(
    image tokens))` and then `set_begin_index(0)`: TDMFlowScheduler built from Z-Image-Turbo's scheduler config
    (FlowMatchEuler, shift 3.0, no dynamic shift) takes that call as "K steps on the student's grid" (the default
    sigmas ask for no grid, mu is the base scheduler's shift, not the student's); other sigmas are refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift, get_default_z_image_sigmas,
                                                              retrieve_timesteps)

    from tdm.scheduling_tdm import TDMFlowScheduler

    base = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False).config
    scheduler = TDMFlowScheduler.from_config(base, total_steps=1000, grid_shift=3.0)
    timesteps, n = retrieve_timesteps(scheduler, k, "cpu", sigmas=get_default_z_image_sigmas(k),
                                      mu=calculate_shift(4096))
    scheduler.set_begin_index(0)
    assert n == k and timesteps.tolist() == student_timesteps(k, 1000, 3.0).tolist()
    assert timesteps.dtype == torch.float32 and scheduler.sigmas[-1] == 0
    if k > 1:
        with pytest.raises(ValueError, match="not the student's"):
            retrieve_timesteps(scheduler, k, "cpu", sigmas=[0.9] * k, mu=calculate_shift(4096))
