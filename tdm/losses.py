"""The two TDM losses, as pure functions of tensors (no models in here).

Fake score: x0-space denoising score matching toward the student's own prediction, at points diffused from
the student's trajectory, weighted by min(SNR(tau), clamp) and the importance weight
exp(-mean(m^2)/2) / exp(-mean(n^2)/2), where m is the effective noise of x_tau relative to the student's x0
and n the fresh noise (the authors' `obtain_mixed_noise`).

Generator: regress the student's x0 toward x0 + (teacher_cfg_x0 - fake_x0), normalised per sample by
mean |x0 - teacher_cfg_x0|, under pseudo-Huber or L2. Its gradient is the TDM score difference, pushed
through one student step.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

Metric = Literal["huber", "huber_sample", "l2"]

# The paper's pseudo-Huber constant for a whole sample: c = 0.00054 sqrt(d) (from iCT).
PAPER_HUBER_C_PER_SQRT_DIM = 0.00054


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def importance_weight(effective_eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """exp(-mean(m^2)/2) / exp(-mean(n^2)/2) per sample, computed as one exp of the difference (stable)."""
    return torch.exp(-0.5 * (_per_sample_mean(effective_eps.float() ** 2) - _per_sample_mean(noise.float() ** 2)))


def fake_score_loss(fake_x0: torch.Tensor, student_x0: torch.Tensor, snr_tau: torch.Tensor,
                    is_weight: torch.Tensor, snr_clamp: float = 5.0) -> torch.Tensor:
    """Weighted x0-space DSM: mean over the batch of mse(fake_x0, student_x0) * min(SNR, clamp) * IS weight."""
    mse = _per_sample_mean((fake_x0.float() - student_x0.float()) ** 2)
    weight = snr_tau.float().clamp(max=snr_clamp) * is_weight.float()
    return (mse * weight.detach()).mean()


def generator_target(student_x0: torch.Tensor, teacher_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """x0 + (teacher_cfg_x0 - fake_x0), detached: the point the student's x0 is pulled toward."""
    return (student_x0 + (teacher_x0 - fake_x0)).detach()


def generator_normaliser(student_x0: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """mean |x0 - teacher_cfg_x0| per sample (detached), shaped to broadcast: DMD's scale-free weighting."""
    w = (student_x0.double() - teacher_x0.double()).abs().flatten(1).mean(1).detach()
    return w.reshape(-1, *([1] * (student_x0.ndim - 1)))


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float, per_sample: bool) -> torch.Tensor:
    """sqrt(d^2 + c^2) - c: per element (then averaged), or on each sample's whole L2 distance."""
    diff = x.float() - y.float()
    if per_sample:
        return torch.sqrt(diff.flatten(1).pow(2).sum(1) + c * c) - c
    return torch.sqrt(diff.pow(2) + c * c) - c


def generator_loss(student_x0: torch.Tensor, teacher_x0: torch.Tensor, fake_x0: torch.Tensor,
                   metric: Metric = "huber", huber_c: float | None = None) -> torch.Tensor:
    """The TDM generator loss (gradient flows into `student_x0` only).

    metric "huber": per-element pseudo-Huber with c = huber_c (default 1e-3), as the authors' code;
    "huber_sample": the paper's per-sample form with c = huber_c or 0.00054 sqrt(d); "l2": squared error.
    Each sample's loss is divided by mean |x0 - teacher_cfg_x0|.
    """
    target = generator_target(student_x0, teacher_x0, fake_x0)
    norm = generator_normaliser(student_x0, teacher_x0).float()
    if metric == "huber":
        per = pseudo_huber(student_x0, target, 1e-3 if huber_c is None else huber_c, per_sample=False)
        return (per / norm).mean()
    if metric == "huber_sample":
        d = student_x0[0].numel()
        c = PAPER_HUBER_C_PER_SQRT_DIM * math.sqrt(d) if huber_c is None else huber_c
        return (pseudo_huber(student_x0, target, c, per_sample=True) / norm.flatten()).mean()
    if metric == "l2":
        return ((student_x0.float() - target.float()) ** 2 / norm).mean()
    raise ValueError(f"distill.metric must be 'huber', 'huber_sample' or 'l2', got {metric!r}")
