"""PixArt-Sigma: PixArt-alpha's transformer (`PixArtTransformer2DModel`, learned sigma, epsilon on the linear VP
schedule) behind `PixArtSigmaPipeline`: T5 with 300 tokens (alpha: 120), the SDXL VAE, no micro-conditions on
the released checkpoints (the Sigma pipeline never passes resolution / aspect ratio; the adapter follows the
transformer's `use_additional_conditions`, false on those checkpoints). Everything else is the alpha adapter's.
"""
from __future__ import annotations

from tdm.backbones.pixart import PixArtAlphaBackbone


class PixArtSigmaBackbone(PixArtAlphaBackbone):
    family = "pixart_sigma"
    pipeline_classes = ("PixArtSigmaPipeline",)
    max_tokens = 300  # PixArtSigmaPipeline's max_sequence_length


__all__ = ["PixArtSigmaBackbone"]
