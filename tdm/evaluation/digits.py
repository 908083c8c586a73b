"""The digits metric: FID and class accuracy in a small CNN's feature space, for plain or restyled digits.

Inception features mean nothing on 8x8 greyscale digits, so a tiny classifier trained on the
train split stands in for Inception: its penultimate layer is the FID feature space, its logits
score whether a sample shows the digit its prompt asked for. FID is measured against the
held-out test split; FID(train vs test) is the floor a perfect generator would sit at.

A classifier belongs to one style (`style=None`: plain digits; "thick", "invert": `tdm.data.digits_style`):
it is trained on that style's train split and scores against that style's held-out split, so FID
features and class accuracy mean the same for a style as for plain digits (the plain classifier
reads thick strokes at 68% and inverted digits at 15%). `DigitsScorer` is the one entry point:
the runner's `digits_fid` / `class_accuracy`, `evaluate_samples` (teacher_ft, distill,
`tdm sample --score`) and the lora_transfer stage's per-style rows all score through it.

A second, independent view (issue #17): `DigitMLP`, a classifier of another architecture (a fully connected
net on the flattened pixels, no convolution) trained from another seed (`SECOND_VIEW`), with its own FID, and
KID (the unbiased squared MMD with the cubic polynomial kernel, Binkowski et al. 2018, "Demystifying MMD GANs")
in both feature spaces. `two_view_scores` gives both views of one sample set; a claim that one set is better
than another counts only when both views rank them the same way (`views_agree`).
"""
from __future__ import annotations

import json
import time
import warnings
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from tdm.artifacts import atomic_write_file
from tdm.data import digits_split, digits_style, label_from_prompt

# Bump whenever the architecture or the training recipe changes, so stale caches are not reused.
CLASSIFIER_VERSION = "v1"
# The second view's classifier (DigitMLP) has its own version, bumped on the same rule.
MLP_VERSION = "v1"
# The second view: architecture and seed, both unlike the first view's (cnn, seed 0).
SECOND_VIEW = {"arch": "mlp", "seed": 1}
FEATURE_DIM = 64
IMAGE_SIZE = 8
_BATCH = 512


class DigitClassifier(nn.Module):
    """Small CNN on 1 x 8 x 8 images in [-1, 1], of one digit style (None: plain)."""

    def __init__(self, feature_dim: int = FEATURE_DIM, style: str | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, feature_dim),
        )
        self.head = nn.Linear(feature_dim, 10)
        # The style whose splits it was trained on and scores against.
        self.style = style
        # Set by load_classifier from the sidecar; NaN until then.
        self.held_out_accuracy: float = float("nan")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim), taken before the ReLU: no dead units, so the
        FID covariance stays full rank."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


class DigitMLP(nn.Module):
    """The second view's classifier: a fully connected net on the 64 flattened pixels of 1 x 8 x 8 images in
    [-1, 1] (no convolution, no pooling: a different inductive bias from `DigitClassifier`), of one style."""

    arch = "mlp"

    def __init__(self, feature_dim: int = FEATURE_DIM, style: str | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 256), nn.ReLU(),
            nn.Linear(256, 128), nn.ReLU(),
            nn.Linear(128, feature_dim),
        )
        self.head = nn.Linear(feature_dim, 10)
        self.style = style
        self.held_out_accuracy: float = float("nan")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim), before the ReLU as in `DigitClassifier.features`."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


DigitClassifier.arch = "cnn"
# Architecture name -> (class, cache-file stem, cache version).
ARCHITECTURES: dict[str, tuple[type[nn.Module], str, str]] = {
    "cnn": (DigitClassifier, "digit_classifier", CLASSIFIER_VERSION),
    "mlp": (DigitMLP, "digit_mlp", MLP_VERSION),
}


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown digit classifier architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x 8 x 8 x 1 (or N x 8 x 8), as `tdm sample` writes them, -> float N x 1 x 8 x 8 in [-1, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"digit samples must be uint8, got dtype {images.dtype}")
    if images.ndim == 4:
        if images.shape[-1] != 1:
            raise ValueError(f"digit samples must have 1 channel (N x H x W x 1), got shape {images.shape}")
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"digit samples must be N x H x W x 1 or N x H x W, got shape {images.shape}")
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"digit samples must be {IMAGE_SIZE}x{IMAGE_SIZE}, got {images.shape[1]}x{images.shape[2]}")
    if images.shape[0] == 0:
        raise ValueError("no digit samples")
    x = torch.from_numpy(images.astype(np.float32))[:, None]
    return x / 127.5 - 1.0


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round-trip [-1, 1] values through uint8, the way samples are stored, so real and generated
    images are scored at the same precision. Idempotent on already-quantised input."""
    levels = ((x.float() + 1.0) * 127.5).round().clamp(0, 255)
    return levels / 127.5 - 1.0


# --- styles ----------------------------------------------------------------------------------

def styled(images: torch.Tensor, style: str | None) -> torch.Tensor:
    """Digits (N x 1 x 8 x 8 in [-1, 1]) in `style`; None leaves them plain."""
    return images if style is None else digits_style(images, style)


def styled_split(split: str, style: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits `split` in `style`, quantised as stored samples are: (images N x 1 x 8 x 8, labels N)."""
    x, y = digits_split(split)
    return quantize(styled(x, style)), y


def background(style: str | None) -> float:
    """The style's background level: a blank plain image (all -1) restyled. -1 for plain and thick, +1 for
    invert; the fill of the shift augmentation, so a shifted digit shows no border."""
    return float(styled(torch.full((1, 1, IMAGE_SIZE, IMAGE_SIZE), -1.0), style)[0, 0, 0, 0])


# --- training and caching -------------------------------------------------------------------

def _shift_batch(x: torch.Tensor, gen: torch.Generator, fill: float) -> torch.Tensor:
    """Shift each image by a random -1..+1 pixels in x and y, filling with the background level `fill`."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    # All nine crops at once, then pick one per image: batched, no per-sample loop.
    crops = torch.stack([padded[:, :, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE]
                         for dy in range(3) for dx in range(3)])
    choice = torch.randint(0, 9, (n,), generator=gen)
    return crops[choice, torch.arange(n)]


def _new_classifier(seed: int, style: str | None, arch: str = "cnn") -> nn.Module:
    # Fork the global RNG: layer init draws from it, and callers' random state must not move.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHITECTURES[arch][0](style=style)


def train_classifier(style: str | None = None, seed: int = 0, epochs: int = 25, batch_size: int = 64,
                     lr: float = 2e-3, arch: str = "cnn") -> nn.Module:
    """The digit classifier of `style` and architecture `arch` ("cnn": `DigitClassifier`, "mlp": `DigitMLP`),
    trained on that style's train split: per-image random +-1 pixel shifts filled with the style's background,
    Adam, cosine schedule, seeded (CPU, a few seconds). Raises ValueError for an unknown `arch`."""
    _check_arch(arch)
    x, y = styled_split("train", style)
    fill = background(style)
    gen = torch.Generator().manual_seed(seed)
    model = _new_classifier(seed, style, arch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(_shift_batch(x[idx], gen, fill)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def classifier_paths(cache_dir: str | Path, style: str | None = None, seed: int = 0,
                     arch: str = "cnn") -> tuple[Path, Path]:
    """(weights, sidecar) of a cached classifier: digit_classifier-<version>[-<style>][-seed<seed>] for the
    CNN, digit_mlp-<mlp version>[-<style>][-seed<seed>] for the MLP."""
    _check_arch(arch)
    _, name, version = ARCHITECTURES[arch]
    stem = (f"{name}-{version}" + (f"-{style}" if style is not None else "")
            + (f"-seed{seed}" if seed else ""))
    return Path(cache_dir) / f"{stem}.safetensors", Path(cache_dir) / f"{stem}.json"


def load_classifier(cache_dir: str | Path, *, style: str | None = None, seed: int = 0,
                    arch: str = "cnn") -> nn.Module:
    """The digit classifier of `style` and architecture `arch`, trained on first use and cached under
    `cache_dir`; `held_out_accuracy` is its accuracy on the style's test split. Raises ValueError for an
    unknown style or architecture (before any training)."""
    from safetensors.torch import load_file, save_file

    _check_arch(arch)
    version = ARCHITECTURES[arch][2]
    if style is not None:
        digits_style(torch.zeros(0, 1, IMAGE_SIZE, IMAGE_SIZE), style)  # an unknown style fails before training
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights_path, meta_path = classifier_paths(cache_dir, style, seed, arch)
    # The CNN's sidecar stays as it was (no arch key): caches written before the second view are reused as is.
    meta = {"version": version, "style": style, "seed": seed, **({"arch": arch} if arch != "cnn" else {})}

    if weights_path.is_file():
        model = _new_classifier(seed, style, arch)
        model.load_state_dict(load_file(str(weights_path)))
        model.eval()
    else:
        start = time.perf_counter()
        model = train_classifier(style, seed, arch=arch) if arch != "cnn" else train_classifier(style, seed)
        train_seconds = time.perf_counter() - start
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        meta.update(held_out_accuracy=_held_out_accuracy(model), train_seconds=round(train_seconds, 2))
        # Sidecar first: a weights file on disk then always has its metadata beside it.
        atomic_write_file(meta_path, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
        atomic_write_file(weights_path, lambda p: save_file(state, p, metadata={"version": version}))

    if meta_path.is_file():
        model.held_out_accuracy = float(json.loads(meta_path.read_text())["held_out_accuracy"])
    else:  # sidecar lost: recompute rather than fail
        model.held_out_accuracy = meta["held_out_accuracy"] = _held_out_accuracy(model)
        atomic_write_file(meta_path, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return model


def _held_out_accuracy(model: DigitClassifier) -> float:
    return class_accuracy(*styled_split("test", model.style), model)


# --- metrics ---------------------------------------------------------------------------------

@torch.no_grad()
def _batched(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[i:i + _BATCH]) for i in range(0, len(x), _BATCH)])


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images N x 1 x {IMAGE_SIZE} x {IMAGE_SIZE}, got shape {tuple(images.shape)}")


def _features(images: torch.Tensor, classifier: DigitClassifier) -> np.ndarray:
    _check_images(images)
    # Quantise so float inputs are scored exactly as their stored uint8 versions would be.
    x = quantize(images.detach().cpu())
    return _batched(classifier.features, x).double().numpy()


def _stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors as an N x D array, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # Singular input is handled by the caller's retry, so scipy's warning is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(m)


def _large_imag(m: np.ndarray) -> bool:
    return np.iscomplexobj(m) and not np.allclose(np.diagonal(m).imag, 0, atol=1e-3)


def _frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray,
                        eps: float = 1e-6) -> float:
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all() or _large_imag(covmean):
        # Singular product: nudge both covariances off zero, as the reference FID code does.
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if _large_imag(covmean):
        raise ValueError(f"sqrtm gave large imaginary part {np.abs(covmean.imag).max():.3g}")
    covmean = covmean.real  # round-off leaves tiny imaginary parts
    fid = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
    return max(float(fid), 0.0)  # FID >= 0; tiny negatives are round-off


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets `a` (N x D) and `b` (M x D)."""
    (mu1, s1), (mu2, s2) = _stats(a), _stats(b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    return _frechet_from_stats(mu1, s1, mu2, s2)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray) -> float:
    """KID between feature sets `a` (N x D) and `b` (M x D): the unbiased estimate of the squared MMD with the
    cubic polynomial kernel k(x, y) = (x . y / D + 1)^3 (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 2;
    the kernel is torchmetrics' `poly_kernel`, the estimator Gretton et al. 2012, Eq. 3, for unequal N, M).

    Computed on the whole sets (no random subsets): deterministic. Unbiased, so its real-vs-real value is ~0
    at any sample size (unlike FID) and it can be slightly negative. Float64. Raises ValueError for fewer than
    2 rows or differing D."""
    from torchmetrics.image.kid import poly_kernel

    x, y = (torch.as_tensor(np.asarray(f, dtype=np.float64)) for f in (a, b))
    for name, f in (("a", x), ("b", y)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"KID: need at least 2 feature vectors as an N x D array for {name}, got "
                             f"shape {tuple(f.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"KID: feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)
    # Off-diagonal means of the within-set kernels (the unbiased part), the full mean of the cross kernel.
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2.0 * k_xy.mean())


# Per-classifier reference statistics, computed once; weak keys so dropped classifiers are freed.
_REFERENCE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _reference(classifier: DigitClassifier) -> dict:
    ref = _REFERENCE.get(classifier)
    if ref is None:
        feats = _features(styled_split("test", classifier.style)[0], classifier)
        # KID's kernel (x . y / D + 1)^3 assumes features of unit scale (Inception's pooled features are ~O(1)):
        # these pre-ReLU features are centred and scaled by one scalar, both from the train split (not the
        # reference), so distances keep their geometry and the kernel its intended range.
        train = _features(styled_split("train", classifier.style)[0], classifier)
        centre = train.mean(axis=0)
        scale = float(np.sqrt(((train - centre) ** 2).sum(axis=1).mean() / train.shape[1]))
        ref = {"test": _stats(feats), "kid_units": (centre, scale)}
        ref["test_kid_features"] = _kid_units(feats, ref)
        _REFERENCE[classifier] = ref
    return ref


def digits_fid(images: torch.Tensor, classifier: DigitClassifier) -> float:
    """FID of images (N x 1 x 8 x 8 in [-1, 1]) against the held-out test split of the classifier's style."""
    mu, sigma = _stats(_features(images, classifier))
    return _frechet_from_stats(mu, sigma, *_reference(classifier)["test"])


def _kid_units(feats: np.ndarray, ref: dict) -> np.ndarray:
    centre, scale = ref["kid_units"]
    return (feats - centre) / scale


def kid_features(images: torch.Tensor, classifier: nn.Module) -> np.ndarray:
    """The classifier's features of images (N x 1 x 8 x 8 in [-1, 1]) in KID's units: centred on the train
    split's mean feature and divided by its RMS per-dimension spread (one scalar), float64 N x D."""
    return _kid_units(_features(images, classifier), _reference(classifier))


def digits_kid(images: torch.Tensor, classifier: nn.Module) -> float:
    """KID (`kernel_inception_distance`, on `kid_features`) of images (N x 1 x 8 x 8 in [-1, 1], N >= 2)
    against the held-out test split of the classifier's style."""
    return kernel_inception_distance(kid_features(images, classifier), _reference(classifier)["test_kid_features"])


def _train_subset(classifier: nn.Module, n: int | None) -> torch.Tensor:
    train = styled_split("train", classifier.style)[0]
    if n is not None:
        if not 2 <= n <= len(train):
            raise ValueError(f"floor subset size must be in [2, {len(train)}], got {n}")
        train = train[np.sort(np.random.default_rng(0).permutation(len(train))[:n])]
    return train


def real_kid_floor(classifier: nn.Module, n: int | None = None) -> float:
    """KID of real train images (all, or the same fixed n-image subset `real_fid_floor` uses) vs the test split:
    a perfect generator's KID, ~0 at any n since the estimate is unbiased."""
    floors = _reference(classifier).setdefault("kid_floor", {})
    if n not in floors:
        floors[n] = digits_kid(_train_subset(classifier, n), classifier)
    return floors[n]


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: DigitClassifier) -> float:
    """Fraction of images the classifier assigns to `labels`."""
    _check_images(images)
    labels = torch.as_tensor(labels).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    pred = _batched(classifier, quantize(images.detach().cpu())).argmax(dim=1)
    return float((pred == labels.to(pred.device)).double().mean())


def real_fid_floor(classifier: DigitClassifier, n: int | None = None) -> float:
    """FID(train split vs test split) in the classifier's style: what a generator that reproduces the data
    distribution scores.

    FID is biased upward at small sample sizes, so `n` scores a fixed n-image subset of the
    train split instead, to compare fairly against a sample set of that size.
    """
    floors = _reference(classifier).setdefault("floor", {})
    if n not in floors:
        floors[n] = digits_fid(_train_subset(classifier, n), classifier)
    return floors[n]


# --- the scorer ------------------------------------------------------------------------------

def _sample_set(images: np.ndarray, prompts: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    x = images_to_tensor(images)
    prompts = [str(p) for p in prompts]
    if len(prompts) != len(x):
        raise ValueError(f"{len(x)} images but {len(prompts)} prompts")
    return x, prompts


class DigitsScorer:
    """The digits metric for sample sets (uint8 N x 8 x 8 x 1, as `tdm sample` stores them) in one style's
    classifier space: FID against the style's held-out split (or given reference images), class accuracy on
    the samples whose prompt names a digit, and the real-data FID floor at the same n; KID on request.

    `arch` / `seed` pick the classifier: the default ("cnn", 0) is the first view every recorded figure uses,
    `DigitsScorer(cache_dir, **SECOND_VIEW)` the second (`two_view_scores` gives both)."""

    def __init__(self, cache_dir: str | Path, style: str | None = None, seed: int = 0, arch: str = "cnn") -> None:
        self.classifier = load_classifier(cache_dir, style=style, seed=seed, arch=arch)

    @property
    def style(self) -> str | None:
        return self.classifier.style

    def fid(self, images: np.ndarray, reference: np.ndarray | None = None) -> float:
        """FID against the held-out split, or against `reference` images (uint8, like `images`)."""
        x = images_to_tensor(images)
        if reference is None:
            return digits_fid(x, self.classifier)
        return frechet_distance(_features(x, self.classifier), _features(images_to_tensor(reference), self.classifier))

    def kid(self, images: np.ndarray, reference: np.ndarray | None = None) -> float:
        """KID against the held-out split, or against `reference` images (uint8, like `images`)."""
        x = images_to_tensor(images)
        if reference is None:
            return digits_kid(x, self.classifier)
        return kernel_inception_distance(kid_features(x, self.classifier),
                                         kid_features(images_to_tensor(reference), self.classifier))

    def kid_floor(self, n: int) -> float:
        """KID of n real train images (clamped to the split) vs the held-out split."""
        return real_kid_floor(self.classifier, n=min(max(n, 2), len(digits_split("train")[1])))

    def accuracy(self, images: np.ndarray, prompts: Sequence[str]) -> float | None:
        """Class accuracy on the samples whose prompt names a digit; None when no prompt does."""
        x, prompts = _sample_set(images, prompts)
        asked = [label_from_prompt(p) for p in prompts]
        keep = [i for i, label in enumerate(asked) if label is not None]
        if not keep:
            return None
        return class_accuracy(x[keep], torch.tensor([asked[i] for i in keep]), self.classifier)

    def floor(self, n: int) -> float:
        """FID of n real train images (clamped to the split) vs the held-out split: a perfect generator's score
        at that sample count."""
        return real_fid_floor(self.classifier, n=min(max(n, 2), len(digits_split("train")[1])))

    def score(self, images: np.ndarray, prompts: Sequence[str], kid: bool = False) -> dict:
        """{fid, accuracy, fid_floor, n, classifier_accuracy} of one sample set; `kid=True` adds kid and
        kid_floor."""
        x, prompts = _sample_set(images, prompts)
        extra = {"kid": self.kid(images), "kid_floor": self.kid_floor(len(x))} if kid else {}
        return {
            "fid": self.fid(images),
            "accuracy": self.accuracy(images, prompts),
            # FID is biased upward at small n: the fair floor is real data at the same sample count.
            "fid_floor": self.floor(len(x)),
            "n": len(x),
            "classifier_accuracy": self.classifier.held_out_accuracy,
            **extra,
        }


def evaluate_samples(images: np.ndarray, prompts: Sequence[str], cache_dir: str | Path,
                     style: str | None = None) -> dict:
    """Metrics for a `tdm sample` npz (`images` uint8 N x 8 x 8 x 1, `prompts`): `DigitsScorer.score`."""
    _sample_set(images, prompts)  # bad input fails before a classifier is trained
    return DigitsScorer(cache_dir, style).score(images, prompts)


# --- both views ------------------------------------------------------------------------------

# The figures each view gives of a sample set, lower is better; the second view's carry this suffix.
VIEW_METRICS = ("fid", "kid")
SECOND_SUFFIX = "_mlp"


def two_view_scores(images: np.ndarray, prompts: Sequence[str], cache_dir: str | Path,
                    style: str | None = None) -> dict:
    """Both views of one sample set (uint8 N x 8 x 8 x 1, its prompts): the first view's `DigitsScorer.score`
    with KID (fid, kid, accuracy, fid_floor, kid_floor, n, classifier_accuracy), and the same keys of the
    second view (`SECOND_VIEW`: MLP, seed 1) with the suffix "_mlp" (fid_mlp, kid_mlp, accuracy_mlp, ...).
    Raises ValueError for bad input before any classifier is trained."""
    _sample_set(images, prompts)
    first = DigitsScorer(cache_dir, style).score(images, prompts, kid=True)
    second = DigitsScorer(cache_dir, style, **SECOND_VIEW).score(images, prompts, kid=True)
    return {**first, **{f"{k}{SECOND_SUFFIX}": v for k, v in second.items() if k != "n"}}


def views_agree(a: dict, b: dict, margin: float = 0.0) -> str | None:
    """Which of two `two_view_scores` results is better in both views: "a" when `a` is lower than `b` on every
    figure of `VIEW_METRICS` in both views (fid, kid, fid_mlp, kid_mlp) by more than `margin` (relative, e.g.
    0.05 = 5%), "b" for the reverse, None when the figures disagree or a difference is within the margin (the
    claim does not count). Raises KeyError naming a missing figure."""
    keys = [k + s for s in ("", SECOND_SUFFIX) for k in VIEW_METRICS]
    missing = [k for k in keys if k not in a or k not in b]
    if missing:
        raise KeyError(f"views_agree: missing figures {missing} (score with two_view_scores)")

    def lower(x: float, y: float) -> bool:
        return x < y - margin * abs(y)

    if all(lower(a[k], b[k]) for k in keys):
        return "a"
    if all(lower(b[k], a[k]) for k in keys):
        return "b"
    return None
