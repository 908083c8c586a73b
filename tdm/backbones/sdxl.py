"""SDXL: UNet + two CLIP text encoders (penultimate hidden states concatenated; pooled output of the second)
+ VAE, with the size/crop micro-conditioning `time_ids` = (orig h, orig w, crop top, crop left, h, w).

The unconditional branch follows the pipeline: with `force_zeros_for_empty_prompt` (SDXL base) it is all
zeros, not the encoding of "".
"""
from __future__ import annotations

import torch
from torch import nn

from tdm.backbones.base import Cond
from tdm.backbones.pipeline import PipelineBackbone


class SDXLBackbone(PipelineBackbone):
    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_encoders = ("text_encoder", "text_encoder_2")

    def time_ids(self, n: int) -> torch.Tensor:
        h, w = self.resolution  # generated at the training size: no crop, original = target
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).expand(n, 6)

    # The size micro-conditioning is not a text encoder output: recomputed at the current resolution (a stage's
    # `set_resolution`), also over rows a prompt store gives (stored at the native size; equal there).
    def encode_prompts(self, prompts) -> Cond:
        return {**super().encode_prompts(prompts), "time_ids": self.time_ids(len(prompts))}

    def null_cond(self, n: int) -> Cond:
        return {**super().null_cond(n), "time_ids": self.time_ids(n)}

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": self.time_ids(len(prompts))}

    def _null(self) -> Cond:
        null = self.encode_prompts([""])
        if self.pipe.config.force_zeros_for_empty_prompt:
            null = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in null.items()}
        return null

    def prompt_settings(self) -> dict:
        # The native size's ids: a store is made (and checked) at the native size; a stage's set_resolution
        # recomputes the live ids over the stored rows (encode_prompts).
        h, w = (side * self.vae_scale_factor for side in self.native_latent_size)
        return {"force_zeros_for_empty_prompt": bool(self.pipe.config.force_zeros_for_empty_prompt),
                "time_ids": [h, w, 0, 0, h, w]}

    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        x_t, cond = self.net_inputs(net, x_t, cond)
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return net(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added,
                   return_dict=False)[0]
