"""External students: a published LoRA on a teacher, sampled the way the stock diffusers pipeline samples it.

The authors release their students as LoRAs (docs: /work/shared/notes/recipes.md): SD3-Medium / SD3.5-Medium
applied at adapter weight 0.125 and sampled at 4 steps, guidance 1, with a DPM-Solver multistep scheduler and a
`flow_shift`; Dreamshaper (SD1.5); CogVideoX-2B. To score those next to tdm's own students, an external
student is

    teacher folder + LoRA (diffusers / kohya / peft file or folder, `tdm.lora.load_lora`) at a scale
    + a diffusers scheduler (the teacher's own, a scheduler_config.json, or a diffusers class name + flow_shift)
    + a number of steps and a CFG scale,

and `ExternalStudent.sample` runs the loop of the family's stock pipeline (`StableDiffusionPipeline`,
`StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, `PixArtAlphaPipeline` / `PixArtSigmaPipeline`):
`set_timesteps(steps)` (SD3: with `mu` when the scheduler shifts dynamically), the starting latents times
`init_noise_sigma` (UNet / PixArt pipelines; SD3's pipeline does not scale them), at each timestep
`scale_model_input` (where the pipeline calls it), one denoiser call on [uncond, cond] when guidance > 1, the
guided output `uncond + g (cond - uncond)`, then `scheduler.step`. The LoRA is attached as a live peft adapter
at the scale (`tdm.lora.attach`: per layer scaling = scale * alpha / r, what diffusers' `set_adapters(...,
adapter_weights=[scale])` sets), so the result equals `pipe.load_lora_weights(lora)` + `pipe.set_adapters(
[name], [scale])` + `pipe(prompt, num_inference_steps=steps, guidance_scale=g, latents=noise)` (tested per
family in tests/unit/test_external_lora.py). Digits (no stock pipeline) runs the same UNet loop.

Families whose stock loop differs more (CogVideoX's dynamic CFG and frame layout, FLUX's packed latents and
guidance embedding, Wan's negative prompt) are refused by name rather than sampled approximately.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

# Families whose stock pipeline loop `ExternalStudent.sample` reproduces exactly.
FAMILIES = ("digits", "sd15", "sdxl", "sd3", "pixart_alpha", "pixart_sigma")
# Their pipelines' `prepare_latents` multiply given latents by `init_noise_sigma`, and their loops call
# `scale_model_input`; SD3's does neither (its schedulers are flow schedulers, where both are the identity).
_SCALES_LATENTS = {"digits", "sd15", "sdxl", "pixart_alpha", "pixart_sigma"}
FLOW_SCHEDULER_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "TDMFlowScheduler")


def _is_flow(scheduler) -> bool:
    """A flow-matching scheduler: the flow-match classes, or a multistep solver in its flow mode
    (`use_flow_sigmas` + `prediction_type: flow_prediction`, as DPM-Solver / UniPC / DEIS carry it)."""
    config = scheduler.config
    return (type(scheduler).__name__ in FLOW_SCHEDULER_CLASSES
            or (bool(config.get("use_flow_sigmas", False)) and config.get("prediction_type") == "flow_prediction"))


def _read_scheduler_config(path: Path) -> dict:
    from tdm.backbones import read_json_file

    if path.is_dir():
        for candidate in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise FileNotFoundError(f"{path}: no scheduler_config.json (or scheduler/scheduler_config.json) in it")
    config = read_json_file(path, "a scheduler config")
    if "_class_name" not in config:
        raise ValueError(f"{path}: no _class_name (not a diffusers scheduler config)")
    return config


def _scheduler_class(name: str, where: str):
    import diffusers
    from diffusers import SchedulerMixin

    from tdm import scheduling_tdm

    cls = getattr(diffusers, str(name), None) or getattr(scheduling_tdm, str(name), None)
    if not (inspect.isclass(cls) and issubclass(cls, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise ValueError(f"{where}: {name!r} is not a diffusers scheduler class (e.g. {', '.join(known[:6])}, ...)")
    return cls


def build_scheduler(teacher_config: dict, spec: str | Path | None = None, flow_shift: float | None = None):
    """The diffusers scheduler an external student samples with, from config files only (no weights).

    `spec` None: the teacher's own scheduler (`teacher_config`, its scheduler_config.json). A path (a
    scheduler_config.json, or a folder holding one or `scheduler/scheduler_config.json`): that config, its
    `_class_name`. A diffusers class name (e.g. "DPMSolverMultistepScheduler"): that class `from_config` of the
    teacher's config, as `Class.from_config(pipe.scheduler.config)` builds it; on a flow-matching teacher a class
    with a flow mode is put in it (`use_flow_sigmas: true`, `prediction_type: flow_prediction`, `flow_shift` =
    the teacher's `shift` unless given), which is how the SD3 TDM releases are sampled.

    `flow_shift` sets the shift of the timestep warp sigma' = s sigma / (1 + (s - 1) sigma) (diffusers'
    convention): the config key `flow_shift` (DPM-Solver / UniPC flow mode) or `shift` (FlowMatchEuler).

    ValueError (naming `spec` or `flow_shift`) when the scheduler cannot sample this teacher: a VP scheduler on a
    flow-matching teacher or the reverse, another prediction type or another noise schedule (alphas_cumprod)
    than the teacher's, a flow shift on a scheduler with none, an unknown class."""
    where = "scheduler" if spec is None else str(spec)
    teacher_cls = _scheduler_class(teacher_config.get("_class_name"), "the teacher's scheduler_config.json")
    teacher = teacher_cls.from_config(teacher_config)
    teacher_flow = _is_flow(teacher)
    if spec is None:
        cls, config, overrides = teacher_cls, dict(teacher_config), {}
    elif Path(str(spec)).expanduser().exists() or str(spec).endswith(".json"):
        path = Path(str(spec)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{spec}: not found")
        config = _read_scheduler_config(path)
        cls, overrides = _scheduler_class(config["_class_name"], str(path)), {}
    else:
        cls, config = _scheduler_class(str(spec), "scheduler"), dict(teacher_config)
        accepted = set(inspect.signature(cls.__init__).parameters)
        overrides = {}
        if teacher_flow and cls.__name__ not in FLOW_SCHEDULER_CLASSES and "use_flow_sigmas" in accepted:
            overrides = {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                         "flow_shift": float(teacher_config.get("shift", 1.0))}
    if flow_shift is not None:
        if not (math.isfinite(flow_shift) and flow_shift > 0):
            raise ValueError(f"flow_shift: must be a finite number > 0, got {flow_shift}")
        accepted = set(inspect.signature(cls.__init__).parameters)
        key = "flow_shift" if "flow_shift" in accepted else "shift" if "shift" in accepted else None
        if key is None:
            raise ValueError(f"flow_shift: {cls.__name__} has no flow shift (flow_shift / shift)")
        if config.get("use_dynamic_shifting") and key == "shift":
            raise ValueError(f"flow_shift: {cls.__name__} shifts dynamically (use_dynamic_shifting: true); a fixed "
                             f"shift would be ignored")
        overrides[key] = float(flow_shift)
    scheduler = cls.from_config(config, **overrides)
    flow = _is_flow(scheduler)
    if flow != teacher_flow:
        kind = lambda f: "a flow-matching" if f else "a VP (alphas_cumprod)"  # noqa: E731
        hint = (" (a multistep solver needs use_flow_sigmas: true and prediction_type: flow_prediction)"
                if teacher_flow else "")
        raise ValueError(f"{where}: {cls.__name__} is {kind(flow)} scheduler but the teacher "
                         f"({teacher_cls.__name__}) is {kind(teacher_flow)} model{hint}")
    if flow and flow_shift is not None and key == "flow_shift" and not scheduler.config.get("use_flow_sigmas"):
        raise ValueError(f"flow_shift: {cls.__name__} is not in its flow mode (use_flow_sigmas: false)")
    if not flow:
        ptype, want = scheduler.config.get("prediction_type"), teacher.config.get("prediction_type")
        if ptype != want:
            raise ValueError(f"{where}: prediction_type {ptype!r} but the teacher predicts {want!r}")
        ours, theirs = getattr(scheduler, "alphas_cumprod", None), getattr(teacher, "alphas_cumprod", None)
        if ours is None or theirs is None or ours.shape != theirs.shape or \
                not torch.allclose(ours.double(), theirs.double(), rtol=1e-6, atol=1e-9):
            raise ValueError(f"{where}: its noise schedule (betas / alphas_cumprod) is not the teacher's")
    return scheduler


def _teacher_scheduler_config(model: Path) -> dict:
    from tdm.backbones import read_json_file

    return read_json_file(Path(model) / "scheduler" / "scheduler_config.json", "a scheduler config")


@dataclass
class ExternalStudent:
    """A teacher backbone with a LoRA attached at `lora_scale` (None: the teacher itself), and the diffusers
    `scheduler` it samples with. Built by `load_external`."""

    backbone: object  # tdm.backbones.Backbone
    scheduler: object  # a diffusers SchedulerMixin
    lora: str | None = None
    lora_scale: float = 1.0

    @property
    def family(self) -> str:
        return self.backbone.family

    def to(self, device) -> "ExternalStudent":
        self.backbone.to(device)
        return self

    def set_lora_scale(self, scale: float) -> "ExternalStudent":
        """Change the LoRA's strength in place (as `pipe.set_adapters([name], adapter_weights=[scale])` does);
        ValueError without a LoRA or for a scale that is not a finite number >= 0."""
        from peft.tuners.lora import LoraLayer

        if self.lora is None:
            raise ValueError("lora_scale: this external student has no LoRA")
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"lora_scale: must be a finite number >= 0, got {scale}")
        for layer in self.backbone.net.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale("external", float(scale))
        self.lora_scale = float(scale)
        return self

    def _timesteps(self, scheduler, steps: int, device) -> torch.Tensor:
        kwargs = {}
        if self.family == "sd3" and scheduler.config.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            net = self.backbone.net
            h, w = self.backbone.latent_size
            seq = (h // net.config.patch_size) * (w // net.config.patch_size)
            c = scheduler.config
            kwargs["mu"] = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, device=device, **kwargs)
        return scheduler.timesteps

    @torch.no_grad()
    def sample(self, cond, noise: torch.Tensor, steps: int, guidance: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The stock pipeline's denoising loop from `noise` (B, *sample_shape), float32, in the denoiser's
        space; returns the final latents (B, *sample_shape) as the pipeline's `output_type="latent"` gives them.
        `cond` is `backbone.encode_prompts(prompts)`; CFG (guidance > 1) pairs it with the empty prompt's
        conditioning as the pipeline does. `generator` goes to `scheduler.step` where it takes one (stochastic
        schedulers), as the pipeline passes its own. ValueError for steps < 1 or guidance < 1."""
        from tdm.backbones.base import cat_cond

        if steps < 1:
            raise ValueError(f"steps: must be >= 1, got {steps}")
        if not guidance >= 1:
            raise ValueError(f"guidance: must be >= 1 (1 = no CFG), got {guidance}")
        backbone, net = self.backbone, self.backbone.net
        scheduler = copy.deepcopy(self.scheduler)  # multistep solvers keep state between steps
        timesteps = self._timesteps(scheduler, steps, noise.device)
        scales = self.family in _SCALES_LATENTS
        x = noise * scheduler.init_noise_sigma if scales else noise
        cfg = guidance > 1.0
        if cfg:
            n = x.shape[0]
            cond = cat_cond([backbone.null_cond(n), cond])  # the pipelines' order: [uncond, cond]
        step_params = set(inspect.signature(scheduler.step).parameters)
        extra = {}
        if "eta" in step_params:
            extra["eta"] = 0.0
        if "generator" in step_params:
            extra["generator"] = generator
        for t in timesteps:
            x_in = torch.cat([x, x]) if cfg else x
            if scales:
                x_in = scheduler.scale_model_input(x_in, t)
            out = backbone.predict(net, x_in, t.expand(x_in.shape[0]).to(x_in.device), cond)
            if cfg:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            x = scheduler.step(out, t, x, **extra, return_dict=False)[0]
        return x

    def recipe(self, steps: int, guidance: float) -> dict:
        """What reproduces this sampling in a stock pipeline: LoRA and scale, steps, guidance, scheduler config."""
        return {"lora": self.lora, "lora_scale": self.lora_scale, "steps": steps, "guidance": guidance,
                "scheduler": dict(self.scheduler.config) | {"_class_name": type(self.scheduler).__name__}}


def check_external(model: str | Path, lora: str | Path | None = None, lora_scale: float = 1.0,
                   scheduler: str | Path | None = None, flow_shift: float | None = None):
    """Everything `load_external` reads, checked from files only (no weights loaded): the model folder, its
    family, the LoRA (parsed: layout, keys), the scale and the scheduler. Returns (model folder, LoRA or None,
    scheduler). Errors (FileNotFoundError / ValueError) are prefixed by the argument they concern: `model`,
    `lora`, `lora_scale`, `scheduler`, `flow_shift`."""
    from tdm.backbones import check_model, family_of
    from tdm.lora import load_lora

    try:
        folder = check_model(model)[0]
        family = family_of(folder)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"model: {err}") from None
    if family not in FAMILIES:
        raise ValueError(f"model: the {family} family's stock pipeline loop is not reproduced by tdm's "
                         f"external-student sampler (handled: {', '.join(FAMILIES)})")
    if isinstance(lora_scale, bool) or not (isinstance(lora_scale, (int, float)) and math.isfinite(lora_scale)
                                            and lora_scale >= 0):
        raise ValueError(f"lora_scale: must be a finite number >= 0, got {lora_scale!r}")
    parsed = None
    if lora is not None:
        if not Path(lora).expanduser().exists():
            raise FileNotFoundError(f"lora: not found: {lora}")
        try:
            parsed = load_lora(Path(lora).expanduser())
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"lora: {err}") from None
    where = "scheduler" if scheduler is not None else "model"
    try:
        built = build_scheduler(_teacher_scheduler_config(folder), scheduler, flow_shift)
    except (FileNotFoundError, ValueError) as err:
        text = str(err)
        prefix = "" if text.startswith(("flow_shift:", f"{scheduler}:", "scheduler:")) else f"{where}: "
        raise type(err)(prefix + text) from None
    return folder, parsed, built


def load_external(model: str | Path, lora: str | Path | None = None, lora_scale: float = 1.0,
                  scheduler: str | Path | None = None, flow_shift: float | None = None,
                  device: str | torch.device | None = None,
                  prompt_store: str | Path | None = None) -> ExternalStudent:
    """The teacher in `model` with `lora` attached at `lora_scale` (a live peft adapter: `tdm.lora.attach`) and
    the scheduler `build_scheduler(teacher's config, scheduler, flow_shift)`. Checked before any weight loads
    (`check_external`); a LoRA whose modules are no Linear / Conv2d layer of the model fails naming the module.
    `prompt_store`: a `tdm prompt-store` folder read instead of the text encoders (never built)."""
    from tdm.backbones import load_backbone
    from tdm.lora import attach

    folder, parsed, built = check_external(model, lora, lora_scale, scheduler, flow_shift)
    backbone = load_backbone(folder, prompt_store=prompt_store)
    if parsed is not None:
        try:
            attach(backbone.net, parsed, scale=float(lora_scale), adapter_name="external")
        except ValueError as err:
            raise ValueError(f"lora: {lora}: {err}") from None
    external = ExternalStudent(backbone, built, None if lora is None else str(lora), float(lora_scale))
    return external.to(device) if device is not None else external


def sample_external(model: "str | Path | ExternalStudent", prompts: Sequence[str], *, steps: int = 4,
                    guidance: float = 1.0, lora: str | Path | None = None, lora_scale: float = 1.0,
                    scheduler: str | Path | None = None, flow_shift: float | None = None, seed: int = 0,
                    batch_size: int = 64, progress: bool = False, device: str | torch.device | None = None
                    ) -> torch.Tensor:
    """One image per prompt from an external student (a teacher folder + `lora` at `lora_scale`, or an
    `ExternalStudent` already loaded), sampled by the stock pipeline's loop over `steps` steps at CFG `guidance`:
    uint8 (N, H, W, C). The starting noise is `tdm.sampler.make_noise(N, sample_shape, seed)`, the same as
    `sample_teacher` / `sample_student` draw, so rows of an evaluation share it. What the evaluate stage calls
    for `evaluate.lora` (with `lora_scale`, `lora_steps`, `lora_guidance`)."""
    from tdm.sampler import _sample_prompts

    if isinstance(model, ExternalStudent):
        external = model if device is None else model.to(device)
    else:
        external = load_external(model, lora, lora_scale, scheduler, flow_shift, device)
    if steps < 1 or not guidance >= 1:
        raise ValueError(f"steps must be >= 1 and guidance >= 1, got {steps} and {guidance}")
    external.backbone.net.eval()
    generator = torch.Generator(device=external.backbone.device).manual_seed(seed)
    desc = f"external student, {steps} steps" + (f", LoRA x{external.lora_scale:g}" if external.lora else "")
    return _sample_prompts(external.backbone, prompts, seed, batch_size, desc, progress,
                           lambda cond, noise: external.sample(cond, noise, steps, guidance, generator))


def recipe_json(external: ExternalStudent, steps: int, guidance: float) -> str:
    return json.dumps(external.recipe(steps, guidance), indent=2, default=str)


__all__ = ["FAMILIES", "ExternalStudent", "build_scheduler", "check_external", "load_external", "sample_external"]
