"""Wan2.1 T2V (1.3B / 14B): `WanTransformer3DModel` + UMT5 + `AutoencoderKLWan`, rectified flow with a shifted
sampler grid.

* Schedule: the hub checkpoints ship `UniPCMultistepScheduler` in its flow mode (`use_flow_sigmas: true`,
  `prediction_type: "flow_prediction"`, `flow_shift` 3.0 for 480p / 5.0 for 720p); some repackagings ship
  `FlowMatchEulerDiscreteScheduler`. Either way the marginals are rectified flow, read as `FlowSchedule`:
  t = T s (T = num_train_timesteps), x_t = (1 - s) x0 + s n, the model predicts v = n - x0 (UniPC:
  `_sigma_to_alpha_sigma_t` gives alpha = 1 - s, sigma = s; `convert_model_output` x0 = x - s v). `flow_shift`
  only picks the teacher sampler's grid. The pipeline feeds the transformer t = int(1000 s) (int64).
* Latents: (C, F', H/8, W/8) per sample, as the transformer and the VAE both take them ((B, C, F, H, W));
  F' = (F - 1) / 4 + 1 (81 frames -> 21). Normalised per channel: (z - latents_mean) / latents_std
  (WanPipeline decodes with z = x * latents_std + latents_mean). `decode` gives uint8 frames (B, F, H, W, C).
* Native shape: the pipeline's defaults 480x832, 81 frames, or `tdm_backbone.json` (`tdm.backbones.native_shape`).
* Text: UMT5-XXL, 512 tokens (the pipeline's max_sequence_length), embeddings zeroed past each prompt's length;
  the unconditional branch is the empty prompt (the pipeline's default negative_prompt None -> "").
* Refused (clear message, before loading weights): Wan2.2 A14B's two experts (`transformer_2`, `boundary_ratio`)
  and Wan2.2 TI2V's per-token timesteps (`expand_timesteps`): see docs/backbones.md for the two-expert design.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tdm.backbones.base import Cond
from tdm.backbones.cogvideox import to_uint8_frames
from tdm.backbones.native_shape import FolderSettings
from tdm.backbones.pipeline import UnsupportedModel, read_model_index
from tdm.schedule import FlowSchedule

MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default
FLOW_SIGMA_SCHEDULERS = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


class WanBackbone(FolderSettings):
    family = "wan"
    pipeline_classes = ("WanPipeline",)
    net_name = "transformer"
    net_classes = ("WanTransformer3DModel",)
    prediction_types = ("flow",)
    defaults = {"height": 480, "width": 832, "num_frames": 81}  # WanPipeline.__call__'s defaults

    # -- checks ---------------------------------------------------------------------------------------------------
    @classmethod
    def check_schedule(cls, scheduler, where: str):
        """UniPC / DPM-Solver in flow mode (use_flow_sigmas + flow_prediction) is rectified flow; anything else as
        every family reads it (FlowMatchEuler: flow; a VP scheduler: refused by prediction type)."""
        config = scheduler.config
        if type(scheduler).__name__ in FLOW_SIGMA_SCHEDULERS and getattr(config, "use_flow_sigmas", False):
            if config.prediction_type != "flow_prediction":
                raise UnsupportedModel(f"{where}: {type(scheduler).__name__} with use_flow_sigmas and prediction type "
                                       f"{config.prediction_type!r} is not handled (flow_prediction only)")
            if getattr(config, "thresholding", False):
                raise UnsupportedModel(f"{where}: thresholding is not handled")
            return FlowSchedule(config.num_train_timesteps), "flow"
        return super().check_schedule(scheduler, where)

    @classmethod
    def check_folder(cls, folder: Path) -> None:
        super().check_folder(folder)
        meta = read_model_index(folder)
        where = str(Path(folder) / "model_index.json")
        if (meta.get("transformer_2") or [None, None])[1] is not None or meta.get("boundary_ratio") is not None:
            raise UnsupportedModel(f"{where}: a two-expert Wan2.2 model (transformer_2 / boundary_ratio) is not "
                                   f"handled yet; Wan2.1 T2V models are (docs/backbones.md, Known limits)")
        if meta.get("expand_timesteps"):
            raise UnsupportedModel(f"{where}: expand_timesteps (Wan2.2 TI2V per-token timesteps) is not handled")

    def check_settings(self, where: str) -> None:
        super().check_settings(where)
        s, t = self.vae.config.scale_factor_spatial, self.vae.config.scale_factor_temporal
        p = self.net.config.patch_size
        h, w, f = self.settings["height"], self.settings["width"], self.settings["num_frames"]
        if h % (s * p[1]) or w % (s * p[2]) or (f - 1) % t:
            raise ValueError(f"{where}: native shape {h}x{w}, {f} frames: height / width must be multiples of "
                             f"{s * p[1]} and num_frames - 1 of {t}")

    # -- shapes ---------------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.scale_factor_spatial

    @property
    def temporal_compression(self) -> int:
        return self.vae.config.scale_factor_temporal

    @property
    def num_frames(self) -> int:
        return self.settings["num_frames"]

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.temporal_compression + 1

    @property
    def native_latent_size(self) -> tuple[int, int]:
        return self.settings["height"] // self.vae_scale_factor, self.settings["width"] // self.vae_scale_factor

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.net.config.in_channels, self.latent_frames, *self.latent_size)

    # -- model ----------------------------------------------------------------------------------------------------
    @property
    def max_sequence_length(self) -> int:
        return min(MAX_SEQUENCE_LENGTH, self.pipe.tokenizer.model_max_length)

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds}

    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The velocity at (x_t (B, C, F', h, w), t (B,) integer timesteps)."""
        x_t, cond = self.net_inputs(net, x_t, cond)
        return net(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                   return_dict=False)[0]

    def time_embedding(self, net: nn.Module) -> nn.Module:
        return net.condition_embedder.time_embedder

    # -- latents --------------------------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.vae.config
        shape = (1, c.z_dim, 1, 1, 1)
        return (torch.tensor(c.latents_mean, dtype=like.dtype, device=like.device).view(shape),
                torch.tensor(c.latents_std, dtype=like.dtype, device=like.device).view(shape))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Videos (B, 3, F, H, W) in [-1, 1], or images (B, 3, H, W) as static clips -> latents (B, C, F', h, w)."""
        if images.ndim == 4:
            images = images.unsqueeze(2).expand(-1, -1, self.num_frames, -1, -1)
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).float()

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F', h, w) -> uint8 frames (B, F, H, W, 3)."""
        z = x0.to(self.vae.device, self.vae.dtype)
        mean, std = self._latent_stats(z)
        return to_uint8_frames(self.vae.decode(z * std + mean, return_dict=False)[0].float())

    @property
    def lora_target_modules(self) -> list[str]:
        # Self- and cross-attention (attn1 / attn2) and the feed-forward: the set diffusers' Wan LoRAs train.
        return ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


__all__ = ["WanBackbone"]
