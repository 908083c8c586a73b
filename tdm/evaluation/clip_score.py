"""CLIP score: 100 x max(cosine(image, prompt), 0), averaged (torchmetrics' definition), on open_clip.

open_clip directly rather than torchmetrics' CLIPScore, which breaks with transformers 5 and only takes
OpenAI names. The default model is configurable (`eval.clip_model`, ARCH:TAG).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tdm.evaluation.clip_models import find_clip_weights, load_clip

CLIP_MODEL = "ViT-g-14:laion2b_s12b_b42k"


class ClipScore:
    """`ClipScore(weights_dir)(images, prompts)` -> {"clip_score": mean 100 x max(cos, 0)}."""

    name = "clip"

    def __init__(self, weights_dir: str | Path, device: str = "cpu", clip_model: str = CLIP_MODEL) -> None:
        self.clip = load_clip(clip_model, find_clip_weights(weights_dir, clip_model, "clip"), device)

    def scores(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cos = (self.clip.image_features(images) * self.clip.text_features(list(prompts))).sum(-1)
        return 100.0 * cos.clamp(min=0).numpy()

    def __call__(self, images: np.ndarray, prompts: Sequence[str], reference=None) -> dict:
        return {"clip_score": float(self.scores(images, prompts).mean())}
