"""Teacher-trajectory regression: DMD's data-free regression loss, generalised to the student's K-step grid.

DMD (Yin et al., CVPR 2024, sec. 3.3) adds to distribution matching a regression of the one-step generator's
output onto the teacher's deterministic ODE solution from the same noise, over a fixed set of (noise, image)
pairs made by the teacher itself (no data), to hold off the mode-seeking collapse of the reverse-KL gradient.
Here the teacher's DDIM trajectory starts where the student's does (pure noise at t_0 = grid[0]) and is solved
on a refinement of the student's grid, so it passes through every student grid point t_i: the student's x0
prediction at the teacher's x_{t_i} is pulled toward the teacher's endpoint (K = 1: exactly DMD's pairs). The
gradient goes through one student step, as TDM's generator loss does.

DMD measures the distance with LPIPS (VGG weights, image space); ours is squared error in the denoiser's space
divided per sample by its mean absolute error (detached), the scale-free weighting of the TDM generator loss
(`tdm.losses.generator_normaliser`), so `distill.regression_weight` is comparable across families and
resolutions. Our choice, not DMD's: LPIPS does not apply to latents or videos and needs weights offline runs
lack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tdm.backbones.base import Backbone
from tdm.sampler import clip_prediction, guided_x0_eps


@dataclass
class TeacherPairs:
    """Teacher DDIM trajectories from the student's starting noise, kept at the student's grid points."""

    points: torch.Tensor  # (K, n, *sample_shape) the teacher's x at each student grid point; points[0] = the noise
    x0: torch.Tensor  # (n, *sample_shape) the teacher's endpoint from that noise
    prompt_idx: torch.Tensor  # (n,) int64 index into the prompt list each pair was made for


def refined_grid(grid: Sequence[int], t_clean: int, substeps: int) -> list[int]:
    """The student's grid (descending, K entries) with every interval, down to `t_clean`, split into `substeps`
    (near-)equal integer DDIM steps; repeated timesteps are dropped. Every student grid point stays in it."""
    ends = [int(t) for t in grid] + [int(t_clean)]
    out = [ends[0]]
    for hi, lo in zip(ends[:-1], ends[1:]):
        for j in range(1, substeps + 1):
            t = round(hi - (hi - lo) * j / substeps)
            if t < out[-1]:
                out.append(t)
    return out


@torch.no_grad()
def teacher_trajectories(backbone: Backbone, net: torch.nn.Module, cond, noise: torch.Tensor,
                         grid: Sequence[int], substeps: int, guidance: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of teacher trajectories: DDIM (eta = 0) with CFG from `noise` at t = grid[0] over
    `refined_grid(grid, t_clean, substeps)`, with clipping as `tdm.sampler.teacher_sample`. `guidance[i]` is the
    CFG scale on the segment from grid[i] to the next grid point (a per-step `distill.guidance_schedule`).
    Returns (points (K, B, ...), x0 (B, ...))."""
    schedule = backbone.schedule
    t_clean = int(schedule.t_clean)
    fine = refined_grid(grid, t_clean, substeps)
    marks = {int(t): i for i, t in enumerate(grid)}
    x, points, segment = noise, [], 0
    for t, t_next in zip(fine[:-1], fine[1:]):
        if t in marks:
            segment = marks[t]
            points.append(x)
        tt = torch.full((x.shape[0],), t, device=x.device)
        x0, eps = clip_prediction(backbone, x, tt, *guided_x0_eps(backbone, net, x, tt, cond, guidance[segment]))
        x = schedule.ddim_step(x0, eps, t_next) if t_next != t_clean else x0
    return torch.stack(points), x


def make_teacher_pairs(backbone: Backbone, net: torch.nn.Module, prompts: Sequence[str], grid: Sequence[int], *,
                       n: int, substeps: int, guidance: Sequence[float], seed: int, batch_size: int,
                       device: torch.device | str, progress=None) -> TeacherPairs:
    """`n` teacher pairs over `prompts` (drawn uniformly from a generator seeded with `seed`, noise likewise),
    `batch_size` trajectories per teacher batch; `progress(done, total)` after each. Deterministic in `seed`:
    a resumed run rebuilds the same pairs. Raises ValueError for n < 1 or a guidance list not one per step."""
    if n < 1 or substeps < 1:
        raise ValueError(f"teacher pairs: n ({n}) and substeps ({substeps}) must be >= 1")
    if len(guidance) != len(grid):
        raise ValueError(f"teacher pairs: {len(guidance)} guidance scales for a {len(grid)}-step grid")
    g = torch.Generator().manual_seed(seed)
    prompt_idx = torch.randint(len(prompts), (n,), generator=g)
    noise = torch.randn((n, *backbone.sample_shape), generator=g)
    points, x0s = [], []
    starts = range(0, n, batch_size)
    for done, start in enumerate(starts, 1):
        idx = prompt_idx[start:start + batch_size]
        cond = backbone.encode_prompts([prompts[i] for i in idx])
        p, x0 = teacher_trajectories(backbone, net, cond, noise[start:start + batch_size].to(device), grid, substeps,
                                     guidance)
        points.append(p.cpu()), x0s.append(x0.cpu())
        if progress is not None:
            progress(done, len(starts))
    return TeacherPairs(torch.cat(points, 1), torch.cat(x0s), prompt_idx)


def regression_loss(student_x0: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """mean over the batch of mse(student_x0, teacher_x0) / mean |student_x0 - teacher_x0| (per sample,
    detached): gradient flows into `student_x0` only. Shapes (B, ...), any float dtype; a float32 scalar."""
    diff = student_x0.float() - teacher_x0.float()
    mse = diff.pow(2).flatten(1).mean(1)
    norm = diff.detach().abs().flatten(1).mean(1).clamp(min=1e-8)
    return (mse / norm).mean()


__all__ = ["TeacherPairs", "refined_grid", "teacher_trajectories", "make_teacher_pairs", "regression_loss"]
