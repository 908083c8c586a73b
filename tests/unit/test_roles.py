"""The three roles over one architecture (tdm/roles.py): LoRA switching, the bare teacher, K conditioning."""
import pytest
import torch

from tdm.backbones import load_backbone
from tdm.roles import Roles


def test_lora_roles_switch_and_teacher_is_the_bare_base(tiny_digits, teacher_dir):
    backbone = load_backbone(teacher_dir)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([300, 700])
    cond = backbone.encode_prompts(["a handwritten digit two"] * 2)
    with torch.no_grad():
        bare = backbone.predict_x0_eps(backbone.net, x, t, cond)[0]
    roles = Roles(backbone, "lora", lora_rank=4)
    with torch.no_grad():
        for p in roles.parameters("student"):
            p.normal_(0, 0.1)
        teacher = roles.x0_eps("teacher", x, t, cond)[0]
        student = roles.x0_eps("student", x, t, cond)[0]
        fake = roles.x0_eps("fake", x, t, cond)[0]  # its B is still zero: equals the base
        teacher_again = roles.x0_eps("teacher", x, t, cond)[0]
        merged = roles.merged_net("student")
        merged_x0 = backbone.predict_x0_eps(merged, x, t, cond)[0]
    torch.testing.assert_close(teacher, bare, atol=0, rtol=0)
    torch.testing.assert_close(teacher_again, bare, atol=0, rtol=0)
    torch.testing.assert_close(fake, bare, atol=1e-6, rtol=1e-6)
    assert (student - bare).abs().max() > 1e-3
    torch.testing.assert_close(merged_x0, student, atol=1e-4, rtol=1e-4)  # LoRA merged into a plain copy


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_k_conditioning_at_init_equals_the_unconditioned_model(teacher_dir, mode):
    backbone = load_backbone(teacher_dir)
    roles = Roles(backbone, mode, lora_rank=4, k_max=4)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([100, 500, 899])
    cond = backbone.encode_prompts(["a handwritten digit six"] * 3)
    with torch.no_grad():
        plain = roles.x0_eps("teacher", x, t, cond)[0]
        for k in (1, 2, 4):
            torch.testing.assert_close(roles.x0_eps("student", x, t, cond, torch.full((3,), k))[0], plain)
        roles.k_embeddings["student"].weight.normal_()
        assert (roles.x0_eps("student", x, t, cond, torch.full((3,), 1))[0] - plain).abs().max() > 1e-4
        torch.testing.assert_close(roles.x0_eps("teacher", x, t, cond)[0], plain)  # the teacher ignores K
