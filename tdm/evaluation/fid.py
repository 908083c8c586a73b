"""FID with the standard Inception features (torch-fidelity's port of the TF 2015-12-05 graph, pool3, 2048-d).

Reference statistics (mean, covariance) of a reference image folder (COCO-style: any .png/.jpg/.jpeg/.webp
files, searched recursively) or of an npz of uint8 images are computed once and cached under
`<weights_dir>/fid_stats/`, keyed by the reference's files and the Inception weights. The Fréchet distance
is computed from symmetric eigendecompositions instead of scipy's sqrtm of a 2048 x 2048 non-symmetric
product (tens of seconds on one CPU thread, and complex round-off): tr sqrt(S1 S2) is the sum of square roots
of the eigenvalues of B S1 B^T / (n-1) when the n samples are fewer than the feature dimensions (B = centred
sample features), else of S1^1/2 S2 S1^1/2. Tests check it against torchmetrics' FrechetInceptionDistance.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from tdm.artifacts import atomic_write_file
from tdm.evaluation.digits import _stats
from tdm.evaluation.weights import WeightFile, find_weights, load_state_dict

INCEPTION = WeightFile("weights-inception-2015-12-05-6726825d.pth", "91.2 MB",
                       url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                           "weights-inception-2015-12-05-6726825d.pth")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_BATCH = 32


def load_inception(weights_dir: str | Path, device: str = "cpu") -> torch.nn.Module:
    """torch-fidelity's InceptionV3 feature extractor (2048-d pool features) from the local weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = find_weights(weights_dir, INCEPTION, "fid")
    load_state_dict(path, "fid")  # torch-fidelity unpickles with weights_only=False: vet the file safely first
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)).to(device)


def to_uint8_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C (C = 1 or 3) -> uint8 N x 3 x H x W (grey repeated to RGB)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 N x H x W x 1|3 images, got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_features(extractor: torch.nn.Module, batches: Iterable[np.ndarray]) -> np.ndarray:
    """(N, 2048) float64 features of uint8 NHWC batches."""
    device = next(extractor.parameters()).device
    feats = [extractor(to_uint8_nchw(b).to(device))[0].double().cpu() for b in batches]
    if not feats:
        raise ValueError("no images to compute Inception features of")
    return torch.cat(feats).numpy()


def _chunks(images: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(images), _BATCH):
        yield images[start:start + _BATCH]


def list_images(folder: Path, what: str = "FID reference folder") -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ValueError(f"{what} needs at least 2 images (.png/.jpg/.jpeg/.webp), found {len(files)}: {folder}")
    return files


def _folder_batches(files: Sequence[Path]) -> Iterator[np.ndarray]:
    """Same-size runs of images as uint8 batches (Inception resizes each to 299 itself)."""
    from PIL import Image

    batch: list[np.ndarray] = []
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        if batch and (a.shape != batch[0].shape or len(batch) == _BATCH):
            yield np.stack(batch)
            batch = []
        batch.append(a)
    if batch:
        yield np.stack(batch)


def _reference_key(reference: Path, weights: Path) -> str:
    h = hashlib.sha256()
    w = weights.stat()
    h.update(f"{weights.name}:{w.st_size}:{w.st_mtime_ns}".encode())
    if reference.is_dir():
        for f in list_images(reference):
            s = f.stat()
            h.update(f"{f.relative_to(reference)}:{s.st_size}:{s.st_mtime_ns}\n".encode())
    else:
        with open(reference, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:20]


def _sqrt_trace(eigenvalues: np.ndarray) -> float:
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())  # PSD: negatives are round-off


def frechet_to_stats(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to `feats` (N x D) and (mu_ref, sigma_ref), exactly."""
    feats = np.asarray(feats, dtype=np.float64)
    mu, sigma = _stats(feats)
    if mu.shape != mu_ref.shape:
        raise ValueError(f"feature dims differ: {mu.shape[0]} vs {mu_ref.shape[0]}")
    n, d = feats.shape
    if n - 1 < d:  # the sample covariance has rank < D: work in the n x n space
        b = feats - mu
        cross = np.linalg.eigvalsh(b @ sigma_ref @ b.T / (n - 1))
    else:
        w, v = np.linalg.eigh(sigma_ref)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        cross = np.linalg.eigvalsh(root @ sigma @ root)
    diff = mu - mu_ref
    fid = diff @ diff + np.trace(sigma) + np.trace(sigma_ref) - 2.0 * _sqrt_trace(cross)
    return max(float(fid), 0.0)


class FID:
    """`FID(weights_dir, reference)(images)` -> {"fid": ...}; a per-call `reference` (npz of uint8 images or a
    folder) overrides the default one."""

    name = "fid"

    def __init__(self, weights_dir: str | Path, reference: str | Path | None = None, device: str = "cpu") -> None:
        self.weights_dir = Path(weights_dir)
        self.weights = find_weights(weights_dir, INCEPTION, "fid")
        if reference is not None and not Path(reference).exists():
            raise FileNotFoundError(f"fid: reference images not found: {reference}")
        self.reference = Path(reference) if reference is not None else None
        self.extractor = load_inception(weights_dir, device)
        self._memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def features(self, images: np.ndarray) -> np.ndarray:
        return inception_features(self.extractor, _chunks(images))

    def reference_stats(self, reference: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of a reference folder or npz, from the cache when its files have not changed."""
        reference = Path(reference)
        if not reference.exists():
            raise FileNotFoundError(f"fid: reference images not found: {reference}")
        key = _reference_key(reference, self.weights)
        if key in self._memo:
            return self._memo[key]
        cache = self.weights_dir / "fid_stats" / f"{reference.stem}-{key}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                stats = (z["mu"], z["sigma"])
        else:
            if reference.is_dir():
                feats = inception_features(self.extractor, _folder_batches(list_images(reference)))
            else:
                from tdm.artifacts import load_samples

                feats = self.features(load_samples(reference)[0])
            stats = _stats(feats)
            atomic_write_file(cache, lambda p: np.savez(p, mu=stats[0], sigma=stats[1], n=len(feats),
                                                         source=str(reference.resolve())))
        self._memo[key] = stats
        return stats

    def __call__(self, images: np.ndarray, prompts: Sequence[str] = (), reference: str | Path | None = None) -> dict:
        reference = reference if reference is not None else self.reference
        if reference is None:
            raise ValueError("fid: no reference images (set evaluate.fid_reference or give the row a reference)")
        return {"fid": frechet_to_stats(self.features(images), *self.reference_stats(reference))}
