"""Toy digits metrics: a really trained classifier, FID against closed forms and real data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tdm.data import digit_prompt, digits_split
from tdm.evaluation.digits import (
    CLASSIFIER_VERSION,
    DigitClassifier,
    class_accuracy,
    digits_fid,
    evaluate_samples,
    frechet_distance,
    images_to_tensor,
    load_classifier,
    quantize,
    real_fid_floor,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digit_cache")


@pytest.fixture(scope="module")
def classifier(cache_dir) -> DigitClassifier:
    # Trained once for the whole module (a few seconds on one thread).
    return load_classifier(cache_dir)


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_split("test")


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """N x 1 x 8 x 8 in [-1, 1] -> N x 8 x 8 x 1 uint8, the layout `tdm sample` writes."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --- classifier ---------------------------------------------------------------------------------

def test_classifier_is_accurate_and_cached(classifier, cache_dir):
    assert classifier.held_out_accuracy >= 0.95
    weights = cache_dir / f"digit_classifier-{CLASSIFIER_VERSION}.safetensors"
    assert weights.is_file() and weights.with_suffix(".json").is_file()
    assert not list(cache_dir.glob(".*"))  # atomic writes leave no temp files

    mtime = weights.stat().st_mtime_ns
    again = load_classifier(cache_dir)
    assert weights.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert again.held_out_accuracy == classifier.held_out_accuracy
    for (name, a), (_, b) in zip(classifier.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_classifier_shapes(classifier, test_split):
    x = test_split[0][:5]
    assert classifier(x).shape == (5, 10)
    assert classifier.features(x).shape[0] == 5 and classifier.features(x).shape[1] <= 128


# --- conversions --------------------------------------------------------------------------------

def test_images_to_tensor_round_trip(test_split):
    x = quantize(test_split[0][:7])
    u = _to_uint8(x)
    assert torch.equal(images_to_tensor(u), x)
    assert torch.equal(images_to_tensor(u[..., 0]), x)  # N x H x W accepted too
    assert torch.equal(quantize(x), x)  # idempotent
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("bad", [
    np.zeros((4, 8, 8, 1), dtype=np.float32),  # wrong dtype
    np.zeros((4, 8, 8, 3), dtype=np.uint8),    # RGB
    np.zeros((4, 16, 16, 1), dtype=np.uint8),  # wrong size
    np.zeros((8, 8), dtype=np.uint8),          # no batch axis
    np.zeros((0, 8, 8, 1), dtype=np.uint8),    # empty
])
def test_images_to_tensor_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        images_to_tensor(bad)


# --- Fréchet distance ---------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)

    # Same covariance, shifted mean: FID is exactly the squared mean distance.
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)

    # Diagonal covariances: sum of (sqrt(s1) - sqrt(s2))^2 on top of the mean term.
    b = rng.normal(size=(500, 6))
    scale = np.array([1.0, 2.0, 0.5, 3.0, 1.0, 1.5])
    a_w, b_w = _whiten(a), _whiten(b)  # exact zero mean, identity covariance
    expected = 4.0 + np.sum((1.0 - scale) ** 2)
    got = frechet_distance(a_w, b_w * scale + np.array([2.0, 0, 0, 0, 0, 0]))
    assert got == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b_w * scale, a_w) == pytest.approx(frechet_distance(a_w, b_w * scale), rel=1e-9)


def _whiten(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0)
    return x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T


def test_frechet_distance_handles_singular_covariance():
    rng = np.random.default_rng(1)
    a = np.zeros((50, 4))
    a[:, 0] = rng.normal(size=50)  # rank-1 covariance
    b = rng.normal(size=(60, 4))
    fid = frechet_distance(a, b)
    assert np.isfinite(fid) and fid > 0
    # Agrees with the same set made full rank by a tiny jitter.
    jittered = a + 1e-4 * rng.normal(size=a.shape)
    assert fid == pytest.approx(frechet_distance(jittered, b), rel=1e-2)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :3])


# --- digits FID and accuracy --------------------------------------------------------------------

def test_digits_fid_orders_real_and_broken(classifier, test_split):
    x, _ = test_split
    floor = real_fid_floor(classifier)
    assert 0 < floor < 10
    assert digits_fid(x, classifier) == pytest.approx(0.0, abs=1e-6)  # the reference set itself
    assert digits_fid(digits_split("train")[0], classifier) == pytest.approx(floor)

    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shifted = F.pad(x, (1, 0, 1, 0), value=-1.0)[:, :, :8, :8]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), value=-1.0), 3, stride=1)
    fids = {name: digits_fid(imgs, classifier) for name, imgs in
            [("noise", noise), ("shifted", shifted), ("blurred", blurred)]}
    for name, fid in fids.items():
        assert fid > 10 * floor, (name, fid, floor)
    assert fids["noise"] > fids["shifted"]

    # Sensitive to the input, and a smaller real subset sits above the full-split floor.
    assert digits_fid(x[:200], classifier) != digits_fid(x[200:], classifier)
    assert real_fid_floor(classifier, n=450) > floor


def test_class_accuracy(classifier, test_split):
    x, y = test_split
    assert class_accuracy(x, y, classifier) >= 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert class_accuracy(x, shuffled, classifier) < 0.2


# --- runner entry -------------------------------------------------------------------------------

def test_evaluate_samples_on_real_digits(classifier, cache_dir, test_split):
    x, y = test_split
    prompts = np.array([digit_prompt(int(label), template=i) for i, label in enumerate(y)])
    out = evaluate_samples(_to_uint8(x), prompts, cache_dir)
    assert out["n"] == len(x)
    assert out["accuracy"] >= 0.95
    assert out["fid"] < 1e-6  # uint8 samples are exactly the quantised reference set
    assert out["fid_floor"] == pytest.approx(real_fid_floor(classifier, n=len(x)))  # floor at the same n
    assert out["classifier_accuracy"] == classifier.held_out_accuracy

    no_digit = evaluate_samples(_to_uint8(x[:20]), ["a cat"] * 20, cache_dir)
    assert no_digit["accuracy"] is None and no_digit["fid"] > 0


def test_evaluate_samples_rejects_bad_input(cache_dir, test_split):
    u = _to_uint8(test_split[0][:10])
    with pytest.raises(ValueError, match="8x8"):
        evaluate_samples(np.zeros((10, 16, 16, 1), np.uint8), ["a handwritten digit one"] * 10, cache_dir)
    with pytest.raises(ValueError, match="prompts"):
        evaluate_samples(u, ["a handwritten digit one"] * 9, cache_dir)
