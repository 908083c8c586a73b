"""Teacher fine-tuning ("better teacher, better student"): standard diffusion training with CFG dropout.

On the digits default the teacher starts from a fresh init and learns the digits from scratch; on a real
backbone it fine-tunes the pretrained denoiser on an image-caption folder. One loop either way:
sample a batch, noise it at a random t, regress the model's own output type (eps / v / flow), optionally
min-SNR weighted, clip, step, EMA. The EMA weights are the teacher that distillation reads.

Every random draw of step s comes from a generator seeded by (seed, s, process), so a resumed run draws
exactly what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator

from tdm import checkpoint as ckpt
from tdm import tracking
from tdm.artifacts import save_samples, write_json
from tdm.backbones import Backbone, build_backbone
from tdm.config import Config, StagePaths, dump
from tdm.data import PROMPT_TEMPLATES, ImageCaptionFolder, digit_prompt, digit_prompt_set, digits_split
from tdm.ema import EMA
from tdm.training import (TrainingDiverged, all_finite, lr_factor, replicas_identical, resumable_checkpoint,
                          step_generator)

STAGE = "teacher_ft"


# -- data ---------------------------------------------------------------------------------------------------------
class DigitsTrainSet:
    """The digits train split; each draw pairs an image with a randomly phrased prompt for its label."""

    def __init__(self):
        self.images, self.labels = digits_split("train")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        templates = torch.randint(len(PROMPT_TEMPLATES), (len(index),), generator=g)
        return self.images[index], [digit_prompt(int(self.labels[i]), int(k)) for i, k in zip(index, templates)]


class FolderTrainSet:
    """An image-caption folder (metadata.jsonl) at the backbone's resolution, encoded to its latent space."""

    def __init__(self, folder: str, resolution: int, channels: int):
        self.data = ImageCaptionFolder.open(folder)
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, index: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        images = torch.stack([self.data.load(int(i), self.resolution, self.channels) for i in index])
        return images, [self.data.captions[int(i)] for i in index]


# -- the loss -----------------------------------------------------------------------------------------------------
def min_snr_weight(snr: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) expressed for the model's own regression target."""
    if gamma is None:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    return torch.ones_like(snr)  # flow: the velocity loss is already balanced across t


def diffusion_loss(backbone: Backbone, net, x0: torch.Tensor, cond, t: torch.Tensor, eps: torch.Tensor,
                   snr_gamma: float | None) -> torch.Tensor:
    schedule, ptype = backbone.schedule, backbone.prediction_type
    x_t = schedule.add_noise(x0, eps, t)
    target = schedule.from_x0_eps(x0, eps, t, ptype)
    pred = backbone.predict(net, x_t, t, cond)
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * min_snr_weight(schedule.snr(t).to(per_sample), snr_gamma, ptype)).mean()


def config_fingerprint(cfg: Config) -> str:
    """What must match for a checkpoint to be resumed: the model and the training math of this stage."""
    relevant = {"model": dump(cfg)["model"], STAGE: dump(cfg)[STAGE]}
    for bookkeeping in ("eval_samples", "checkpoint_every"):
        relevant[STAGE].pop(bookkeeping)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    train_time_s: float  # summed over every session of a resumed run
    resumed_from: int | None


def open_training_set(cfg: Config):
    """The images the stage trains on, opened (and checked) before any model is built."""
    t = cfg.teacher_ft
    if t.data == "digits":
        if cfg.model.family != "digits":
            raise ValueError(f"teacher_ft.data: 'digits' needs model.family digits, got {cfg.model.family!r}")
        return DigitsTrainSet()
    return FolderTrainSet(t.data, t.resolution, 1 if cfg.model.family == "digits" else 3)


def _check_resolution(cfg: Config, backbone: Backbone, data) -> None:
    if isinstance(data, FolderTrainSet):
        probe = backbone.encode_images(torch.zeros(1, backbone.image_channels, data.resolution, data.resolution,
                                                   device=backbone.device))
        if tuple(probe.shape[1:]) != tuple(backbone.sample_shape):
            raise ValueError(f"teacher_ft.resolution {data.resolution} gives samples of shape "
                             f"{tuple(probe.shape[1:])}, the model works at {tuple(backbone.sample_shape)}")


def train(cfg: Config, paths: StagePaths, backbone: Backbone | None = None, progress: bool = True,
          stop_after: int | None = None) -> tuple[Backbone, EMA, TrainResult]:
    """Run (or resume) the fine-tuning loop; returns the backbone, the EMA teacher and a summary.
    `stop_after` ends the run early at that step (a checkpoint is written), as a kill would."""
    t = cfg.teacher_ft
    data = open_training_set(cfg)
    # cpu=True on CPU-only machines: without it accelerate does not form a (gloo) process group under torchrun.
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available())
    if t.batch_size % accelerator.num_processes:
        raise ValueError(f"teacher_ft.batch_size {t.batch_size} is not divisible by {accelerator.num_processes} processes")
    per_process = t.batch_size // accelerator.num_processes

    torch.manual_seed(t.seed)
    backbone = backbone or build_backbone(cfg.model, seed=t.seed)
    backbone.to(accelerator.device)
    _check_resolution(cfg, backbone, data)
    net = backbone.net.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.lr_schedule))
    ema = EMA(dict(net.named_parameters()), t.ema_decay)

    ckpt_root = paths.out_dir / "checkpoints"
    fingerprint = config_fingerprint(cfg)
    start, resumed_from, loss_value, past_time = 0, None, float("nan"), 0.0
    found = resumable_checkpoint(accelerator, ckpt_root, fingerprint, STAGE)
    if found is not None:
        path, state = found
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"])
        start = resumed_from = int(state["step"])
        loss_value, past_time = float(state["loss"]), float(state["train_time_s"])
        accelerator.print(f"teacher_ft: resuming from {path} (step {start})")
        if accelerator.is_main_process:
            _truncate_loss_log(paths.out_dir / "loss.csv", start)
    # The LR scheduler stays unprepared: accelerate would step it once per process.
    net, optimizer = accelerator.prepare(net, optimizer)
    if found is not None and accelerator.scaler is not None and "scaler" in found[1]:
        accelerator.scaler.load_state_dict(found[1]["scaler"])

    pending: list[tuple[int, float, float]] = []  # loss log rows not yet on disk
    t0 = time.perf_counter()

    def save(step: int) -> None:
        # Only finite weights become a checkpoint, so the last one on disk is always a good one.
        if not all_finite(net.parameters()):
            raise TrainingDiverged(f"teacher_ft: weights went NaN/Inf by step {step}; stopped. Last good checkpoint: "
                                   f"{ckpt.latest_checkpoint(ckpt_root) or 'none yet'}. Lower teacher_ft.lr.")
        if not replicas_identical(accelerator, net.parameters()):  # DDP should guarantee it: prove it
            raise RuntimeError(f"teacher_ft: model replicas differ across processes at step {step}")
        if accelerator.is_main_process:
            _append_loss_log(paths.out_dir / "loss.csv", pending, fresh=start == 0 and step == len(pending))
            tracking.log_steps([{"step": s, "loss": loss, "lr": lr} for s, loss, lr in pending])
            state = {"step": step, "fingerprint": fingerprint, "net": accelerator.unwrap_model(net).state_dict(),
                     "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                     "ema": ema.state_dict(), "rng": ckpt.rng_state(), "loss": loss_value,
                     "train_time_s": past_time + time.perf_counter() - t0}
            if accelerator.scaler is not None:
                state["scaler"] = accelerator.scaler.state_dict()
            ckpt.save_state(ckpt.step_dir(ckpt_root, step), state)
            ckpt.prune_checkpoints(ckpt_root, keep=2)
        pending.clear()
        accelerator.wait_for_everyone()

    end = t.steps if stop_after is None else min(t.steps, stop_after)
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=start, desc="teacher_ft", unit="step", dynamic_ncols=True)
    for step in range(start, end):
        g = step_generator(t.seed, step, accelerator.process_index)
        index = torch.randperm(len(data), generator=g)[:per_process]
        images, prompts = data.batch(index, g)
        drop = torch.rand(len(prompts), generator=g) < t.cfg_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop)]
        timesteps = torch.randint(0, backbone.schedule.num_train_timesteps, (len(prompts),), generator=g)
        x0 = backbone.encode_images(images.to(accelerator.device))
        eps = torch.randn(x0.shape, generator=g).to(accelerator.device)
        cond = backbone.encode_prompts(prompts)
        with accelerator.autocast():
            loss = diffusion_loss(backbone, net, x0, cond, timesteps.to(accelerator.device), eps, t.snr_gamma)
        # Every rank sees the mean loss, so a NaN on one rank stops all of them (none hangs in an all-reduce).
        loss_value = accelerator.reduce(loss.detach(), "mean").item() if accelerator.num_processes > 1 else loss.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"teacher_ft: loss is {loss_value} at step {step}; stopped. Last good checkpoint: "
                                   f"{ckpt.latest_checkpoint(ckpt_root) or 'none yet'}. Lower teacher_ft.lr.")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(net.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(dict(accelerator.unwrap_model(net).named_parameters()))
        pending.append((step + 1, loss_value, scheduler.get_last_lr()[0]))
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == end:
            save(step + 1)
    if bar is not None:
        bar.close()
    train_time = past_time + (time.perf_counter() - t0 if end > start else 0.0)
    backbone.net = accelerator.unwrap_model(net)
    return backbone, ema, TrainResult(end, loss_value, train_time, resumed_from)


def _truncate_loss_log(path: Path, last_step: int) -> None:
    """Drop log rows past the checkpoint a run resumes from (they will be recomputed, identically)."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:1] + [ln for ln in lines[1:] if int(ln.split(",")[0]) <= last_step]))


def _append_loss_log(path: Path, rows: Sequence[tuple[int, float, float]], fresh: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if fresh or not path.exists() else "a") as f:
        if fresh or path.stat().st_size == 0:
            f.write("step,loss,lr\n")
        f.writelines(f"{s},{loss:.6f},{lr:.6e}\n" for s, loss, lr in rows)


def evaluate_teacher(cfg: Config, backbone: Backbone, net, out_dir: Path, progress: bool = True) -> dict:
    """Sample the teacher (sample.steps DDIM, sample.guidance CFG) and, on digits, score the toy metrics."""
    from tdm.sampler import sample_images

    n = cfg.teacher_ft.eval_samples
    if n == 0:
        return {}
    prompts = digit_prompt_set(n, seed=cfg.sample.seed) if cfg.model.family == "digits" else None
    if prompts is None:
        return {}
    s = cfg.sample
    t0 = time.perf_counter()
    images = sample_images(backbone, net, prompts, steps=s.steps, guidance=s.guidance, seed=s.seed,
                           batch_size=s.batch_size, progress=progress)
    sample_time = time.perf_counter() - t0
    save_samples(out_dir / "samples.npz", images, prompts, steps=s.steps, guidance=s.guidance)
    from tdm.evaluation.digits import evaluate_samples

    scores = evaluate_samples(images.numpy(), prompts, cfg.eval.weights_dir)
    return {**{f"eval_{k}": v for k, v in scores.items()}, "eval_steps": s.steps, "eval_guidance": s.guidance,
            "eval_sample_time_s": round(sample_time, 2)}


def run(cfg: Config, paths: StagePaths | None = None, progress: bool = True) -> dict:
    """The teacher_ft stage: train, save the EMA teacher to outputs/teacher_ft/model, score it, write metrics.
    Under several processes only the main one saves and evaluates."""
    from accelerate import PartialState

    paths = paths or StagePaths.of(STAGE)
    backbone, ema, result = train(cfg, paths, progress=progress)
    state = PartialState()
    if not state.is_main_process:
        state.wait_for_everyone()
        return {}
    model_dir = paths.out_dir / "model"
    teacher = ema.averaged_copy(backbone.net)
    backbone.save(model_dir, net=teacher, extra_files={"tdm_params.json": json.dumps(dump(cfg), indent=2)})
    metrics = {"steps": result.steps, "final_loss": result.final_loss, "train_time_s": round(result.train_time_s, 2),
               "resumed_from": result.resumed_from,
               "parameters": sum(p.numel() for p in backbone.net.parameters())}
    metrics.update(evaluate_teacher(cfg, backbone, teacher, paths.out_dir, progress))
    write_json(paths.metrics, metrics)
    state.wait_for_everyone()
    return metrics
