import pytest
import torch
from torch import nn

from tdm.backbones import cat_cond
from tdm.sampler import guided_x0_eps, make_noise, sample_student, sample_teacher, student_sample, teacher_sample
from tdm.student import Student, StudentRecord
from tdm.schedule import student_timesteps


class PointMassDenoiser(nn.Module):
    """The exact epsilon-predictor for data concentrated on one point per prompt: the prompt's target is the
    mean of its text embedding, broadcast over the image. Records the timesteps it is called at."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.calls: list[list[int]] = []

    def target(self, encoder_hidden_states, like):
        return encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).expand_as(like)

    def forward(self, x_t, t, encoder_hidden_states, return_dict=False):
        self.calls.append(t.tolist())
        alpha, sigma = self.schedule.coefficients(t, x_t)
        return ((x_t - alpha * self.target(encoder_hidden_states, x_t)) / sigma,)


@pytest.fixture
def point_mass(tiny_digits):
    return PointMassDenoiser(tiny_digits.schedule)


PROMPTS = ["a handwritten digit three", "a handwritten digit nine"]


@pytest.mark.parametrize("steps", [1, 4, 50])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_teacher_ddim_lands_on_the_guided_point(tiny_digits, point_mass, steps, guidance):
    cond = tiny_digits.encode_prompts(PROMPTS)
    noise = make_noise(2, tiny_digits.sample_shape, seed=1)
    x0 = teacher_sample(tiny_digits, point_mass, cond, noise, steps, guidance)
    target_c = point_mass.target(cond["encoder_hidden_states"], noise)
    target_u = point_mass.target(tiny_digits.null_cond(2)["encoder_hidden_states"], noise)
    torch.testing.assert_close(x0, target_u + guidance * (target_c - target_u), atol=1e-4, rtol=1e-4)
    # One network call per step; with CFG, cond and uncond share it (batch of 4).
    assert len(point_mass.calls) == steps
    assert len(point_mass.calls[0]) == (2 if guidance == 1.0 else 4)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_student_trajectory_visits_its_grid_and_is_exact(tiny_digits, point_mass, k):
    cond = tiny_digits.encode_prompts(PROMPTS)
    noise = make_noise(2, tiny_digits.sample_shape, seed=2)
    x0 = student_sample(tiny_digits, point_mass, cond, noise, student_timesteps(k, 900))
    torch.testing.assert_close(x0, point_mass.target(cond["encoder_hidden_states"], noise), atol=1e-4, rtol=1e-4)
    assert [c[0] for c in point_mass.calls] == student_timesteps(k, 900).tolist()


def test_batched_cfg_equals_separate_forwards(tiny_digits):
    net = tiny_digits.net
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([50, 400, 900])
    cond = tiny_digits.encode_prompts(["a handwritten digit one"] * 3)
    with torch.no_grad():
        x0, eps = guided_x0_eps(tiny_digits, net, x, t, cond, 4.5)
        out_c = tiny_digits.predict(net, x, t, cond)
        out_u = tiny_digits.predict(net, x, t, tiny_digits.null_cond(3))
    ref_x0, ref_eps = tiny_digits.schedule.to_x0_eps(out_u + 4.5 * (out_c - out_u), x, t, "epsilon")
    torch.testing.assert_close(x0, ref_x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps, ref_eps, atol=1e-4, rtol=1e-4)
    assert cat_cond([cond, cond])["encoder_hidden_states"].shape[0] == 6


def test_samples_do_not_depend_on_batch_size_and_follow_the_seed(tiny_digits):
    prompts = [f"a handwritten digit {w}" for w in ["zero", "one", "two", "three", "four"]] * 2
    a = sample_teacher(tiny_digits, tiny_digits.net, prompts, steps=3, guidance=2.0, seed=5, batch_size=3)
    b = sample_teacher(tiny_digits, tiny_digits.net, prompts, steps=3, guidance=2.0, seed=5, batch_size=10)
    c = sample_teacher(tiny_digits, tiny_digits.net, prompts, steps=3, guidance=2.0, seed=6, batch_size=10)
    assert a.shape == (10, 8, 8, 1) and a.dtype == torch.uint8
    assert (a.int() - b.int()).abs().max() <= 1  # batched matmuls may round differently in the last bit
    assert not torch.equal(b, c)
    student = Student(tiny_digits, tiny_digits.net, StudentRecord(family="digits", k=4, total_steps=900))
    s = sample_student(student, prompts, seed=5)
    assert s.shape == (10, 8, 8, 1)
    noise = make_noise(len(prompts), tiny_digits.sample_shape, seed=5)
    x0 = student_sample(tiny_digits, tiny_digits.net, tiny_digits.encode_prompts(prompts), noise,
                        student_timesteps(4, 900))
    assert torch.equal(s, tiny_digits.decode(x0))  # K = the record's K, same noise as the teacher's
    with pytest.raises(ValueError, match="total_steps"):
        sample_student(student, prompts, k=901)


def test_the_old_call_forms_fail_clearly_or_keep_working(tiny_digits):
    from tdm.sampler import TDMScheduler  # the import the README documented before tdm.scheduling_tdm
    from tdm.scheduling_tdm import TDMScheduler as same

    assert TDMScheduler is same
    noise = make_noise(1, tiny_digits.sample_shape, seed=0)
    cond = tiny_digits.encode_prompts(["a handwritten digit one"])
    with pytest.raises(TypeError, match="StudentGrid"):
        student_sample(tiny_digits, tiny_digits.net, cond, noise, 4, 900)


def test_sampling_prints_plain_progress_lines_when_asked(tiny_digits, monkeypatch, capsys):
    """Without a bar (-q under DVC / the flow), TDM_PROGRESS_EVERY makes sampling print n/total batch lines."""
    from tdm.sampler import sample_teacher

    monkeypatch.setenv("TDM_PROGRESS_EVERY", "0")
    sample_teacher(tiny_digits, tiny_digits.net, ["a handwritten digit one"] * 3, steps=2, batch_size=1)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" (")[0] for ln in lines] == [f"sampling 2 steps: {i}/3 batch" for i in (1, 2, 3)]
    monkeypatch.delenv("TDM_PROGRESS_EVERY")
    sample_teacher(tiny_digits, tiny_digits.net, ["a handwritten digit one"] * 3, steps=2, batch_size=1)
    assert capsys.readouterr().err == ""
