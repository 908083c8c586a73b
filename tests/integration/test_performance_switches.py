"""Speed switches (distill.compile, distill.channels_last) and the always-on role-switching shortcuts give the
same distillation as the plain path (docs/performance.md). Timings live in benchmarks/optimizations.py."""

import pytest
import torch
from accelerate import Accelerator
from peft.tuners.tuners_utils import BaseTunerLayer

from conftest import PARAMS
from tdm import config
from tdm.backbones import load_backbone
from tdm.config import ConfigError
from tdm.distill import TDMTrainer, check_inputs, save_student
from tdm.training import fingerprint
from tdm.roles import Roles
from tdm.sampler import speed_up_net

TINY = ["distill.batch_size=8", "distill.eval_samples=0", "distill.fake_lr=1e-3", "distill.lr=2e-4"]


@pytest.fixture(scope="module")
def teacher_dir(tiny_digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "model"
    tiny_digits.save(folder)
    return folder


def _cfg(teacher_dir, *extra):
    return config.load(PARAMS, [f"distill.teacher={teacher_dir}", *TINY, *extra])


def _two_iterations(teacher_dir, *extra):
    """Losses and trained weights after two iterations (LoRA's B moves from the first, A from the second)."""
    torch.manual_seed(0)  # LoRA's A matrices are drawn at random: the same draw for every variant
    trainer = TDMTrainer(_cfg(teacher_dir, *extra), load_backbone(teacher_dir), Accelerator(cpu=True))
    losses = [trainer.iteration(s) for s in range(2)]
    return trainer, losses, {r: trainer.roles.state_dict(r) for r in ("student", "fake")}


def _assert_same_run(a, b, tol, weight_tol=5e-5):
    """Losses and gradient norms agree to `tol`. Weights to `weight_tol`: Adam's first steps move each weight
    by about lr x sign(grad) (student lr 2e-4 here), so float-level gradient noise on near-zero gradients
    shows up as a fraction of one step."""
    (_, losses_a, weights_a), (_, losses_b, weights_b) = a, b
    for la, lb in zip(losses_a, losses_b):
        for name in ("loss_fake", "loss_gen", "grad_norm_fake", "grad_norm_gen"):
            torch.testing.assert_close(lb[name], la[name], atol=tol, rtol=tol, msg=name)
    for role in weights_a:
        moved = 0
        for name, w in weights_a[role].items():
            torch.testing.assert_close(weights_b[role][name], w, atol=weight_tol, rtol=0, msg=f"{role} {name}")
            moved += int(not torch.equal(w, weights_b[role][name]))
    return moved


def test_switches_default_off_and_are_validated():
    d = config.load(PARAMS).distill
    assert d.compile is False and d.channels_last is False
    for key in ("distill.compile", "distill.channels_last"):
        with pytest.raises(ConfigError) as err:
            config.load(PARAMS, [f"{key}=maybe"])
        assert str(err.value).startswith(f"{PARAMS}: {key}: ")


def test_switches_do_not_change_the_resume_fingerprint(teacher_dir):
    # Same math within float tolerance: a run may resume with a switch flipped.
    plain = fingerprint(_cfg(teacher_dir), "distill")
    assert fingerprint(_cfg(teacher_dir, "distill.channels_last=true", "distill.compile=true"), "distill") == plain
    assert fingerprint(_cfg(teacher_dir, "distill.guidance=3"), "distill") != plain


def test_channels_last_is_refused_for_non_unet_teachers(tmp_path):
    import tiny_models

    folder = tiny_models.save_pipeline(tiny_models.build("pixart_alpha"), tmp_path / "pixart")
    cfg = config.load(PARAMS, [f"distill.teacher={folder}", "distill.channels_last=true"])
    with pytest.raises(ValueError, match=r"^distill.channels_last: only for UNet families .* pixart_alpha model"):
        check_inputs(cfg)
    with pytest.raises(ValueError, match="channels_last is for UNet denoisers"):
        speed_up_net(torch.nn.Linear(2, 2), channels_last=True)


def test_lora_switching_ends_in_peft_state(teacher_dir):
    """activate() skips peft calls that do not change anything: every switch still ends in exactly the
    state peft's own enable_adapters/set_adapter leave (active adapter, enabled flag, requires_grad)."""
    roles = Roles(load_backbone(teacher_dir), "lora", lora_rank=4)
    layers = [m for m in roles.nets["teacher"].modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    for role in ("student", "fake", "teacher", "fake", "student", "student", "teacher", "student"):
        roles.activate(role)
        for layer in layers:
            assert layer.disable_adapters == (role == "teacher")
            if role != "teacher":
                assert layer.active_adapters == [role]
        for r in ("student", "fake"):
            assert all(p.requires_grad == (r == role) for p in roles.parameters(r)), (role, r)


def test_role_parameters_are_found_once_and_handed_out_as_copies(teacher_dir):
    roles = Roles(load_backbone(teacher_dir), "lora", lora_rank=4)
    first = roles.named_parameters("student")
    first.clear()  # a caller's dict: the roles' own set is untouched
    again = roles.named_parameters("student")
    walk = {n: p for n, p in roles.nets["teacher"].named_parameters() if "lora_" in n and ".student." in n}
    assert again.keys() == walk.keys() and all(again[n] is walk[n] for n in walk)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_channels_last_gives_the_same_iterations(teacher_dir, tmp_path, mode):
    plain = _two_iterations(teacher_dir, f"distill.mode={mode}")
    fast = _two_iterations(teacher_dir, f"distill.mode={mode}", "distill.channels_last=true")
    convs = [m.weight for m in fast[0].roles.nets["student"].modules()
             if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)  # the switch is on
    assert _assert_same_run(plain, fast, tol=1e-5) > 0  # the weights trained, and agree
    # What is saved is plain contiguous weights (safetensors), and samples like the plain run's student.
    save_student(fast[0], tmp_path / "fast" / "student")
    save_student(plain[0], tmp_path / "plain" / "student")
    a, b = load_backbone(tmp_path / "plain" / "student"), load_backbone(tmp_path / "fast" / "student")
    for (n, wa), wb in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        torch.testing.assert_close(wb, wa, atol=5e-5, rtol=0, msg=n)


@pytest.mark.slow  # compiling the tiny UNet's graphs (forward and backward per role) takes minutes on CPU
def test_compile_gives_the_same_iterations_with_lora_switching(teacher_dir):
    plain = _two_iterations(teacher_dir, "distill.mode=lora")
    compiled = _two_iterations(teacher_dir, "distill.mode=lora", "distill.compile=true")
    assert compiled[0].roles.activate("student") is not compiled[0].roles.nets["student"]  # the compiled form
    assert _assert_same_run(plain, compiled, tol=1e-4, weight_tol=1e-4) > 0


def test_channels_last_sampling_gives_the_same_samples(tiny_digits):
    import copy

    from tdm.sampler import make_noise, student_sample
    from tdm.schedule import student_timesteps

    cond = tiny_digits.encode_prompts(["a handwritten digit three"] * 4)
    noise = make_noise(4, tiny_digits.sample_shape, seed=0)
    plain = student_sample(tiny_digits, tiny_digits.net, cond, noise, student_timesteps(4, 900))
    net = speed_up_net(copy.deepcopy(tiny_digits.net), channels_last=True)
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fast = student_sample(tiny_digits, net, cond, noise, student_timesteps(4, 900))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
