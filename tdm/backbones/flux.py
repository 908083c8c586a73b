"""FLUX.1 (dev, schnell, and fine-tunes such as Krea): `FluxTransformer2DModel` + CLIP-L (pooled) + T5-XXL + a
16-channel VAE with a shift factor, rectified flow.

* Schedule: `FlowMatchEulerDiscreteScheduler` with resolution-dependent shift (`use_dynamic_shifting`, mu from the
  packed image sequence length, `calculate_shift`): like SD3's `shift`, mu only picks the teacher sampler's grid;
  the marginals are rectified flow, t = 1000 s, x_t = (1 - s) x0 + s n, v = n - x0 (`FlowSchedule`).
* Latents: tdm works on the unpacked latents (16, H/8, W/8) per sample (what the VAE gives; elementwise schedule
  ops do not care about layout); `predict` packs them into 2x2 patches ((B, h/2 * w/2, 64), FluxPipeline's
  `_pack_latents`), builds the RoPE ids (`_prepare_latent_image_ids`: (h/2 * w/2, 3) rows (0, row, col); text ids
  zeros (L, 3)), feeds t / 1000 as the pipeline does, and unpacks the velocity.
* Guidance: FLUX.1-dev is guidance-distilled (`guidance_embeds: true`): its guidance is an input, not two passes.
  The conditioning carries it (`cond["guidance"]`, (B,) float32, the adapter's `embedded_guidance`: default 3.5,
  FluxPipeline's default `guidance_scale`), for the teacher, the student and the fake score alike, so the student
  starts as an exact copy of the teacher it distils. `distill.guidance` > 1 adds real CFG against the empty prompt
  on top (two passes; FluxPipeline's `true_cfg_scale` with negative_prompt ""). A student is sampled by the stock
  pipeline with `guidance_scale=embedded_guidance` (its guidance input, not CFG) and no true CFG. schnell has no
  guidance input. docs/backbones.md, "FLUX guidance", has the decision and what was measured.
* Native shape: 1024 x 1024 (the pipeline's default), or `tdm_backbone.json` (`tdm.backbones.native_shape`), which
  also holds `embedded_guidance`.
"""
from __future__ import annotations

import torch
from torch import nn

from tdm.backbones.base import Cond
from tdm.backbones.native_shape import FolderSettings

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's T5 length for dev (schnell's model card: 256)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w): FluxPipeline._unpack_latents, in latent (not pixel) units."""
    b, _, c4 = packed.shape
    return packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


class FluxBackbone(FolderSettings):
    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    net_name = "transformer"
    net_classes = ("FluxTransformer2DModel",)
    prediction_types = ("flow",)
    text_encoders = ("text_encoder", "text_encoder_2")
    defaults = {"height": 1024, "width": 1024, "embedded_guidance": DEFAULT_GUIDANCE}

    def check_settings(self, where: str) -> None:
        if isinstance(self.settings.get("embedded_guidance"), int):
            self.settings["embedded_guidance"] = float(self.settings["embedded_guidance"])
        super().check_settings(where)
        m = 2 * self.vae_scale_factor
        if self.settings["height"] % m or self.settings["width"] % m:
            raise ValueError(f"{where}: native shape {self.settings['height']}x{self.settings['width']}: height and "
                             f"width must be multiples of {m} (VAE factor x the 2x2 packing)")

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.net.config.guidance_embeds)

    @property
    def embedded_guidance(self) -> float | None:
        """The guidance input every role sees (None for models without one: schnell)."""
        return self.settings["embedded_guidance"] if self.guidance_embeds else None

    @embedded_guidance.setter
    def embedded_guidance(self, value: float) -> None:
        self.settings["embedded_guidance"] = float(value)
        self._null_cache = None

    @property
    def native_latent_size(self) -> tuple[int, int]:
        return self.settings["height"] // self.vae_scale_factor, self.settings["width"] // self.vae_scale_factor

    @property
    def latent_multiple(self) -> int:
        return 2  # the pipeline packs 2x2 latent patches into tokens

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.net.config.in_channels // 4, *self.latent_size)

    @property
    def max_sequence_length(self) -> int:
        return min(MAX_SEQUENCE_LENGTH, self.pipe.tokenizer_2.model_max_length)

    def prompt_settings(self) -> dict:
        return {**super().prompt_settings(), "embedded_guidance": self.embedded_guidance}

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.guidance_embeds:
            cond["guidance"] = torch.full((len(prompts),), self.embedded_guidance, dtype=torch.float32,
                                          device=embeds.device)
        return cond

    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The velocity at x_t (B, C, h, w), t (B,) integer timesteps; cond["guidance"] (B,) when the model takes
        it (a model with guidance_embeds needs it)."""
        x_t, cond = self.net_inputs(net, x_t, cond)
        b, _, h, w = x_t.shape
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        embeds = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        guidance = cond.get("guidance") if net.config.guidance_embeds else None
        if net.config.guidance_embeds and guidance is None:
            raise ValueError("flux: this model takes a guidance input (guidance_embeds) and the conditioning has none")
        out = net(hidden_states=pack(x_t), timestep=t.to(x_t.dtype) / 1000, guidance=guidance,
                  pooled_projections=cond["pooled_projections"], encoder_hidden_states=embeds, txt_ids=txt_ids,
                  img_ids=img_ids, return_dict=False)[0]
        return unpack(out, h, w)

    def time_embedding(self, net: nn.Module) -> nn.Module:
        return net.time_text_embed.timestep_embedder

    @property
    def lora_target_modules(self) -> list[str]:
        # Double blocks: joint attention (to_*, add_*_proj, to_add_out) and both FFs; single blocks: to_q/k/v,
        # proj_mlp, proj_out (the final proj_out matches too). The set diffusers' FLUX LoRA scripts train.
        return ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]


__all__ = ["FluxBackbone", "pack", "unpack", "DEFAULT_GUIDANCE"]
