import json

import pytest
import torch
from transformers import CLIPTokenizer

from tdm.backbones import DigitsArch, DigitsBackbone, family_of, load_backbone
from tdm.backbones.clip_tokenizer import FULL_NUM_MERGES, write_clip_tokenizer


def test_full_bpe_gives_the_real_clip_ids(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path))
    assert len(tok) == 49408
    # The ids of OpenAI CLIP ViT-L/14's tokenizer for this sentence.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_merge_prefix_is_a_consistent_smaller_vocabulary(tmp_path):
    full = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "full"))
    small = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "small", 2000, 16))
    assert len(small) == 512 + 2000 + 2
    ids = small("a handwritten digit seven", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == small.bos_token_id
    # Tokens the small vocabulary has carry the same ids as in the full one.
    assert small("a photo of a").input_ids[1:-1] == full("a photo of a").input_ids[1:-1]
    with pytest.raises(ValueError, match="num_merges"):
        write_clip_tokenizer(tmp_path / "bad", FULL_NUM_MERGES + 1)


def test_prompts_encode_to_distinct_conditionings(tiny_digits):
    cond = tiny_digits.encode_prompts(["a handwritten digit seven", "a handwritten digit eight", ""])
    h = cond["encoder_hidden_states"]
    assert h.shape == (3, 16, 64) and not h.requires_grad
    assert not torch.allclose(h[0], h[1]) and not torch.allclose(h[0], h[2])
    null = tiny_digits.null_cond(4)["encoder_hidden_states"]
    assert null.shape == (4, 16, 64) and torch.equal(null[0], h[2])


def test_predict_shapes_and_x0_eps_identity(tiny_digits):
    x = torch.randn(3, *tiny_digits.sample_shape)
    t = torch.tensor([10, 500, 999])
    cond = tiny_digits.encode_prompts(["a handwritten digit one"] * 3)
    out = tiny_digits.predict(tiny_digits.net, x, t, cond)
    assert out.shape == x.shape == (3, 1, 8, 8)
    x0, eps = tiny_digits.predict_x0_eps(tiny_digits.net, x, t, cond)
    torch.testing.assert_close(tiny_digits.schedule.add_noise(x0, eps, t), x, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_gives_identical_outputs(tiny_digits, tmp_path):
    tiny_digits.save(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert meta["tdm_family"] == "digits" and meta["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert family_of(tmp_path / "model") == "digits"
    loaded = load_backbone(tmp_path / "model")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 800])
    prompts = ["a handwritten digit two", "the number five, written by hand"]
    with torch.no_grad():
        a = tiny_digits.predict(tiny_digits.net, x, t, tiny_digits.encode_prompts(prompts))
        b = loaded.predict(loaded.net, x, t, loaded.encode_prompts(prompts))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not list(tmp_path.glob(".model.*")), "temp folder left behind"


def test_create_is_seeded():
    arch = DigitsArch(channels=(32, 32), text_layers=1, num_merges=100)
    a, b = DigitsBackbone.create(arch, seed=3), DigitsBackbone.create(arch, seed=3)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)


def test_decode_is_uint8_nhwc(tiny_digits):
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(5, 1, 1, 1).expand(5, 1, 8, 8)
    im = tiny_digits.decode(x)
    assert im.dtype == torch.uint8 and im.shape == (5, 8, 8, 1)
    assert im[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


def test_unsupported_folders_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_backbone(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    with pytest.raises(ValueError, match="unsupported model.*HunyuanVideoPipeline"):
        load_backbone(tmp_path)


def test_loads_a_hub_id_from_the_offline_cache(tiny_digits, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    snapshot = tmp_path / "hub" / "models--tdm-test--tiny-digits" / "snapshots" / ("0" * 40)
    tiny_digits.save(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_backbone("tdm-test/tiny-digits")
    for a, b in zip(loaded.net.parameters(), tiny_digits.net.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="not in the HF cache"):
        load_backbone("tdm-test/absent")


@pytest.mark.parametrize("family", ["digits", "sd3"])
def test_saved_tokenizers_do_not_depend_on_the_last_call(family, tiny_digits, tmp_path):
    """A fast tokenizer keeps its last call's truncation / padding in tokenizer.json: a model saved after
    encoding prompts would differ from one saved before (a resumed run's bytes from an uninterrupted run's, and
    DVC would rerun everything downstream)."""
    import hashlib

    import tiny_models

    from tdm.backbones import load_backbone

    backbone = tiny_digits if family == "digits" else load_backbone(
        tiny_models.save_pipeline(tiny_models.build(family), tmp_path / "base"))
    backbone.save(tmp_path / "before")
    backbone.encode_prompts(["a handwritten digit one"])
    backbone.save(tmp_path / "after")
    files = sorted(p.relative_to(tmp_path / "before") for p in (tmp_path / "before").rglob("tokenizer*.json"))
    assert files
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert [digest(tmp_path / "before" / f) for f in files] == [digest(tmp_path / "after" / f) for f in files]
