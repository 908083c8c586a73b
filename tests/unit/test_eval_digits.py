"""Toy digits metrics: a really trained classifier, FID against closed forms and real data; one trainer for
every style (the plain classifier bitwise as before), one scorer behind every caller."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tdm.data import DIGIT_STYLES, digit_prompt, digits_split, digits_style
from tdm.evaluation import digits
from tdm.evaluation.digits import (
    CLASSIFIER_VERSION,
    MLP_VERSION,
    SECOND_VIEW,
    DigitClassifier,
    DigitMLP,
    DigitsScorer,
    background,
    class_accuracy,
    classifier_paths,
    digits_fid,
    evaluate_samples,
    frechet_distance,
    images_to_tensor,
    kernel_inception_distance,
    load_classifier,
    quantize,
    real_fid_floor,
    styled_split,
    train_classifier,
    two_view_scores,
    views_agree,
)

# The plain classifier as the code before the one-trainer refactor trained it (recorded then, torch 2.14.1 CPU,
# one thread): every recorded digits figure (FID, class accuracy) rests on these exact weights.
PLAIN_WEIGHTS_SHA256 = "be4e70f35da8f42d4ba764fe449a862001cdf3310f4ac62bb80e2111c00c614d"
PLAIN_HELD_OUT_ACCURACY = 442 / 450


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


def _weights_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_plain_classifier_weights_unchanged(classifier, cache_dir):
    """The 25-epoch plain classifier is the one recorded before the trainer was shared by the styles, under the
    same cache file (what the old code would find and reuse). Recorded on torch 2.14.1 CPU: on another platform
    the kernels may round differently, and the recipe test below is the portable proof."""
    assert classifier.style is None
    assert _weights_sha256(classifier) == PLAIN_WEIGHTS_SHA256
    assert classifier.held_out_accuracy == PLAIN_HELD_OUT_ACCURACY
    assert classifier_paths(cache_dir) == (cache_dir / "digit_classifier-v1.safetensors",
                                           cache_dir / "digit_classifier-v1.json")


def _old_shift_batch(x, gen):
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    crops = torch.stack([padded[:, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)])
    return crops[torch.randint(0, 9, (n,), generator=gen), torch.arange(n)]


def _old_train(seed, epochs, batch_size=64, lr=2e-3):
    """The plain classifier's training before the refactor (tdm/evaluation/digits.py `_train`), kept here only."""
    x, y = digits_split("train")
    x = quantize(x)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(_old_shift_batch(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


@pytest.mark.parametrize("seed", [0, 3])
def test_plain_recipe_is_the_old_one_bitwise(seed):
    """The shared trainer with no style is the old plain recipe draw for draw (2 epochs: the same code path as
    25, in a second)."""
    old, new = _old_train(seed, epochs=2), train_classifier(None, seed=seed, epochs=2)
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items()):
        assert torch.equal(a, b), name


def test_background_is_the_restyled_blank():
    assert background(None) == -1.0 and background("thick") == -1.0 and background("invert") == 1.0
    for style in DIGIT_STYLES:  # agrees with the styled train split's corners (digits never touch them)
        x = styled_split("train", style)[0]
        corners = torch.cat([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, 0], x[:, 0, -1, -1]])
        assert corners.median().item() == background(style)


def test_shift_fills_with_the_style_background():
    """A shifted image brings in the style's background: blank grounds stay blank, whatever the shift."""
    for style in (None, *DIGIT_STYLES):
        blank = torch.full((64, 1, 8, 8), background(style))
        assert torch.equal(digits._shift_batch(blank, torch.Generator().manual_seed(0), background(style)), blank)
    x = styled_split("train", "invert")[0][:64]
    shifted = digits._shift_batch(x, torch.Generator().manual_seed(0), background("invert"))
    assert sum(not torch.equal(a, b) for a, b in zip(shifted, x)) > 40  # most images move


def _fast_trainer(monkeypatch, calls: list):
    """train_classifier at 3 epochs (the style tests need a trained classifier, not a good one), recording calls."""
    real = digits.train_classifier

    def fast(style=None, seed=0, **kwargs):
        calls.append((style, seed))
        return real(style, seed, epochs=3)

    monkeypatch.setattr(digits, "train_classifier", fast)


def test_style_classifier_uses_the_shared_trainer_and_its_own_cache(tmp_path, monkeypatch):
    calls = []
    _fast_trainer(monkeypatch, calls)
    invert = load_classifier(tmp_path, style="invert")
    assert calls == [("invert", 0)] and invert.style == "invert"
    weights, sidecar = classifier_paths(tmp_path, "invert")
    assert weights.name == f"digit_classifier-{CLASSIFIER_VERSION}-invert.safetensors"
    assert weights.is_file() and sidecar.is_file()
    assert not classifier_paths(tmp_path)[0].exists()  # the plain classifier's file is another one
    meta = json.loads(sidecar.read_text())
    assert meta["style"] == "invert" and meta["held_out_accuracy"] == invert.held_out_accuracy
    # Held out on the style's own test split: the inverted digits it was trained on, not plain ones.
    x, y = digits_split("test")
    assert invert.held_out_accuracy == class_accuracy(quantize(digits_style(x, "invert")), y, invert) > 0.5
    again = load_classifier(tmp_path, style="invert")
    assert calls == [("invert", 0)]  # cached: not retrained
    for (name, a), (_, b) in zip(invert.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # Its FID reference is the style's held-out split.
    assert digits_fid(digits_style(x, "invert"), invert) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown digit style"):
        load_classifier(tmp_path, style="bold")
    assert calls == [("invert", 0)]


def test_one_scorer_behind_every_caller(classifier, cache_dir, tmp_path, monkeypatch):
    """evaluate_samples, the runner's metrics and lora_transfer's per-style scoring give the same figures."""
    from tdm import lora_transfer
    from tdm.artifacts import save_samples
    from tdm.config import parse
    from tdm.evaluation.rows import EvalRow
    from tdm.evaluation.runner import Evaluator, MetricSettings

    x, y = digits_split("test")
    noisy = (x[:60] + 0.3 * torch.randn(x[:60].shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    prompts = [digit_prompt(int(label)) for label in y[:60]]
    images = _to_uint8(noisy)

    by_fn = evaluate_samples(images, prompts, cache_dir)
    by_scorer = DigitsScorer(cache_dir).score(images, prompts)
    by_runner = Evaluator(["digits_fid", "class_accuracy"], MetricSettings(weights_dir=str(cache_dir))).score(
        images, prompts)
    assert by_fn == by_scorer
    assert (by_runner["fid_digits"], by_runner["class_accuracy"], by_runner["fid_digits_floor"]) == (
        by_fn["fid"], by_fn["accuracy"], by_fn["fid_floor"])
    assert by_fn["fid_floor"] == real_fid_floor(classifier, n=60)

    # A style: lora_transfer's rows and references through the same scorer.
    _fast_trainer(monkeypatch, [])
    styled = _to_uint8(digits_style(noisy, "thick"))
    npz = save_samples(tmp_path / "thick.npz", styled, prompts)[0]
    cfg = parse({"eval": {"weights_dir": str(tmp_path / "w")}, "lora_transfer": {"n": 60}})
    row = EvalRow(model="digits:thick+tdm_lora", steps=2, nfe=2, guidance=1.0, samples=str(npz))
    (scored,), references = lora_transfer.score_rows(cfg, [row], {"digits:thick": "thick"})
    styled_scores = evaluate_samples(styled, prompts, tmp_path / "w", style="thick")
    assert scored.metrics == {k: styled_scores[k] for k in ("fid", "accuracy", "n")}
    assert references["digits:thick"] == {"real_accuracy": styled_scores["classifier_accuracy"],
                                          "fid_floor": styled_scores["fid_floor"]}
    assert styled_scores["fid"] != by_fn["fid"]  # another classifier, another reference set


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


# --- the second view (issue #17): another architecture and seed, FID and KID in both ----------------------------

def _fast_any_trainer(monkeypatch, calls: list, epochs: int = 3):
    """train_classifier at a few epochs for any architecture, recording (style, seed, arch)."""
    real = digits.train_classifier

    def fast(style=None, seed=0, arch="cnn", **kwargs):
        calls.append((style, seed, arch))
        return real(style, seed, epochs=epochs, arch=arch)

    monkeypatch.setattr(digits, "train_classifier", fast)


@pytest.fixture(scope="module")
def second_view(cache_dir) -> torch.nn.Module:
    """The second view's classifier cached beside the first, trained at 8 epochs (the test needs a trained
    classifier of the other architecture, not the 25-epoch one) so `two_view_scores` finds it."""
    with pytest.MonkeyPatch.context() as mp:
        _fast_any_trainer(mp, [], epochs=8)
        return load_classifier(cache_dir, **SECOND_VIEW)


def test_second_view_is_another_architecture_seed_and_cache(classifier, tmp_path, monkeypatch):
    calls = []
    _fast_any_trainer(monkeypatch, calls)
    mlp = load_classifier(tmp_path, **SECOND_VIEW)
    assert SECOND_VIEW == {"arch": "mlp", "seed": 1} and calls == [(None, 1, "mlp")]
    assert isinstance(mlp, DigitMLP) and not any(isinstance(m, torch.nn.Conv2d) for m in mlp.modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in classifier.modules())
    assert not any(v.ndim == 4 for v in mlp.state_dict().values())  # no convolution kernel anywhere
    weights, sidecar = classifier_paths(tmp_path, **SECOND_VIEW)
    assert weights.name == f"digit_mlp-{MLP_VERSION}-seed1.safetensors" and weights.is_file()
    meta = json.loads(sidecar.read_text())
    assert meta["arch"] == "mlp" and meta["seed"] == 1 and meta["version"] == MLP_VERSION
    assert not classifier_paths(tmp_path)[0].exists()  # the first view's file is another one
    assert not list(tmp_path.glob(".*"))
    assert 0.5 < mlp.held_out_accuracy == json.loads(sidecar.read_text())["held_out_accuracy"]
    again = load_classifier(tmp_path, **SECOND_VIEW)
    assert calls == [(None, 1, "mlp")]  # cached
    for (name, a), (_, b) in zip(mlp.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="unknown digit classifier architecture 'vit'"):
        load_classifier(tmp_path, arch="vit")
    with pytest.raises(ValueError, match="architecture"):
        DigitsScorer(tmp_path, arch="resnet")
    assert calls == [(None, 1, "mlp")]  # refused before training


def test_kid_is_the_unbiased_cubic_mmd():
    gen = np.random.default_rng(0)
    a, b = gen.normal(size=(300, 16)), gen.normal(0.5, 1.0, size=(300, 16))
    from torchmetrics.image.kid import poly_mmd

    # Equal sizes: torchmetrics' own estimator (what its KernelInceptionDistance averages over subsets).
    for x, y in ((a, b), (a, gen.normal(size=(300, 16)))):
        expected = float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)))
        assert kernel_inception_distance(x, y) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # Unequal sizes: the direct unbiased sum.
    x, y = a[:50], b[:80]
    k = lambda u, v: (u @ v.T / 16 + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    direct = ((kxx.sum() - np.trace(kxx)) / (50 * 49) + (kyy.sum() - np.trace(kyy)) / (80 * 79) - 2 * kxy.mean())
    assert kernel_inception_distance(x, y) == pytest.approx(direct, rel=1e-9)
    assert abs(kernel_inception_distance(a[:150], a[150:])) < 0.1 * kernel_inception_distance(a, b)
    with pytest.raises(ValueError, match="feature dims differ"):
        kernel_inception_distance(a, b[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(a[:1], b)


def test_both_views_near_zero_on_real_and_rank_degraded_worse(classifier, second_view, cache_dir, test_split):
    """Real-vs-real: FID at its floor, KID ~0 in both views; blurred and noise-added digits rank worse than clean
    ones in both views (views_agree), and the views are different feature spaces (other FIDs)."""
    x, y = test_split
    train, train_y = digits_split("train")
    prompts = [digit_prompt(int(label)) for label in train_y]
    real = two_view_scores(_to_uint8(train), prompts, cache_dir)
    for suffix in ("", "_mlp"):
        assert real["fid" + suffix] == pytest.approx(real["fid_floor" + suffix]) and real["fid" + suffix] < 10
        assert abs(real["kid" + suffix]) < 0.05 and abs(real["kid_floor" + suffix] - real["kid" + suffix]) < 0.05
    assert real["fid"] != real["fid_mlp"] and real["accuracy_mlp"] > 0.9 and real["n"] == len(train)
    assert {k: real[k] for k in ("fid", "accuracy", "fid_floor", "n", "classifier_accuracy")} == \
        DigitsScorer(cache_dir).score(_to_uint8(train), prompts)  # the first view is the recorded metric

    # A random real split against itself (same distribution): KID ~0 in both views.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    half_a, half_b = _to_uint8(train[order[:600]]), _to_uint8(train[order[600:1200]])
    for view in (DigitsScorer(cache_dir), DigitsScorer(cache_dir, **SECOND_VIEW)):
        assert abs(view.kid(half_a, reference=half_b)) < 0.05

    test_prompts = [digit_prompt(int(label)) for label in y]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), value=-1.0), 3, stride=1)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    clean = two_view_scores(_to_uint8(train[order[:450]]), prompts[:450], cache_dir)
    for name, bad in (("blurred", blurred), ("noisy", noisy)):
        worse = two_view_scores(_to_uint8(bad), test_prompts, cache_dir)
        assert views_agree(clean, worse, margin=0.5) == "a", (name, worse)
        assert views_agree(worse, clean) == "b"
    # Disagreement (one figure the other way) is no claim; a missing figure names itself.
    assert views_agree(clean, {**clean, "kid_mlp": clean["kid_mlp"] - 1.0, "fid": clean["fid"] + 1}) is None
    with pytest.raises(KeyError, match="kid_mlp"):
        views_agree({"fid": 1, "kid": 1, "fid_mlp": 1}, clean)
    with pytest.raises(ValueError, match="prompts"):
        two_view_scores(_to_uint8(x[:10]), test_prompts[:9], cache_dir)
