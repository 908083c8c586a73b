"""Reading scheduler configs: TDMScheduler's alphas_cumprod are every diffusers VP scheduler's own, bit for bit;
every key is implemented, irrelevant (the base scheduler's own inference grid / solver) or refused by name; the
student's grid round-trips through save_pretrained; set_timesteps / step / add_noise keep the diffusers contract."""
from __future__ import annotations

import json

import diffusers
import pytest
import torch

from tdm.schedule import StudentGrid
from tdm.scheduling_tdm import TDMFlowScheduler, TDMScheduler, from_student, vp_alphas_cumprod
from tdm.student import StudentRecord

VP_CLASSES = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
              "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
              "DEISMultistepScheduler", "UniPCMultistepScheduler", "SASolverScheduler", "LCMScheduler", "TCDScheduler",
              "DDIMParallelScheduler", "DDPMParallelScheduler", "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
VP_CONFIGS = {
    "linear": {},
    "scaled_linear": SD,
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "trained": dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
    "zero_snr_v": dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "snr_shift_2": dict(SD, snr_shift_scale=2.0, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
}


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _saved_config(scheduler, tmp_path):
    """The config as a pipeline folder holds it (scheduler_config.json, with _class_name), read back."""
    scheduler.save_pretrained(tmp_path)
    return json.loads((tmp_path / "scheduler_config.json").read_text())


@pytest.mark.parametrize("config", sorted(VP_CONFIGS))
@pytest.mark.parametrize("name", VP_CLASSES)
def test_alphas_cumprod_are_the_base_schedulers_bit_for_bit(name, config, tmp_path):
    cls = getattr(diffusers, name)
    kwargs = {k: v for k, v in VP_CONFIGS[config].items() if k in cls._get_init_keys(cls)}
    base = cls(**kwargs)  # the teacher's scheduler, as tdm's backbones read it (its alphas_cumprod)
    for source in (base.config, _saved_config(base, tmp_path)):  # in memory (no _class_name) and from a file
        ours = TDMScheduler.from_config(source, total_steps=1000, clip_sample=False)
        assert ours.alphas_cumprod.dtype == base.alphas_cumprod.dtype
        assert torch.equal(ours.alphas_cumprod, base.alphas_cumprod), name
    if base.config.get("rescale_betas_zero_snr"):
        assert float(ours.alphas_cumprod[-1]) == (2**-24 if name in ("EulerDiscreteScheduler",
                                                                     "EulerAncestralDiscreteScheduler",
                                                                     "DPMSolverMultistepScheduler",
                                                                     "UniPCMultistepScheduler") else 0.0)
    if "CogVideoX" in name:
        assert ours.config.snr_shift_scale == base.config.snr_shift_scale


def test_cogvideox_snr_shift_read_from_every_source(tmp_path):
    """Case 01: the SNR shift is part of the schedule (0.0953 at t = 500, not the unshifted 0.241); an old config file
    without the key gets CogVideoXDDIMScheduler's default 3.0, as that class does."""
    cog = diffusers.CogVideoXDDIMScheduler(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                           snr_shift_scale=3.0, timestep_spacing="trailing", clip_sample=False)
    ours = TDMScheduler.from_config(cog.config, total_steps=900, clip_sample=False)
    assert torch.equal(ours.alphas_cumprod, cog.alphas_cumprod)
    assert round(float(ours.alphas_cumprod[500]), 4) == 0.0953
    unshifted = TDMScheduler.from_config(diffusers.DDIMScheduler(**SD, clip_sample=False, rescale_betas_zero_snr=True,
                                                                 prediction_type="v_prediction").config,
                                         total_steps=900)
    assert round(float(unshifted.alphas_cumprod[500]), 3) == 0.241
    old = _saved_config(cog, tmp_path)
    del old["snr_shift_scale"]
    assert torch.equal(TDMScheduler.from_config(old, total_steps=900).alphas_cumprod, cog.alphas_cumprod)
    # A CogVideoX config handed to DDIMScheduler: DDIM ignores the key, so the schedule is DDIM's (as tdm reads it).
    ddim = diffusers.DDIMScheduler.from_config(cog.config)  # (clip_sample=False comes along)
    assert torch.equal(TDMScheduler.from_config({**_saved_config(ddim, tmp_path / "d"), "snr_shift_scale": 3.0},
                                                total_steps=900).alphas_cumprod, ddim.alphas_cumprod)


def test_vp_alphas_cumprod_formula_directly():
    betas, acp = vp_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear", snr_shift_scale=1.0)
    assert acp.dtype == torch.float64  # the CogVideoX recipe: float64 scaled_linear betas
    torch.testing.assert_close(acp, torch.cumprod(1 - betas, 0))
    _, acp = vp_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear", rescale_betas_zero_snr=True)
    assert float(acp[-1]) == 0.0 and acp.dtype == torch.float32
    with pytest.raises(ValueError, match="terminal_alpha_cumprod"):
        vp_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear", terminal_alpha_cumprod=2**-24)


# -- refusals ---------------------------------------------------------------------------------------------------
FLOW = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
REFUSED = [
    # (scheduler class, config, overrides, message)
    (TDMScheduler, diffusers.DDIMScheduler(thresholding=True, clip_sample=False).config, {}, r"thresholding=True"),
    (TDMScheduler, diffusers.DDPMScheduler(**SD).config, {},
     r"clip_sample=True in the DDPM\w*Scheduler config.*explicit"),
    (TDMScheduler, diffusers.DDPMScheduler(beta_schedule="sigmoid").config, {"clip_sample": False},
     r"beta_schedule.*'sigmoid'"),
    (TDMScheduler, diffusers.DDIMScheduler(prediction_type="sample").config, {"clip_sample": False},
     r"prediction_type='sample'"),
    (TDMScheduler, {"prediction_type": "flow"}, {"total_steps": 900}, r"prediction_type='flow'"),
    (TDMScheduler, diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                         flow_shift=3.0).config, {}, r"use_flow_sigmas=True"),
    (TDMScheduler, diffusers.EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction").config,
     {}, r"timestep_type='continuous'"),
    (TDMScheduler, diffusers.DDIMScheduler(rescale_betas_zero_snr=True).config, {"clip_sample": False},
     r"'epsilon' on a zero-terminal-SNR schedule"),
    (TDMScheduler, diffusers.CogVideoXDDIMScheduler(rescale_betas_zero_snr=True).config, {"clip_sample": False},
     r"'epsilon' on a zero-terminal-SNR schedule"),
    # a flow-matching config given to the VP class: in memory (by its keys) and from a file (by _class_name)
    (TDMScheduler, FLOW, {}, r"FlowMatchEulerDiscreteScheduler.*flow-matching.*TDMFlowScheduler"),
    (TDMScheduler, {**FLOW, "_class_name": "FlowMatchEulerDiscreteScheduler"}, {}, r"use TDMFlowScheduler"),
    (TDMScheduler, {"beta_schedule": "linear", "shift": 3.0}, {"total_steps": 900},
     r"unknown scheduler config key shift=3.0.*flow-matching"),
    (TDMScheduler, {**diffusers.DDIMScheduler().config, "_class_name": "DDIMScheduler", "beta_schedule": "karras"},
     {"clip_sample": False}, r"beta_schedule.*'karras'"),
    (TDMScheduler, diffusers.EDMEulerScheduler().config, {}, r"a EDMEulerScheduler config, whose schedule is not read"),
    (TDMScheduler, {**diffusers.EDMEulerScheduler().config, "_class_name": "EDMEulerScheduler"}, {},
     r"unknown scheduler config key sigma_"),
    (TDMScheduler, {"_class_name": "MyScheduler"}, {}, r"'MyScheduler' is not a diffusers scheduler"),
    (TDMScheduler, {"beta_schedule": "linear", "my_key": 1}, {"total_steps": 900}, r"unknown .* my_key=1"),
    # the VP config given to the flow class, and flow keys that change what the model is fed
    (TDMFlowScheduler, diffusers.DDIMScheduler().config, {}, r"keys of DDIMParallelScheduler / DDIMScheduler\) is a "
     r"VP scheduler \(use TDMScheduler"),
    (TDMFlowScheduler, {"beta_schedule": "linear"}, {"total_steps": 900}, r"beta_schedule.*VP scheduler key"),
    (TDMFlowScheduler, TDMScheduler().config, {}, r"is a VP scheduler config \(TDMScheduler\)"),
    (TDMFlowScheduler, diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config, {}, r"invert_sigmas"),
    (TDMFlowScheduler, diffusers.FlowMatchLCMScheduler().config, {}, r"FlowMatchLCMScheduler.*not read yet"),
    (TDMFlowScheduler, diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction").config, {},
     r"use_flow_sigmas=False is not reproduced"),
    (TDMFlowScheduler, diffusers.UniPCMultistepScheduler(use_flow_sigmas=True).config, {},
     r"prediction_type='epsilon' is not reproduced"),
    (TDMFlowScheduler, diffusers.EulerDiscreteScheduler().config, {}, r"EulerDiscreteScheduler.*VP scheduler"),
    # overrides: only our own settings; the teacher's `shift` is not the student grid's
    (TDMFlowScheduler, FLOW, {"shift": 3.0}, r"shift=3.0 is not a setting.*grid_shift"),
    (TDMScheduler, diffusers.DDIMScheduler().config, {"timestep_spacing": "trailing"}, r"timestep_spacing.*not a"),
    # the grid is the student's: it must be said, and be a grid
    (TDMScheduler, diffusers.DDIMScheduler(clip_sample=False).config, {}, r"total_steps is required"),
    (TDMFlowScheduler, FLOW, {}, r"total_steps is required"),
    (TDMScheduler, {}, {"total_steps": 2000}, r"total_steps must be .* \[2, num_train_timesteps=1000\]"),
    (TDMScheduler, {}, {"total_steps": 1000, "grid_timesteps": [999, 500], "grid_shift": 2.0}, r"grid_shift"),
    (TDMScheduler, {}, {"total_steps": 1000, "grid_timesteps": [500, 999]}, r"strictly descending"),
]


@pytest.mark.parametrize("cls, config, overrides, message", REFUSED,
                         ids=[f"{c.__name__}-{m[:30]}" for c, _, _, m in REFUSED])
def test_refuses_what_it_cannot_reproduce(cls, config, overrides, message):
    total = {} if "total_steps" in overrides or "required" in message else {"total_steps": 1000}
    with pytest.raises(ValueError, match=message):
        cls.from_config(config, **total, **overrides)


def test_irrelevant_keys_are_accepted_and_change_nothing():
    """The base scheduler's own inference grid and solver (spacing, offset, karras sigmas, solver order, the
    teacher's flow shift, dynamic shifting, stochastic sampling) do not move the student's grid or step."""
    ref = TDMScheduler.from_config(diffusers.DDIMScheduler(**SD, clip_sample=False).config, total_steps=900)
    for config in (diffusers.DDIMScheduler(**SD, clip_sample=False, timestep_spacing="leading", steps_offset=1,
                                           set_alpha_to_one=False),
                   diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True, timestep_spacing="trailing"),
                   diffusers.DPMSolverMultistepScheduler(**SD, solver_order=3, algorithm_type="sde-dpmsolver++"),
                   diffusers.UniPCMultistepScheduler(**SD, predict_x0=False, solver_type="bh1")):
        ours = TDMScheduler.from_config(config.config, total_steps=900)
        assert _public(ours.config) == _public(ref.config) and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    flow_ref = TDMFlowScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler().config, total_steps=1000)
    for config in (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                   diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                             shift_terminal=0.02, time_shift_type="linear"),
                   diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, stochastic_sampling=True),
                   diffusers.FlowMatchHeunDiscreteScheduler(shift=2.0)):
        ours = TDMFlowScheduler.from_config(config.config, total_steps=1000)
        assert _public(ours.config) == _public(flow_ref.config)
        assert "use_dynamic_shifting" not in ours.config  # so pipelines do not compute a mu for it
        ours.set_timesteps(4)
        assert ours.timesteps.tolist() == [999.0, 749.0, 499.0, 249.0]


def test_zero_snr_refusals_mirror_the_backbones():
    """An epsilon model on an exactly-zero terminal SNR is refused by tdm's backbones and here alike; Euler's 2**-24
    terminal is accepted by both."""
    from tdm.backbones import SD15Backbone, UnsupportedModel

    for base in (diffusers.DDIMScheduler(**SD, rescale_betas_zero_snr=True, clip_sample=False),
                 diffusers.EulerDiscreteScheduler(**SD, rescale_betas_zero_snr=True)):
        try:
            SD15Backbone.check_schedule(base, "test")
            backbone_ok = True
        except UnsupportedModel:
            backbone_ok = False
        try:
            ours = TDMScheduler.from_config(base.config, total_steps=1000)
            ours_ok = True
        except ValueError:
            ours_ok = False
        assert backbone_ok == ours_ok == isinstance(base, diffusers.EulerDiscreteScheduler)
    assert float(ours.alphas_cumprod[-1]) == 2**-24 and ours.config.terminal_alpha_cumprod == 2**-24


# -- the grid and the diffusers contract ------------------------------------------------------------------------
def test_grid_round_trips_and_is_the_student_grid(tmp_path):
    vp = diffusers.DDIMScheduler(**SD, clip_sample=False).config
    for cls, config in ((TDMScheduler, vp), (TDMFlowScheduler, FLOW)):
        for grid in ({"total_steps": 1000, "grid_shift": 2.0}, {"total_steps": 1000,
                                                                 "grid_timesteps": [999, 856, 665, 399]}):
            scheduler = cls.from_config(config, **grid)
            folder = tmp_path / f"{cls.__name__}{len(grid)}{'grid_shift' in grid}"
            scheduler.save_pretrained(folder)
            again = cls.from_pretrained(folder)
            assert _public(again.config) == _public(scheduler.config)
            student = StudentGrid(1000, grid.get("grid_shift", 1.0), grid.get("grid_timesteps"))
            again.set_timesteps(4)
            assert again.timesteps.tolist() == student.at(4).tolist() == [999, 856, 665, 399]
            assert again.timesteps.dtype == (torch.float32 if cls is TDMFlowScheduler else torch.int64)
            if "grid_timesteps" in grid:
                with pytest.raises(ValueError, match="num_inference_steps.*K = 4 only"):
                    again.set_timesteps(2)
            else:
                again.set_timesteps(2)
                assert again.timesteps.tolist() == student.at(2).tolist()


def test_a_saved_pipeline_reloads_with_the_scheduler(tmp_path):
    """pipe.save_pretrained writes ["tdm.scheduling_tdm", "TDMScheduler"] in model_index.json; diffusers imports it
    back with the same grid."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    import tiny_models

    pipe = tiny_models.build("sd15")
    pipe.scheduler = TDMScheduler.from_config(pipe.scheduler.config, total_steps=900, grid_shift=2.0)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["tdm.scheduling_tdm",
                                                                                   "TDMScheduler"]
    again = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, feature_extractor=None,
                                                              requires_safety_checker=False)
    assert type(again.scheduler) is TDMScheduler and _public(again.scheduler.config) == _public(pipe.scheduler.config)


def test_set_timesteps_takes_pipeline_kwargs_only_when_harmless():
    vp = TDMScheduler.from_config(diffusers.DDIMScheduler(**SD, clip_sample=False).config, total_steps=900)
    vp.set_timesteps(timesteps=[899, 674, 449, 224], device="cpu")  # the student's grid: accepted
    assert vp.num_inference_steps == 4 and vp.timesteps.tolist() == [899, 674, 449, 224]
    with pytest.raises(ValueError, match=r"timesteps \[999, 500\] are not the student's 2-step grid \[899, 449\]"):
        vp.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="sigmas are not taken"):
        vp.set_timesteps(sigmas=[14.6, 1.0])
    with pytest.raises(ValueError, match="needs num_inference_steps"):
        vp.set_timesteps()
    with pytest.raises(ValueError, match="num_inference_steps.*total_steps"):
        vp.set_timesteps(901)
    flow = TDMFlowScheduler.from_config(FLOW, total_steps=1000)
    flow.set_timesteps(sigmas=[0.999, 0.499])  # what StableDiffusion3Pipeline(sigmas=...) passes: the grid
    assert flow.timesteps.tolist() == [999.0, 499.0]
    torch.testing.assert_close(flow.sigmas, torch.tensor([0.999, 0.499, 0.0]))
    with pytest.raises(ValueError, match="sigmas .* are not the student's"):
        flow.set_timesteps(sigmas=[0.9, 0.5])
    # What FluxPipeline always passes: its default sigmas linspace(1, 1/K, K) and a resolution mu ask for nothing.
    flow.set_timesteps(sigmas=[1.0, 0.5], mu=0.7)
    assert flow.timesteps.tolist() == [999.0, 499.0]
    flow.set_timesteps(4, mu=1.15)
    assert flow.timesteps.tolist() == [999.0, 749.0, 499.0, 249.0]
    with pytest.raises(ValueError, match="mu=0.7"):  # a VP student's grid has no resolution shift to ignore
        vp.set_timesteps(2, mu=0.7)


def test_step_contract():
    vp = TDMScheduler.from_config(diffusers.DDIMScheduler(**SD, clip_sample=False).config, total_steps=900)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="set_timesteps"):
        vp.step(x, 899, x)
    vp.set_timesteps(2)
    with pytest.raises(ValueError, match="not on the student grid"):
        vp.step(x, 500, x)
    with pytest.raises(ValueError, match="not on the student grid"):
        vp.step(x, torch.tensor(899.5), x)
    with pytest.raises(ValueError, match=r"model_output \(2, 8, 8, 8\).*learned-variance"):
        vp.step(torch.cat([x, x], 1), 899, x)
    with pytest.raises(ValueError, match="eta=0.5"):
        vp.step(x, 899, x, eta=0.5)
    ref = vp.step(x, 899, x).prev_sample
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # the sample's dtype is kept
        out = vp.step(x.to(dtype), torch.tensor(899), x.to(dtype))
        assert out.prev_sample.dtype == out.pred_original_sample.dtype == dtype
        torch.testing.assert_close(out.prev_sample.float(), ref, atol=0.05, rtol=0.02)
    prev, x0 = vp.step(x, 449, x, return_dict=False)  # the last step returns x0
    assert torch.equal(prev, x0)
    assert vp.scale_model_input(x, 899) is x and vp.order == 1 and vp.init_noise_sigma == 1.0 and len(vp) == 1000


def test_add_noise_is_the_schedules_forward_process():
    ddpm = diffusers.DDPMScheduler(**SD)
    vp = TDMScheduler.from_config(ddpm.config, total_steps=1000, clip_sample=True)  # (clipping: a step matter)
    x0, n = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 10])
    torch.testing.assert_close(vp.add_noise(x0, n, t), ddpm.add_noise(x0, n, t))
    flow = TDMFlowScheduler.from_config(FLOW, total_steps=1000)
    s = torch.tensor([0.75, 0.25]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(flow.add_noise(x0, n, torch.tensor([750.0, 250.0])), (1 - s) * x0 + s * n)
    assert flow.add_noise(x0.half(), n.half(), torch.tensor(500.0)).dtype == torch.float16


def test_from_student_picks_the_family_scheduler(tmp_path):
    ddim = diffusers.DDIMScheduler(**SD).config  # clip_sample=True (DDIM's default): from_student decides by family
    sd15 = from_student(StudentRecord(family="sd15", k=4, total_steps=900, shift=2.0), ddim)
    assert type(sd15) is TDMScheduler and sd15.config.grid_shift == 2.0 and not sd15.config.clip_sample
    ddpm = diffusers.DDPMScheduler(**SD)  # DDPM clips by default; the SD1.5 sampler does not
    assert ddpm.config.clip_sample and not from_student(StudentRecord("sd15", 4, 900), ddpm.config).config.clip_sample
    sd3 = from_student(StudentRecord(family="sd3", k=2, total_steps=1000, explicit_timesteps=(999, 499)), FLOW)
    assert type(sd3) is TDMFlowScheduler and sd3.config.grid_timesteps == [999, 499]
    with pytest.raises(ValueError, match="VP scheduler"):
        from_student(StudentRecord(family="sd3", k=2, total_steps=1000), ddim)
    with pytest.raises(ValueError, match="flow-matching"):
        from_student(StudentRecord(family="sdxl", k=2, total_steps=1000), FLOW)
    with pytest.raises(ValueError, match="prediction_type 'v_prediction' is not the pixart_alpha family's"):
        from_student(StudentRecord(family="pixart_alpha", k=2, total_steps=1000),
                     diffusers.DDIMScheduler(prediction_type="v_prediction").config)
    unify = StudentRecord(family="sd15", k=4, total_steps=900, unify=True, k_choices=(1, 2, 4))
    with pytest.raises(ValueError, match="TDM-unify.*K embedding"):
        from_student(unify, ddim)
    assert from_student(unify, ddim, k_embedding_handled=True).config.total_steps == 900
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "tdm_student.json").write_text(StudentRecord(family="sd15", k=4, total_steps=800).to_json())
    assert from_student(folder, ddim).config.total_steps == 800  # a student folder works too


def test_solver_order_is_the_students_and_round_trips(tmp_path):
    """solver_order (1 DDIM, 2 DPM-Solver++(2M)) is a student key: saved and reloaded, set by from_student from the
    record, never read from a base scheduler's config (a DPM-Solver config's solver_order is the teacher's)."""
    dpm = diffusers.DPMSolverMultistepScheduler(**SD, solver_order=3).config
    assert TDMScheduler.from_config(dpm, total_steps=900).config.solver_order == 1
    two = TDMScheduler.from_config(dpm, total_steps=900, solver_order=2)
    two.save_pretrained(tmp_path / "vp")
    assert TDMScheduler.from_pretrained(tmp_path / "vp").config.solver_order == 2
    flow = TDMFlowScheduler.from_config(FLOW, total_steps=1000, solver_order=2)
    flow.save_pretrained(tmp_path / "flow")
    assert TDMFlowScheduler.from_pretrained(tmp_path / "flow").config.solver_order == 2
    record = StudentRecord(family="sd15", k=4, total_steps=900, solver_order=2)
    assert from_student(record, dpm).config.solver_order == 2
    assert from_student(record, dpm, solver_order=1).config.solver_order == 1
    for bad in (0, 3, True, "2"):
        with pytest.raises(ValueError, match="solver_order: must be 1"):
            TDMScheduler.from_config(dpm, total_steps=900, solver_order=bad)


def test_second_order_steps_must_follow_the_grid():
    """DPM-Solver++(2M) needs the previous step's x0: a step taken out of grid order is refused, a restart at the
    first grid point starts afresh (and gives the same result), set_timesteps resets."""
    vp = TDMScheduler.from_config(diffusers.DDIMScheduler(**SD, clip_sample=False).config, total_steps=900,
                                  solver_order=2)
    vp.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run():
        y = x
        for t in vp.timesteps:
            y = vp.step(0.5 * y, t, y).prev_sample
        return y

    first = run()
    assert torch.equal(run(), first)  # restarting at t_0 needs no set_timesteps
    vp.set_timesteps(4)
    vp.step(0.5 * x, 899, x)
    with pytest.raises(ValueError, match="did not follow the step at 674"):
        vp.step(0.5 * x, 449, x)


def test_wan_unipc_flow_config_is_read_as_the_flow_schedule():
    """Wan's hub scheduler: UniPCMultistepScheduler in flow mode (flow_shift 3 for 480p); t = 1000 s, alpha = 1 - s,
    sigma = s, velocity output: the flow student's schedule. Its sampler keys and unused VP half are not kept."""
    wan = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                            solver_order=2).config
    flow = TDMFlowScheduler.from_config(wan, total_steps=1000, grid_shift=3.0)
    assert flow.config.grid_shift == 3.0 and flow.config.solver_order == 1 and flow.config.num_train_timesteps == 1000
    with pytest.raises(ValueError, match="thresholding=True is not reproduced"):
        TDMFlowScheduler.from_config({**wan, "thresholding": True}, total_steps=1000)
    with pytest.raises(ValueError, match="use_flow_sigmas=True is not reproduced"):  # and the VP class refuses it
        TDMScheduler.from_config(wan, total_steps=1000)
    flow.set_begin_index(0)
    with pytest.raises(ValueError, match="begin_index"):
        flow.set_begin_index(2)
