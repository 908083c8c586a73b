"""The TDM student's trajectory as a diffusers scheduler, so a stock pipeline runs the student:

    pipe.scheduler = TDMScheduler.from_config(pipe.scheduler.config, total_steps=900)
    pipe(prompt, num_inference_steps=4, guidance_scale=1.0)   # CFG is baked into the student

It takes the same steps as `tdm.sampler.student_sample`, with the same arithmetic (the shared `VPSchedule`):
timesteps `student_timesteps(K, total_steps)` (e.g. 899, 674, 449, 224), at each one the model output becomes
(x0, eps), x0 is optionally clipped (pixel-space models) with eps re-derived, and DDIM moves to the next grid
point; the last step returns x0. Given the same starting noise the images are identical to our own sampler's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from tdm.schedule import VPSchedule, student_timesteps


@dataclass
class TDMSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor  # the next trajectory point (x0 after the last step)
    pred_original_sample: torch.Tensor  # the student's x0 at this step


def _betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
           trained_betas, rescale_betas_zero_snr: bool) -> torch.Tensor:
    """Betas exactly as diffusers' DDPM / DDIM schedulers build them (float32), so alphas_cumprod match."""
    from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar, rescale_zero_terminal_snr

    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    else:
        raise ValueError(f"TDMScheduler: unknown beta_schedule {beta_schedule!r} "
                         "(expected linear, scaled_linear or squaredcos_cap_v2)")
    return rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


class TDMScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic K-step TDM student sampling over a `total_steps`-long trajectory (VP schedules)."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["LCMScheduler", "TCDScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 clip_sample: bool = False, clip_sample_range: float = 1.0, rescale_betas_zero_snr: bool = False,
                 total_steps: int = 900):
        if not 2 <= total_steps <= num_train_timesteps:
            raise ValueError(f"TDMScheduler: total_steps must be in [2, num_train_timesteps={num_train_timesteps}], "
                             f"got {total_steps}")
        self.betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:  # zero terminal SNR: keep the last alpha off exact zero (as diffusers does)
            self.alphas_cumprod[-1] = 2**-24
        self.schedule = VPSchedule(self.alphas_cumprod)
        self.schedule._check_prediction_type(prediction_type)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = student_timesteps(1, total_steps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The student's K-step grid (K = num_inference_steps) over its trajectory of `total_steps`."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = student_timesteps(num_inference_steps, self.config.total_steps).to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> TDMSchedulerOutput | tuple:
        """One student step: (x0, eps) from the model output, clip x0 if configured, DDIM to the next grid point.
        Deterministic: `generator` is accepted for pipeline compatibility and unused."""
        if self.num_inference_steps is None:
            raise ValueError("TDMScheduler: call set_timesteps(num_inference_steps) before step()")
        t = int(timestep)
        grid = self.timesteps.tolist()
        if t not in grid:
            raise ValueError(f"TDMScheduler: timestep {t} is not on the student grid {grid}")
        i = grid.index(t)
        tt = torch.full((sample.shape[0],), t, device=sample.device)
        x0, eps = self.schedule.to_x0_eps(model_output, sample, tt, self.config.prediction_type)
        if self.config.clip_sample:  # as tdm.sampler.clip_prediction
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
            alpha, sigma = self.schedule.coefficients(tt, sample)
            eps = (sample - alpha * x0) / sigma
        prev = self.schedule.ddim_step(x0, eps, grid[i + 1]) if i + 1 < len(grid) else x0
        if not return_dict:
            return prev, x0
        return TDMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t = timesteps.reshape(-1).expand(original_samples.shape[0]) if timesteps.numel() == 1 else timesteps
        return self.schedule.add_noise(original_samples, noise, t.to(original_samples.device))

    def __len__(self) -> int:
        return self.config.num_train_timesteps


__all__ = ["TDMScheduler", "TDMSchedulerOutput"]
