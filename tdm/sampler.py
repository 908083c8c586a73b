"""Samplers: the teacher's DDIM with classifier-free guidance, and the TDM student's K-step trajectory.

Both are deterministic given the starting noise, batched, and written once against the schedule view, so
they serve epsilon, v and flow models alike.

The student trajectory (the authors' `generate_new`): start from pure noise at t_0 = total_steps - 1, predict
(x0, eps) with the student, move to the next grid point with DDIM, x_{t_{i+1}} = alpha x0 + sigma eps, and
return the last x0. The grid comes from the student's record (`tdm.schedule.StudentGrid`), e.g. 899, 674, 449,
224 for K=4 of 900. DPM-Solver++(2M) over the same grid is an option (`solver_order=2`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tdm.backbones.base import Backbone, Cond, cat_cond
from tdm.schedule import ddim_timesteps


def guided_x0_eps(backbone: Backbone, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                  guidance: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) with classifier-free guidance; cond and uncond go through `net` as one batch. `guidance`: one
    scale, or one per sample (a (B,) tensor: `distill.guidance_schedule` gives each trajectory step its own)."""
    per_sample = torch.is_tensor(guidance)
    if (bool((guidance == 1).all()) if per_sample else guidance == 1.0):
        return backbone.predict_x0_eps(net, x_t, t, cond)
    n = x_t.shape[0]
    both = backbone.predict(net, torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond([cond, backbone.null_cond(n)]))
    out_c, out_u = both.chunk(2)
    if per_sample:
        guidance = guidance.to(out_c.device, torch.float32).view(n, *([1] * (out_c.ndim - 1)))
    # Every supported output type is linear in (x0, eps), so guiding the raw output guides both.
    return backbone.schedule.to_x0_eps(out_u + guidance * (out_c - out_u), x_t, t, backbone.prediction_type)


def speed_up_net(net: nn.Module, *, compile: bool = False, channels_last: bool = False) -> nn.Module:
    """Optional speed switches for a denoiser (docs/performance.md); results agree within float tolerance.
    channels_last converts the weights in place (UNets: convolutions in NHWC); compile returns a compiled
    wrapper of `net` (static shapes: one graph per batch size and grad mode), `net` itself stays usable."""
    if channels_last:
        if not type(net).__name__.startswith("UNet"):
            raise ValueError(f"channels_last is for UNet denoisers (digits, sd15, sdxl), not {type(net).__name__}")
        net.to(memory_format=torch.channels_last)
    return torch.compile(net, dynamic=False) if compile else net


def clip_prediction(backbone: Backbone, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
                    eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-space models: clip x0 to the data range and re-derive eps from it (diffusers' `clip_sample`).
    Near t = T the eps -> x0 conversion divides by a tiny alpha; clipping keeps that error from compounding."""
    if backbone.clip_x0 is None:
        return x0, eps
    x0 = x0.clamp(-backbone.clip_x0, backbone.clip_x0)
    alpha, sigma = backbone.schedule.coefficients(t, x_t)
    return x0, (x_t - alpha * x0) / sigma


@torch.no_grad()
def teacher_sample(backbone: Backbone, net: nn.Module, cond: Cond, noise: torch.Tensor, steps: int,
                   guidance: float = 1.0) -> torch.Tensor:
    """DDIM (eta = 0) over `steps` trailing timesteps from `noise`; returns x0 in the denoiser's space."""
    schedule = backbone.schedule
    grid = ddim_timesteps(steps, schedule.num_train_timesteps).tolist() + [schedule.t_clean]
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        tt = torch.full((x.shape[0],), t, device=x.device)
        x0, eps = clip_prediction(backbone, x, tt, *guided_x0_eps(backbone, net, x, tt, cond, guidance))
        x = schedule.ddim_step(x0, eps, t_next) if t_next != schedule.t_clean else x0
    return x


SOLVER_ORDERS = (1, 2)  # 1: DDIM (the trajectory TDM trains), 2: DPM-Solver++(2M) over the same grid


def check_solver_order(solver_order) -> int:
    """`solver_order` as an int in SOLVER_ORDERS; ValueError naming it otherwise."""
    if isinstance(solver_order, bool) or solver_order not in SOLVER_ORDERS:
        raise ValueError(f"solver_order: must be 1 (DDIM, the trajectory the student is trained on) or 2 "
                         f"(DPM-Solver++(2M) over the same grid), got {solver_order!r}")
    return int(solver_order)


@torch.no_grad()
def student_sample(backbone: Backbone, net: nn.Module, cond: Cond, noise: torch.Tensor, timesteps: torch.Tensor,
                   k_embedding: nn.Embedding | None = None, solver_order: int = 1) -> torch.Tensor:
    """The TDM student's deterministic trajectory over its grid `timesteps` (descending, K entries; e.g.
    `StudentRecord.timesteps(K)`) from `noise`; no CFG (it is baked in). A K-aware (TDM-unify) student's
    `k_embedding` is told K = len(timesteps) at every step (`tdm.student.k_conditioning`).

    `solver_order` 1 moves between grid points with DDIM (the trajectory TDM trains, the authors'
    `generate_new`); 2 with DPM-Solver++(2M) (`NoiseSchedule.solver_step`; its first step is DDIM, so K <= 2
    samples identically). The same K network evaluations either way; the last step returns x0."""
    from tdm.student import k_conditioning

    if isinstance(timesteps, int):
        raise TypeError("student_sample takes the student's grid, not K and total_steps: pass "
                        "tdm.schedule.StudentGrid(total_steps).at(k) (or StudentRecord.timesteps(k))")
    check_solver_order(solver_order)
    schedule = backbone.schedule
    grid = [int(t) for t in timesteps]
    k_cond = torch.full((noise.shape[0],), len(grid), device=noise.device) if k_embedding is not None else None
    x, previous = noise, None
    with k_conditioning(backbone, net, k_embedding, k_cond):
        for i, t in enumerate(grid):
            tt = torch.full((x.shape[0],), t, device=x.device)
            x0, eps = clip_prediction(backbone, x, tt, *backbone.predict_x0_eps(net, x, tt, cond))
            if i + 1 == len(grid):
                return x0
            x = schedule.solver_step(x, x0, eps, tt, grid[i + 1], previous)
            previous = (t, x0) if solver_order == 2 else None
    return x


def make_noise(n: int, shape: Sequence[int], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """All starting noise drawn at once from one seeded generator, so samples do not depend on batch size."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g).to(device)


@torch.no_grad()
def _sample_prompts(backbone: Backbone, prompts: Sequence[str], seed: int, batch_size: int, desc: str,
                    progress: bool, run_batch) -> torch.Tensor:
    """One image per prompt, batch by batch: `run_batch(cond, noise) -> x0`; uint8 (N, H, W, C). A tqdm bar
    with `progress`, else plain lines every TDM_PROGRESS_EVERY seconds when that is set (consoles without
    bars: `-q` under DVC and the Prefect flow; `tdm.training.ProgressLines`)."""
    from tdm.training import ProgressLines

    noise = make_noise(len(prompts), backbone.sample_shape, seed, backbone.device)
    out = []
    starts = range(0, len(prompts), batch_size)
    lines = None if progress else ProgressLines(desc, "batch", len(starts))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for i, start in enumerate(starts):
        batch = list(prompts[start:start + batch_size])
        out.append(backbone.decode(run_batch(backbone.encode_prompts(batch), noise[start:start + len(batch)])))
        if lines is not None:
            lines.update(i + 1)
    return torch.cat(out)


def sample_teacher(backbone: Backbone, net: nn.Module, prompts: Sequence[str], *, steps: int, guidance: float = 1.0,
                   seed: int = 0, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Sample `net` with DDIM over `steps` steps and CFG at `guidance`, one image per prompt: uint8 (N, H, W, C)
    (videos (N, F, H, W, C)). The starting noise depends on `seed` only, not on `batch_size`."""
    net.eval()
    return _sample_prompts(backbone, prompts, seed, batch_size, f"sampling {steps} steps", progress,
                           lambda cond, noise: teacher_sample(backbone, net, cond, noise, steps, guidance))


def sample_student(student, prompts: Sequence[str], *, k: int | None = None, seed: int = 0, batch_size: int = 64,
                   progress: bool = False, solver_order: int | None = None) -> torch.Tensor:
    """Sample a `tdm.student.Student` along its K-step trajectory (K = `k`, default the record's; solver order
    default the record's), one image per prompt: uint8 (N, H, W, C). Same noise as `sample_teacher` for the
    same seed and prompts."""
    k = student.record.k if k is None else k
    student.record.check_k(k)
    order = check_solver_order(student.record.solver_order if solver_order is None else solver_order)
    student.net.eval()
    return _sample_prompts(student.backbone, prompts, seed, batch_size,
                           f"student, {k} steps" + (", DPM-Solver++(2M)" if order == 2 else ""), progress,
                           lambda cond, noise: student.sample(cond, noise, k, solver_order=order))


__all__ = ["speed_up_net", "clip_prediction", "guided_x0_eps", "teacher_sample", "student_sample", "make_noise",
           "sample_teacher", "sample_student", "SOLVER_ORDERS", "check_solver_order"]


def __getattr__(name: str):
    """`from tdm.sampler import TDMScheduler` (the documented import before tdm.scheduling_tdm) keeps working."""
    if name in ("TDMScheduler", "TDMFlowScheduler"):
        from tdm import scheduling_tdm

        return getattr(scheduling_tdm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
