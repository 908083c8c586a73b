"""The distill stage: the TDM iteration (data-free: it reads prompts only), run by `tdm.training.run_loop`.

One iteration (docs/design.md, "The TDM iteration"):
  1. roll the student out along its K-step grid without grad, keeping its inputs and (x0, eps) at every
     grid point, only as deep as the deepest step any sample drew;
  2. fake-score step: per sample a step i, t_mid (the next grid point, or random below it) and tau in
     (t_mid, t_i] ("separate") or [t_mid, total_steps) ("shared"); diffuse the student's next trajectory
     point to tau; DSM toward the student's x0, weighted by min(SNR, 5) x the importance weight;
  3. generator step (fresh draws): teacher CFG x0 (cond + uncond in one forward) and fake x0 at x_tau;
     one student forward with grad at its stored input; pseudo-Huber toward x0 + (teacher - fake).
Every random draw of step s comes from a generator seeded by (seed, s, process): resume is exact.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from tdm.artifacts import atomic_folder, save_samples, write_json
from tdm.backbones import Backbone, load_backbone
from tdm.backbones.base import Cond
from tdm.config import Config, StagePaths, dump
from tdm.data import digit_prompt_set, read_prompts
from tdm.ema import EMA
from tdm.losses import fake_score_loss, generator_loss, importance_weight
from tdm.roles import Roles
from tdm.schedule import StudentGrid
from tdm.student import StudentRecord, load_student
from tdm.regression import regression_loss
from tdm.training import (LoopSettings, ProgressLines, average_gradients, fingerprint, lr_factor, run_loop,
                          step_generator)

STAGE = "distill"


# -- draws ----------------------------------------------------------------------------------------------------
@dataclass
class LossPoints:
    """Where on the trajectory one loss is taken, per sample (all (B,) int64): the student's grid index i, its
    input time t_i, the time t_mid the student's step lands at, and the noise level tau in (t_mid, t_i]."""

    step: torch.Tensor  # i, an index into the grid
    t_in: torch.Tensor  # t_i = grid[i]
    t_mid: torch.Tensor  # grid[i + 1] (t_clean after the last step), or random below t_i (distill.random_mid)
    tau: torch.Tensor  # where the fake score and the teacher are queried


def draw_points(grid: torch.Tensor, t_clean: int, n: int, cfg, g: torch.Generator) -> LossPoints:
    """Vectorised draws of (i, t_i, t_mid, tau) for `n` samples (the authors' intervals and margins)."""
    d = cfg.distill
    k = len(grid)
    step = torch.randint(k, (n,), generator=g)
    t_in = grid[step]
    following = torch.cat([grid[1:], torch.tensor([t_clean])])
    t_mid = following[step]
    if d.random_mid:  # t_mid uniform in [t_{i+1}, t_i - 20) when that interval is not empty
        lo, hi = t_mid.clamp(min=0), t_in - 20
        t_mid = torch.where(hi > lo, lo + (torch.rand(n, generator=g) * (hi - lo)).long(), t_mid)
    lo = torch.maximum(t_mid, torch.tensor(d.tau_min))
    hi = (t_in if d.interval == "separate" else torch.full_like(t_in, d.total_steps)) - d.tau_gap
    hi = torch.maximum(hi, lo + 1)
    tau = lo + (torch.rand(n, generator=g) * (hi - lo)).long()
    return LossPoints(step, t_in, t_mid, tau)


# -- the iteration --------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    inputs: torch.Tensor  # (depth, B, ...) the student's input at each grid point
    x0: torch.Tensor  # (depth, B, ...) its x0 prediction there
    eps: torch.Tensor  # (depth, B, ...) its eps prediction there


@torch.no_grad()
def rollout(roles: Roles, noise: torch.Tensor, grid: torch.Tensor, cond: Cond, k: torch.Tensor | None,
            depth: int) -> Rollout:
    """The student's deterministic trajectory from `noise`, `depth` grid points deep."""
    schedule = roles.backbone.schedule
    x, inputs, x0s, epss = noise, [], [], []
    for j in range(depth):
        t = torch.full((x.shape[0],), int(grid[j]), device=x.device)
        x0, eps = roles.x0_eps("student", x, t, cond, k)
        inputs.append(x), x0s.append(x0), epss.append(eps)
        if j + 1 < depth:
            x = schedule.ddim_step(x0, eps, int(grid[j + 1]))
    return Rollout(torch.stack(inputs), torch.stack(x0s), torch.stack(epss))


def at_step(stacked: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Each sample's entry of a rollout stack (depth, B, ...) at its own grid index `step` (B,) -> (B, ...)."""
    return stacked[step.to(stacked.device), torch.arange(stacked.shape[1], device=stacked.device)]


@dataclass
class Diffused:
    """The student's next trajectory point re-noised to tau (all (B, ...) like the samples)."""

    x_tau: torch.Tensor
    x0: torch.Tensor  # the student's x0 prediction at step i (the fake score's DSM target)
    noise: torch.Tensor  # the fresh noise n added from t_mid to tau
    effective_noise: torch.Tensor  # m, with x_tau = alpha_tau x0 + sigma_tau m (importance weight's numerator)


def diffuse_to_tau(roles: Roles, traj: Rollout, pts: LossPoints, g: torch.Generator) -> Diffused:
    """x_tau from the student's own (x0, eps) at step i: DDIM to t_mid, then forward-diffuse to tau."""
    schedule = roles.backbone.schedule
    x0, eps = at_step(traj.x0, pts.step), at_step(traj.eps, pts.step)
    device = x0.device
    t_mid, tau = pts.t_mid.to(device), pts.tau.to(device)
    x_mid = schedule.add_noise(x0, eps, t_mid)
    noise = torch.randn(x0.shape, generator=g).to(device)
    x_tau, effective = schedule.diffuse(x_mid, eps, t_mid, tau, noise)
    return Diffused(x_tau, x0, noise, effective)


def base_dtype(cfg: Config) -> torch.dtype | None:
    """The dtype distill loads the frozen base in (teacher, text encoders, VAE): LoRA mode under bf16 / fp16 holds
    it in that dtype (the adapters stay float32); full mode, or no mixed precision, keeps the saved dtype (None)."""
    from tdm.backbones.stored_prompts import frozen_dtype

    return frozen_dtype(cfg.distill.mode, cfg.distill.mixed_precision)


def distill_prompts(cfg: Config) -> list[str]:
    """The prompts distillation draws from: the digits set (1000, or batch_size when larger) or a prompt file."""
    d = cfg.distill
    return (digit_prompt_set(max(1000, d.batch_size), seed=d.seed) if d.prompts == "digits"
            else read_prompts(d.prompts))


def make_optimizer(kind: str, groups: list[dict], lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over parameter groups: torch's, or bitsandbytes' 8-bit AdamW (`distill.optimizer: adamw8bit`: both
    moments quantised blockwise to 8 bits, Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization";
    tensors under bitsandbytes' min_8bit_size (4096) keep 32-bit states). bitsandbytes >= 0.48 runs it on CPU too.
    ValueError naming the key when bitsandbytes is not installed."""
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("distill.optimizer: adamw8bit needs bitsandbytes (pip install -e '.[memory]' in tdm's "
                             "clone, i.e. "
                             "bitsandbytes==0.50.2)") from None
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The gradients' total 2-norm; they are clipped to `max_norm` first unless it is None (the norm is still
    reported, the gradients untouched)."""
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(grads)


class TDMTrainer:
    """Roles, optimisers, schedulers and EMA of one distillation run, and the iteration over them.

    Under FSDP (an accelerate FSDP2 config, `tdm.sharding.fsdp_plugin`) the roles are sharded before the
    optimisers are built, so optimisers and EMA hold shards; FSDP reduce-scatters the gradients (no
    `average_gradients`), clipping and the logged norms are global, and `state_dict` gathers full tensors (a
    collective: `gathers_state`) in the format of an unsharded run."""

    def __init__(self, cfg: Config, backbone: Backbone, accelerator: Accelerator):
        from tdm.sharding import fsdp_kwargs, fsdp_plugin

        d = cfg.distill
        self.cfg, self.backbone, self.accelerator = cfg, backbone, accelerator
        self.roles = Roles(backbone, d.mode, d.lora_rank, d.lora_alpha, k_max=max(d.k_choices) if d.unify else None)
        if d.gradient_checkpointing:
            for role in ("student", "fake"):
                self.roles.nets[role].enable_gradient_checkpointing()
        self.plugin = fsdp_plugin(accelerator)
        self.gathers_state = self.plugin is not None  # run_loop calls state_dict() on every process then
        self._saved_weights: dict[str, torch.Tensor] | None = None  # `unshard`'s gathered student weights
        if self.plugin is not None:
            TDMTrainer.check_fsdp(cfg)
            self.roles.shard(**fsdp_kwargs(accelerator, self.plugin, lora=d.mode == "lora"))
        if d.compile or d.channels_last:  # before the optimisers: channels_last re-lays the weights
            self.roles.speed_up(compile=d.compile, channels_last=d.channels_last)
        student = self.roles.named_parameters("student")
        k_params = [p for n, p in student.items() if n.startswith("k_embedding.")]
        if d.k_embed_lr is not None and k_params:  # the K embedding in its own group, at its own lr
            groups = [{"params": [p for n, p in student.items() if not n.startswith("k_embedding.")]},
                      {"params": k_params, "lr": d.k_embed_lr}]
        else:
            groups = [{"params": list(student.values())}]
        fake_decay = d.weight_decay if d.fake_weight_decay is None else d.fake_weight_decay
        self.opt = {
            "student": make_optimizer(d.optimizer, groups, d.lr, d.betas, d.weight_decay),
            "fake": make_optimizer(d.optimizer, [{"params": self.roles.parameters("fake")}], d.fake_lr, d.betas,
                                   fake_decay),
        }
        fake_schedule = d.lr_schedule if d.fake_lr_schedule == "same" else "constant"
        fake_warmup = d.warmup_steps if d.fake_lr_schedule == "same" else 0
        self.sched = {
            "student": torch.optim.lr_scheduler.LambdaLR(
                self.opt["student"], lambda s: lr_factor(s, d.warmup_steps, d.iterations, d.lr_schedule)),
            "fake": torch.optim.lr_scheduler.LambdaLR(
                self.opt["fake"], lambda s: lr_factor(s, fake_warmup, d.iterations, fake_schedule)),
        }
        self.clip = {"student": d.grad_clip, "fake": d.fake_grad_clip}
        # student_weights "raw" keeps no average (the official recipe): the trained weights are the student.
        self.ema = EMA(student, d.ema_decay) if d.student_weights == "ema" else None
        self.grid = StudentGrid(d.total_steps, d.shift, d.timesteps)  # the one grid: training, record, sampling
        self.prompts = distill_prompts(cfg)
        self.pairs = self._teacher_pairs() if d.regression_weight > 0 else None

    def _teacher_pairs(self):
        """distill.regression_weight: the teacher's trajectories the regression loss reads (tdm/regression.py),
        made once from distill.seed + 1, the same on every process (a resumed run rebuilds them: bitwise on CPU,
        and on GPUs with deterministic kernels at the same process count)."""
        from tdm.regression import make_teacher_pairs

        d, acc = self.cfg.distill, self.accelerator
        substeps = max(1, round(d.regression_teacher_steps / d.k))
        per_process = max(1, d.batch_size // acc.num_processes)
        lines = ProgressLines("distill: teacher pairs", "batch", -(-d.regression_pairs // per_process),
                              main_process=acc.is_main_process)
        if acc.is_main_process:
            print(f"distill: making {d.regression_pairs} teacher pairs ({substeps * d.k} DDIM steps each) for "
                  f"distill.regression_weight {d.regression_weight:g}", file=sys.stderr, flush=True)
        guidance = d.guidance_schedule or (d.guidance,) * d.k
        with self._autocast():
            pairs = make_teacher_pairs(self.backbone, self.roles.activate("teacher"), self.prompts,
                                       self.grid.at(d.k).tolist(), n=d.regression_pairs, substeps=substeps,
                                       guidance=guidance, seed=d.seed + 1,
                                       batch_size=per_process,  # the teacher batch training runs
                                       device=acc.device, progress=lambda i, n: lines.update(i))
        return pairs

    @staticmethod
    def check_fsdp(cfg: Config) -> None:
        """The distill switches FSDP does not take, refused before any model is built (ValueError naming the
        key): torch.compile and channels_last of sharded networks, 8-bit AdamW over DTensors, fp16's GradScaler
        multi-stage runs and a quantised base are untested under FSDP here; bf16 (tdm's autocast, as unsharded) is the mixed
        precision."""
        d = cfg.distill
        refused = [(d.compile, "distill.compile: true"), (d.channels_last, "distill.channels_last: true"),
                   (d.optimizer == "adamw8bit", "distill.optimizer: adamw8bit"),
                   (d.mixed_precision == "fp16", "distill.mixed_precision: fp16 (use bf16)"),
                   (bool(getattr(d, "stages", None)), "distill.stages"),
                   (d.base_quantization is not None, f"distill.base_quantization: {d.base_quantization}"),
                   (d.regression_weight > 0, f"distill.regression_weight: {d.regression_weight:g}")]
        for on, what in refused:
            if on:
                raise ValueError(f"{what} is not supported under FSDP (an accelerate config with "
                                 f"distributed_type: FSDP); launch with configs/accelerate/ddp.yaml or drop it")

    def student_weights(self) -> dict[str, torch.Tensor]:
        """The weights the saved student carries (`distill.student_weights`): the EMA shadow, or the raw ones;
        full tensors after `unshard` (FSDP)."""
        if self._saved_weights is not None:
            return self._saved_weights
        return self.ema.shadow if self.ema is not None else self.roles.state_dict("student")

    def unshard(self) -> None:
        """FSDP, after training: gather the student's weights and every role into plain modules on the main
        process (a collective: every process calls it), so `save_student` works as on an unsharded run; the
        other processes release their roles."""
        from tdm.sharding import gather_dict

        keep = self.accelerator.is_main_process
        weights = self.ema.shadow if self.ema is not None else self.roles.named_parameters("student")
        self._saved_weights = gather_dict(weights, keep)
        self.roles.gather(keep)
        self.opt = self.sched = self.ema = None  # shards of modules that are gone

    # -- one iteration --------------------------------------------------------------------------------------
    def _update(self, role: str, loss: torch.Tensor, step_schedule: bool = True) -> torch.Tensor:
        """Backward, average over processes, clip, step. Under fp16 accelerate's GradScaler scales the loss
        in `backward`; the optimisers are ours (two parameter sets on one module in LoRA mode, which
        accelerate's prepare cannot wrap), so we unscale before clipping (the clip and the logged norm see
        true gradients) and let the scaler skip a step whose gradients overflowed (torch.amp recipe for
        several optimisers: unscale_ / step each, one update per iteration, in `iteration`)."""
        from tdm.sharding import clip_grad_norm

        params, scaler = self.roles.parameters(role), self.accelerator.scaler
        self.accelerator.backward(loss)
        if self.plugin is None:  # FSDP reduce-scattered the gradients in backward
            average_gradients(self.accelerator, params)
        if scaler is not None:
            scaler.unscale_(self.opt[role])
        grad_norm = grad_norm_and_clip(params, self.clip[role]) if self.plugin is None \
            else clip_grad_norm(params, self.clip[role])  # over every process's shards
        if scaler is not None:
            scaler.step(self.opt[role])  # skipped when the unscaled gradients hold an inf / NaN
        else:
            self.opt[role].step()
        if step_schedule:  # the lr schedules count iterations (distill.fake_updates steps the fake score more)
            self.sched[role].step()
        self.opt[role].zero_grad(set_to_none=True)
        return grad_norm.detach()

    # FSDP: every process must run the same forwards (each all-gathers its units), but each draws its own
    # rollout depth (and, TDM-unify, its own K). A process whose rollout is shallower than the deepest one runs
    # the missing student forwards on its first grid point and discards them: the numerics stay those of an
    # unsharded run, and the wall time is the deepest process's, which a synchronous step waits for anyway.
    def _deepest(self, depth: int) -> int:
        """The deepest rollout of this iteration over every process (one small all-reduce)."""
        import torch.distributed as dist

        deepest = torch.tensor([depth], device=self.accelerator.device)
        dist.all_reduce(deepest, op=dist.ReduceOp.MAX)
        return int(deepest)

    @torch.no_grad()
    def _idle_forwards(self, n: int, x: torch.Tensor, grid: torch.Tensor, cond, k_cond) -> None:
        t = torch.full((x.shape[0],), int(grid[0]), device=x.device)
        for _ in range(n):
            self.roles.x0_eps("student", x, t, cond, k_cond)

    def _autocast(self):
        """accelerate's autocast (`distill.mixed_precision`). Under FSDP without its cast cache: autocast keeps
        the low-precision copy of every trainable leaf it casts until the region ends, and FSDP's gathered
        parameters are such leaves, so the cache would hold a full bf16 copy of each sharded role. The casts
        themselves are the same (identical numerics), only redone per use."""
        if self.plugin is None:
            return self.accelerator.autocast()
        from accelerate.utils import AutocastKwargs

        return self.accelerator.autocast(AutocastKwargs(cache_enabled=False))

    def _draw(self, g: torch.Generator):
        """One batch of the student's inputs: (K, its grid, prompts' cond, noise, the K condition or None)."""
        d, acc = self.cfg.distill, self.accelerator
        per_process = d.batch_size // acc.num_processes
        k = d.k if not d.unify else d.k_choices[self._k_index(g)]
        prompt_idx = torch.randint(len(self.prompts), (per_process,), generator=g)
        cond = self.backbone.encode_prompts([self.prompts[i] for i in prompt_idx])
        noise = torch.randn((per_process, *self.backbone.sample_shape), generator=g).to(acc.device)
        k_cond = torch.full((per_process,), k, device=acc.device) if d.unify else None
        return k, self.grid.at(k), cond, noise, k_cond

    def _k_index(self, g: torch.Generator) -> int:
        """TDM-unify: which K of k_choices this iteration trains, uniform (the paper) or by `k_weights`."""
        d = self.cfg.distill
        if d.k_weights is None:
            return int(torch.randint(len(d.k_choices), (1,), generator=g))
        return int(torch.multinomial(torch.tensor(d.k_weights, dtype=torch.float64), 1, generator=g))

    def _rollout(self, noise, grid, cond, k_cond, depth: int) -> Rollout:
        deepest = self._deepest(depth) if self.plugin is not None else depth
        traj = rollout(self.roles, noise, grid, cond, k_cond, depth)
        self._idle_forwards(deepest - depth, noise, grid, cond, k_cond)
        return traj

    def _fake_loss(self, traj: Rollout, pts: LossPoints, cond, k_cond, g: torch.Generator):
        """Fake score: DSM toward the student's own x0 around its trajectory; (loss, importance weights)."""
        at_tau = diffuse_to_tau(self.roles, traj, pts, g)
        tau = pts.tau.to(self.accelerator.device)
        fake_x0, _ = self.roles.x0_eps("fake", at_tau.x_tau, tau, cond, k_cond)
        is_w = importance_weight(at_tau.effective_noise, at_tau.noise)
        snr = self.backbone.schedule.snr(tau).to(self.accelerator.device)
        return fake_score_loss(fake_x0, at_tau.x0, snr, is_w, self.cfg.distill.snr_clamp), is_w

    def _regression_loss(self, g: torch.Generator) -> torch.Tensor:
        """DMD's regression on a batch of teacher pairs: the student's x0 at the teacher's x_{t_i} (a grid index
        per sample) toward the teacher's endpoint. Drawn after every TDM draw of the iteration, so the TDM part
        is that of a run without it."""
        pairs, acc = self.pairs, self.accelerator
        n = self.cfg.distill.batch_size // acc.num_processes  # a fixed K (refused with unify: no K condition)
        idx = torch.randint(pairs.x0.shape[0], (n,), generator=g)
        step = torch.randint(pairs.points.shape[0], (n,), generator=g)
        grid = self.grid.at(self.cfg.distill.k)
        cond = self.backbone.encode_prompts([self.prompts[i] for i in pairs.prompt_idx[idx]])
        x_in = pairs.points[step, idx].to(acc.device)
        student_x0, _ = self.roles.x0_eps("student", x_in, grid[step].to(acc.device), cond)
        return regression_loss(student_x0, pairs.x0[idx].to(acc.device))

    def _guidance(self, pts: LossPoints) -> float | torch.Tensor:
        """The teacher's CFG scale per generator point: `distill.guidance`, or the per-student-step
        `distill.guidance_schedule` entry of each point's grid index."""
        schedule = self.cfg.distill.guidance_schedule
        if schedule is None:
            return self.cfg.distill.guidance
        return torch.tensor(schedule, dtype=torch.float32)[pts.step].to(self.accelerator.device)

    def iteration(self, step: int) -> dict[str, torch.Tensor]:
        d, roles, acc = self.cfg.distill, self.roles, self.accelerator
        device = acc.device
        g = step_generator(d.seed, step, acc.process_index)
        t_clean = int(self.backbone.schedule.t_clean)
        # DMD2's two time-scale update rule: fake_updates - 1 extra fake-score updates, each on a fresh student
        # batch, before the one below (none by default: the draws below are then those of the plain iteration).
        for _ in range(d.fake_updates - 1):
            _, grid, cond, noise, k_cond = self._draw(g)
            pts = draw_points(grid, t_clean, noise.shape[0], self.cfg, g)
            with self._autocast():
                traj = self._rollout(noise, grid, cond, k_cond, int(pts.step.max()) + 1)
                loss_fake, _ = self._fake_loss(traj, pts, cond, k_cond, g)
            self._update("fake", loss_fake, step_schedule=False)
            if acc.scaler is not None:  # GradScaler: one update per unscale_/step round
                acc.scaler.update()

        k, grid, cond, noise, k_cond = self._draw(g)
        per_process = noise.shape[0]
        fake_pts = draw_points(grid, t_clean, per_process, self.cfg, g)
        gen_pts = draw_points(grid, t_clean, per_process, self.cfg, g)
        depth = int(torch.maximum(fake_pts.step.max(), gen_pts.step.max())) + 1
        with self._autocast():
            traj = self._rollout(noise, grid, cond, k_cond, depth)
            loss_fake, is_w = self._fake_loss(traj, fake_pts, cond, k_cond, g)
        grad_fake = self._update("fake", loss_fake)

        with self._autocast():
            # Generator: teacher (CFG, one batched forward) and the updated fake score at fresh points.
            x_tau = diffuse_to_tau(roles, traj, gen_pts, g).x_tau
            tau = gen_pts.tau.to(device)
            with torch.no_grad():
                teacher_x0 = roles.teacher_guided_x0(x_tau, tau, cond, self._guidance(gen_pts))
                fake_x0, _ = roles.x0_eps("fake", x_tau, tau, cond, k_cond)
            # Gradient through one student step: its prediction at the stored trajectory input.
            x_in = at_step(traj.inputs, gen_pts.step)
            student_x0, _ = roles.x0_eps("student", x_in, gen_pts.t_in.to(device), cond, k_cond)
            loss_gen = generator_loss(student_x0, teacher_x0, fake_x0, d.metric, d.huber_c)
            loss_reg = self._regression_loss(g) if self.pairs is not None else None
        # loss_gen stays the TDM loss in the log; the regression term is logged on its own (loss_reg)
        grad_gen = self._update("student", loss_gen if loss_reg is None else loss_gen + d.regression_weight * loss_reg)
        if acc.scaler is not None:
            acc.scaler.update()  # once per iteration, after both optimisers stepped (or skipped)
        if self.ema is not None:
            self.ema.update(self.roles.named_parameters("student"))
        metrics = {"loss_fake": loss_fake.detach(), "loss_gen": loss_gen.detach(), "grad_norm_fake": grad_fake,
                   "grad_norm_gen": grad_gen, "is_weight_mean": is_w.mean().detach(),
                   "is_weight_min": is_w.min().detach(), "is_weight_max": is_w.max().detach(),
                   "lr": torch.tensor(self.sched["student"].get_last_lr()[0]),
                   "lr_fake": torch.tensor(self.sched["fake"].get_last_lr()[0]), "k": torch.tensor(float(k))}
        if loss_reg is not None:
            metrics["loss_reg"] = loss_reg.detach()
        # Per trajectory index i (issue 17): the distribution-matching gap mean |teacher_cfg_x0 - fake_x0| the
        # generator is pulled by at the points drawn in step i's interval (steps not drawn this iteration are
        # absent: NaN in the log's row, skipped by MLflow).
        # The same keys on every process and iteration (every K of k_choices under unify), NaN where not drawn:
        # the log's cross-process mean skips NaN for these (training._host_rows).
        gap = (teacher_x0.float() - fake_x0.float()).abs().flatten(1).mean(1).detach()
        steps = gen_pts.step.to(gap.device)
        for kk in (d.k_choices if d.unify else (d.k,)):
            prefix = f"dm_gap_k{kk}_step" if d.unify else "dm_gap_step"
            for i in range(kk):
                drawn = (steps == i) if kk == k else torch.zeros_like(steps, dtype=torch.bool)
                metrics[f"{prefix}{i}"] = gap[drawn].mean() if bool(drawn.any()) else gap.new_tensor(float("nan"))
        if d.unify:  # TDM-unify: how far the K embeddings moved from zero (Frobenius norm of each table, each K's row)
            metrics["k_embed_norm"] = roles.k_embeddings["student"].weight.detach().norm()
            metrics["k_embed_norm_fake"] = roles.k_embeddings["fake"].weight.detach().norm()
            table = roles.k_embeddings["student"].weight.detach()
            if self.plugin is not None:  # a DTensor shard: the whole (small) table, on every process
                table = table.full_tensor()
            for choice in d.k_choices:
                metrics[f"k_embed_norm_k{choice}"] = table[choice].norm()
            metrics["lr_k_embed"] = torch.tensor(self.sched["student"].get_last_lr()[-1])
        if self.plugin is not None:  # norms over shards are partial DTensors: reduced here, on every process
            from tdm.sharding import local

            metrics = {name: local(v) for name, v in metrics.items()}
        return metrics

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The training state. Under FSDP the shards are gathered (every process must call it) into full CPU
        tensors on the main process (None elsewhere), in the format of an unsharded run."""
        if self.plugin is not None:
            from tdm.sharding import gather_dict, gather_optimizer_state

            keep = self.accelerator.is_main_process
            return {"student": gather_dict(self.roles.named_parameters("student"), keep),
                    "fake": gather_dict(self.roles.named_parameters("fake"), keep),
                    "opt_student": gather_optimizer_state(self.opt["student"], keep),
                    "opt_fake": gather_optimizer_state(self.opt["fake"], keep),
                    "sched_student": self.sched["student"].state_dict(), "sched_fake": self.sched["fake"].state_dict(),
                    **({"ema": {"shadow": gather_dict(self.ema.shadow, keep), "num_updates": self.ema.num_updates}}
                       if self.ema is not None else {})}
        return {"student": self.roles.state_dict("student"), "fake": self.roles.state_dict("fake"),
                "opt_student": self._opt_state("student"), "opt_fake": self._opt_state("fake"),
                "sched_student": self.sched["student"].state_dict(), "sched_fake": self.sched["fake"].state_dict(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                **({"scaler": self.accelerator.scaler.state_dict()} if self.accelerator.scaler is not None else {})}

    def _opt_state(self, role: str) -> dict:
        """The optimiser's state dict; 8-bit AdamW's tensors copied apart (bitsandbytes shares one quantisation
        map between parameters, which a safetensors checkpoint refuses to write)."""
        state = self.opt[role].state_dict()
        if self.cfg.distill.optimizer == "adamw8bit":
            def unshare(value):
                if torch.is_tensor(value):
                    return value.clone()
                if isinstance(value, dict):
                    return {k: unshare(v) for k, v in value.items()}
                return value
            state = {**state, "state": unshare(state["state"])}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.roles.load_state_dict("student", state["student"])
        self.roles.load_state_dict("fake", state["fake"])
        from tdm.sharding import shard_optimizer_state

        for role in ("student", "fake"):
            opt_state = state[f"opt_{role}"]
            if self.plugin is not None:  # full tensors (any checkpoint's) cut to this process's shards
                opt_state = shard_optimizer_state(self.opt[role], opt_state)
            self.opt[role].load_state_dict(opt_state)
            self.sched[role].load_state_dict(state[f"sched_{role}"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def trainable(self) -> list[torch.Tensor]:
        return self.roles.parameters("student") + self.roles.parameters("fake")


# -- the stage ------------------------------------------------------------------------------------------------
def check_inputs(cfg: Config) -> None:
    """Everything the stage reads, checked before any model is built; errors name the key. Raises
    FileNotFoundError (the teacher folder or a part of it is missing) or ValueError (a teacher that does not
    parse or no adapter runs, a grid longer than its schedule, K > total_steps, an indivisible batch)."""
    from tdm.backbones import check_model, train_timesteps

    d = cfg.distill
    try:
        folder, family = check_model(d.teacher)
        schedule_len = train_timesteps(folder)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"distill.teacher: {err} (run `tdm teacher-ft` first?)") from None
    except ValueError as err:
        raise ValueError(f"distill.teacher: {err}") from None
    if d.channels_last and family not in ("digits", "sd15", "sdxl"):
        raise ValueError(f"distill.channels_last: only for UNet families (digits, sd15, sdxl); the teacher is a "
                         f"{family} model (got true)")
    if d.total_steps > schedule_len:
        raise ValueError(f"distill.total_steps: {d.total_steps} exceeds the teacher's {schedule_len} training "
                         f"timesteps ({folder / 'scheduler' / 'scheduler_config.json'})")
    if d.k > d.total_steps or max(d.k_choices) > d.total_steps:
        raise ValueError(f"distill.k: must be <= distill.total_steps ({d.total_steps})")
    if d.batch_size % int(os.environ.get("WORLD_SIZE", "1")):
        raise ValueError(f"distill.batch_size {d.batch_size} is not divisible by the number of processes")
    for i, st in enumerate(d.stages):
        if st.batch_size is not None and st.batch_size % int(os.environ.get("WORLD_SIZE", "1")):
            raise ValueError(f"distill.stages[{i}].batch_size {st.batch_size} is not divisible by the number of "
                             f"processes")
    if d.optimizer == "adamw8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("distill.optimizer: adamw8bit needs bitsandbytes (pip install -e '.[memory]' in tdm's "
                             "clone, i.e. "
                             "bitsandbytes==0.50.2)")
    if d.base_quantization is not None:  # torchao importable (the `memory` extra), before any model is built
        from tdm.quantize import require_torchao

        require_torchao(d.base_quantization)
    if d.prompt_store is not None:  # made from this teacher's encoders, in the dtype distill loads them, all prompts
        from tdm.backbones.stored_prompts import open_for

        open_for(d.prompt_store, folder, base_dtype(cfg), distill_prompts(cfg), key="distill.prompt_store")


def train(cfg: Config, paths: StagePaths, progress: bool = True,
          stop_after: int | None = None) -> tuple[TDMTrainer, dict]:
    """Run (or resume) TDM distillation; `stop_after` ends early at that iteration (a checkpoint is written)."""
    d = cfg.distill
    check_inputs(cfg)
    accelerator = Accelerator(mixed_precision=d.mixed_precision, cpu=not torch.cuda.is_available())
    from tdm.sharding import fsdp_plugin

    if fsdp_plugin(accelerator) is not None:  # an FSDP accelerate config: what it cannot take, before any model
        TDMTrainer.check_fsdp(cfg)
    if d.base_quantization is not None:  # a device that cannot run it is refused before the teacher is read
        from tdm.quantize import check_device

        check_device(d.base_quantization, accelerator.device)
    torch.manual_seed(d.seed)
    # LoRA mode: the frozen base (teacher, encoders, VAE) is held in the mixed-precision dtype; the adapters
    # stay float32. Full mode keeps float32 weights for its trainable copies.
    # With distill.prompt_store the text encoders are never constructed: the store gives every conditioning.
    def build(stage_cfg: Config, resolution: int | None = None) -> TDMTrainer:
        """One stage's trainer over a freshly loaded frozen base (at `resolution`: a `distill.stages` entry's)."""
        # distill.base_quantization: the denoiser's Linear weights int8 / fp8 (tdm.quantize; LoRA mode only)
        backbone = load_backbone(d.teacher, dtype=base_dtype(cfg), prompt_store=d.prompt_store,
                                 quantization=d.base_quantization).to(accelerator.device)
        if d.total_steps > backbone.schedule.num_train_timesteps:
            raise ValueError(f"distill.total_steps {d.total_steps} exceeds the teacher's "
                             f"{backbone.schedule.num_train_timesteps} training timesteps")
        backbone.set_resolution(resolution, where="distill.stages: resolution")
        return TDMTrainer(stage_cfg, backbone, accelerator)

    if d.stages:  # multi-stage: one loop over the stages (tdm/stages.py)
        from tdm.stages import StagedTrainer

        staged = StagedTrainer(cfg, build, main_process=accelerator.is_main_process)
        trainer, step = staged, staged.iteration
    else:
        trainer = build(cfg)
        step = trainer.iteration
    from tdm.artifacts import weights_digest
    from tdm.backbones import resolve_model_path

    resume_key = fingerprint(cfg, STAGE, upstream={"teacher": weights_digest(resolve_model_path(d.teacher))})
    settings = LoopSettings(STAGE, d.iterations, d.checkpoint_every, d.log_every, resume_key, paths.out_dir,
                            on_diverge="Lower distill.lr / distill.fake_lr.", unit="it")
    result = run_loop(accelerator, settings, trainer, step, progress, stop_after)
    summary = {"iterations": result.steps, "resumed_from": result.resumed_from,
               "train_time_s": round(result.train_time_s, 2), "student_weights": d.student_weights,
               "prompt_store": d.prompt_store is not None,
               **{k: v for k, v in result.last.items() if k.startswith(("loss_", "grad_norm_"))}}
    if d.stages:
        summary["stages"] = len(d.stages)
        trainer = trainer.current  # the last stage's: the student it saves
    if trainer.plugin is not None:  # FSDP: full tensors for save_student, on the main process
        trainer.unshard()
    return trainer, summary


def student_record(cfg: Config, family: str) -> StudentRecord:
    """What the distilled student is (the record `tdm sample --student`, evaluate and lora-transfer read)."""
    d = cfg.distill
    return StudentRecord(family=family, k=d.k, total_steps=d.total_steps, shift=d.shift,
                         explicit_timesteps=d.timesteps,
                         unify=d.unify, k_choices=tuple(d.k_choices) if d.unify else (d.k,), guidance=d.guidance,
                         guidance_schedule=d.guidance_schedule, mode=d.mode, teacher=d.teacher)


def save_student(trainer: TDMTrainer, folder: Path, cfg: Config | None = None) -> StudentRecord:
    """The student (EMA or raw weights: `distill.student_weights`) as a model folder (LoRA merged in) with its
    record and, if K-aware, its K embedding (`tdm.student`); LoRA mode also writes the adapter alone to
    `student_lora/` beside it. A teacher loaded without text encoders (`distill.prompt_store`) gets its encoder
    folders linked from the teacher's. `cfg`: the run's params written beside it (null = the trainer's: a
    multi-stage run passes the whole config, its last stage's trainer holds that stage's)."""
    d = trainer.cfg.distill
    roles = trainer.roles
    weights = trainer.student_weights()
    net = roles.merged_net("student", weights)
    record = student_record(trainer.cfg, trainer.backbone.family)
    sidecars = record.files(roles.k_embedding("student", weights))
    trainer.backbone.save(folder, net=net, extra_files={**sidecars,
                                                        "tdm_params.json": json.dumps(dump(cfg or trainer.cfg), indent=2)})
    if d.mode != "lora":  # a LoRA left by an earlier run in this folder would no longer match the student
        import shutil

        shutil.rmtree(folder.parent / "student_lora", ignore_errors=True)
    if d.mode == "lora":
        from tdm.lora import from_peft, save_lora

        with torch.no_grad():  # the adapter with the saved (EMA or raw) weights
            live = roles.state_dict("student")
            roles.load_state_dict("student", {n: w.to(live[n].dtype) for n, w in weights.items()})
            # Cloned: peft returns the live parameters, which the next line puts back to the non-EMA values.
            adapter = {k: v.detach().clone().contiguous() for k, v in roles.adapter_state_dict("student").items()}
            roles.load_state_dict("student", live)
        # In the layout PeftModel.save_pretrained writes (base_model.model. keys), so PeftModel.from_pretrained on
        # the denoiser loads it; tdm.lora.load_lora reads it as any other layout.
        config = json.loads(json.dumps(roles.lora_config.to_dict(), default=lambda v: sorted(v)
                                       if isinstance(v, set) else str(v)))
        save_lora(from_peft(adapter, config), folder.parent / "student_lora", "peft")
    return record


def evaluate_student(cfg: Config, folder: Path, out_dir: Path, progress: bool = True) -> dict:
    """Sample the saved student at each K it was trained for and score it (digits)."""
    from tdm.evaluation.digits import evaluate_samples
    from tdm.sampler import sample_student

    d = cfg.distill
    if d.eval_samples == 0 or cfg.model.family != "digits":
        return {}
    # The saved student links the teacher's encoder folders, so distill.prompt_store serves it too.
    student = load_student(folder, prompt_store=d.prompt_store)
    prompts = digit_prompt_set(d.eval_samples, seed=cfg.sample.seed)
    results = {}
    for k in student.record.sampling_ks:
        images = sample_student(student, prompts, k=k, seed=cfg.sample.seed, batch_size=cfg.sample.batch_size,
                                progress=progress)
        save_samples(out_dir / f"samples_k{k}.npz", images, prompts, steps=k)
        scores = evaluate_samples(images.numpy(), prompts, cfg.eval.weights_dir)
        results.update({f"eval_k{k}_{name}": v for name, v in scores.items()})
    return results


def run(cfg: Config, paths: StagePaths | None = None, progress: bool = True) -> dict:
    """The distill stage: distil, save the EMA student to outputs/distill/student, score it, write metrics."""
    from accelerate import PartialState

    paths = paths or StagePaths.of(STAGE)
    trainer, summary = train(cfg, paths, progress=progress)
    state = PartialState()
    if not state.is_main_process:
        state.wait_for_everyone()
        return {}
    folder = paths.out_dir / "student"
    save_student(trainer, folder, cfg)
    metrics = {**summary, "k": cfg.distill.k, "guidance": trainer.cfg.distill.guidance,
               "guidance_schedule": cfg.distill.guidance_schedule, "mode": cfg.distill.mode}
    metrics.update(evaluate_student(cfg, folder, paths.out_dir, progress))
    write_json(paths.metrics, metrics)
    state.wait_for_everyone()
    return metrics
