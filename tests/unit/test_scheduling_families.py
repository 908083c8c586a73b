"""Every family's stock diffusers pipeline, with `pipe.scheduler = from_student(record, pipe.scheduler.config)`, runs
the student exactly as `tdm.sampler.student_sample` does on our backbone: same timesteps, same latents, bit for bit,
at K = 1, 2, 4 on the uniform and a shifted grid (digits, which has no pipeline class: through `step` alone).

Where the stock pipeline differs from our sampler's code path (so the match is not a tautology):
  * sd15 / sdxl: the pipeline's own prompt encoding, SDXL's add_time_ids, `init_noise_sigma` scaling and
    `scale_model_input`, its UNet call;
  * pixart_alpha: the pipeline splits the learned-sigma channels itself (`out_channels // 2 == latent_channels`)
    before `step`, passes the resolution / aspect-ratio conditions only when `sample_size == 128`, and at K = 1
    takes `step(...)[1]` (pred_original_sample) instead of `[0]`;
  * sd3: float32 `scheduler.timesteps` fed to the transformer (our backbone feeds int64), no init_noise_sigma;
  * cogvideox: `noise_pred.float()`, `latents.to(prompt_embeds.dtype)`, the `eta` / `generator` step kwargs it
    inspects our `step` signature for, and its own (F, C, H, W) latent layout; the SNR-shifted alphas_cumprod.
A second test checks the same pipelines against diffusers' *own* schedulers on a grid they can express (DDIM
trailing / CogVideoXDDIM / FlowMatchEuler on the same timesteps): agreement within float noise, with none of tdm's
schedule code involved on that side.

The tiny PixArt of tests/tiny_models.py (sample_size 8 with use_additional_conditions) cannot be driven by the stock
pipeline: resolution binning raises "Invalid sample size" (only 32 / 64 / 128 are binned) and, unbinned, the
pipeline passes resolution=None to a model that needs it (AttributeError). Real checkpoints have
use_additional_conditions exactly when sample_size == 128, so two real-shaped variants are built here: the 256/512
layout (no micro-conditions) for the full matrix, and the 1024 layout (sample_size 128, micro-conditions) sampled
at 16 px with use_resolution_binning=False.
"""
from __future__ import annotations

import pytest
import torch
import tiny_models

from tdm.sampler import student_sample
from tdm.scheduling_tdm import TDMFlowScheduler, TDMScheduler, from_student
from tdm.student import StudentRecord

PROMPTS = ["a photo of a cat", "a red car in the rain"]
FAMILIES = ("sd15", "sdxl", "pixart_alpha", "sd3", "cogvideox")
GRIDS = {"uniform": (900, 1.0), "shifted": (1000, 3.0)}  # (total_steps, shift)
KS = (1, 2, 4)
MEASURED: dict[str, float] = {}  # family/grid/K -> max |stock pipeline - student_sample|, printed at the end


def _pixart_variant(sample_size: int, micro: bool):
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    pipe = tiny_models.build("pixart_alpha")
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    config.update(sample_size=sample_size, use_additional_conditions=micro)
    torch.manual_seed(1)
    transformer = PixArtTransformer2DModel(**config)
    return PixArtAlphaPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                               transformer=transformer, scheduler=pipe.scheduler)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> (stock pipeline loaded from the saved folder, our backbone on the same folder)."""
    import diffusers

    from tdm.backbones import load_backbone

    root = tmp_path_factory.mktemp("families")
    built = {f: tiny_models.build(f) for f in FAMILIES if f != "pixart_alpha"}
    built["pixart_alpha"] = _pixart_variant(8, micro=False)
    built["pixart_1024"] = _pixart_variant(128, micro=True)
    out = {}
    for name, pipe in built.items():
        folder = tiny_models.save_pipeline(pipe, root / name)
        cls = getattr(diffusers, type(pipe).__name__)
        kwargs = {"safety_checker": None, "feature_extractor": None,
                  "requires_safety_checker": False} if name == "sd15" else {}
        stock = cls.from_pretrained(folder, **kwargs)  # a fresh, stock pipeline: nothing of tdm in it
        stock.set_progress_bar_config(disable=True)
        out[name] = (stock, load_backbone(folder))
    return out


def _latent_shape(name, backbone):
    return (4, 8, 8) if name == "pixart_1024" else backbone.sample_shape  # 1024 layout sampled at 16 px


def _run(name: str, pipe, k: int | None, noise: torch.Tensor, **extra) -> torch.Tensor:
    """The stock pipeline at K steps, no CFG (guidance 1: the student has it baked in), fixed latents."""
    common = dict(prompt=PROMPTS, num_inference_steps=k, guidance_scale=1.0, latents=noise.clone(),
                  output_type="latent", **extra)
    if name in ("sd15", "sdxl"):
        return pipe(**common).images
    if name.startswith("pixart"):
        return pipe(**common, height=16, width=16, max_sequence_length=tiny_models.TEXT_LEN, clean_caption=False,
                    use_resolution_binning=False).images
    if name == "sd3":
        return pipe(**common, height=16, width=16, max_sequence_length=tiny_models.TEXT_LEN).images
    return pipe(**common, num_frames=9, height=16, width=16, use_dynamic_cfg=False,
                max_sequence_length=tiny_models.TEXT_LEN).frames


def _family(name):
    return "pixart_alpha" if name.startswith("pixart") else name


@pytest.mark.parametrize("solver_order", (1, 2))
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("name", FAMILIES + ("pixart_1024",))
def test_stock_pipeline_runs_the_student_exactly(name, grid, solver_order, families):
    """solver_order 1: the DDIM trajectory; 2: DPM-Solver++(2M) (the record's solver order reaches the
    scheduler's config through from_student; the scheduler keeps the previous x0 across the pipeline's steps)."""
    pipe, backbone = families[name]
    base_config = pipe.scheduler.config
    total_steps, shift = GRIDS[grid]
    noise = torch.randn((len(PROMPTS), *_latent_shape(name, backbone)), generator=torch.Generator().manual_seed(3))
    cond = backbone.encode_prompts(PROMPTS)
    try:
        for k in KS if name != "pixart_1024" else (4,):
            record = StudentRecord(family=_family(name), k=k, total_steps=total_steps, shift=shift,
                                   solver_order=solver_order)
            pipe.scheduler = from_student(record, base_config)
            assert isinstance(pipe.scheduler, TDMFlowScheduler if name == "sd3" else TDMScheduler)
            assert pipe.scheduler.config.solver_order == solver_order
            theirs = _run(name, pipe, k, noise)
            ours = student_sample(backbone, backbone.net, cond, noise, record.timesteps(k), solver_order=solver_order)
            assert pipe.scheduler.timesteps.tolist() == record.timesteps(k).tolist()
            diff = (theirs.float() - ours).abs().max().item()
            MEASURED[f"{name}/{grid}/order{solver_order}/K={k}"] = diff
            print(f"{name:12s} {grid:8s} order {solver_order} K={k} grid={record.timesteps(k).tolist()}: "
                  f"max |stock - ours| = {diff:.3g} (max |x0| {ours.abs().max():.3g})")
            assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
            assert torch.equal(theirs, ours), (name, grid, solver_order, k, diff)
            if solver_order == 2 and k == 4:  # the second-order steps do change the result (not DDIM renamed)
                ddim = student_sample(backbone, backbone.net, cond, noise, record.timesteps(k))
                assert (ddim - ours).abs().max() > 1e-4
    finally:
        _restore(pipe, base_config)


def _restore(pipe, config):
    import diffusers

    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)


@pytest.mark.parametrize("name", FAMILIES)
def test_against_diffusers_own_schedulers_on_the_same_grid(name, families):
    """Independent of tdm's schedule code: on the uniform grid over 1000 steps (999, 749, 499, 249 for K = 4), the
    stock DDIM (trailing, final alpha 1: its last step returns x0) / CogVideoXDDIM / FlowMatchEuler (shift 1, sigmas
    t / 1000: its Euler step is the student's DDIM step on a flow schedule) give the same latents within float
    noise (diffusers' float32 alphas and float32 sigma * 1000 timesteps vs our float64 coefficients)."""
    import diffusers

    pipe, backbone = families[name]
    base_config = pipe.scheduler.config
    noise = torch.randn((len(PROMPTS), *backbone.sample_shape), generator=torch.Generator().manual_seed(5))
    try:
        for k in KS:
            record = StudentRecord(family=name, k=k, total_steps=1000)
            pipe.scheduler = from_student(record, base_config)
            ours = _run(name, pipe, k, noise)
            grid = record.timesteps(k)
            if name == "sd3":
                pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(base_config, shift=1.0)
                theirs = pipe(prompt=PROMPTS, guidance_scale=1.0, latents=noise.clone(), output_type="latent",
                              height=16, width=16, max_sequence_length=tiny_models.TEXT_LEN,
                              sigmas=(grid.double() / 1000).tolist()).images
            else:
                if name == "cogvideox":  # its own DDIM already has trailing spacing and final alpha 1
                    pipe.scheduler = diffusers.CogVideoXDDIMScheduler.from_config(base_config)
                else:  # (clip_sample: DDIM's default is on, and PixArt's DPM-Solver config does not say)
                    pipe.scheduler = diffusers.DDIMScheduler.from_config(base_config, timestep_spacing="trailing",
                                                                         set_alpha_to_one=True, clip_sample=False)
                theirs = _run(name, pipe, k, noise)
                assert pipe.scheduler.timesteps.tolist() == grid.tolist()
            assert not isinstance(pipe.scheduler, (TDMScheduler, TDMFlowScheduler))
            diff = (theirs.float() - ours).abs().max().item()
            print(f"{name:12s} K={k}: max |TDM scheduler - diffusers' {type(pipe.scheduler).__name__}| = {diff:.3g}")
            torch.testing.assert_close(theirs.float(), ours, atol=1e-4, rtol=1e-4)
    finally:
        _restore(pipe, base_config)


@pytest.mark.parametrize("name", ("sd15", "sdxl", "pixart_alpha", "sd3"))
def test_second_order_against_diffusers_dpm_solver(name, families):
    """Independent of tdm's solver code: diffusers' DPMSolverMultistepScheduler (algorithm_type "dpmsolver++",
    solver_order 2, midpoint, lower_order_final, final sigma 0: its last step returns x0) on the student's
    4-step grid (`set_timesteps(timesteps=...)`) gives the latents of `solver_order=2` within float noise (its
    float32 sigmas vs our float64 coefficients). SD3 through its flow mode (use_flow_sigmas, flow_prediction,
    shift 1), whose set_timesteps takes no custom grid in this diffusers: its sigmas are set to the grid's.""" 
    import diffusers

    pipe, backbone = families[name]
    base_config = pipe.scheduler.config
    noise = torch.randn((len(PROMPTS), *backbone.sample_shape), generator=torch.Generator().manual_seed(7))
    total_steps, shift = GRIDS["shifted"]
    record = StudentRecord(family=name, k=4, total_steps=total_steps, shift=shift, solver_order=2)
    grid = record.timesteps(4)
    try:
        pipe.scheduler = from_student(record, base_config)
        ours = _run(name, pipe, 4, noise)
        dpm = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                   final_sigmas_type="zero", euler_at_final=False, use_karras_sigmas=False)
        if name == "sd3":
            class OnTheGrid(diffusers.DPMSolverMultistepScheduler):
                """Its flow mode takes no custom grid here: only the grid is replaced (sigmas = t / 1000, then 0)."""

                def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None):
                    super().set_timesteps(len(grid), device)
                    self.sigmas = torch.cat([grid.double() / 1000, torch.zeros(1, dtype=torch.float64)]).float()
                    self.timesteps = grid.float().to(device)

            pipe.scheduler = OnTheGrid(use_flow_sigmas=True, flow_shift=1.0, prediction_type="flow_prediction", **dpm)
            theirs = _run(name, pipe, 4, noise)
        else:
            pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(base_config, **dpm)
            theirs = _run(name, pipe, None, noise, timesteps=grid.tolist())
            assert pipe.scheduler.timesteps.tolist() == grid.tolist()
        diff = (theirs.float() - ours).abs().max().item()
        ddim = student_sample(backbone, backbone.net, backbone.encode_prompts(PROMPTS), noise, grid)
        apart = (ddim - ours).abs().max().item()
        print(f"{name:12s} K=4 order 2: max |TDM scheduler - diffusers' DPMSolverMultistepScheduler| = {diff:.3g} "
              f"(order 2 vs DDIM: {apart:.3g})")
        torch.testing.assert_close(theirs.float(), ours, atol=1e-4, rtol=1e-4)
        assert apart > 20 * diff  # the check can tell a second-order step from DDIM
    finally:
        _restore(pipe, base_config)


@pytest.mark.parametrize("solver_order", (1, 2))
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_digits_through_step_alone(grid, solver_order, tiny_digits):
    """Digits has no diffusers pipeline class: the pipeline loop (set_timesteps, scale_model_input, the UNet, step)
    written out, with x0 clipping switched on by from_student because the digits sampler clips."""
    total_steps, shift = GRIDS[grid]
    cond = tiny_digits.encode_prompts(["a handwritten digit seven", "a handwritten digit two"])
    noise = torch.randn((2, *tiny_digits.sample_shape), generator=torch.Generator().manual_seed(1))
    for k in KS:
        record = StudentRecord(family="digits", k=k, total_steps=total_steps, shift=shift, solver_order=solver_order)
        scheduler = from_student(record, tiny_digits.scheduler.config)
        assert scheduler.config.clip_sample and scheduler.config.clip_sample_range == 1.0
        ours = student_sample(tiny_digits, tiny_digits.net, cond, noise, record.timesteps(k), solver_order=solver_order)
        scheduler.set_timesteps(k)
        x = noise.clone() * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = tiny_digits.net(scheduler.scale_model_input(x, t), t,
                                      encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]
                x = scheduler.step(out, t, x, return_dict=False)[0]
        diff = (x - ours).abs().max().item()
        MEASURED[f"digits/{grid}/order{solver_order}/K={k}"] = diff
        print(f"digits       {grid:8s} K={k} grid={record.timesteps(k).tolist()}: max |step loop - ours| = {diff:.3g}")
        assert torch.equal(x, ours)


def test_print_measured_differences():
    """The per-family maxima over K (run with -s to see them)."""
    by_family: dict[str, float] = {}
    for key, value in MEASURED.items():
        by_family[key.split("/")[0]] = max(by_family.get(key.split("/")[0], 0.0), value)
    for family, value in sorted(by_family.items()):
        print(f"max |stock pipeline (or step loop) - student_sample| over K in {KS}, both grids: {family}: {value:.3g}")
    assert all(v == 0.0 for v in by_family.values())
