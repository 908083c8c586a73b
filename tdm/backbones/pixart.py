"""PixArt-alpha: a DiT (`PixArtTransformer2DModel`) + T5 + VAE, epsilon prediction on a linear VP schedule.

The transformer predicts 2x channels (epsilon and the learned variance): only the epsilon half is used.
Resolution and aspect-ratio conditions are passed when the model uses them (the 1024 px checkpoints).
diffusers has no LoRA mixin for PixArt: adapters are plain peft (`tdm.roles`, `Backbone.load_lora`).
"""
from __future__ import annotations

import torch
from torch import nn

from tdm.backbones.base import Cond
from tdm.backbones.pipeline import PipelineBackbone

MAX_SEQUENCE_LENGTH = 120  # the pipeline's T5 length


class PixArtAlphaBackbone(PipelineBackbone):
    family = "pixart_alpha"
    pipeline_classes = ("PixArtAlphaPipeline",)
    net_name = "transformer"
    net_classes = ("PixArtTransformer2DModel",)
    prediction_types = ("epsilon",)
    max_tokens = MAX_SEQUENCE_LENGTH  # the pipeline's T5 length (PixArt-Sigma: 300)

    @property
    def max_sequence_length(self) -> int:
        return min(self.max_tokens, self.pipe.tokenizer.model_max_length)

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                                     clean_caption=False,
                                                     max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def added_conditions(self, net: nn.Module, x_t: torch.Tensor) -> dict:
        if not getattr(net, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        n, (h, w) = x_t.shape[0], x_t.shape[-2:]
        h, w = h * self.vae_scale_factor, w * self.vae_scale_factor
        return {"resolution": torch.tensor([[h, w]], dtype=x_t.dtype, device=x_t.device).expand(n, 2),
                "aspect_ratio": torch.tensor([[h / w]], dtype=x_t.dtype, device=x_t.device).expand(n, 1)}

    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        x_t, cond = self.net_inputs(net, x_t, cond)
        out = net(x_t, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                  encoder_attention_mask=cond["encoder_attention_mask"],
                  added_cond_kwargs=self.added_conditions(net, x_t), return_dict=False)[0]
        if out.shape[1] == 2 * x_t.shape[1]:  # learned sigma: keep epsilon
            out = out.chunk(2, dim=1)[0]
        return out

    def time_embedding(self, net: nn.Module) -> nn.Module:
        return net.adaln_single.emb.timestep_embedder

    @property
    def lora_target_modules(self) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
