"""One view of every noise schedule: x_t = alpha_t * x0 + sigma_t * eps.

VP (DDPM/SD-style, integer timesteps 0..T-1 plus t=-1 for clean data) and rectified flow
(SD3-style, t = 1000 * s with alpha = 1 - s, sigma = s) share one interface, so the
distillation code never branches on the schedule: it converts any model output to
(x0, eps), moves along the trajectory with DDIM, and re-noises with `diffuse`.

Coefficients are computed in float64 internally (differences like sigma_to^2 - scale^2
sigma_from^2 cancel badly in float32) and returned in float32, the dtype of a float t,
or, for `coefficients`, the dtype of the tensor they will multiply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow", "sample")

TimestepLike = Tensor | int | float


def _as_t(t: TimestepLike) -> Tensor:
    return t if isinstance(t, Tensor) else torch.as_tensor(t)


def _out_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """(B,) or scalar per-sample values -> (B, 1, 1, ...) broadcastable against `like`."""
    v = v.to(device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Base class. Subclasses define `_alpha_sigma64` (float64 alpha, sigma of a checked t)."""

    num_train_timesteps: int
    kind: str
    t_clean: float  # alpha = 1, sigma = 0
    t_max: float  # the noisiest timestep the schedule defines
    zero_terminal_snr: bool = False  # alpha(t_max) = 0: x0 is undefined there for an epsilon model

    # --- subclass hook -----------------------------------------------------------------
    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # --- coefficients --------------------------------------------------------------------
    def _check_t(self, t: Tensor) -> None:
        # Written so NaN fails too. Checked on the CPU only: on an accelerator `bool(...)` would force a host
        # sync on every schedule lookup (a dozen per TDM iteration); there t comes from our own grids and draws.
        if t.device.type != "cpu":
            return
        ok = (t >= self.t_clean) & (t <= self.t_max)
        if not bool(ok.all()):
            raise ValueError(
                f"timestep out of range for {self.kind} schedule: expected t in "
                f"[{self.t_clean}, {self.t_max}], got min={t.min().item()}, max={t.max().item()}"
            )

    def _coeffs64(self, t: TimestepLike) -> tuple[Tensor, Tensor]:
        t = _as_t(t)
        self._check_t(t)
        return self._alpha_sigma64(t.to(torch.float64))

    def alpha(self, t: TimestepLike) -> Tensor:
        t = _as_t(t)
        return self._coeffs64(t)[0].to(_out_dtype(t))

    def sigma(self, t: TimestepLike) -> Tensor:
        t = _as_t(t)
        return self._coeffs64(t)[1].to(_out_dtype(t))

    def snr(self, t: TimestepLike) -> Tensor:
        t = _as_t(t)
        alpha, sigma = self._coeffs64(t)
        return (alpha**2 / sigma**2).to(_out_dtype(t))  # inf at t_clean

    def coefficients(self, t: TimestepLike, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha, sigma of per-sample t (B,), shaped (B, 1, ...) on like's device and dtype."""
        alpha, sigma = self._coeffs64(t)
        return _expand(alpha, like), _expand(sigma, like)

    # --- forward process -----------------------------------------------------------------
    def add_noise(self, x0: Tensor, eps: Tensor, t: TimestepLike) -> Tensor:
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * eps

    def _kernel64(self, t_from: TimestepLike, t_to: TimestepLike) -> tuple[Tensor, ...]:
        t_from, t_to = _as_t(t_from), _as_t(t_to)
        if not bool((t_to >= t_from).all()):
            raise ValueError(f"forward kernel needs t_to >= t_from, got t_from={t_from}, t_to={t_to}")
        a_from, s_from = self._coeffs64(t_from)
        a_to, s_to = self._coeffs64(t_to)
        # alpha_from = 0 only at pure noise (flow t = T), where t_to = t_from: the identity map.
        scale = torch.where(a_from > 0, a_to / a_from.clamp_min(1e-300), torch.ones_like(a_from))
        noise_std = (s_to**2 - scale**2 * s_from**2).clamp_min(0).sqrt()
        return scale, noise_std, s_from, s_to

    def forward_kernel(self, t_from: TimestepLike, t_to: TimestepLike) -> tuple[Tensor, Tensor]:
        """(scale, noise_std) with x_to = scale * x_from + noise_std * n, matching the marginals."""
        scale, noise_std, _, _ = self._kernel64(t_from, t_to)
        dtype = torch.promote_types(_out_dtype(_as_t(t_from)), _out_dtype(_as_t(t_to)))
        return scale.to(dtype), noise_std.to(dtype)

    def diffuse(
        self, x_from: Tensor, eps_from: Tensor, t_from: TimestepLike, t_to: TimestepLike, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Re-noise x_from (= alpha_from x0 + sigma_from eps_from) to t_to with fresh `noise`.

        Returns (x_to, effective_eps) with x_to = alpha_to x0 + sigma_to effective_eps. The
        weights on eps_from and noise have squares summing to 1, so effective_eps is standard
        normal whenever eps_from and noise are independent standard normals.
        """
        scale, noise_std, s_from, s_to = self._kernel64(t_from, t_to)
        # sigma_to = 0 forces t_from = t_to = t_clean: nothing to add, keep eps_from.
        safe_s_to = s_to.clamp_min(1e-300)
        w_eps = torch.where(s_to > 0, scale * s_from / safe_s_to, torch.ones_like(s_to))
        w_noise = torch.where(s_to > 0, noise_std / safe_s_to, torch.zeros_like(s_to))
        x_to = _expand(scale, x_from) * x_from + _expand(noise_std, x_from) * noise
        effective_eps = _expand(w_eps, eps_from) * eps_from + _expand(w_noise, eps_from) * noise
        return x_to, effective_eps

    # --- model output <-> (x0, eps) ------------------------------------------------------
    def _check_prediction_type(self, prediction_type: str) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r} for a {self.kind!r} schedule; "
                f"expected one of {PREDICTION_TYPES}"
            )
        # v and flow targets are each defined by their own schedule family.
        wrong = {"vp": "flow", "flow": "v_prediction"}[self.kind]
        if prediction_type == wrong:
            raise ValueError(f"prediction_type {prediction_type!r} is not defined on a {self.kind!r} schedule")

    def to_x0_eps(
        self, output: Tensor, x_t: Tensor, t: TimestepLike, prediction_type: str
    ) -> tuple[Tensor, Tensor]:
        self._check_prediction_type(prediction_type)
        alpha, sigma = self.coefficients(t, x_t)
        if prediction_type == "epsilon":
            return (x_t - sigma * output) / alpha, output
        if prediction_type == "v_prediction":  # v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1
            return alpha * x_t - sigma * output, sigma * x_t + alpha * output
        if prediction_type == "flow":  # out = eps - x0, alpha + sigma = 1
            return x_t - sigma * output, x_t + alpha * output
        return output, (x_t - alpha * output) / sigma  # sample

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: TimestepLike, prediction_type: str) -> Tensor:
        """The model output that `to_x0_eps` would turn into (x0, eps)."""
        self._check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            alpha, sigma = self.coefficients(t, x0)
            return alpha * eps - sigma * x0
        if prediction_type == "flow":
            return eps - x0
        return x0  # sample

    def ddim_step(self, x0: Tensor, eps: Tensor, t_next: TimestepLike) -> Tensor:
        """Deterministic DDIM: keep the predicted noise, move to t_next (t_clean gives x0)."""
        return self.add_noise(x0, eps, t_next)

    def log_snr_half(self, t: TimestepLike) -> float:
        """lambda_t = log(alpha_t / sigma_t) (DPM-Solver's half log-SNR) of one timestep, float64; -inf where
        alpha = 0 (flow t = T, a zero-terminal-SNR VP end)."""
        alpha, sigma = (float(v) for v in self._coeffs64(_as_t(t).reshape(-1)[:1]))
        return -math.inf if alpha == 0.0 else math.log(alpha) - math.log(sigma)

    def solver_step(self, x: Tensor, x0: Tensor, eps: Tensor, t: Tensor, t_next: int,
                    previous: tuple[int, Tensor] | None = None) -> Tensor:
        """One step of the student's sampler from x = x_t (per-sample t, (B,)) to t_next, given the model's
        (x0, eps) at t. `previous` = (t_prev, x0 at t_prev) of the step before makes it DPM-Solver++(2M)
        (Lu et al. 2022, "DPM-Solver++", Alg. 2; diffusers' DPMSolverMultistepScheduler with
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"): the data prediction is
        extrapolated, D = (1 + c) x0 - c x0_prev with c = h / (2 h_prev), h = lambda_next - lambda_t,
        h_prev = lambda_t - lambda_prev, and DDIM moves to t_next with D and the noise it implies,
        x_next = alpha_next D + sigma_next (x - alpha_t D) / sigma_t (algebraically the paper's
        sigma_next / sigma_t x - alpha_next (exp(-h) - 1) D). Without `previous` (the first step), or when
        lambda_prev is -inf (alpha = 0 there), it is exactly `ddim_step(x0, eps, t_next)`."""
        if previous is None:
            return self.ddim_step(x0, eps, t_next)
        t_prev, x0_prev = previous
        lam, lam_prev = self.log_snr_half(t), self.log_snr_half(t_prev)
        if not math.isfinite(lam_prev):
            return self.ddim_step(x0, eps, t_next)
        c = (self.log_snr_half(t_next) - lam) / (2.0 * (lam - lam_prev))
        d = (1.0 + c) * x0 - c * x0_prev
        alpha, sigma = self.coefficients(t, x)
        return self.ddim_step(d, (x - alpha * d) / sigma, t_next)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, num_train_timesteps={self.num_train_timesteps})"


class VPSchedule(NoiseSchedule):
    """Variance preserving: alpha = sqrt(acp[t]), sigma = sqrt(1 - acp[t]); t = -1 is clean data."""

    kind = "vp"
    t_clean = -1.0

    def __init__(self, alphas_cumprod: Tensor) -> None:
        acp = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if acp.ndim != 1 or len(acp) < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(acp.shape)}")
        # Zero terminal SNR (CogVideoX, `rescale_betas_zero_snr`): the last entry may be exactly 0 (pure noise);
        # every other one must be a proper signal level.
        if not bool(((acp[:-1] > 0) & (acp[:-1] <= 1)).all()) or not 0 <= float(acp[-1]) <= 1:
            raise ValueError("alphas_cumprod must lie in (0, 1] (the last entry may be 0: zero terminal SNR)")
        self.num_train_timesteps = len(acp)
        self.t_max = float(len(acp) - 1)
        self.alphas_cumprod = acp
        self.zero_terminal_snr = float(acp[-1]) == 0.0
        # Index t + 1 into [1, acp...]: t = -1 is the clean endpoint (DDIM's final_alpha_cumprod = 1).
        self._table = torch.cat([acp.new_ones(1), acp])
        self._tables: dict[torch.device, Tensor] = {}

    def _table_on(self, device: torch.device) -> Tensor:
        if device not in self._tables:  # avoid a host->device copy on every call
            self._tables[device] = self._table.to(device)
        return self._tables[device]

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        table = self._table_on(t.device)
        idx = t + 1
        # Float t: linear interpolation of acp between neighbouring integer steps.
        lo = idx.floor().long().clamp(0, self.num_train_timesteps - 1)
        w = idx - lo
        acp = table[lo] * (1 - w) + table[lo + 1] * w
        return acp.sqrt(), (1 - acp).sqrt()

    @classmethod
    def from_scheduler(cls, scheduler) -> VPSchedule:
        """From any diffusers scheduler carrying `alphas_cumprod` (DDPM, DDIM, Euler, ...)."""
        acp = getattr(scheduler, "alphas_cumprod", None)
        if acp is None:
            raise ValueError(
                f"{type(scheduler).__name__} has no `alphas_cumprod`, so it is not a VP schedule; "
                "for flow-matching schedulers use FlowSchedule(scheduler.config.num_train_timesteps)"
            )
        return cls(torch.as_tensor(acp))


class FlowSchedule(NoiseSchedule):
    """Rectified flow (SD3): s = t / T, alpha = 1 - s, sigma = s; t = 0 is clean data."""

    kind = "flow"
    t_clean = 0.0

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps
        self.t_max = float(num_train_timesteps)

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = t / self.num_train_timesteps
        return 1 - s, s


def shift_warp(u: Tensor, shift: float) -> Tensor:
    """The timestep shift of flow-matching schedulers, on a noise fraction u in [0, 1]: u' = shift u /
    (1 + (shift - 1) u) (diffusers' `FlowMatchEulerDiscreteScheduler`, static `shift`; SD3 uses 3.0). shift > 1
    moves steps toward the noisy end. Applied here to the student's grid of any family (VP too)."""
    return shift * u / (1 + (shift - 1) * u)


def student_timesteps(k: int, total_steps: int, shift: float = 1.0) -> Tensor:
    """The student's K-step grid, descending int64 (the first step at t = total_steps - 1).

    shift = 1: t_i = total - 1 - floor(i * total / k), the authors' uniform grid (`generate_new`): 899, 674, 449,
    224 for K = 4 of 900. shift != 1: t_i = floor(total * shift_warp(1 - i / k, shift)) - 1 (float64), the
    flow-matching shift of that grid: shift 2 gives 999, 856, 665, 399 for K = 4 of 1000, the grid the authors'
    CogVideoX-2B student was trained on. Both forms agree at shift 1 whenever k divides i * total. Across K
    (TDM-unify) each K gets the warp of its own uniform grid, so every K starts at the same t_0."""
    if not 1 <= k <= total_steps:
        raise ValueError(f"need 1 <= k <= total_steps, got k={k}, total_steps={total_steps}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    i = torch.arange(k, dtype=torch.int64)
    if shift == 1.0:
        return total_steps - 1 - (i * total_steps) // k
    u = 1 - i.double() / k
    grid = torch.floor(total_steps * shift_warp(u, shift)).long() - 1
    if bool((grid[1:] >= grid[:-1]).any()) or int(grid[-1]) < 0:
        raise ValueError(f"shift {shift} collapses the {k}-step grid over {total_steps} steps: {grid.tolist()}")
    return grid


def check_timesteps(timesteps, total_steps: int) -> Tensor:
    """An explicit student grid as int64: non-empty, strictly descending, in [0, total_steps - 1]; ValueError
    otherwise (naming the offending values)."""
    grid = torch.as_tensor(list(timesteps), dtype=torch.int64)
    if grid.ndim != 1 or len(grid) == 0:
        raise ValueError("timesteps: need a non-empty list of integers")
    if bool((grid[1:] >= grid[:-1]).any()):
        raise ValueError(f"timesteps: must be strictly descending, got {grid.tolist()}")
    if int(grid[0]) > total_steps - 1 or int(grid[-1]) < 0:
        raise ValueError(f"timesteps: must lie in [0, total_steps - 1 = {total_steps - 1}], got {grid.tolist()}")
    return grid


@dataclass(frozen=True)
class StudentGrid:
    """Where the student's K steps sit: `timesteps` when given (one K: its length), else
    `student_timesteps(K, total_steps, shift)`. The one source of the grid for training, sampling, the
    diffusers scheduler and the student's record."""

    total_steps: int
    shift: float = 1.0
    timesteps: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(check_timesteps(self.timesteps, self.total_steps).tolist()))
            if self.shift != 1.0:
                raise ValueError("timesteps: an explicit grid takes no shift (leave shift at 1)")
        student_timesteps(1, self.total_steps, self.shift)  # validates total_steps and shift

    def at(self, k: int) -> Tensor:
        """The K-step grid, descending int64 (k entries). ValueError when an explicit grid has another length."""
        if self.timesteps is not None:
            if k != len(self.timesteps):
                raise ValueError(f"steps: this student's grid is explicit ({list(self.timesteps)}): K = "
                                 f"{len(self.timesteps)} only, got {k}")
            return torch.tensor(self.timesteps, dtype=torch.int64)
        return student_timesteps(k, self.total_steps, self.shift)


def ddim_timesteps(num_steps: int, num_train_timesteps: int) -> Tensor:
    """Teacher grid with "trailing" spacing (diffusers DDIM), descending int64 from T - 1."""
    T = num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"need 1 <= num_steps <= num_train_timesteps, got {num_steps}, {T}")
    # round(T - i * T / n) - 1, with the step taken as numpy's float arange takes it
    # ((T - T/n) - T, then T + i * step) so the rare .5 ties round as diffusers' do.
    # Unlike np.arange, the grid always has exactly num_steps entries (never a stray -1).
    step = (T - T / num_steps) - T
    i = torch.arange(num_steps, dtype=torch.float64)
    return torch.round(T + i * step).to(torch.int64) - 1
