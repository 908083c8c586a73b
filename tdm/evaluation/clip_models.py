"""open_clip models built from local files: the backbone of the HPS, aesthetic and CLIP-score metrics.

A model is named `ARCH:TAG` (open_clip's names, e.g. `ViT-L-14:openai`); its weights are one file found by
`weights.find_weights` and handed to open_clip as `pretrained=<file>`, the path open_clip itself takes for a
local checkpoint. Settings a pretrained tag carries (QuickGELU, mean/std, resize) are applied from open_clip's
registry, so a local file behaves as the hub tag would. A file holding `{'state_dict': ...}` (HPS) loads too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdm.evaluation.weights import MissingWeights, WeightFile, find_weights

# Hub repos and sizes of the models the metrics use by default (known here so that a missing file is reported
# without importing open_clip, which takes seconds); other ARCH:TAGs are looked up in open_clip's registry.
_KNOWN = {("ViT-L-14", "openai"): ("timm/vit_large_patch14_clip_224.openai", "1.71 GB"),
          ("ViT-g-14", "laion2b_s12b_b42k"): ("laion/CLIP-ViT-g-14-laion2B-s12B-b42K", "5.47 GB"),
          ("ViT-H-14", "laion2b_s32b_b79k"): ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "3.94 GB"),
          ("ViT-B-32", "openai"): ("timm/vit_base_patch32_clip_224.openai", "0.61 GB")}


def parse_name(name: str) -> tuple[str, str]:
    arch, sep, tag = name.partition(":")
    if not sep or not arch or not tag:
        raise ValueError(f"open_clip model must be ARCH:TAG (e.g. ViT-L-14:openai), got {name!r}")
    return arch, tag


def _pretrained_cfg(arch: str, tag: str) -> dict:
    from open_clip.pretrained import get_pretrained_cfg

    return get_pretrained_cfg(arch, tag) or {}


def weight_files(arch: str, tag: str) -> list[WeightFile]:
    """Where the weights of ARCH:TAG may lie: `open_clip-ARCH-TAG.safetensors|.bin` flat, or the hub cache."""
    if (arch, tag) in _KNOWN:
        repo, size = _KNOWN[(arch, tag)]
    else:
        repo, size = (_pretrained_cfg(arch, tag).get("hf_hub") or "").strip("/") or None, "size unknown"
    return [WeightFile(f"open_clip-{arch}-{tag}.{ext}", size, repo=repo, repo_file=repo_file)
            for ext, repo_file in (("safetensors", "open_clip_model.safetensors"),
                                   ("bin", "open_clip_pytorch_model.bin"))]


def find_clip_weights(weights_dir: str | Path, name: str, metric: str) -> Path:
    arch, tag = parse_name(name)
    errors = []
    for wf in weight_files(arch, tag):
        try:
            return find_weights(weights_dir, wf, metric)
        except MissingWeights as err:
            errors.append(err)
    raise errors[0]  # names the preferred (safetensors) file


@dataclass
class ClipModel:
    model: nn.Module
    preprocess: Callable  # PIL image -> normalised tensor (open_clip's eval transform)
    tokenizer: Callable
    device: str

    @torch.no_grad()
    def image_features(self, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """uint8 N x H x W x C (C = 1 or 3) -> L2-normalised image embeddings (N, D), float32 on CPU."""
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(to_pil(im)) for im in images[start:start + batch_size]])
            f = self.model.encode_image(x.to(self.device)).float()
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(prompts[start:start + batch_size]).to(self.device)
            f = self.model.encode_text(tokens).float()
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        return torch.cat(out)


def to_pil(image: np.ndarray):
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected a uint8 H x W x 1|3 image, got {image.dtype} {image.shape}")
    return Image.fromarray(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image)


def load_clip(name: str, checkpoint: Path, device: str) -> ClipModel:
    """ARCH:TAG with its weights from `checkpoint` (a file), in eval mode on `device`."""
    import open_clip

    arch, tag = parse_name(name)
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r} (in {name!r})")
    pcfg = _pretrained_cfg(arch, tag)
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=str(checkpoint), device=device, force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
        image_mean=pcfg.get("mean"), image_std=pcfg.get("std"), image_interpolation=pcfg.get("interpolation"),
        image_resize_mode=pcfg.get("resize_mode"))
    model.eval()
    return ClipModel(model, preprocess, open_clip.get_tokenizer(arch), device)
