"""Teacher fine-tuning ("better teacher, better student"): standard diffusion training with CFG dropout.

On the digits default the teacher starts from a fresh init and learns the digits from scratch; on a real
backbone it fine-tunes the pretrained denoiser on an image-caption folder, or (CogVideoX, Wan) on a video-caption
folder (clips + metadata.jsonl, `tdm.data.VideoCaptionFolder`) at the model's native frames and size. One loop
either way: sample a batch, noise it at a random t, regress the model's own output type (eps / v / flow), optionally
min-SNR weighted, clip, step, EMA. The EMA weights are the teacher that distillation reads.

Every random draw of step s comes from a generator seeded by (seed, s, process), so a resumed run draws
exactly what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from tdm.artifacts import save_samples, write_json
from tdm.backbones import Backbone, build_backbone
from tdm.config import Config, StagePaths, dump
from tdm.data import (PROMPT_TEMPLATES, ImageCaptionFolder, VideoCaptionFolder, digit_prompt, digit_prompt_set,
                      digits_split, holds_clips)
from tdm.ema import EMA
from tdm.training import LoopSettings, fingerprint, lr_factor, run_loop, step_generator

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


class VideoFolderTrainSet:
    """A video-caption folder (clips + metadata.jsonl) for a video family. Clips train at the model's native shape
    (its num_frames, height x width), set by `fit` once the backbone is built; teacher_ft.resolution (a square
    side) applies to image folders only. Batches are videos (B, C, F, H, W), as the video `encode_images` take."""

    def __init__(self, folder: str):
        self.data = VideoCaptionFolder.open(folder)
        self.num_frames = self.height = self.width = None

    def fit(self, backbone: Backbone) -> None:
        """Take the backbone's frames and pixel size; ValueError naming any clip shorter than its frames."""
        self.num_frames = backbone.num_frames
        self.height, self.width = backbone.resolution
        self.data.check_frames(self.num_frames)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, index: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        clips = torch.stack([self.data.load(int(i), self.num_frames, self.height, self.width) for i in index])
        return clips.permute(0, 2, 1, 3, 4), [self.data.captions[int(i)] for i in index]


VIDEO_FAMILIES = ("cogvideox", "wan")  # the families whose teacher fine-tunes on clips


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


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    train_time_s: float  # summed over every session of a resumed run
    resumed_from: int | None


def open_training_set(cfg: Config):
    """The images the stage trains on, opened (and checked) before any model is built."""
    ft = cfg.teacher_ft
    if ft.data == "digits":
        if cfg.model.family != "digits":
            raise ValueError(f"teacher_ft.data: 'digits' needs model.family digits, got {cfg.model.family!r}")
        return DigitsTrainSet()
    if holds_clips(ft.data):
        if cfg.model.family not in VIDEO_FAMILIES:
            raise ValueError(f"{ft.data} holds video clips; they train video families ({', '.join(VIDEO_FAMILIES)}), "
                             f"model.family is {cfg.model.family!r}")
        return VideoFolderTrainSet(ft.data)
    return FolderTrainSet(ft.data, ft.resolution, 1 if cfg.model.family == "digits" else 3)


def training_captions(cfg: Config) -> list[str]:
    """Every prompt a step can draw: the captions (digits: each digit in each phrasing) and "" (CFG dropout)."""
    data = open_training_set(cfg)
    if isinstance(data, DigitsTrainSet):
        from tdm.backbones.stored_prompts import digit_prompts

        return [*digit_prompts(), ""]
    return [*data.data.captions, ""]


def check_inputs(cfg: Config) -> None:
    """Everything the stage reads, checked before any model is built; errors name the key: the training set
    (`open_training_set`: every metadata.jsonl row and image file), and model.pretrained (weights present).
    Raises FileNotFoundError or ValueError."""
    try:
        open_training_set(cfg)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"teacher_ft.data: {err}") from None
    except ValueError as err:
        raise ValueError(f"teacher_ft.data: {err}") from None
    if cfg.model.pretrained is not None:
        from tdm.backbones import check_model

        try:
            check_model(cfg.model.pretrained)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"model.pretrained: {err}") from None
        except ValueError as err:
            raise ValueError(f"model.pretrained: {err}") from None
    if cfg.teacher_ft.prompt_store is not None:  # made from model.pretrained's encoders, holding every caption
        if cfg.model.pretrained is None:
            raise ValueError("teacher_ft.prompt_store: needs model.pretrained (a fresh digits model has no saved "
                             "text encoder to match a store against)")
        from tdm.backbones.stored_prompts import open_for

        open_for(cfg.teacher_ft.prompt_store, cfg.model.pretrained, None, training_captions(cfg),
                 key="teacher_ft.prompt_store")
    if cfg.teacher_ft.batch_size % int(os.environ.get("WORLD_SIZE", "1")):
        raise ValueError(f"teacher_ft.batch_size {cfg.teacher_ft.batch_size} is not divisible by the number of "
                         f"processes")


def _check_resolution(cfg: Config, backbone: Backbone, data) -> None:
    if isinstance(data, FolderTrainSet):
        probe = backbone.encode_images(torch.zeros(1, backbone.image_channels, data.resolution, data.resolution,
                                                   device=backbone.device))
        if tuple(probe.shape[1:]) != tuple(backbone.sample_shape):
            raise ValueError(f"teacher_ft.resolution {data.resolution} gives samples of shape "
                             f"{tuple(probe.shape[1:])}, the model works at {tuple(backbone.sample_shape)}")
    if isinstance(data, VideoFolderTrainSet):
        try:
            data.fit(backbone)
        except ValueError as err:
            raise ValueError(f"teacher_ft.data: {err}") from None


class TeacherTrainer:
    """The teacher's net, optimiser, LR schedule and EMA, and one SFT step over them (the training loop,
    `tdm.training.run_loop`, drives it)."""

    def __init__(self, cfg: Config, backbone: Backbone, data, accelerator: Accelerator):
        ft = cfg.teacher_ft
        self.cfg, self.backbone, self.data, self.accelerator = cfg, backbone, data, accelerator
        net = backbone.net.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(net.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
        # The LR scheduler stays unprepared: accelerate would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, ft.warmup_steps, ft.steps, ft.lr_schedule))
        self.ema = EMA(dict(net.named_parameters()), ft.ema_decay)
        self.net, self.optimizer = accelerator.prepare(net, optimizer)
        self.per_process = ft.batch_size // accelerator.num_processes

    def step(self, step: int) -> dict[str, torch.Tensor]:
        ft, acc, backbone = self.cfg.teacher_ft, self.accelerator, self.backbone
        g = step_generator(ft.seed, step, acc.process_index)
        index = torch.randperm(len(self.data), generator=g)[:self.per_process]
        images, prompts = self.data.batch(index, g)
        drop = torch.rand(len(prompts), generator=g) < ft.cfg_dropout
        prompts = ["" if dropped else p for p, dropped in zip(prompts, drop)]
        timesteps = torch.randint(0, backbone.schedule.num_train_timesteps, (len(prompts),), generator=g)
        x0 = backbone.encode_images(images.to(acc.device))
        eps = torch.randn(x0.shape, generator=g).to(acc.device)
        cond = backbone.encode_prompts(prompts)
        with acc.autocast():
            loss = diffusion_loss(backbone, self.net, x0, cond, timesteps.to(acc.device), eps, ft.snr_gamma)
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(self.net.parameters(), ft.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(dict(acc.unwrap_model(self.net).named_parameters()))
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(),
                "lr": torch.tensor(self.scheduler.get_last_lr()[0])}

    def state_dict(self) -> dict:
        state = {"net": self.accelerator.unwrap_model(self.net).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict()}
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.accelerator.unwrap_model(self.net).load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.ema.load_state_dict(state["ema"])
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def trainable(self) -> list[torch.Tensor]:
        return list(self.net.parameters())


def train(cfg: Config, paths: StagePaths, backbone: Backbone | None = None, progress: bool = True,
          stop_after: int | None = None) -> tuple[Backbone, EMA, TrainResult]:
    """Run (or resume) the fine-tuning loop; returns the backbone, the EMA teacher and a summary.
    `stop_after` ends the run early at that step (a checkpoint is written), as a kill would."""
    from tdm.sharding import fsdp_requested

    if fsdp_requested():  # before any data or model: teacher_ft's accelerator.prepare path is DDP only
        raise ValueError("teacher_ft: the FSDP accelerate config is not supported (tdm shards distill only); "
                         "launch with configs/accelerate/ddp.yaml")
    ft = cfg.teacher_ft
    data = open_training_set(cfg)
    # cpu=True on CPU-only machines: without it accelerate does not form a (gloo) process group under torchrun.
    accelerator = Accelerator(mixed_precision=ft.mixed_precision, cpu=not torch.cuda.is_available())
    if ft.batch_size % accelerator.num_processes:
        raise ValueError(f"teacher_ft.batch_size {ft.batch_size} is not divisible by {accelerator.num_processes} "
                         f"processes")
    torch.manual_seed(ft.seed)
    # With teacher_ft.prompt_store the text encoders are never constructed (the saved teacher links their folders).
    backbone = backbone or build_backbone(cfg.model, seed=ft.seed, prompt_store=ft.prompt_store)
    backbone.to(accelerator.device)
    _check_resolution(cfg, backbone, data)
    trainer = TeacherTrainer(cfg, backbone, data, accelerator)
    upstream = {}
    if cfg.model.pretrained is not None:  # fine-tuning resumes only on top of the same pretrained weights
        from tdm.artifacts import weights_digest
        from tdm.backbones import resolve_model_path

        upstream["pretrained"] = weights_digest(resolve_model_path(cfg.model.pretrained))
    settings = LoopSettings(STAGE, ft.steps, ft.checkpoint_every, ft.log_every,
                            fingerprint(cfg, "model", STAGE, upstream=upstream), paths.out_dir,
                            on_diverge="Lower teacher_ft.lr.")
    result = run_loop(accelerator, settings, trainer, trainer.step, progress, stop_after)
    backbone.net = accelerator.unwrap_model(trainer.net)
    return backbone, trainer.ema, TrainResult(result.steps, result.last.get("loss", float("nan")),
                                              result.train_time_s, result.resumed_from)


def evaluate_teacher(cfg: Config, backbone: Backbone, net, out_dir: Path, progress: bool = True) -> dict:
    """Sample the teacher (sample.steps DDIM, sample.guidance CFG) and, on digits, score the toy metrics."""
    from tdm.sampler import sample_teacher

    n = cfg.teacher_ft.eval_samples
    if n == 0:
        return {}
    prompts = digit_prompt_set(n, seed=cfg.sample.seed) if cfg.model.family == "digits" else None
    if prompts is None:
        return {}
    s = cfg.sample
    t0 = time.perf_counter()
    images = sample_teacher(backbone, net, prompts, steps=s.steps, guidance=s.guidance, seed=s.seed,
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
