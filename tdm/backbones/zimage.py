"""Z-Image (Tongyi-MAI Z-Image base and Z-Image-Turbo, 6B): `ZImageTransformer2DModel`, a single-stream DiT, +
Qwen3-4B as text encoder + FLUX.1's 16-channel VAE (scaling 0.3611, shift 0.1159), rectified flow.

What differs from the other flow families, and how the adapter maps it onto tdm's conventions:

* **Inverted time and velocity sign.** ZImagePipeline feeds the transformer (1000 - t) / 1000 for the scheduler's
  t = 1000 s (s = sigma; the transformer multiplies by its `t_scale` 1000), so the model sees 1 - s, the *clean*
  fraction, and it steps `FlowMatchEulerDiscreteScheduler` with `-model_out`: the model predicts x0 - n, the
  negative of diffusers' (and tdm's) velocity v = n - x0. `predict` does both flips: it takes tdm's integer
  t (B,) = 1000 s, feeds float32 (1000 - t) / 1000 exactly as the pipeline computes it, and returns -output
  (B, C, h, w), so `FlowSchedule` (x_t = (1 - s) x0 + s n, x0 = x_t - s v) reads it unchanged. The pipeline
  hard-codes 1000 for the scheduler's `num_train_timesteps`; a model with another value is refused.
* **List inputs.** The transformer takes a list of (C, 1, h, w) latents and a list of variable-length prompt
  embeddings (L_i, D) (ZImagePipeline's `_encode_prompt`: Qwen3's second-to-last hidden state of the chat-
  templated prompt, `hidden_states[-2]`, at the attended tokens only). tdm's conditioning is batch-first tensors,
  so `encode_prompts` keeps the pipeline's embeddings padded to `max_sequence_length` with zeros
  (`encoder_hidden_states` (B, L, D)) plus the pipeline's own attention mask (`encoder_attention_mask` (B, L) int64,
  1 on the tokens it keeps), and `predict` hands the transformer exactly the pipeline's list (each row's masked
  tokens); padded and unpadded conditionings of one prompt give the same output.
* **CFG convention.** ZImagePipeline's `guidance_scale` g gives pos + g (pos - neg) = neg + (g + 1)(pos - neg)
  (CFG only when g > 0; optional `cfg_normalization` / `cfg_truncation`, off by default). tdm's guidance w is the
  standard neg + w (pos - neg), so w = g + 1: `distill.guidance: 5.0` is the pipeline at `guidance_scale=4.0`, and
  a student (CFG baked in) is sampled with `guidance_scale=0.0` (no negative pass). The negative prompt is the
  pipeline's default, "" (chat-templated like every prompt). Neither renormalisation nor truncation is baked.
* **Time embedding.** `t_embedder` (the module `TimestepEmbedder`, ending in an `nn.Sequential` mlp whose last
  layer is an `nn.Linear`; output (B, min(dim, 256))) is where TDM-unify's K embedding is added; it is not a
  diffusers `TimestepEmbedding`, so `tdm export` cannot fold a K embedding into it yet (refused there, by name).
* **Native shape.** The transformer stores no sample size: the pipeline's default 1024 x 1024 (latents
  16 x 128 x 128), or `tdm_backbone.json` (`tdm.backbones.native_shape`); height / width multiples of 16 (the
  VAE's 8 x the 2 x 2 patch), as the pipeline requires.
"""
from __future__ import annotations

import torch
from torch import nn

from tdm.backbones.base import Cond
from tdm.backbones.native_shape import FolderSettings
from tdm.backbones.pipeline import UnsupportedModel

MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline.__call__'s max_sequence_length
PIPELINE_TIMESTEPS = 1000  # the constant ZImagePipeline maps timesteps with: (1000 - t) / 1000
PATCH, F_PATCH = 2, 1  # ZImageTransformer2DModel.forward's default patch sizes (the pipeline's call)
# Attention (to_q / to_k / to_v / to_out.0) and the SwiGLU feed-forward (w1, w2, w3) of every block: the main
# layers and both refiners (noise_refiner, context_refiner), the same module names under each.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


class ZImageBackbone(FolderSettings):
    family = "zimage"
    pipeline_classes = ("ZImagePipeline",)
    net_name = "transformer"
    net_classes = ("ZImageTransformer2DModel",)
    prediction_types = ("flow",)
    text_encoders = ("text_encoder",)
    defaults = {"height": 1024, "width": 1024}  # ZImagePipeline.__call__'s defaults

    # -- checks ---------------------------------------------------------------------------------------------------
    @classmethod
    def check_schedule(cls, scheduler, where: str):
        schedule, ptype = super().check_schedule(scheduler, where)
        if scheduler.config.num_train_timesteps != PIPELINE_TIMESTEPS:
            raise UnsupportedModel(f"{where}: num_train_timesteps={scheduler.config.num_train_timesteps}: "
                                   f"ZImagePipeline maps timesteps with the constant {PIPELINE_TIMESTEPS} "
                                   f"((1000 - t) / 1000), so only {PIPELINE_TIMESTEPS} is handled")
        return schedule, ptype

    def check_settings(self, where: str) -> None:
        super().check_settings(where)
        config = self.net.config
        if PATCH not in tuple(config.all_patch_size) or F_PATCH not in tuple(config.all_f_patch_size):
            raise UnsupportedModel(f"{where}: transformer all_patch_size {config.all_patch_size} / all_f_patch_size "
                                   f"{config.all_f_patch_size} lack the ({PATCH}, {F_PATCH}) patch ZImagePipeline uses")
        m = PATCH * self.vae_scale_factor
        if self.settings["height"] % m or self.settings["width"] % m:
            raise ValueError(f"{where}: native shape {self.settings['height']}x{self.settings['width']}: height and "
                             f"width must be multiples of {m} (VAE factor x the 2x2 patch)")

    # -- shapes ---------------------------------------------------------------------------------------------------
    @property
    def native_latent_size(self) -> tuple[int, int]:
        return self.settings["height"] // self.vae_scale_factor, self.settings["width"] // self.vae_scale_factor

    @property
    def latent_multiple(self) -> int:
        return PATCH

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.net.config.in_channels, *self.latent_size)

    # -- prompts --------------------------------------------------------------------------------------------------
    @property
    def max_sequence_length(self) -> int:
        return min(MAX_SEQUENCE_LENGTH, self.pipe.tokenizer.model_max_length)

    def _encode(self, prompts: list[str]) -> Cond:
        """The pipeline's own per-prompt embeddings ((L_i, D), its text encoder's dtype), zero-padded to
        (B, L, D) with L = `max_sequence_length`, and the mask of the kept tokens (B, L) int64."""
        length = self.max_sequence_length
        # encode_prompt rewrites its list in place (the chat template): give it a copy.
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False,
                                            max_sequence_length=length)
        first = embeds[0]
        padded = first.new_zeros((len(embeds), length, first.shape[-1]))
        mask = torch.zeros((len(embeds), length), dtype=torch.int64, device=first.device)
        for i, e in enumerate(embeds):
            padded[i, :len(e)] = e
            mask[i, :len(e)] = 1
        return {"encoder_hidden_states": padded, "encoder_attention_mask": mask}

    @staticmethod
    def caption_list(cond: Cond) -> list[torch.Tensor]:
        """The transformer's `cap_feats`: each row's kept tokens (L_i, D). ValueError when a row keeps none. On
        the meta device (`tdm.memory_plan`: no values, so no mask to read) every row is taken at its full padded
        length L, an upper bound on the caption tokens."""
        embeds, mask = cond["encoder_hidden_states"], cond["encoder_attention_mask"].bool()
        if embeds.is_meta:
            return list(embeds.unbind(dim=0))
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("zimage: a conditioning row has no tokens (encoder_attention_mask all zero)")
        return [e[m] for e, m in zip(embeds, mask)]

    # -- model ----------------------------------------------------------------------------------------------------
    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """tdm's velocity n - x0 at x_t (B, C, h, w), t (B,) timesteps (t = 1000 s): the transformer fed as
        ZImagePipeline feeds it (list of (C, 1, h, w) latents, float32 (1000 - t) / 1000, per-prompt embeddings),
        its output negated (the pipeline steps with -model_out). Returns (B, C, h, w) in the net's dtype."""
        x_t, cond = self.net_inputs(net, x_t, cond)
        timestep = (PIPELINE_TIMESTEPS - t.to(device=x_t.device, dtype=torch.float32)) / PIPELINE_TIMESTEPS
        out = net(list(x_t.unsqueeze(2).unbind(dim=0)), timestep, self.caption_list(cond), return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)

    def time_embedding(self, net: nn.Module) -> nn.Module:
        return net.t_embedder

    def time_embed_dim(self, net: nn.Module) -> int:
        return net.t_embedder.mlp[-1].out_features

    @property
    def lora_target_modules(self) -> list[str]:
        return list(LORA_TARGETS)


__all__ = ["ZImageBackbone", "MAX_SEQUENCE_LENGTH", "LORA_TARGETS"]
