"""DMD's data-free regression loss on teacher trajectories (tdm/regression.py, distill.regression_weight)."""
import pytest
import torch

from conftest import PARAMS
from tdm import config
from tdm.backbones import load_backbone
from tdm.distill import TDMTrainer
from tdm.regression import make_teacher_pairs, refined_grid, regression_loss, teacher_trajectories
from tdm.sampler import make_noise, teacher_sample

TINY = ["distill.batch_size=8", "distill.iterations=4", "distill.log_every=2", "distill.eval_samples=0",
        "distill.fake_lr=1e-3", "distill.lr=2e-4"]


def _cfg(teacher_dir, tmp_path, *extra):
    return config.load(PARAMS, [f"distill.teacher={teacher_dir}", f"eval.weights_dir={tmp_path / 'w'}", *TINY, *extra])


def _trainer(teacher_dir, tmp_path, *extra):
    from accelerate import Accelerator

    torch.manual_seed(0)
    return TDMTrainer(_cfg(teacher_dir, tmp_path, *extra), load_backbone(teacher_dir), Accelerator(cpu=True))


def test_refined_grid_keeps_every_student_point():
    assert refined_grid([899], -1, 4) == [899, 674, 449, 224, -1]
    fine = refined_grid([899, 674, 449, 224], -1, 3)
    assert fine[0] == 899 and fine[-1] == -1 and len(fine) == 13
    assert all(a > b for a, b in zip(fine, fine[1:]))
    assert {899, 674, 449, 224} <= set(fine)
    assert refined_grid([3, 2], -1, 4) == [3, 2, 1, 0, -1]  # repeated integer timesteps dropped


def test_trajectory_endpoint_is_the_teachers_ddim_sample(teacher_dir):
    backbone = load_backbone(teacher_dir)
    cond = backbone.encode_prompts(["a photo of the digit 3", "a photo of the digit 7"])
    noise = make_noise(2, backbone.sample_shape, seed=0)
    # one student step from t = 999 refined into 10: diffusers' trailing 10-step DDIM grid
    points, x0 = teacher_trajectories(backbone, backbone.net, cond, noise, [999], 10, [2.0])
    assert torch.equal(points[0], noise)
    torch.testing.assert_close(x0, teacher_sample(backbone, backbone.net, cond, noise, 10, guidance=2.0))


def test_points_are_on_the_trajectory_with_per_step_guidance(teacher_dir):
    backbone = load_backbone(teacher_dir)
    cond = backbone.encode_prompts(["a photo of the digit 5"] * 2)
    noise = make_noise(2, backbone.sample_shape, seed=1)
    points, x0 = teacher_trajectories(backbone, backbone.net, cond, noise, [899, 449], 3, [3.0, 1.0])
    assert points.shape == (2, *noise.shape)
    # deterministic DDIM: the second segment from its stored start, at its own scale, ends where the whole did
    _, tail = teacher_trajectories(backbone, backbone.net, cond, points[1], [449], 3, [1.0])
    torch.testing.assert_close(tail, x0)
    _, flat = teacher_trajectories(backbone, backbone.net, cond, noise, [899, 449], 3, [1.0, 1.0])
    assert not torch.allclose(flat, x0)  # the first segment's CFG 3 is applied


def test_pairs_are_deterministic_and_checked(teacher_dir):
    backbone = load_backbone(teacher_dir)
    prompts = ["a photo of the digit 1", "a photo of the digit 2", "a photo of the digit 9"]
    make = lambda **kw: make_teacher_pairs(backbone, backbone.net, prompts, [899, 449], substeps=2, guidance=[2.0, 2.0],
                                           seed=3, device="cpu", **kw)
    a, b = make(n=5, batch_size=2), make(n=5, batch_size=5)
    assert a.points.shape == (2, 5, *backbone.sample_shape) and a.x0.shape == (5, *backbone.sample_shape)
    assert torch.equal(a.prompt_idx, b.prompt_idx) and set(a.prompt_idx.tolist()) <= {0, 1, 2}
    torch.testing.assert_close(a.x0, b.x0)  # batch size does not change the pairs
    with pytest.raises(ValueError, match="2 guidance scales for a 1-step grid"):
        make_teacher_pairs(backbone, backbone.net, prompts, [899], n=2, substeps=2, guidance=[2.0, 2.0], seed=0,
                           batch_size=2, device="cpu")


def test_regression_loss_value_and_gradient():
    y = torch.randn(3, 1, 4, 4)
    x = (y + 0.1 * torch.randn_like(y)).requires_grad_()
    loss = regression_loss(x, y)
    diff = (x - y).detach()
    norm = diff.abs().flatten(1).mean(1)
    torch.testing.assert_close(loss, (diff.pow(2).flatten(1).mean(1) / norm).mean())
    loss.backward()
    expected = 2 * diff / (norm.view(-1, 1, 1, 1) * diff[0].numel() * 3)  # the normaliser is detached
    torch.testing.assert_close(x.grad, expected)
    assert regression_loss(y, y) == 0


def test_trainer_adds_the_regression_to_the_generator_only(teacher_dir, tmp_path):
    plain = _trainer(teacher_dir, tmp_path, "distill.k=2")
    reg = _trainer(teacher_dir, tmp_path, "distill.k=2", "distill.regression_weight=1.0", "distill.regression_pairs=6",
                   "distill.regression_teacher_steps=4")
    assert reg.pairs.points.shape[:2] == (2, 6) and plain.pairs is None
    m_plain, m_reg = plain.iteration(0), reg.iteration(0)
    # the TDM part draws and computes exactly as without it; the regression is logged on its own
    for key in ("loss_fake", "loss_gen", "grad_norm_fake"):
        torch.testing.assert_close(m_reg[key], m_plain[key])
    assert "loss_reg" not in m_plain and m_reg["loss_reg"] > 0
    assert not torch.allclose(m_reg["grad_norm_gen"], m_plain["grad_norm_gen"])
    m_reg = reg.iteration(1)
    assert torch.isfinite(m_reg["loss_reg"])


@pytest.mark.parametrize("extra, message", [
    (["distill.unify=true"], "regression_weight: the teacher pairs follow one fixed-K grid"),
    (["distill.iterations=4", "distill.stages=[{iterations: 4}]"], "regression_weight: the teacher pairs are made once"),
    (["distill.regression_teacher_steps=2"], "regression_teacher_steps: 2 < k = 4"),
])
def test_bad_regression_switches_are_refused_by_key(teacher_dir, tmp_path, extra, message):
    with pytest.raises(config.ConfigError, match=message):
        _cfg(teacher_dir, tmp_path, "distill.regression_weight=0.5", *extra)


def test_regression_is_refused_under_fsdp(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="distill.regression_weight: 0.5 is not supported under FSDP"):
        TDMTrainer.check_fsdp(_cfg(teacher_dir, tmp_path, "distill.regression_weight=0.5"))
