"""Noise schedules: diffusers agreement, conversion round trips, kernel composition, errors."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from tdm.schedule import (
    FlowSchedule,
    VPSchedule,
    ddim_timesteps,
    student_timesteps,
)

SD_DDPM = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
VP_SD = VPSchedule.from_scheduler(SD_DDPM)
VP_LINEAR = VPSchedule.from_scheduler(DDPMScheduler())
FLOW = FlowSchedule()

# (schedule, prediction type, t range where neither 1/alpha nor 1/sigma blows up)
VALID = [
    (VP_SD, "epsilon", (1, 990)),
    (VP_SD, "v_prediction", (-1, 999)),
    (VP_SD, "sample", (1, 999)),
    (VP_LINEAR, "epsilon", (1, 990)),
    (FLOW, "epsilon", (1, 990)),
    (FLOW, "flow", (0, 1000)),
    (FLOW, "sample", (10, 1000)),
]
SCHEDULES = [VP_SD, VP_LINEAR, FLOW]

fast = settings(deadline=None, max_examples=50)


def _t_batch(schedule, lo: float, hi: float, n: int, seed: int) -> torch.Tensor:
    """Float timesteps with the two endpoints always included."""
    g = torch.Generator().manual_seed(seed)
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    t[0], t[-1] = lo, hi
    return t


# --- timestep grids ----------------------------------------------------------------------


def test_student_timesteps_examples():
    assert student_timesteps(4, 900).tolist() == [899, 674, 449, 224]
    assert student_timesteps(2, 900).tolist() == [899, 449]
    assert student_timesteps(1, 900).tolist() == [899]
    assert student_timesteps(4, 900).dtype == torch.int64


@fast
@given(total=st.integers(1, 2000), data=st.data())
def test_student_timesteps_properties(total, data):
    k = data.draw(st.integers(1, total))
    ts = student_timesteps(k, total)
    assert ts.dtype == torch.int64 and len(ts) == k
    assert ts[0] == total - 1 and (ts >= 0).all()
    assert (ts.diff() < 0).all()


@pytest.mark.parametrize("k, total", [(0, 900), (-1, 900), (901, 900)])
def test_student_timesteps_rejects(k, total):
    with pytest.raises(ValueError):
        student_timesteps(k, total)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 16, 25, 48, 50, 100, 250, 1000])
def test_ddim_timesteps_match_diffusers_trailing(n):
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(n)
    ts = ddim_timesteps(n, 1000)
    assert ts.dtype == torch.int64
    assert torch.equal(ts, scheduler.timesteps)


def test_ddim_timesteps_examples():
    assert ddim_timesteps(4, 1000).tolist() == [999, 749, 499, 249]
    ts = ddim_timesteps(50, 1000)
    assert ts[0] == 999 and ts[-1] == 19 and (ts.diff() == -20).all()


@fast
@given(T=st.integers(1, 1500), data=st.data())
def test_ddim_timesteps_properties(T, data):
    # np.arange can overshoot to n + 1 entries (ending in -1) in diffusers; ours never does.
    n = data.draw(st.integers(1, T))
    ts = ddim_timesteps(n, T)
    assert len(ts) == n and ts[0] == T - 1 and ts[-1] >= 0
    assert (ts.diff() < 0).all()


# --- coefficients ------------------------------------------------------------------------


def test_vp_matches_diffusers_add_noise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    eps = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    expected = SD_DDPM.add_noise(x0, eps, t)
    torch.testing.assert_close(VP_SD.add_noise(x0, eps, t), expected, atol=1e-6, rtol=1e-6)


def test_from_scheduler_needs_alphas_cumprod():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler())


def test_endpoints_and_attributes():
    assert (VP_SD.kind, VP_SD.t_clean, VP_SD.num_train_timesteps) == ("vp", -1, 1000)
    assert (FLOW.kind, FLOW.t_clean, FLOW.num_train_timesteps) == ("flow", 0, 1000)
    for s in SCHEDULES:
        t = torch.tensor([s.t_clean])
        assert s.alpha(t).item() == 1.0 and s.sigma(t).item() == 0.0
        assert s.snr(t).item() == float("inf")
    assert FLOW.alpha(torch.tensor([1000])).item() == 0.0
    torch.testing.assert_close(FLOW.sigma(torch.tensor([250.0])), torch.tensor([0.25]))
    torch.testing.assert_close(
        VP_SD.alpha(torch.tensor([10])), SD_DDPM.alphas_cumprod[10:11].sqrt()
    )


@fast
@given(t=st.floats(-1, 999))
def test_vp_unit_variance(t):
    for s in (VP_SD, VP_LINEAR):
        tt = torch.tensor([t], dtype=torch.float64)
        torch.testing.assert_close(s.alpha(tt) ** 2 + s.sigma(tt) ** 2, torch.ones(1, dtype=torch.float64))


@fast
@given(t=st.floats(0, 1000))
def test_flow_unit_sum(t):
    tt = torch.tensor([t], dtype=torch.float64)
    torch.testing.assert_close(FLOW.alpha(tt) + FLOW.sigma(tt), torch.ones(1, dtype=torch.float64))


@fast
@given(t=st.floats(-1, 998))
def test_vp_interpolation_is_monotone_and_hits_integers(t):
    tt = torch.tensor([t, t + 1], dtype=torch.float64)
    a = VP_SD.alpha(tt)
    assert a[0] > a[1]
    k = torch.tensor([int(t)])
    torch.testing.assert_close(VP_SD.alpha(k.double()).float(), VP_SD.alpha(k))


def test_dtypes_and_shapes():
    t = torch.tensor([0, 500, 900])
    assert VP_SD.alpha(t).dtype == torch.float32
    assert VP_SD.sigma(t.double()).dtype == torch.float64
    assert FLOW.alpha(t.half()).dtype == torch.float16
    assert VP_SD.alpha(t.reshape(3, 1)).shape == (3, 1)
    for like in (torch.zeros(3, 4, 8, 8, dtype=torch.bfloat16), torch.zeros(3, 5, 4, 8, 8)):
        for s in SCHEDULES:
            alpha, sigma = s.coefficients(t, like)
            assert alpha.shape == sigma.shape == (3,) + (1,) * (like.ndim - 1)
            assert alpha.dtype == sigma.dtype == like.dtype
            assert (alpha * like).shape == like.shape


# --- conversions -------------------------------------------------------------------------


@fast
@given(case=st.sampled_from(VALID), seed=st.integers(0, 2**31 - 1), video=st.booleans())
def test_conversion_round_trip(case, seed, video):
    schedule, pred, (lo, hi) = case
    g = torch.Generator().manual_seed(seed)
    shape = (5, 3, 2, 4, 4) if video else (5, 2, 4, 4)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = _t_batch(schedule, lo, hi, 5, seed)
    x_t = schedule.add_noise(x0, eps, t)
    out = schedule.from_x0_eps(x0, eps, t, pred)
    x0_hat, eps_hat = schedule.to_x0_eps(out, x_t, t, pred)
    torch.testing.assert_close(x0_hat, x0, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(eps_hat, eps, atol=1e-8, rtol=1e-8)


def test_conversion_known_targets():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    # diffusers' v target and SD3's flow target (noise - sample).
    torch.testing.assert_close(
        VP_SD.from_x0_eps(x0, eps, t, "v_prediction"), SD_DDPM.get_velocity(x0, eps, t), atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(FLOW.from_x0_eps(x0, eps, t, "flow"), eps - x0)


@pytest.mark.parametrize(
    "schedule, pred",
    [(VP_SD, "flow"), (FLOW, "v_prediction"), (VP_SD, "x0"), (FLOW, "velocity")],
)
def test_bad_prediction_type(schedule, pred):
    x = torch.zeros(2, 3)
    t = torch.tensor([1, 2])
    for convert in (schedule.to_x0_eps, schedule.from_x0_eps):
        with pytest.raises(ValueError, match=f"'{pred}'.*'{schedule.kind}'"):
            convert(x, x, t, pred)


# --- forward kernel and diffuse -------------------------------------------------------------


def _three_times(schedule, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = schedule.t_clean, schedule.t_max
    ts = lo + (hi - lo) * torch.rand(3, 8, generator=g, dtype=torch.float64)
    return tuple(ts.sort(dim=0).values)


@fast
@given(schedule=st.sampled_from(SCHEDULES), seed=st.integers(0, 2**31 - 1))
def test_two_hop_kernel_matches_one_hop(schedule, seed):
    t1, t2, t3 = _three_times(schedule, seed)
    # Exclude flow's pure-noise end, where alpha = 0 makes scale a ratio of zeros.
    if schedule.kind == "flow":
        t1, t2, t3 = (t.clamp(max=999.0) for t in (t1, t2, t3))
    s12, n12 = schedule.forward_kernel(t1, t2)
    s23, n23 = schedule.forward_kernel(t2, t3)
    s13, n13 = schedule.forward_kernel(t1, t3)
    torch.testing.assert_close(s12 * s23, s13)
    torch.testing.assert_close(s23**2 * n12**2 + n23**2, n13**2)
    # From clean data the kernel is the marginal itself.
    clean = torch.full_like(t3, schedule.t_clean)
    s, n = schedule.forward_kernel(clean, t3)
    torch.testing.assert_close(s, schedule.alpha(t3))
    torch.testing.assert_close(n, schedule.sigma(t3))


@fast
@given(schedule=st.sampled_from(SCHEDULES), seed=st.integers(0, 2**31 - 1))
def test_diffuse_stays_on_the_marginal(schedule, seed):
    t_from, _, t_to = _three_times(schedule, seed)
    t_to[0] = t_from[0]  # a zero-length hop
    t_from[1], t_to[1] = schedule.t_clean, schedule.t_max  # the whole way
    g = torch.Generator().manual_seed(seed)
    x0, eps_from, noise = (torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    x_from = schedule.add_noise(x0, eps_from, t_from)
    x_to, eff = schedule.diffuse(x_from, eps_from, t_from, t_to, noise)
    torch.testing.assert_close(x_to, schedule.add_noise(x0, eff, t_to))
    torch.testing.assert_close(eff[0], eps_from[0])
    # The weights on eps_from and noise are a unit vector, so eff stays standard normal.
    scale, std = schedule.forward_kernel(t_from, t_to)
    w_eps = scale * schedule.sigma(t_from) / schedule.sigma(t_to)
    w_noise = std / schedule.sigma(t_to)
    torch.testing.assert_close(w_eps**2 + w_noise**2, torch.ones_like(w_eps))


def test_diffuse_effective_eps_is_standard_normal():
    g = torch.Generator().manual_seed(0)
    x0, eps, noise = (torch.randn(4, 20000, generator=g) for _ in range(3))
    t_from, t_to = torch.tensor([-1, 100, 400, 999]), torch.tensor([200, 600, 900, 999])
    _, eff = VP_SD.diffuse(VP_SD.add_noise(x0, eps, t_from), eps, t_from, t_to, noise)
    assert eff.mean(1).abs().max() < 0.05 and (eff.std(1) - 1).abs().max() < 0.05


def test_kernel_rejects_backwards_and_out_of_range():
    with pytest.raises(ValueError, match="t_to >= t_from"):
        VP_SD.forward_kernel(torch.tensor([10, 500]), torch.tensor([20, 400]))
    with pytest.raises(ValueError, match="t_to >= t_from"):
        FLOW.diffuse(*(torch.zeros(1, 3),) * 2, torch.tensor([5.0]), torch.tensor([4.0]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="out of range"):
        VP_SD.forward_kernel(torch.tensor([10]), torch.tensor([1000]))


@pytest.mark.parametrize(
    "schedule, bad", [(VP_SD, -2), (VP_SD, 1000), (VP_SD, -1.5), (FLOW, -0.5), (FLOW, 1001), (FLOW, float("nan"))]
)
def test_timestep_out_of_range(schedule, bad):
    t = torch.tensor([0.0, bad])
    for fn in (schedule.alpha, schedule.sigma, schedule.snr):
        with pytest.raises(ValueError, match="out of range"):
            fn(t)
    with pytest.raises(ValueError, match="out of range"):
        schedule.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), t)


# --- DDIM --------------------------------------------------------------------------------


@fast
@given(case=st.sampled_from(VALID), seed=st.integers(0, 2**31 - 1))
def test_ddim_with_true_eps_stays_on_trajectory(case, seed):
    schedule, pred, (lo, hi) = case
    g = torch.Generator().manual_seed(seed)
    x0, eps = (torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = _t_batch(schedule, lo, hi, 5, seed)
    t_next = _t_batch(schedule, schedule.t_clean, schedule.t_max, 5, seed + 1)
    x_t = schedule.add_noise(x0, eps, t)
    x0_hat, eps_hat = schedule.to_x0_eps(schedule.from_x0_eps(x0, eps, t, pred), x_t, t, pred)
    first = schedule.ddim_step(x0_hat, eps_hat, t_next)
    torch.testing.assert_close(first, schedule.add_noise(x0, eps, t_next), atol=1e-8, rtol=1e-8)
    assert torch.equal(first, schedule.ddim_step(x0_hat, eps_hat, t_next))


def test_ddim_to_clean_returns_x0():
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for s in SCHEDULES:
        assert torch.equal(s.ddim_step(x0, eps, torch.full((3,), s.t_clean)), x0)
        assert torch.equal(s.ddim_step(x0, eps, s.t_clean), x0)  # a scalar t_next broadcasts


def test_ddim_matches_diffusers_ddim_step():
    """One eta=0 step of diffusers' DDIMScheduler equals ddim_step on the converted output."""
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
    )
    scheduler.set_timesteps(4)
    schedule = VPSchedule.from_scheduler(scheduler)
    g = torch.Generator().manual_seed(3)
    x_t, out = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ts = scheduler.timesteps.tolist() + [-1]
    for t, t_next in zip(ts[:-1], ts[1:]):
        expected = scheduler.step(out, t, x_t, eta=0.0).prev_sample
        x0, eps = schedule.to_x0_eps(out, x_t, torch.tensor([t]), "epsilon")
        ours = schedule.ddim_step(x0, eps, torch.tensor([t_next]))
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        x_t = expected


def test_shifted_grid_is_the_flow_shift_warp_of_the_uniform_grid():
    from tdm.schedule import shift_warp

    # The authors' CogVideoX-2B grid is the shift-2 warp of the uniform 4-step grid over 1000 steps.
    assert student_timesteps(4, 1000, shift=2.0).tolist() == [999, 856, 665, 399]
    assert student_timesteps(4, 1000, shift=1.0).tolist() == [999, 749, 499, 249]
    u = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    expected = FlowMatchEulerDiscreteScheduler(shift=3.0).config.shift * u / (1 + 2 * u)  # diffusers' formula
    torch.testing.assert_close(shift_warp(u, 3.0), expected)
    for k in (1, 2, 4):  # every K starts at the top; larger shift pushes steps toward noise
        grid = student_timesteps(k, 1000, shift=3.0)
        assert grid[0] == 999 and bool((grid >= student_timesteps(k, 1000)).all())
    with pytest.raises(ValueError, match="shift"):
        student_timesteps(4, 1000, shift=0.0)
    with pytest.raises(ValueError, match="collapses"):
        student_timesteps(8, 10, shift=50.0)


def test_student_grid_explicit_or_shifted():
    from tdm.schedule import StudentGrid

    explicit = StudentGrid(1000, timesteps=(999, 856, 665, 399))
    assert explicit.at(4).tolist() == [999, 856, 665, 399]
    with pytest.raises(ValueError, match="K = 4 only"):
        explicit.at(2)
    assert StudentGrid(1000, shift=2.0).at(4).tolist() == [999, 856, 665, 399]
    for bad in ((999, 999), (1000, 10), (5, -1), ()):
        with pytest.raises(ValueError, match="timesteps"):
            StudentGrid(1000, timesteps=bad)
