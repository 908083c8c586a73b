import math

import pytest
import torch

from tdm.losses import (fake_score_loss, generator_loss, generator_normaliser, generator_target, importance_weight,
                        pseudo_huber)


def test_importance_weight_by_hand():
    n = torch.ones(2, 1, 2, 2)
    assert torch.allclose(importance_weight(n, n), torch.ones(2))
    m = torch.zeros(2, 1, 2, 2)  # exp(-0/2) / exp(-1/2)
    assert torch.allclose(importance_weight(m, n), torch.full((2,), math.exp(0.5)))


def test_fake_score_loss_by_hand():
    student = torch.zeros(2, 1, 2, 2)
    fake = torch.ones(2, 1, 2, 2)
    snr = torch.tensor([10.0, 0.5])  # clamped to 5 and kept at 0.5
    w = torch.tensor([1.0, 2.0])
    assert fake_score_loss(fake, student, snr, w, snr_clamp=5.0).item() == pytest.approx((5 * 1 + 0.5 * 2) / 2)
    assert fake_score_loss(student, student, snr, w).item() == 0.0


def test_generator_target_and_normaliser():
    x0 = torch.tensor([[0.0, 2.0]])
    teacher, fake = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.0]])
    assert torch.equal(generator_target(x0, teacher, fake), torch.tensor([[0.5, 3.0]]))
    assert generator_normaliser(x0, teacher).item() == pytest.approx(1.0)  # mean(|0-1|, |2-1|)


@pytest.mark.parametrize("metric", ["l2", "huber", "huber_sample"])
def test_generator_gradient_points_along_teacher_minus_fake(metric):
    x0 = torch.zeros(3, 1, 4, 4, requires_grad=True)
    teacher = torch.ones(3, 1, 4, 4)
    fake = torch.full((3, 1, 4, 4), 0.25)
    loss = generator_loss(x0, teacher, fake, metric)
    loss.backward()
    # Descending the loss moves x0 toward teacher - fake (here: up).
    assert (x0.grad < 0).all()
    if metric == "l2":  # mean((x0 - (x0 + 0.75))^2) / mean|x0 - 1| = 0.5625
        assert loss.item() == pytest.approx(0.75 ** 2)


def test_pseudo_huber_by_hand():
    x, y = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    per_element = pseudo_huber(x, y, c=1e-3, per_sample=False)
    assert torch.allclose(per_element, torch.tensor([[3.0, 4.0]]), atol=1e-3)
    per_sample = pseudo_huber(x, y, c=0.0, per_sample=True)  # the L2 distance
    assert per_sample.item() == pytest.approx(5.0)
    # Small differences behave like L2 / (2c): the metric's point.
    tiny = pseudo_huber(torch.tensor([[1e-5]]), torch.zeros(1, 1), c=1e-3, per_sample=False)
    assert tiny.item() == pytest.approx(1e-10 / 2e-3, rel=1e-2)  # float32 cancellation


def test_paper_huber_constant_scales_with_dimension():
    x = torch.zeros(1, 1, 8, 8, requires_grad=True)
    teacher = torch.ones(1, 1, 8, 8)
    a = generator_loss(x, teacher, torch.zeros_like(teacher), "huber_sample")
    c = 0.00054 * math.sqrt(64)
    assert a.item() == pytest.approx(math.sqrt(64 + c * c) - c, rel=1e-5)
    with pytest.raises(ValueError, match="distill.metric"):
        generator_loss(x, teacher, teacher, "cosine")
