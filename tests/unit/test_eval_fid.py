"""Inception FID: torch-fidelity's InceptionV3 loaded from a random checkpoint in its real format, reference
statistics cached, the distance checked against torchmetrics' FrechetInceptionDistance on the same features."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from eval_tiny_weights import photos, write_inception
from PIL import Image

from tdm.artifacts import save_samples
from tdm.evaluation.digits import frechet_distance
from tdm.evaluation.fid import FID, INCEPTION, frechet_to_stats
from tdm.evaluation.weights import MissingWeights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fid_weights")
    write_inception(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A COCO-style folder: images in a subfolder, mixed formats."""
    folder = tmp_path_factory.mktemp("ref")
    (folder / "val2014").mkdir()
    for i, im in enumerate(photos(4, seed=1)):
        Image.fromarray(im).save(folder / "val2014" / f"img_{i}.{'png' if i % 2 else 'jpg'}")
    return folder


@pytest.fixture(scope="module")
def fid(weights, reference):
    return FID(weights, reference=reference)


def test_fid_is_finite_and_tracks_the_input(fid, reference, weights):
    photos_set = photos(4, seed=2)
    noise = np.random.default_rng(0).integers(0, 256, photos_set.shape, dtype=np.uint8)
    near, far = fid(photos_set)["fid"], fid(noise)["fid"]
    assert np.isfinite(near) and np.isfinite(far) and near > 0
    assert far > near  # noise is farther from the photos than other photos are
    cached = list((weights / "fid_stats").glob("*.npz"))
    assert len(cached) == 1  # reference statistics computed once
    mtime = cached[0].stat().st_mtime_ns
    again = FID(weights, reference=reference)
    np.testing.assert_allclose(again.reference_stats(reference)[0], fid.reference_stats(reference)[0])
    assert cached[0].stat().st_mtime_ns == mtime  # read back, not recomputed


@pytest.mark.parametrize("n", [5, 40])  # fewer and more samples than feature dimensions
def test_frechet_matches_scipy_sqrtm(n):
    rng = np.random.default_rng(n)
    ref = rng.normal(size=(50, 12)) @ rng.normal(size=(12, 12))
    feats = rng.normal(0.3, 1.5, size=(n, 12))
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    assert frechet_to_stats(feats, mu, sigma) == pytest.approx(frechet_distance(feats, ref), rel=1e-6)
    assert frechet_to_stats(ref, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_fid_matches_torchmetrics(fid):
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Pool3Slice(torch.nn.Module):  # torchmetrics' custom-feature hook on the very same extractor
        def forward(self, x):  # (64 of the 2048 features keep torchmetrics' 2048-d eigvals out of the test)
            return fid.extractor(x)[0][:, :64]

    a, b = photos(4, seed=3), photos(3, seed=4)
    tm = FrechetInceptionDistance(feature=Pool3Slice())
    tm.update(torch.from_numpy(a).permute(0, 3, 1, 2), real=True)
    tm.update(torch.from_numpy(b).permute(0, 3, 1, 2), real=False)
    fa, fb = fid.features(a)[:, :64], fid.features(b)[:, :64]
    ours = frechet_to_stats(fb, fa.mean(0), np.cov(fa, rowvar=False))
    assert ours == pytest.approx(float(tm.compute()), rel=1e-3)
    # A per-row npz reference overrides the default folder.
    ref_npz = save_samples(fid.weights_dir.parent / "a.npz", a, [""] * len(a))[0]
    assert fid(b, reference=ref_npz)["fid"] == pytest.approx(
        frechet_to_stats(fid.features(b), *fid.reference_stats(ref_npz)), rel=1e-9)


def test_grey_images_and_missing_reference(fid, tmp_path):
    grey = photos(3, seed=5)[..., :1]
    assert np.isfinite(fid(grey)["fid"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fid(grey, reference=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="at least 2 images"):
        fid(grey, reference=tmp_path)


def test_missing_inception_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(MissingWeights, match=INCEPTION.name + r".*torch-fidelity/releases"):
        FID(tmp_path)
    assert time.perf_counter() - start < 1.0
