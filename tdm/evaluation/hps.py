"""HPSv2 / v2.1 (Human Preference Score): open_clip ViT-H-14 with the HPS checkpoint, loaded through open_clip.

The checkpoint (`HPS_v2.1_compressed.pt`, `{'state_dict': ...}` of the whole CLIP model) replaces every
weight, so the model is built from the architecture alone and the checkpoint given as open_clip's
`pretrained=<file>`: the 3.9 GB LAION weights that `hpsv2.img_score` fetches first are never needed.
Preprocessing is HPS's own ("light augmentation" eval transform: longest side to 224 with bicubic, zero pad,
OpenAI mean/std), so scores equal the `hpsv2x` package's (tests/test_eval_hps.py checks it).
Score = cosine(image, prompt) x 100, the scale the paper's tables use.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tdm.evaluation.clip_models import ClipModel, load_clip
from tdm.evaluation.weights import WeightFile, find_weights

VERSIONS = {
    "v2.1": WeightFile("HPS_v2.1_compressed.pt", "about 2 GB", repo="xswu/HPSv2"),
    "v2": WeightFile("HPS_v2_compressed.pt", "about 2 GB", repo="xswu/HPSv2"),
}
ARCH = "ViT-H-14"


def hps_preprocess(image_size: int):
    """HPS's eval transform (hpsv2 `image_transform(..., resize_longest_max=True)`), written out."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import Compose, InterpolationMode, Normalize, ToTensor
    from torchvision.transforms import functional as F

    def resize_max(img: torch.Tensor) -> torch.Tensor:
        height, width = img.shape[1:]
        scale = image_size / float(max(height, width))
        if scale == 1.0:
            return img
        new = tuple(round(d * scale) for d in (height, width))
        img = F.resize(img, list(new), InterpolationMode.BICUBIC)
        pad_h, pad_w = image_size - new[0], image_size - new[1]
        return F.pad(img, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)

    return Compose([lambda im: im.convert("RGB"), ToTensor(), resize_max,
                    Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])


class HPS:
    """`HPS(weights_dir)(images, prompts)` -> {"hps": mean score x 100}."""

    name = "hps"

    def __init__(self, weights_dir: str | Path, version: str = "v2.1", device: str = "cpu",
                 arch: str = ARCH) -> None:
        if version not in VERSIONS:
            raise ValueError(f"HPS version must be one of {sorted(VERSIONS)}, got {version!r}")
        checkpoint = find_weights(weights_dir, VERSIONS[version], f"hps ({version})")
        # The tag is irrelevant (every weight comes from the checkpoint); `:hps` keeps the open_clip defaults.
        clip = load_clip(f"{arch}:hps", checkpoint, device)
        size = clip.model.visual.image_size
        self.clip = ClipModel(clip.model, hps_preprocess(size[0] if isinstance(size, (tuple, list)) else size),
                              clip.tokenizer, device)
        self.version = version

    def scores(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Per-image HPS (cosine x 100)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.clip.device.startswith("cuda")):
            img = self.clip.image_features(images)
            txt = self.clip.text_features(list(prompts))
        return (img * txt).sum(-1).numpy() * 100.0

    def __call__(self, images: np.ndarray, prompts: Sequence[str], reference=None) -> dict:
        return {"hps": float(self.scores(images, prompts).mean())}
