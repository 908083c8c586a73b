"""CogVideoX (2B): a 3D transformer + T5 + a causal video VAE, v-prediction on a zero-terminal-SNR schedule.

Latents are (F, C, H, W) per sample, as the transformer takes them (the VAE works on (C, F, H, W)); 49 frames
compress to 13 latent frames. `decode` returns uint8 frames (B, F, H, W, C). Teacher fine-tuning on an
image-caption folder trains on still images as static clips (each image repeated over the frames).
"""
from __future__ import annotations

import torch
from torch import nn

from tdm.backbones.base import Cond
from tdm.backbones.pipeline import PipelineBackbone


class CogVideoXBackbone(PipelineBackbone):
    family = "cogvideox"
    pipeline_classes = ("CogVideoXPipeline",)
    net_name = "transformer"
    net_classes = ("CogVideoXTransformer3DModel",)
    prediction_types = ("v_prediction",)

    @property
    def native_latent_size(self) -> tuple[int, int]:
        c = self.net.config
        return c.sample_height, c.sample_width

    @property
    def temporal_compression(self) -> int:
        return self.vae.config.temporal_compression_ratio

    @property
    def num_frames(self) -> int:
        return self.net.config.sample_frames

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.temporal_compression + 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.latent_frames, self.net.config.in_channels, *self.latent_size)

    def prompt_settings(self) -> dict:
        return {"max_sequence_length": int(self.net.config.max_text_seq_length)}

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                            max_sequence_length=self.net.config.max_text_seq_length)
        return {"encoder_hidden_states": embeds}

    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        x_t, cond = self.net_inputs(net, x_t, cond)
        rotary = None
        if net.config.use_rotary_positional_embeddings:  # CogVideoX-5B; the 2B model uses sincos embeddings
            h, w = x_t.shape[-2] * self.vae_scale_factor, x_t.shape[-1] * self.vae_scale_factor
            rotary = self.pipe._prepare_rotary_positional_embeddings(h, w, x_t.shape[1], x_t.device)
        return net(hidden_states=x_t, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                   image_rotary_emb=rotary, return_dict=False)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Videos (B, C, F, H, W) in [-1, 1], or images (B, C, H, W) as static clips -> latents (B, F', C, h, w)."""
        if images.ndim == 4:
            images = images.unsqueeze(2).expand(-1, -1, self.num_frames, -1, -1)
        latents = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).float()

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents (B, F', C, h, w) -> uint8 frames (B, F, H, W, C)."""
        latents = x0.permute(0, 2, 1, 3, 4).to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        frames = self.vae.decode(latents, return_dict=False)[0].float()  # (B, C, F, H, W)
        return to_uint8_frames(frames)

    @property
    def lora_target_modules(self) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, F, H, W) -> uint8 (B, F, H, W, C)."""
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()
