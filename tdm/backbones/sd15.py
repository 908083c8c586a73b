"""Stable Diffusion 1.x (and its fine-tunes: Dreamshaper, Realistic Vision, ...): UNet + CLIP ViT-L + VAE.

Any `StableDiffusionPipeline` folder loads: epsilon models (SD1.5) and v-prediction ones (SD2.x) alike, on the
scheduler's own VP schedule (scaled_linear 0.00085-0.012). Prompts go through the pipeline's own
`encode_prompt`, so the conditioning is exactly what diffusers samples with.
"""
from __future__ import annotations

import torch
from torch import nn

from tdm.backbones.base import Cond
from tdm.backbones.pipeline import PipelineBackbone


class SD15Backbone(PipelineBackbone):
    family = "sd15"
    pipeline_classes = ("StableDiffusionPipeline",)
    load_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        x_t, cond = self.net_inputs(net, x_t, cond)
        return net(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]
