"""External students (issue #16): a LoRA in the diffusers layout the TDM releases use, on a tiny teacher, sampled
by tdm (`tdm.external`, `tdm sample --lora`) equals the stock pipeline with `load_lora_weights` +
`set_adapters(..., adapter_weights=[scale])` at the same latents, per family, scale 0.125 and 1.0, with the
teacher's own scheduler and with the releases' DPM-Solver + flow_shift."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_models
import torch

from tdm.cli import main
from tdm.external import build_scheduler, load_external, sample_external
from tdm.sampler import make_noise

PROMPTS = ["a photo of a cat", "a red car in the rain"]
TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
           "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.net.2"]}


def _release(family, root):
    """A tiny teacher folder and a LoRA folder written by the stock pipeline's own `save_lora_weights` (keys
    `unet.<module>.lora_A.weight` / `transformer.<...>`, the peft config with alpha in the header): the layout
    of the authors' SD3 / Dreamshaper releases."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_models.build(family)
    teacher = tiny_models.save_pipeline(pipe, root / "teacher")
    component = "transformer" if hasattr(pipe, "transformer") and pipe.transformer is not None else "unet"
    net = getattr(pipe, component)
    config = LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS[component], init_lora_weights=False)
    torch.manual_seed(1)
    net.add_adapter(config)
    with torch.no_grad():  # visible at scale 0.125 on a random tiny model
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.mul_(8.0)
    layers = get_peft_model_state_dict(net)
    kwargs = {f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": config.to_dict()}
    type(pipe).save_lora_weights(root / "lora", **kwargs)
    return teacher, root / "lora"


def _stock_pipe(teacher, lora, scheduler=None):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(teacher)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.load_lora_weights(lora, adapter_name="tdm")
    return pipe


def _stock(pipe, scale, steps, guidance, noise, family, output_type="latent"):
    pipe.set_adapters(["tdm"], adapter_weights=[scale])
    kwargs = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                  output_type=output_type)
    if family == "sd3":
        kwargs["max_sequence_length"] = tiny_models.TEXT_LEN
    return pipe(**kwargs).images


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sd3"])
def release(request, tmp_path_factory):
    """(family, teacher folder, LoRA folder, the stock pipeline with the LoRA loaded, tdm's external student)."""
    family = request.param
    teacher, lora = _release(family, tmp_path_factory.mktemp(family))
    return family, teacher, lora, _stock_pipe(teacher, lora), load_external(teacher, lora, 1.0)


@pytest.mark.parametrize("scale, steps, guidance", [(0.125, 4, 1.0), (1.0, 3, 2.5)])
def test_external_student_equals_the_stock_pipeline(release, scale, steps, guidance):
    family, teacher, lora, pipe, external = release
    external.set_lora_scale(scale)
    noise = make_noise(len(PROMPTS), external.backbone.sample_shape, seed=3)
    ours = external.sample(external.backbone.encode_prompts(PROMPTS), noise, steps, guidance)
    theirs = _stock(pipe, scale, steps, guidance, noise, family)
    assert (ours - theirs).abs().max().item() < 1e-5 * max(1.0, theirs.abs().max().item())
    without = _stock(pipe, 0.0, steps, guidance, noise, family)
    assert (without - ours).abs().max().item() > 1e-3  # the LoRA does something at this scale


def test_sd3_release_recipe_dpm_solver_with_flow_shift(release):
    """The SD3 releases' recipe: adapter weight 0.125, 4 steps, guidance 1, DPM-Solver multistep with a
    flow_shift (`--scheduler DPMSolverMultistepScheduler --flow-shift 4`)."""
    family, teacher, lora, pipe, _ = release
    if family != "sd3":
        pytest.skip("the DPM-Solver + flow_shift recipe is the SD3 releases'")
    from diffusers import DPMSolverMultistepScheduler

    external = load_external(teacher, lora, 0.125, scheduler="DPMSolverMultistepScheduler", flow_shift=4.0)
    assert external.scheduler.config.use_flow_sigmas and external.scheduler.config.flow_shift == 4.0
    noise = make_noise(len(PROMPTS), external.backbone.sample_shape, seed=5)
    ours = external.sample(external.backbone.encode_prompts(PROMPTS), noise, 4, 1.0)
    config = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    stock_scheduler = DPMSolverMultistepScheduler.from_config(config, use_flow_sigmas=True,
                                                              prediction_type="flow_prediction", flow_shift=4.0)
    euler = _stock(pipe, 0.125, 4, 1.0, noise, family)
    pipe.scheduler, teacher_scheduler = stock_scheduler, pipe.scheduler
    try:
        theirs = _stock(pipe, 0.125, 4, 1.0, noise, family)
    finally:
        pipe.scheduler = teacher_scheduler
    assert (ours - theirs).abs().max().item() < 1e-5 * max(1.0, theirs.abs().max().item())
    assert (euler - ours).abs().max().item() > 1e-3  # the scheduler matters


def test_tdm_sample_lora_cli_equals_the_stock_pipeline(release, tmp_path, capsys):
    """The issue's check: `tdm sample --model <teacher> --lora <diffusers LoRA> --lora-scale 0.125` gives the
    stock pipeline's images (uint8, same noise)."""
    family, teacher, lora, pipe, external = release
    if family != "sd15":
        pytest.skip("one family through the CLI (the sampler itself is compared per family above)")
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", str(teacher), "--lora", str(lora), "--lora-scale", "0.125", "--steps", "4",
                 "--prompt", PROMPTS[0], "--n", "2", "-q", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lora_scale"] == 0.125 and result["scheduler"]["_class_name"] == "DDIMScheduler"
    ours = np.load(out)["images"]
    noise = make_noise(2, external.backbone.sample_shape, seed=0)
    pipe.set_adapters(["tdm"], adapter_weights=[0.125])
    theirs = pipe(prompt=[PROMPTS[0]] * 2, num_inference_steps=4, guidance_scale=1.0, latents=noise,
                  output_type="np").images
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_bad_external_inputs_are_refused_by_flag(release, tmp_path, capsys):
    family, teacher, lora, _, _ = release
    if family != "sd3":
        pytest.skip("one family")
    out = str(tmp_path / "x.npz")
    cases = [
        (["--lora", str(tmp_path / "missing")], "--lora: not found"),
        (["--lora-scale", "0.5"], "--lora-scale applies to --lora"),
        (["--lora", str(lora), "--lora-scale", "-1"], "--lora-scale"),
        (["--lora", str(lora), "--student", "--total-steps", "1000"], "--lora"),
        (["--lora", str(lora), "--scheduler", "NoSuchScheduler"], "--scheduler"),
        (["--lora", str(lora), "--scheduler", "DDIMScheduler"], "VP (alphas_cumprod) scheduler but the teacher"),
        (["--lora", str(lora), "--flow-shift", "0"], "--flow-shift"),
    ]
    for extra, message in cases:
        assert main(["sample", "--model", str(teacher), "--n", "1", "--out", out, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("tdm: error:") and message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "x.npz").exists()


def test_scheduler_config_file_euler_and_refusals(release, tmp_path):
    """A scheduler_config.json of another VP class (Euler: scaled starting noise and model input) samples as the
    stock pipeline with that scheduler; a config with another noise schedule or prediction type is refused."""
    family, teacher, lora, pipe, _ = release
    if family != "sd15":
        pytest.skip("one family")
    from diffusers import EulerDiscreteScheduler

    config = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    euler = dict(EulerDiscreteScheduler.from_config(config).config) | {"_class_name": "EulerDiscreteScheduler"}
    path = _write(tmp_path / "scheduler_config.json", euler)
    external = load_external(teacher, lora, 0.5, scheduler=path)
    assert type(external.scheduler).__name__ == "EulerDiscreteScheduler"
    noise = make_noise(len(PROMPTS), external.backbone.sample_shape, seed=7)
    ours = external.sample(external.backbone.encode_prompts(PROMPTS), noise, 3, 2.0)
    pipe.scheduler, teacher_scheduler = EulerDiscreteScheduler.from_config(euler), pipe.scheduler
    try:
        theirs = _stock(pipe, 0.5, 3, 2.0, noise, family)
    finally:
        pipe.scheduler = teacher_scheduler
    assert (ours - theirs).abs().max().item() < 1e-5 * max(1.0, theirs.abs().max().item())
    images = sample_external(external, PROMPTS[:1], steps=2, guidance=1.0)
    assert images.dtype == torch.uint8 and images.shape[0] == 1
    with pytest.raises(ValueError, match="noise schedule"):
        build_scheduler(config, _write(tmp_path / "b.json", euler | {"beta_schedule": "linear"}))
    with pytest.raises(ValueError, match="prediction_type"):
        build_scheduler(config, _write(tmp_path / "v.json", euler | {"prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="no flow shift"):
        build_scheduler(config, "DDIMScheduler", flow_shift=3.0)


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path
