"""Aesthetic score: the LAION improved-aesthetic-predictor MLP on OpenAI CLIP ViT-L/14 image embeddings.

The MLP (`sac+logos+ava1-l14-linearMSE.pth`, a plain state dict, keys `layers.{0,2,4,6,7}`) reads the
L2-normalised CLIP image embedding and predicts a 1-10 rating. Its input width is read from the file, and
must match the CLIP model's embedding (768 for ViT-L/14).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdm.evaluation.clip_models import find_clip_weights, load_clip
from tdm.evaluation.weights import WeightFile, find_weights, load_state_dict

MLP_FILE = WeightFile("sac+logos+ava1-l14-linearMSE.pth", "3.7 MB",
                      url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                          "sac%2Blogos%2Bava1-l14-linearMSE.pth")
CLIP_MODEL = "ViT-L-14:openai"


class AestheticMLP(nn.Module):
    """The predictor's head, layer for layer (dropouts at 1, 3, 5 so the state-dict keys match)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_mlp(path: Path) -> AestheticMLP:
    state = load_state_dict(path, "aesthetic")
    if "layers.0.weight" not in state:
        raise ValueError(f"aesthetic: {path} is not the improved-aesthetic-predictor MLP (no layers.0.weight)")
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.eval()


class Aesthetic:
    """`Aesthetic(weights_dir)(images, prompts)` -> {"aesthetic": mean predicted rating}."""

    name = "aesthetic"

    def __init__(self, weights_dir: str | Path, device: str = "cpu", clip_model: str = CLIP_MODEL) -> None:
        # Both files are looked up before either is loaded: a missing one fails at once.
        mlp_path = find_weights(weights_dir, MLP_FILE, "aesthetic")
        clip_path = find_clip_weights(weights_dir, clip_model, "aesthetic (CLIP image encoder)")
        self.mlp = load_mlp(mlp_path).to(device)
        self.clip = load_clip(clip_model, clip_path, device)
        embed = getattr(self.clip.model.visual, "output_dim", None)
        if embed is not None and embed != self.mlp.input_size:
            raise ValueError(f"aesthetic: the MLP reads {self.mlp.input_size}-d embeddings but {clip_model} "
                             f"makes {embed}-d ones")

    @torch.no_grad()
    def scores(self, images: np.ndarray) -> np.ndarray:
        emb = self.clip.image_features(images).to(self.clip.device)
        return self.mlp(emb).squeeze(-1).float().cpu().numpy()

    def __call__(self, images: np.ndarray, prompts: Sequence[str] = (), reference=None) -> dict:
        return {"aesthetic": float(self.scores(images).mean())}
