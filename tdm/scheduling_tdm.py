"""The TDM student's trajectory as diffusers schedulers, so a stock pipeline runs the student exactly:

    from tdm.scheduling_tdm import from_student
    from tdm.student import StudentRecord

    record = StudentRecord.load("outputs/distill/student")           # K, total_steps, shift, explicit grid
    pipe.scheduler = from_student(record, pipe.scheduler.config)     # TDMScheduler or TDMFlowScheduler
    pipe(prompt, num_inference_steps=record.k, guidance_scale=1.0)   # CFG is baked into the student

or by hand, with the grid of the student's record (it must match: `total_steps` is required):

    pipe.scheduler = TDMScheduler.from_config(pipe.scheduler.config, total_steps=900)              # VP families
    pipe.scheduler = TDMFlowScheduler.from_config(pipe.scheduler.config, total_steps=1000, grid_shift=3.0)  # SD3

Both take the steps of `tdm.sampler.student_sample` with its arithmetic (the shared `tdm.schedule` views): the
timesteps are `StudentGrid(total_steps, grid_shift, grid_timesteps).at(K)` (K = num_inference_steps; e.g. 899,
674, 449, 224 for K = 4 of 900); at each one the model output becomes (x0, eps) (`NoiseSchedule.to_x0_eps`), x0
is optionally clipped with eps re-derived (`clip_sample`, pixel-space models: `tdm.sampler.clip_prediction`),
DDIM moves to the next grid point (`NoiseSchedule.ddim_step`; with `solver_order=2`, DPM-Solver++(2M) over the
same grid, `NoiseSchedule.solver_step`), and the last step returns x0. Given the same starting noise, the
latents equal our own sampler's bit for bit (tests/unit/test_scheduling_families.py). `solver_order` is the
student's (its record's), never a base config's: a DPM-Solver config's `solver_order` is the teacher's sampler's.

Two classes, because the two kinds of schedule share no config key that means the same thing: a VP schedule is
`alphas_cumprod` (betas, zero-SNR rescaling, CogVideoX's SNR shift), a flow-matching schedule is t = T s with
alpha = 1 - s, sigma = s and nothing else. Each has its own `_compatibles`, saved `_class_name` and refusal table,
so a config of one kind given to the other is refused by name instead of being half-read.

What a config may hold (`from_config`; every key is decided, none is dropped unseen):
  * keys that define the schedule or the step are implemented exactly (VP: `num_train_timesteps`, `beta_start`,
    `beta_end`, `beta_schedule`, `trained_betas`, `prediction_type`, `rescale_betas_zero_snr`,
    `snr_shift_scale`, `clip_sample`, `clip_sample_range`; flow: `num_train_timesteps`);
  * keys that only pick the base scheduler's own inference grid or solver (`timestep_spacing`, `steps_offset`,
    `set_alpha_to_one`, `solver_order`, `use_karras_sigmas`, the flow `shift` of the teacher's sampler,
    `use_dynamic_shifting`, ...: the `*_IRRELEVANT` tables below) are accepted and not kept: the student's grid
    and step are its own, whatever the teacher sampled with;
  * keys that would change what the student computes and are not implemented (`thresholding: true`,
    `timestep_type: continuous`, `use_flow_sigmas: true`, `invert_sigmas: true`, an unknown `beta_schedule`,
    `prediction_type` "sample" / "flow_prediction", an unknown key) raise a ValueError naming the key and value.
  * `clip_sample: true` in a diffusers config (DDPMScheduler's and DDIMScheduler's default) is refused unless
    `clip_sample` is passed explicitly: tdm's sampler clips x0 by family (pixel-space digits: yes; latents: no),
    not by the config, so the config alone cannot say. `from_student` passes it from the family.
The config's `_class_name` (or, for an unsaved scheduler's config, the diffusers class whose keys it has) says
which class defines the schedule: keys that class does not take are ignored as that class ignores them, missing
keys take that class's defaults, and the resulting `alphas_cumprod` are checked bit for bit against that class's
own (a mismatch is refused). A config without `_class_name` that fits several classes which would read it
differently (e.g. a scheduler built with `from_config` from another one's config) is refused: give `_class_name`.

Tensors: `step` takes the model output and the sample of the same shape (B, ...) (latents (B, C, H, W); CogVideoX
(B, F, C, H, W)), computes in float32 (float64 for float64 samples; exactly `student_sample`'s arithmetic for
float32) and returns prev_sample / pred_original_sample in the sample's dtype. `timesteps`: int64 (VP) or float32
(flow), descending, K entries. Pipelines must run with `guidance_scale=1` (CFG is baked into the student; with CFG
on they would run it twice and extrapolate). A TDM-unify student's K embedding is not part of any pipeline:
`from_student` refuses such a record (see its docstring).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from tdm.schedule import FlowSchedule, NoiseSchedule, StudentGrid, VPSchedule


@dataclass
class TDMSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor  # the next trajectory point (x0 after the last step); the sample's shape and dtype
    pred_original_sample: torch.Tensor  # the student's x0 at this step; same shape and dtype


# -- config tables ----------------------------------------------------------------------------------------------
# The student's grid and solver: ours, never read from a base config (a DPM-Solver config's `solver_order` is the
# teacher's sampler's, not the student's).
_STUDENT_KEYS = ("total_steps", "grid_shift", "grid_timesteps", "solver_order")

# VP keys that only choose the base scheduler's own inference grid, solver or stochasticity. The student samples
# on its own grid with its own deterministic step, so none of them changes what it computes.
VP_IRRELEVANT = frozenset({
    "timestep_spacing", "steps_offset", "set_alpha_to_one", "skip_prk_steps", "variance_type", "solver_order",
    "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "lambda_min_clipped", "interpolation_type",
    "sigma_min", "sigma_max", "original_inference_steps", "timestep_scaling", "predictor_order", "corrector_order",
    "disable_corrector", "solver_p", "predict_x0", "tau_func", "use_dynamic_shifting", "time_shift_type",
    "shift_terminal",
    # only read when the key they qualify is on (`thresholding`, `use_flow_sigmas`), which is refused
    "dynamic_thresholding_ratio", "sample_max_value", "flow_shift",
})
# VP keys that change the step or the model's inputs unless they hold this value.
VP_MUST_BE = {"thresholding": False, "use_flow_sigmas": False, "timestep_type": "discrete"}
VP_MUST_BE_WHY = {
    "thresholding": "dynamic thresholding of x0 is not part of the student's step",
    "use_flow_sigmas": "that is a flow-matching schedule: TDMScheduler is VP only",
    "timestep_type": "continuous timesteps feed the model 0.25 log(sigma), not the student's integer t",
}
# Flow keys that only choose the base scheduler's own inference grid (static or resolution-dependent shift, sigma
# spacing, the terminal stretch) or its stochastic sampler: irrelevant to the student's grid and step.
FLOW_IRRELEVANT = frozenset({
    "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
    "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "time_shift_type",
    "stochastic_sampling",
})
FLOW_MUST_BE = {"invert_sigmas": False}
FLOW_MUST_BE_WHY = {"invert_sigmas": "inverted sigmas condition the model on t = T (1 - s), not t = T s"}
# Keys no VP scheduler has: a config holding one is a flow-matching one.
FLOW_ONLY = frozenset({"shift", "invert_sigmas", "base_shift", "max_shift", "base_image_seq_len",
                       "max_image_seq_len", "stochastic_sampling"})

# diffusers classes whose zero-SNR rescaling then sets alphas_cumprod[-1] = 2**-24 (the others leave it at 0).
CLAMPED_ZERO_SNR = frozenset({"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"})
CLAMPED_VALUE = 2.0**-24
# diffusers classes that define alphas_cumprod the CogVideoX way (SNR shift, rescaling of alphas_cumprod).
SNR_SHIFTED = frozenset({"CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"})
# diffusers flow-matching classes whose configs TDMFlowScheduler reads (others are refused until read key by key).
FLOW_BASES = frozenset({"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"})
# VP-family multistep classes in their flow mode (`use_flow_sigmas: true`, `prediction_type: flow_prediction`: Wan's
# UniPC config): t = T s, alpha = 1 - s, sigma = s, the model predicts the velocity, as FlowMatchEuler's. Their
# sampler keys and their VP half (betas: built, never read in flow mode) do not touch the student's schedule.
FLOW_SIGMA_BASES = frozenset({"UniPCMultistepScheduler", "DPMSolverMultistepScheduler"})
FLOW_SIGMA_IRRELEVANT = FLOW_IRRELEVANT | (VP_IRRELEVANT - {"use_flow_sigmas"}) | frozenset({
    "flow_shift", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr"})
FLOW_SIGMA_MUST_BE = {**FLOW_MUST_BE, "use_flow_sigmas": True, "prediction_type": "flow_prediction",
                      "thresholding": False}
FLOW_SIGMA_MUST_BE_WHY = {**FLOW_MUST_BE_WHY, "use_flow_sigmas": "without it this class runs a VP schedule",
                          "prediction_type": "only flow_prediction is the velocity the student's step reads",
                          "thresholding": "dynamic thresholding of x0 is not part of the student's step"}


_BETA_KEYS = frozenset({"beta_start", "beta_end", "beta_schedule"})  # the keys of every beta-schedule VP class


def _init_keys(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _init_defaults(cls: type) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k not in ("self", "args", "kwargs") and p.default is not inspect.Parameter.empty}


def _diffusers_scheduler(name: str) -> type | None:
    import diffusers

    try:
        cls = getattr(diffusers, name, None)
    except Exception:  # a scheduler whose optional dependency is missing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, SchedulerMixin) else None


@lru_cache(maxsize=1)
def _scheduler_key_sets() -> tuple[tuple[type, frozenset], ...]:
    """(class, init keys) of every diffusers scheduler (a config made in memory has exactly its class's keys)."""
    import diffusers

    out = []
    for name in dir(diffusers):
        if name.endswith("Scheduler"):
            cls = _diffusers_scheduler(name)
            if cls is not None:
                try:
                    out.append((cls, frozenset(_init_keys(cls))))
                except (TypeError, ValueError):
                    pass
    return tuple(out)


def _plain(config) -> dict:
    if isinstance(config, ConfigMixin):  # a scheduler instance instead of its config
        config = config.config
    if config is None:
        return {}
    if not hasattr(config, "items"):
        raise TypeError(f"from_config: expected a scheduler config (a mapping), got {type(config).__name__}")
    # `_use_default_values` only tells diffusers' from_config which values were its class's defaults; the values
    # themselves are what that class runs with, so they are read as they are.
    return {k: v for k, v in config.items() if k != "_use_default_values"}


def _describe(cls) -> str:
    return cls.__name__ if isinstance(cls, type) else str(cls)


# -- alphas_cumprod, as diffusers defines them ------------------------------------------------------------------
def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """The "squaredcos_cap_v2" (Glide cosine) betas: 1 - abar(t2) / abar(t1) per step, capped, float32."""
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def _zero_snr_sqrt_abar(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Zero terminal SNR (Lin et al. 2023, Algorithm 1): shift sqrt(abar) so its last entry is 0, scale so its
    first is unchanged; returns the new abar."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = root - last
    root = root * (first / (first - last))
    return root**2


def vp_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                      trained_betas=None, rescale_betas_zero_snr: bool = False, snr_shift_scale: float | None = None,
                      terminal_alpha_cumprod: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(betas, alphas_cumprod), (T,) each, with diffusers' arithmetic and dtypes:

    * snr_shift_scale None (DDPMScheduler / DDIMScheduler and the other beta schedulers): float32 betas
      (linear, scaled_linear, squaredcos_cap_v2 or trained), rescaled to zero terminal SNR through abar when
      `rescale_betas_zero_snr` (`rescale_zero_terminal_snr(betas)`), abar = cumprod(1 - betas): abar[-1] = 0.
    * snr_shift_scale s (CogVideoXDDIMScheduler / CogVideoXDPMScheduler): scaled_linear betas in float64, abar =
      cumprod(1 - betas), then the SNR shift abar / (s + (1 - s) abar), then the zero-SNR rescaling of abar itself.
    * terminal_alpha_cumprod (with rescaling only): then abar[-1] is set to it (EulerDiscreteScheduler,
      EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler use 2**-24)."""
    shifted = snr_shift_scale is not None
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        dtype = torch.float64 if shifted else torch.float32
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=dtype) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule: {beta_schedule!r} is not handled (linear, scaled_linear, "
                         "squaredcos_cap_v2, or trained_betas)")
    if terminal_alpha_cumprod is not None and not rescale_betas_zero_snr:
        raise ValueError("terminal_alpha_cumprod: only with rescale_betas_zero_snr=True (it replaces the rescaled 0)")
    if shifted:
        acp = torch.cumprod(1.0 - betas, dim=0)
        acp = acp / (snr_shift_scale + (1 - snr_shift_scale) * acp)
        if rescale_betas_zero_snr:
            acp = _zero_snr_sqrt_abar(acp)
    else:
        if rescale_betas_zero_snr:
            abar = _zero_snr_sqrt_abar(torch.cumprod(1.0 - betas, dim=0))
            betas = 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])
        acp = torch.cumprod(1.0 - betas, dim=0)
    if terminal_alpha_cumprod is not None:
        acp[-1] = terminal_alpha_cumprod
    return betas, acp


# -- the shared student step ------------------------------------------------------------------------------------
class _TDMStudentScheduler(SchedulerMixin, ConfigMixin):
    """What both kinds share: the student's grid, set_timesteps, step, add_noise. Subclasses set `schedule`
    (a `tdm.schedule.NoiseSchedule`), `prediction_type`, `_clip` and the config tables."""

    order = 1
    init_noise_sigma = 1.0  # the student starts from unscaled standard normal noise (pipelines multiply by it)
    schedule: NoiseSchedule
    prediction_type: str
    _clip: float | None = None
    _timesteps_dtype = torch.int64
    _irrelevant: frozenset = frozenset()
    _must_be: dict = {}
    _must_be_why: dict = {}
    _implemented: frozenset = frozenset()  # schedule/step keys of this class (besides the grid keys)

    def _init_grid(self, total_steps: int, grid_shift: float, grid_timesteps, num_train_timesteps: int) -> None:
        name = type(self).__name__
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or \
                not 2 <= total_steps <= num_train_timesteps:
            raise ValueError(f"{name}: total_steps must be an integer in [2, num_train_timesteps="
                             f"{num_train_timesteps}], got {total_steps!r}")
        try:
            self.grid = StudentGrid(total_steps, float(grid_shift),
                                    None if grid_timesteps is None else tuple(int(t) for t in grid_timesteps))
        except ValueError as err:
            raise ValueError(f"{name}: grid_shift / grid_timesteps: {err}") from None
        self.num_inference_steps: int | None = None
        k = len(self.grid.timesteps) if self.grid.timesteps is not None else 1
        self._grid = self.grid.at(k).tolist()
        self.timesteps = self._as_timesteps(self.grid.at(k))
        self._previous: tuple[int, int, torch.Tensor] | None = None  # (index, t, x0) of the last step (order 2)

    def _init_solver(self, solver_order) -> None:
        from tdm.sampler import check_solver_order

        try:
            self.solver_order = check_solver_order(solver_order)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None

    def _as_timesteps(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.to(self._timesteps_dtype)

    # -- the diffusers scheduler API ---------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None, sigmas: list[float] | None = None,
                      mu: float | None = None) -> None:
        """The student's K-step grid, K = num_inference_steps: `StudentGrid(total_steps, grid_shift,
        grid_timesteps).at(K)` (descending; int64 for VP, float32 values of the same integers for flow).

        `timesteps` (or, flow only, `sigmas` = t / num_train_timesteps), as pipelines forward them from their
        callers, are accepted only when they are that grid (K = their length); anything else is refused, as is
        `mu` (a resolution-dependent shift of the base scheduler's grid: the student's grid is fixed by its record)."""
        name = type(self).__name__
        if mu is not None:
            raise ValueError(f"{name}: mu={mu!r} (dynamic shifting) would move the student's grid, which is fixed by "
                             f"its record (total_steps, grid_shift, grid_timesteps in the config)")
        requested = None
        if timesteps is not None:
            requested, what = torch.as_tensor(list(timesteps), dtype=torch.float64), "timesteps"
        if sigmas is not None:
            if requested is not None:
                raise ValueError(f"{name}: pass timesteps or sigmas, not both")
            requested, what = self._sigmas_to_t(sigmas), "sigmas"
        if requested is not None:
            if num_inference_steps is not None and num_inference_steps != len(requested):
                raise ValueError(f"{name}: num_inference_steps={num_inference_steps} but {len(requested)} {what}")
            num_inference_steps = len(requested)
        if num_inference_steps is None:
            raise ValueError(f"{name}: set_timesteps needs num_inference_steps (the student's K)")
        try:
            grid = self.grid.at(int(num_inference_steps))
        except ValueError as err:
            raise ValueError(f"{name}: num_inference_steps: {err}") from None
        if requested is not None and not (len(requested) == len(grid) and
                                          bool(((requested - grid.double()).abs() <= 1e-3).all())):
            raise ValueError(f"{name}: {what} {list(timesteps if what == 'timesteps' else sigmas)} are not the "
                             f"student's {len(grid)}-step grid {grid.tolist()}; it samples on its own grid only")
        self.num_inference_steps = int(num_inference_steps)
        self._grid = grid.tolist()
        self.timesteps = self._as_timesteps(grid).to(device)
        self._previous = None

    def _sigmas_to_t(self, sigmas) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__}: sigmas are not taken by a VP student's scheduler (its grid is "
                         f"integer timesteps: pass num_inference_steps)")

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Accepted for pipelines that call it (Wan, FLUX, Z-Image): the student always starts at its first grid point
        (no img2img strength cut); `begin_index` must be 0."""
        if begin_index != 0:
            raise ValueError(f"{type(self).__name__}: begin_index={begin_index!r}: the student's trajectory starts at "
                             f"its first grid point")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model sees x_t itself (no input scaling): returns `sample` unchanged."""
        return sample

    def _index(self, timestep) -> int:
        name = type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(f"{name}: call set_timesteps(num_inference_steps) before step()")
        value = float(timestep)
        t = int(round(value))
        if value != t or t not in self._grid:
            raise ValueError(f"{name}: timestep {value:g} is not on the student grid {self._grid}")
        return self._grid.index(t)

    def _step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index(timestep)
        if model_output.shape != sample.shape:
            raise ValueError(f"{type(self).__name__}: model_output {tuple(model_output.shape)} and sample "
                             f"{tuple(sample.shape)} differ (a learned-variance model's extra channels must be split "
                             f"off before step, as PixArt's pipeline does)")
        t = self._grid[i]
        # Arithmetic in float32 at least (float64 for float64 samples), as `student_sample` does with float32 noise;
        # the result goes back to the sample's dtype.
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x, out = sample.to(dtype), model_output.to(dtype)
        tt = torch.full((x.shape[0],), t, device=x.device)
        x0, eps = self.schedule.to_x0_eps(out, x, tt, self.prediction_type)
        if self._clip is not None:  # as tdm.sampler.clip_prediction
            x0 = x0.clamp(-self._clip, self._clip)
            alpha, sigma = self.schedule.coefficients(tt, x)
            eps = (x - alpha * x0) / sigma
        # Order 2 uses the previous step's x0 (DPM-Solver++(2M), as tdm.sampler.student_sample); a run restarted
        # at the first grid point, or steps taken out of order, start afresh / are refused.
        previous = None
        if self.solver_order == 2 and i > 0:
            if self._previous is None or self._previous[0] != i - 1:
                raise ValueError(f"{type(self).__name__}: solver_order=2 steps the grid in order; step() at "
                                 f"timestep {t} did not follow the step at {self._grid[i - 1]}")
            previous = self._previous[1:]
        if i + 1 < len(self._grid):
            prev = self.schedule.solver_step(x, x0, eps, tt, self._grid[i + 1], previous)
        else:
            prev = x0
        self._previous = (i, t, x0) if self.solver_order == 2 and i + 1 < len(self._grid) else None
        return prev.to(sample.dtype), x0.to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise at `timesteps` (scalar or (B,)); the samples' dtype."""
        timesteps = torch.as_tensor(timesteps)
        t = timesteps.reshape(-1).expand(original_samples.shape[0]) if timesteps.numel() == 1 else timesteps
        return self.schedule.add_noise(original_samples, noise, t.to(original_samples.device))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- reading configs ---------------------------------------------------------------------------------------
    @classmethod
    def _bases(cls, config: dict) -> list:
        """The classes that may define `config`'s schedule: [its `_class_name`] (ours or a diffusers scheduler);
        for a config without one (a scheduler made in memory), the diffusers schedulers with exactly its keys, else
        (it also holds the keys of a config it was built from) every one whose keys it holds; [None] for a plain
        dict (read as our keys)."""
        name = config.get("_class_name")
        if name is not None:
            ours = {c.__name__: c for c in (TDMScheduler, TDMFlowScheduler)}
            if name in ours:
                return [ours[name]]
            base = _diffusers_scheduler(str(name))
            if base is None:
                raise ValueError(f"{cls.__name__}: _class_name {name!r} is not a diffusers scheduler; cannot tell "
                                 f"how it defines its schedule")
            return [base]
        keys = {k for k in config if not k.startswith("_")}
        ours = [c for c in (TDMScheduler, TDMFlowScheduler) if keys == _init_keys(c)]
        if ours:
            return ours
        def readable(c):
            return _BETA_KEYS <= _init_keys(c) or c.__name__.startswith("FlowMatch")

        exact = [c for c, ks in _scheduler_key_sets() if ks == keys]
        if exact:
            if not any(readable(c) for c in exact):
                raise ValueError(f"{cls.__name__}: this config (no _class_name) is a "
                                 f"{' / '.join(sorted(c.__name__ for c in exact))} config, whose schedule is not "
                                 f"read here")
            return [c for c in exact if readable(c)]
        # It also holds the keys of the config it was built from: every class whose keys it holds may be its own.
        return [c for c, ks in _scheduler_key_sets() if ks <= keys and readable(c)] or [None]

    @classmethod
    def _check_base(cls, base: type, label: str) -> None:
        """ValueError when `base` (named by `label` in the message) is of the other kind."""
        raise NotImplementedError

    @classmethod
    def _read_as(cls, base, config: dict, overrides: dict) -> dict:
        """The init kwargs of `config` read as `base` defines it, plus `overrides`; ValueError naming any key it
        cannot honour."""
        name = cls.__name__
        if isinstance(base, type) and not issubclass(base, _TDMStudentScheduler):
            # A diffusers scheduler's config: the keys its class ignores are ignored (as that class ignores them),
            # missing ones take that class's defaults (as it does), the student's grid comes from `overrides` only.
            taken = _init_keys(base)
            values = {**_init_defaults(base), **{k: v for k, v in config.items() if k in taken}}
            values = {k: v for k, v in values.items() if k not in _STUDENT_KEYS}
            if values.get("clip_sample") and "clip_sample" not in overrides:
                # DDPM / DDIM clip by default; tdm's samplers clip x0 by family (pixel-space digits), not by config.
                raise ValueError(f"{name}: clip_sample=True in the {base.__name__} config: tdm's sampler clips x0 "
                                 f"only for pixel-space families (digits), whatever the config says; pass "
                                 f"clip_sample=True or False explicitly, or use tdm.scheduling_tdm.from_student")
        else:  # a TDM scheduler's config, or a plain dict in our keys
            values = {k: v for k, v in config.items() if not k.startswith("_")}
        if "total_steps" not in values and "total_steps" not in overrides:
            raise ValueError(f"{name}: total_steps is required (the student's trajectory length, from its record "
                             f"tdm_student.json; or use tdm.scheduling_tdm.from_student)")
        init = {}
        irrelevant, must_be, must_be_why = cls._tables(base)
        for key, value in values.items():
            if key in cls._implemented or key in _STUDENT_KEYS:
                init[key] = value
            elif key in must_be:
                if value != must_be[key]:
                    raise ValueError(f"{name}: {key}={value!r} is not reproduced ({must_be_why[key]}); "
                                     f"refused rather than sampled differently")
            elif key in irrelevant:
                continue  # the base scheduler's own inference grid / solver: not the student's
            else:
                raise ValueError(f"{name}: unknown scheduler config key {key}={value!r}"
                                 f"{cls._unknown_hint(key)}; refused rather than ignored (it may change the schedule)")
        init.update(overrides)
        return init

    @classmethod
    def _tables(cls, base) -> tuple[frozenset, dict, dict]:
        """(irrelevant keys, keys that must hold a value, why) for a config of class `base`."""
        return cls._irrelevant, cls._must_be, cls._must_be_why

    @classmethod
    def _read(cls, config: dict, overrides: dict) -> tuple[dict, list]:
        """(init kwargs, the diffusers classes to check them against) for `config` + `overrides`."""
        name = cls.__name__
        for key in overrides:
            if key not in cls._implemented and key not in _STUDENT_KEYS:
                hint = " (the student grid's shift is grid_shift)" if key == "shift" else ""
                raise ValueError(f"{name}: {key}={overrides[key]!r} is not a setting of {name}{hint}; "
                                 f"it takes {sorted(cls._implemented | set(_STUDENT_KEYS))}")
        bases = cls._bases(config)
        named = [b for b in bases if b is not None]
        if named:
            label = (f"_class_name {config['_class_name']!r}" if "_class_name" in config else
                     f"this config (the keys of {' / '.join(sorted(b.__name__ for b in named))})")
            for base in named:
                cls._check_base(base, label)
        defaults = _init_defaults(cls)
        readings = [{**defaults, **cls._read_as(base, config, overrides)} for base in bases]
        if any(r != readings[0] for r in readings[1:]):
            raise ValueError(f"{name}: this config (no _class_name) fits {sorted(_describe(b) for b in bases)}, "
                             f"which read it differently; give its _class_name")
        return readings[0], [b for b in bases if b is not None and not issubclass(b, _TDMStudentScheduler)]

    @classmethod
    def _unknown_hint(cls, key: str) -> str:
        return ""

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build from any scheduler config (e.g. `pipe.scheduler.config`) plus `kwargs` overrides; the student's
        grid (`total_steps`, required unless `config` is a TDM scheduler's, and optional `grid_shift` /
        `grid_timesteps`) is passed here. ValueError naming the key for anything that would sample differently."""
        config = _plain(config)
        init, bases = cls._read(config, dict(kwargs))
        scheduler = cls(**init)
        for base in bases:
            scheduler._verify_against(base, config, kwargs)
        return (scheduler, {}) if return_unused_kwargs else scheduler

    def _verify_against(self, base: type, config: dict, overrides: dict) -> None:
        pass


# -- VP ---------------------------------------------------------------------------------------------------------
class TDMScheduler(_TDMStudentScheduler):
    """The TDM student's deterministic K-step sampler on a VP schedule (epsilon or v-prediction models: SD1.5,
    SDXL, PixArt-alpha, CogVideoX, digits), over its `total_steps`-long trajectory.

    `alphas_cumprod` (float32; float64 when CogVideoX's float64 scaled_linear betas are used) are the base
    scheduler's, bit for bit (`vp_alphas_cumprod`): betas from `beta_schedule` / `trained_betas`, the zero-SNR
    rescaling of DDIMScheduler (`rescale_betas_zero_snr`), CogVideoXDDIMScheduler's SNR shift (`snr_shift_scale`,
    None = none) and the 2**-24 terminal of the Euler / DPM-Solver / UniPC schedulers (`terminal_alpha_cumprod`).
    `clip_sample` / `clip_sample_range`: clip x0 and re-derive eps (pixel-space models, as our sampler does).
    The grid: `total_steps`, `grid_shift`, `grid_timesteps` (`tdm.schedule.StudentGrid`, the student's record).
    Refused: prediction_type "sample" / "flow"; an epsilon model on a zero-terminal-SNR schedule (no x0 at t = T;
    tdm's backbones refuse it too)."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["LCMScheduler", "TCDScheduler",
                                                                  "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]
    _irrelevant = VP_IRRELEVANT
    _must_be = VP_MUST_BE
    _must_be_why = VP_MUST_BE_WHY
    _implemented = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                              "prediction_type", "clip_sample", "clip_sample_range", "rescale_betas_zero_snr",
                              "snr_shift_scale", "terminal_alpha_cumprod"})

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 clip_sample: bool = False, clip_sample_range: float = 1.0, rescale_betas_zero_snr: bool = False,
                 snr_shift_scale: float | None = None, terminal_alpha_cumprod: float | None = None,
                 total_steps: int = 900, grid_shift: float = 1.0, grid_timesteps: list[int] | None = None,
                 solver_order: int = 1):
        name = type(self).__name__
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{name}: prediction_type={prediction_type!r} is not handled (epsilon or v_prediction; "
                             f"flow-matching models: TDMFlowScheduler)")
        try:
            self.betas, self.alphas_cumprod = vp_alphas_cumprod(
                num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
                snr_shift_scale, terminal_alpha_cumprod)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        self.alphas = 1.0 - self.betas
        self.schedule = VPSchedule(self.alphas_cumprod)
        if self.schedule.zero_terminal_snr and prediction_type == "epsilon":
            raise ValueError(f"{name}: prediction_type='epsilon' on a zero-terminal-SNR schedule "
                             f"(rescale_betas_zero_snr=True): x0 is undefined at t = T; not handled")
        self.prediction_type = prediction_type
        self._clip = float(clip_sample_range) if clip_sample else None
        self._init_grid(total_steps, grid_shift, grid_timesteps, num_train_timesteps)
        self._init_solver(solver_order)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None, return_dict: bool = True) -> TDMSchedulerOutput | tuple:
        """One student step at grid point `timestep`: model_output (epsilon or v, the sample's shape (B, ...)) ->
        (x0, eps), clip x0 if configured, DDIM (solver_order 2: DPM-Solver++(2M), which needs the steps in grid
        order) to the next grid point (x0 after the last). Deterministic: `eta` must be 0 (pipelines pass their
        default 0), `generator` is accepted and unused. Returns (prev, x0)."""
        if eta != 0:
            raise ValueError(f"TDMScheduler: eta={eta!r}: the student's step is deterministic DDIM (eta = 0)")
        prev, x0 = self._step(model_output, timestep, sample)
        return TDMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)

    @classmethod
    def _check_base(cls, base: type, label: str) -> None:
        if base is TDMFlowScheduler or base.__name__.startswith("FlowMatch"):
            raise ValueError(f"TDMScheduler: {label} is a flow-matching scheduler's ({base.__name__}); "
                             f"TDMScheduler is VP only: use TDMFlowScheduler")

    @classmethod
    def _read_as(cls, base, config: dict, overrides: dict) -> dict:
        init = super()._read_as(base, config, overrides)
        # How its class ends the zero-SNR schedule, in our keys (2**-24 for the Euler / DPM / UniPC classes).
        # snr_shift_scale needs nothing here: only CogVideoX's classes take it (default 3.0 when a file lacks it).
        if isinstance(base, type) and base.__name__ in CLAMPED_ZERO_SNR and init.get("rescale_betas_zero_snr"):
            init.setdefault("terminal_alpha_cumprod", CLAMPED_VALUE)
        return init

    @classmethod
    def _unknown_hint(cls, key: str) -> str:
        return " (a flow-matching scheduler key: use TDMFlowScheduler)" if key in FLOW_ONLY else ""

    def _verify_against(self, base: type, config: dict, overrides: dict) -> None:
        """alphas_cumprod must be those of the class that defines this config (the teacher's schedule, as
        tdm's backbones read it); refused otherwise."""
        from diffusers.utils import logging

        taken = _init_keys(base)
        level = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            reference = base.from_config({**config, **{k: v for k, v in overrides.items() if k in taken}})
        except Exception as err:
            raise ValueError(f"TDMScheduler: could not build {base.__name__} from this config to check its "
                             f"schedule ({type(err).__name__}: {err})") from None
        finally:
            logging.set_verbosity(level)
        acp = getattr(reference, "alphas_cumprod", None)
        if acp is None:
            raise ValueError(f"TDMScheduler: {base.__name__} has no alphas_cumprod: not a VP scheduler")
        acp = torch.as_tensor(acp)
        if acp.dtype != self.alphas_cumprod.dtype or not torch.equal(acp, self.alphas_cumprod):
            diff = (acp.double() - self.alphas_cumprod.double()).abs().max().item() \
                if acp.shape == self.alphas_cumprod.shape else float("nan")
            raise ValueError(f"TDMScheduler: {base.__name__} defines alphas_cumprod differently from this reading of "
                             f"its config (max |diff| {diff:.3g}, dtypes {acp.dtype} / {self.alphas_cumprod.dtype}); "
                             f"not handled")


# -- flow matching ----------------------------------------------------------------------------------------------
class TDMFlowScheduler(_TDMStudentScheduler):
    """The TDM student's deterministic K-step sampler on a rectified-flow schedule (FlowMatchEulerDiscreteScheduler
    models: SD3; any `num_train_timesteps`): t = T s, x_t = (1 - s) x0 + s eps (`tdm.schedule.FlowSchedule`), the
    model predicts the velocity eps - x0 at t, fed as `timesteps` (float32 values of the student's integer grid,
    as FlowMatchEulerDiscreteScheduler feeds t = 1000 sigma). The student's DDIM step on this schedule is the Euler
    step x + (s_next - s) v; the last step returns x0. `sigmas` (K + 1, float32) = timesteps / T then 0.

    The teacher's sampler settings in a FlowMatch config (`shift`, `use_dynamic_shifting` and its
    `base_shift`/`max_shift`/`*_image_seq_len`, `shift_terminal`, `use_karras/exponential/beta_sigmas`,
    `time_shift_type`, `stochastic_sampling`) only pick that sampler's own grid and step and are not kept; the
    student's grid shift is `grid_shift`. `invert_sigmas: true` (the model conditioned on T (1 - s)) is refused."""

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    _irrelevant = FLOW_IRRELEVANT
    _must_be = FLOW_MUST_BE
    _must_be_why = FLOW_MUST_BE_WHY
    _implemented = frozenset({"num_train_timesteps"})
    _timesteps_dtype = torch.float32
    prediction_type = "flow"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, total_steps: int = 900, grid_shift: float = 1.0,
                 grid_timesteps: list[int] | None = None, solver_order: int = 1):
        self.schedule = FlowSchedule(num_train_timesteps)
        self._init_grid(total_steps, grid_shift, grid_timesteps, num_train_timesteps)
        self._init_solver(solver_order)
        self._set_sigmas()

    def _set_sigmas(self) -> None:
        grid = torch.tensor(self._grid, dtype=torch.float64)
        self.sigmas = torch.cat([grid / self.config.num_train_timesteps, grid.new_zeros(1)]).float()

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | None = None, sigmas: list[float] | None = None,
                      mu: float | None = None) -> None:
        """The student's K-step grid, K = num_inference_steps (descending float32 timesteps; `sigmas` = t / T then
        0). What FluxPipeline and ZImagePipeline always pass is accepted: `mu` (their resolution-dependent shift
        of the base scheduler's grid) is ignored, and `sigmas` equal to their default `linspace(1, 1 / K, K)`
        (FluxPipeline's, and ZImagePipeline's `get_default_z_image_sigmas`) ask for no grid (K = their length). Other `timesteps` / `sigmas` are accepted only when they are the student's grid."""
        if sigmas is not None and timesteps is None:
            k = len(sigmas)
            default = torch.linspace(1.0, 1.0 / k, k, dtype=torch.float64)
            if bool(((torch.as_tensor(list(sigmas), dtype=torch.float64) - default).abs() <= 1e-6).all()):
                if num_inference_steps not in (None, k):
                    raise ValueError(f"TDMFlowScheduler: num_inference_steps={num_inference_steps} but {k} sigmas")
                sigmas, num_inference_steps = None, k
        super().set_timesteps(num_inference_steps, device, timesteps, sigmas, None)
        self._set_sigmas()
        self.sigmas = self.sigmas.to(device)

    def _sigmas_to_t(self, sigmas) -> torch.Tensor:
        return torch.as_tensor(list(sigmas), dtype=torch.float64) * self.config.num_train_timesteps

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> TDMSchedulerOutput | tuple:
        """One student step at grid point `timestep`: the velocity (the sample's shape (B, ...)) -> (x0, eps),
        DDIM (= Euler; solver_order 2: DPM-Solver++(2M), steps in grid order) to the next grid point (x0 after
        the last). Deterministic. Returns (prev, x0)."""
        prev, x0 = self._step(model_output, timestep, sample)
        return TDMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)

    @classmethod
    def _check_base(cls, base: type, label: str) -> None:
        if base is TDMFlowScheduler or base.__name__ in FLOW_BASES | FLOW_SIGMA_BASES:
            return
        if base is TDMScheduler:
            raise ValueError(f"TDMFlowScheduler: {label} is a VP scheduler config (TDMScheduler): use TDMScheduler")
        kind = "a flow-matching scheduler not read yet" if base.__name__.startswith("FlowMatch") else \
            "a VP scheduler (use TDMScheduler)"
        raise ValueError(f"TDMFlowScheduler: {label} is {kind}; it reads {sorted(FLOW_BASES)} configs and "
                         f"{sorted(FLOW_SIGMA_BASES)} ones in flow mode")

    @classmethod
    def _tables(cls, base) -> tuple[frozenset, dict, dict]:
        if isinstance(base, type) and base.__name__ in FLOW_SIGMA_BASES:
            return FLOW_SIGMA_IRRELEVANT, FLOW_SIGMA_MUST_BE, FLOW_SIGMA_MUST_BE_WHY
        return super()._tables(base)

    @classmethod
    def _unknown_hint(cls, key: str) -> str:
        vp = TDMScheduler._implemented | VP_IRRELEVANT | set(VP_MUST_BE)
        return " (a VP scheduler key: use TDMScheduler)" if key in vp else ""


# -- the student's scheduler ------------------------------------------------------------------------------------
def from_student(record, scheduler_config, *, k_embedding_handled: bool = False,
                 solver_order: int | None = None) -> _TDMStudentScheduler:
    """The scheduler that runs the student of `record` (a `tdm.student.StudentRecord`, or a student folder) in a
    stock pipeline whose scheduler config (the teacher's: `pipe.scheduler.config`) is `scheduler_config`:
    TDMFlowScheduler for flow-matching families (sd3), TDMScheduler otherwise; the record's grid
    (total_steps, shift, explicit timesteps) and solver order (`solver_order` overrides the record's: 1 DDIM,
    2 DPM-Solver++(2M)); x0 clipping exactly when the family's sampler clips (digits).

    ValueError when the config is not of the family's kind, its prediction type is not the family's, or the
    student is TDM-unify: its K embedding (k_embedding.safetensors) is no part of a diffusers pipeline, so a stock
    pipeline would run the student without it; pass `k_embedding_handled=True` only when the pipeline's denoiser
    applies it itself."""
    from tdm.backbones import FAMILIES
    from tdm.student import StudentRecord

    if not isinstance(record, StudentRecord):
        record = StudentRecord.load(record)
    if record.family not in FAMILIES:
        raise ValueError(f"from_student: unknown family {record.family!r}")
    if record.unify and not k_embedding_handled:
        raise ValueError("from_student: a TDM-unify student conditions on K through its K embedding "
                         "(k_embedding.safetensors), which a diffusers pipeline does not load: the stock pipeline "
                         "would sample a different model")
    adapter = FAMILIES[record.family]
    kinds = getattr(adapter, "prediction_types", (getattr(adapter, "prediction_type", "epsilon"),))
    flow = "flow" in kinds
    grid = dict(total_steps=record.total_steps, grid_shift=record.shift,
                grid_timesteps=None if record.explicit_timesteps is None else list(record.explicit_timesteps),
                solver_order=record.solver_order if solver_order is None else solver_order)
    if flow:
        return TDMFlowScheduler.from_config(scheduler_config, **grid)
    clip = adapter.clip_x0
    scheduler = TDMScheduler.from_config(scheduler_config, clip_sample=clip is not None,
                                         clip_sample_range=1.0 if clip is None else clip, **grid)
    allowed = getattr(adapter, "prediction_types", None)
    if allowed is not None and scheduler.config.prediction_type not in allowed:
        raise ValueError(f"from_student: prediction_type {scheduler.config.prediction_type!r} is not the "
                         f"{record.family} family's ({', '.join(allowed)})")
    return scheduler


__all__ = ["TDMScheduler", "TDMFlowScheduler", "TDMSchedulerOutput", "from_student", "vp_alphas_cumprod"]
