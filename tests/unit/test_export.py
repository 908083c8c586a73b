"""Export for stock pipelines (tdm/export.py): a K-aware student's K embedding folded into the weights computes
exactly what the hooked student computes, for every family."""
import pytest
import torch
import tiny_models

from tdm.backbones import load_backbone
from tdm.export import fold_k_embedding
from tdm.student import k_conditioning

PROMPTS = ["a photo of a cat", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, tiny_digits):
    root = tmp_path_factory.mktemp("tiny")
    out = {f: load_backbone(tiny_models.save_pipeline(tiny_models.build(f), root / f)) for f in tiny_models.FAMILIES}
    return {"digits": tiny_digits, **out}


@pytest.mark.parametrize("family", ["digits", *tiny_models.FAMILIES])
def test_folded_k_embedding_equals_the_hooked_student(family, backbones):
    backbone = backbones[family]
    g = torch.Generator().manual_seed(0)
    embedding = torch.nn.Embedding(5, backbone.time_embed_dim(backbone.net))
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(embedding.weight.shape, generator=g))
    x = torch.randn((2, *backbone.sample_shape), generator=g)
    t = torch.tensor([999, 250])
    cond = backbone.encode_prompts(PROMPTS if family != "digits" else ["a handwritten digit one"] * 2)
    for k in (1, 2, 4):
        folded = fold_k_embedding(backbone, backbone.net, embedding, k)
        with torch.no_grad():
            with k_conditioning(backbone, backbone.net, embedding, torch.full((2,), k)):
                hooked = backbone.predict(backbone.net, x, t, cond)
            plain = backbone.predict(folded, x, t, cond)
            untouched = backbone.predict(backbone.net, x, t, cond)
        torch.testing.assert_close(plain, hooked, atol=1e-5, rtol=1e-5)
        assert (plain - untouched).abs().max() > 1e-4  # the fold is not a no-op
    with pytest.raises(ValueError, match="no row"):
        fold_k_embedding(backbone, backbone.net, embedding, 5)


def test_a_time_embedding_with_a_post_activation_is_refused(tiny_digits):
    net = tiny_digits.net
    tiny_digits.time_embedding(net).post_act = torch.nn.SiLU()
    try:
        with pytest.raises(ValueError, match="cannot be folded"):
            fold_k_embedding(tiny_digits, net, torch.nn.Embedding(5, tiny_digits.time_embed_dim(net)), 2)
    finally:
        tiny_digits.time_embedding(net).post_act = None
