"""HPS, aesthetic score and CLIP score on tiny random open_clip models written in the real file formats."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_tiny_weights import TINY_ARCH, photos, register_tiny_clip, write_aesthetic_mlp, write_hps, write_open_clip

from tdm.evaluation.aesthetic import Aesthetic
from tdm.evaluation.clip_score import ClipScore
from tdm.evaluation.hps import HPS, hps_preprocess
from tdm.evaluation.weights import MissingWeights

PROMPTS = ["a photo of a temple", "a red flower", "a handwritten digit seven", "a cat"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_weights")
    register_tiny_clip(folder)
    write_hps(folder)
    write_open_clip(folder, "openai")
    write_open_clip(folder, "laion")
    write_aesthetic_mlp(folder)
    return folder


@pytest.fixture(scope="module")
def images():
    return photos(4)


def test_hps_loads_the_checkpoint_and_scores(weights, images):
    hps = HPS(weights, arch=TINY_ARCH)  # found in the hub cache layout, loaded as open_clip pretrained=<file>
    scores = hps.scores(images, PROMPTS)
    assert scores.shape == (4,) and np.isfinite(scores).all()
    assert np.abs(scores).max() <= 100.0  # cosine x 100
    # Every weight comes from the checkpoint, none from open_clip's random init.
    from eval_tiny_weights import tiny_clip_state

    for name, value in tiny_clip_state(1).items():
        torch.testing.assert_close(hps.clip.model.state_dict()[name], value, msg=name)
    # The score depends on the image and on the prompt.
    assert not np.allclose(hps.scores(images[::-1].copy(), PROMPTS), scores)
    assert not np.allclose(hps.scores(images, PROMPTS[::-1]), scores)
    assert hps(images, PROMPTS)["hps"] == pytest.approx(float(scores.mean()))


def test_hps_equals_the_hpsv2x_package(weights, images):
    """The same checkpoint scored by hpsv2x's own model factory, transform, tokenizer and formula
    (img_score.score's body: it hard-codes ViT-H-14 and a 3.9 GB download, so its parts are called)."""
    hpsv2_open_clip = pytest.importorskip("hpsv2.src.open_clip", reason="hpsv2x not installed")
    from PIL import Image

    model, _, preprocess_val = hpsv2_open_clip.create_model_and_transforms(
        TINY_ARCH, None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    from eval_tiny_weights import hub_cache_file

    checkpoint = torch.load(hub_cache_file(weights, "xswu/HPSv2", "HPS_v2.1_compressed.pt"), map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    tokenizer = hpsv2_open_clip.get_tokenizer(TINY_ARCH)
    theirs = []
    with torch.no_grad():
        for img, prompt in zip(images, PROMPTS):
            out = model(preprocess_val(Image.fromarray(img)).unsqueeze(0), tokenizer([prompt]))
            theirs.append(float(torch.diagonal(out["image_features"] @ out["text_features"].T)[0]))
    ours = HPS(weights, arch=TINY_ARCH).scores(images, PROMPTS) / 100.0
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    # And the transform is HPS's (longest side to 224, zero padding), not open_clip's center crop.
    tall = np.zeros((64, 32, 3), np.uint8) + 200
    ours_t = hps_preprocess(32)(Image.fromarray(tall))
    torch.testing.assert_close(ours_t, preprocess_val(Image.fromarray(tall)))


def test_aesthetic_mlp_reads_normalised_clip_embeddings(weights, images):
    aes = Aesthetic(weights, clip_model=f"{TINY_ARCH}:openai")
    scores = aes.scores(images)
    assert scores.shape == (4,) and np.isfinite(scores).all()
    assert len(set(np.round(scores, 6))) > 1  # differs between images
    # The head sees unit-norm embeddings: scoring them by hand gives the same numbers.
    emb = aes.clip.image_features(images)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    np.testing.assert_allclose(aes.mlp(emb).squeeze(-1).detach().numpy(), scores, rtol=1e-5)
    assert aes(images)["aesthetic"] == pytest.approx(float(scores.mean()))


def test_aesthetic_rejects_a_mismatched_clip(weights, tmp_path):
    write_aesthetic_mlp(tmp_path, input_size=768)
    (tmp_path / f"open_clip-{TINY_ARCH}-openai.safetensors").symlink_to(
        weights / f"open_clip-{TINY_ARCH}-openai.safetensors")
    with pytest.raises(ValueError, match="768-d"):
        Aesthetic(tmp_path, clip_model=f"{TINY_ARCH}:openai")


def test_clip_score_is_clamped_cosine(weights, images):
    cs = ClipScore(weights, clip_model=f"{TINY_ARCH}:laion")
    scores = cs.scores(images, PROMPTS)
    cos = (cs.clip.image_features(images) * cs.clip.text_features(PROMPTS)).sum(-1).numpy()
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), rtol=1e-6)
    assert np.isfinite(scores).all() and (scores >= 0).all()
    assert not np.allclose(cs.scores(images, PROMPTS[::-1]), scores)


@pytest.mark.parametrize("build,needs", [
    (lambda d: HPS(d), "HPS_v2.1_compressed.pt"),
    (lambda d: HPS(d, version="v2"), "HPS_v2_compressed.pt"),
    (lambda d: Aesthetic(d), "sac+logos+ava1-l14-linearMSE.pth"),
    (lambda d: ClipScore(d), "open_clip-ViT-g-14-laion2b_s12b_b42k.safetensors"),
])
def test_missing_weights_fail_fast_naming_the_file(tmp_path, build, needs):
    start = time.perf_counter()
    with pytest.raises(MissingWeights, match=re.escape(needs) + ".*get it from") as err:
        build(tmp_path)
    assert time.perf_counter() - start < 1.0
    assert str(tmp_path) in str(err.value)


def test_aesthetic_names_the_clip_file_when_only_the_mlp_is_there(tmp_path):
    write_aesthetic_mlp(tmp_path, input_size=768)
    with pytest.raises(MissingWeights, match="open_clip-ViT-L-14-openai.safetensors.*timm/vit_large_patch14"):
        Aesthetic(tmp_path)


def test_known_hub_repos_match_open_clips_registry():
    """The repos named without importing open_clip (for a fast error) are the ones open_clip itself uses."""
    from tdm.evaluation.clip_models import _KNOWN, _pretrained_cfg

    for (arch, tag), (repo, _) in _KNOWN.items():
        assert _pretrained_cfg(arch, tag)["hf_hub"].strip("/") == repo


REAL = os.environ.get("TDM_EVAL_WEIGHTS")  # a weights_dir holding the real files (see docs/evaluation.md)


@pytest.mark.skipif(not REAL or not (Path(REAL) / "HPS_v2.1_compressed.pt").is_file(),
                    reason="real-weights check: set TDM_EVAL_WEIGHTS to a folder with HPS_v2.1_compressed.pt (and "
                           "the LAION ViT-H-14 open_clip_pytorch_model.bin in the HF cache, which hpsv2x loads first)")
def test_hps_real_weights_agree_with_hpsv2x():
    from PIL import Image

    img_score = pytest.importorskip("hpsv2.img_score", reason="hpsv2x not installed")
    images, prompt = photos(2, size=224), "a photo of a building"
    theirs = img_score.score([Image.fromarray(im) for im in images], prompt,
                             cp=str(Path(REAL) / "HPS_v2.1_compressed.pt"), hps_version="v2.1")
    ours = HPS(REAL).scores(images, [prompt] * 2) / 100.0
    np.testing.assert_allclose(ours, np.asarray(theirs, dtype=float), rtol=1e-3)
