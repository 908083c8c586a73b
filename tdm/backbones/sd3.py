"""Stable Diffusion 3: an MMDiT (`SD3Transformer2DModel`) + two CLIP encoders + T5 + a 16-channel VAE with a
shift factor, trained by rectified flow.

Flow matching in the schedule view: t = 1000 s, x_t = (1 - s) x0 + s n, the model predicts the velocity
n - x0 (`prediction_type` "flow"). The scheduler's `shift` only chooses the teacher's sampling timesteps; the
marginals at a given t are the same, so the TDM math needs nothing else.
"""
from __future__ import annotations

import torch
from torch import nn

from tdm.backbones.base import Cond
from tdm.backbones.pipeline import PipelineBackbone

MAX_SEQUENCE_LENGTH = 256  # the pipeline's T5 length


class SD3Backbone(PipelineBackbone):
    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    net_name = "transformer"
    net_classes = ("SD3Transformer2DModel",)
    prediction_types = ("flow",)
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")

    @property
    def max_sequence_length(self) -> int:
        tokenizer = getattr(self.pipe, "tokenizer_3", None)
        return min(MAX_SEQUENCE_LENGTH, tokenizer.model_max_length) if tokenizer is not None else MAX_SEQUENCE_LENGTH

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        x_t, cond = self.net_inputs(net, x_t, cond)
        return net(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                   pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    def time_embedding(self, net: nn.Module) -> nn.Module:
        return net.time_text_embed.timestep_embedder

    @property
    def lora_target_modules(self) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
