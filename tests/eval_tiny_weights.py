"""Tiny random metric weights, each written in its real file format and at its real place in a weights folder,
so the metrics load them through the same code path the real files take. Random weights, so only the
plumbing and the arithmetic are under test, not the scores' meaning."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TINY_ARCH = "tdm-tiny-clip"
TINY_CLIP_CFG = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def register_tiny_clip(folder: Path) -> str:
    """Register the tiny architecture with open_clip (and hpsv2x's bundled copy, when installed)."""
    import open_clip

    path = Path(folder) / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(path)
    try:
        from hpsv2.src import open_clip as hps_open_clip

        hps_open_clip.add_model_config(path)
    except ImportError:
        pass
    return TINY_ARCH


def tiny_clip_state(seed: int = 0) -> dict:
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_ARCH)
        # Random text/image towers give near-identical embeddings; spread the projections so scores vary.
        with torch.no_grad():
            model.text_projection.normal_(0, 1.0)
            model.visual.proj.normal_(0, 1.0)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def hub_cache_file(weights_dir: Path, repo: str, filename: str) -> Path:
    """A path in the Hugging Face cache layout (`hf download` leaves files there) under weights_dir/hub."""
    repo_dir = Path(weights_dir) / "hub" / ("models--" + repo.replace("/", "--"))
    rev = "0" * 40
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(rev)
    path = repo_dir / "snapshots" / rev / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_hps(weights_dir: Path, version_file: str = "HPS_v2.1_compressed.pt") -> Path:
    """HPS format: torch.save({'state_dict': <whole CLIP model>}), in the hub cache as `hf download` puts it."""
    path = hub_cache_file(weights_dir, "xswu/HPSv2", version_file)
    torch.save({"state_dict": tiny_clip_state(1)}, path)
    return path


def write_open_clip(weights_dir: Path, tag: str) -> Path:
    """open_clip's hub format (open_clip_model.safetensors), flat under its documented name."""
    from safetensors.torch import save_file

    path = Path(weights_dir) / f"open_clip-{TINY_ARCH}-{tag}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_clip_state(2), str(path))
    return path


def write_aesthetic_mlp(weights_dir: Path, input_size: int = 32) -> Path:
    """The improved-aesthetic-predictor's format: torch.save(state_dict) with keys layers.{0,2,4,6,7}."""
    from tdm.evaluation.aesthetic import MLP_FILE, AestheticMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        mlp = AestheticMLP(input_size)
    path = Path(weights_dir) / MLP_FILE.name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(mlp.state_dict(), path)
    return path


def write_inception(weights_dir: Path) -> Path:
    """torch-fidelity's InceptionV3 state dict, random convolutions with BatchNorm statistics calibrated on
    one random batch so features stay O(1) (raw random init shrinks them to ~1e-8 by the pool layer)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from tdm.evaluation.fid import INCEPTION

    class Unloaded(FeatureExtractorInceptionV3):  # builds the architecture without reading weights
        def load_state_dict(self, *args, **kwargs):
            return None

    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    empty = weights_dir / "empty.pth"
    torch.save({}, empty)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # running stats = this batch's
        net.train()
        with torch.no_grad():
            net(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))
    empty.unlink()
    path = weights_dir / INCEPTION.name
    torch.save(net.state_dict(), path)
    return path


def photos(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """n uint8 RGB crops (size x size) of scikit-learn's two bundled photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = load_sample_images().images[i % 2]
        y, x = rng.integers(0, img.shape[0] - 200), rng.integers(0, img.shape[1] - 200)
        out.append(np.asarray(Image.fromarray(img[y:y + 200, x:x + 200]).resize((size, size))))
    return np.stack(out)
