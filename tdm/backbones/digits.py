"""The embedded default: a small text-conditioned UNet on scikit-learn's 8x8 handwritten digits.

It is the SD1.5 code path (UNet2DConditionModel + CLIPTextModel + CLIPTokenizer, epsilon prediction, a
DDPM-style VP schedule) in pixel space: no VAE, one grey channel at 8x8, so everything runs on a CPU in minutes.
The folder it saves is laid out like a diffusers pipeline (model_index.json, unet/, text_encoder/, tokenizer/,
scheduler/), and each part loads with its own `from_pretrained`.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tdm.backbones.base import Backbone, Cond, forget_call_settings, to_uint8, write_extra_files
from tdm.backbones.clip_tokenizer import vocab_size, write_clip_tokenizer
from tdm.schedule import VPSchedule

FAMILY = "digits"
PIPELINE_CLASS = "TDMDigitsPipeline"


@dataclass(frozen=True)
class DigitsArch:
    """Architecture of a freshly initialised digits model (there is no pretrained one)."""

    channels: tuple[int, ...] = (32, 64, 64)  # UNet widths per level: 8x8, 4x4, 2x2; cross-attention below 8x8
    layers_per_block: int = 1
    # GroupNorm groups. diffusers' default 32 assumes wide layers: at 32 channels it normalises each channel
    # alone and so erases the per-channel time-embedding shift the resnets add (the UNet goes time-blind).
    norm_groups: int = 8
    attention_heads: int = 4
    text_dim: int = 64
    text_layers: int = 2
    num_merges: int = 10000  # a prefix of CLIP's BPE merges: ids agree with real CLIP, vocabulary stays small
    max_length: int = 16
    beta_schedule: str = "squaredcos_cap_v2"  # cosine: the linear schedule destroys 8x8 images too early

    def __post_init__(self):
        if len(self.channels) < 2 or any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"model.channels: need >= 2 levels, each a multiple of {self.norm_groups} (GroupNorm), "
                             f"got {self.channels}")
        if 8 % 2 ** (len(self.channels) - 1):
            raise ValueError(f"model.channels: {len(self.channels)} levels do not divide an 8x8 image")


class DigitsBackbone(Backbone):
    family = FAMILY
    prediction_type = "epsilon"
    image_channels = 1
    clip_x0 = 1.0  # pixel space: data lies in [-1, 1]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel | None, tokenizer: CLIPTokenizer,
                 scheduler: DDPMScheduler):
        self.net = unet
        # None: loaded without it (`load(text_encoders=False)`); a prompt store stands in (`tdm.backbones.stored_prompts`).
        self.text_encoder = text_encoder.eval().requires_grad_(False) if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.schedule = VPSchedule.from_scheduler(scheduler)
        self.prediction_type = scheduler.config.prediction_type
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._null_cache = None

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, arch: DigitsArch = DigitsArch(), seed: int = 0) -> "DigitsBackbone":
        """A fresh, randomly initialised digits model (weights fixed by `seed`)."""
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, arch.num_merges, arch.max_length))
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size(arch.num_merges), hidden_size=arch.text_dim, intermediate_size=2 * arch.text_dim,
            num_hidden_layers=arch.text_layers, num_attention_heads=4, max_position_embeddings=arch.max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, projection_dim=arch.text_dim,
        ))
        n = len(arch.channels)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=arch.channels,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            layers_per_block=arch.layers_per_block, cross_attention_dim=arch.text_dim,
            attention_head_dim=arch.attention_heads, norm_num_groups=arch.norm_groups,
        )
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=arch.beta_schedule,
                                  beta_start=0.0001, beta_end=0.02, prediction_type="epsilon", clip_sample=False)
        return cls(unet, text_encoder, tokenizer, scheduler)

    @classmethod
    def load(cls, folder: str | Path, text_encoders: bool = True, quantization: str | None = None) -> "DigitsBackbone":
        """A saved digits folder; `text_encoders=False` never constructs the text encoder (a prompt store stands
        in for it; saving links its folder from this one). `quantization`: the UNet's Linear weights int8 / fp8
        (`tdm.quantize.load_denoiser`; its convolutions, most of it, stay float32)."""
        folder = Path(folder)
        if quantization is not None:
            from tdm.quantize import load_denoiser

            unet = load_denoiser(folder, "unet", UNet2DConditionModel, quantization)
        else:
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        backbone = cls(
            unet,
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder") if text_encoders else None,
            CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        )
        backbone.source_folder = folder
        backbone.skipped_components = () if text_encoders else ("text_encoder",)
        return backbone

    def save(self, folder: str | Path, net: nn.Module | None = None,
             extra_files: dict[str, str | bytes] | None = None, scheduler=None) -> None:
        """Write the model folder atomically (a sibling temp folder, then a rename); `extra_files` are written
        into it too (e.g. the params that made it); `scheduler` in place of the model's when given."""
        import diffusers

        from tdm.artifacts import atomic_folder

        with atomic_folder(folder) as tmp:
            (net if net is not None else self.net).save_pretrained(tmp / "unet")
            if self.text_encoder is not None:
                self.text_encoder.save_pretrained(tmp / "text_encoder")
            forget_call_settings(self.tokenizer)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            scheduler = scheduler or self.scheduler
            scheduler.save_pretrained(tmp / "scheduler")
            module = "diffusers" if type(scheduler).__module__.startswith("diffusers") else type(scheduler).__module__
            (tmp / "model_index.json").write_text(json.dumps({
                "_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__, "tdm_family": FAMILY,
                "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": [module, type(scheduler).__name__],
            }, indent=2))
            self.copy_skipped_components(tmp)
            write_extra_files(tmp, extra_files)

    # -- the protocol -------------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        c = self.net.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """{"encoder_hidden_states": (B, max_length, text_dim)} float32 on the text encoder's device, or the
        attached prompt store's rows (bit-identical)."""
        if self.prompt_store is not None:
            return self.prompt_store.encode(list(prompts), self)
        self.missing_text_encoders()
        # The digits prompt set is small and the text encoder frozen: cache per prompt.
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state
            self._prompt_cache.update(zip(missing, hidden))
        return {"encoder_hidden_states": torch.stack([self._prompt_cache[p] for p in prompts])}

    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return net(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images  # pixel space

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return to_uint8(x0)

    @property
    def lora_target_modules(self) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, **({"text_encoder": self.text_encoder} if self.text_encoder is not None else {})}

    def to(self, device):
        super().to(device)
        self._prompt_cache.clear()
        return self
