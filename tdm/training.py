"""The training loop both stages run (teacher SFT, TDM distillation), and the pieces they share.

The loop is infrastructure; the method supplies one step (edm2 / FastGen style). `run_loop` owns: resuming
from the newest checkpoint made with the same params (`fingerprint`), the per-step log `metrics.jsonl`, the
progress bar, the cadence of logging and checkpointing, and one divergence policy:

  - every `log_every` steps the step metrics move to the host in one sync (mean over processes, so every rank
    sees the same values) and a non-finite loss (a metric named `loss*`) stops the run (`TrainingDiverged`, on
    every rank). Other metrics may be inf legitimately: an fp16 step whose gradients overflowed has an inf
    gradient norm and is skipped by the GradScaler;
  - before every checkpoint the metrics are flushed (so checked), the trainable weights must be finite and
    identical on every process; only then is the checkpoint written, so the last one on disk is always good.

Progress on a console without bars (`-q`, as dvc.yaml runs the stages, and under the Prefect flow, which sets
it): with TDM_PROGRESS_EVERY=<seconds> set, the loop also writes a plain line to stderr at most that often
(at log flushes, and always at the last step): `distill: 120/400 it (30%) loss_fake=0.51 loss_gen=0.21 |
1 min 02 s elapsed, ETA 2 min 25 s` (`ProgressLines`, for any loop without a bar).

A stage hands it a `TrainingState` (what to checkpoint and check) and a step function `step(i) -> {name:
0-d tensor}`. Every random draw of step i comes from `step_generator(seed, i, process)`: a resumed run draws
exactly what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch


class TrainingDiverged(RuntimeError):
    """The loss or the weights went NaN/Inf; the last good checkpoint is kept."""


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """Every random draw of a step comes from this generator, so a resumed run draws exactly what the
    uninterrupted run would have drawn (no RNG state to restore, no data-loader position to replay)."""
    digest = hashlib.sha256(f"{seed}/{step}/{process}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def average_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over processes, as DDP would, for parameter sets DDP cannot wrap
    (student and fake score are two adapters on one shared module in LoRA mode)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def replicas_identical(accelerator, params: Iterable[torch.Tensor]) -> bool:
    """True when every process holds the same weights (checked via a float64 signature). FSDP shards
    (DTensors) are skipped: each lives on one process only, there is no replica to compare."""
    from tdm.sharding import is_sharded

    if accelerator.num_processes == 1:
        return True
    replicated = [p for p in params if not is_sharded(p)]
    if not replicated:
        return True
    signature = torch.stack([p.detach().double().sum() for p in replicated]).sum().reshape(1)
    everyone = accelerator.gather(signature.to(accelerator.device))
    return bool(torch.all(everyone == everyone[0]))


def fingerprint(cfg, *sections: str, upstream: dict[str, str] | None = None) -> str:
    """What must match for a checkpoint to be resumed: the named config sections, less each section's
    BOOKKEEPING keys (cadence, evaluation size, speed switches: they do not change the trained weights), and
    the identity of every model the run builds on (`upstream`: {role: artifacts.weights_digest}), so a
    teacher retrained at the same path starts the student afresh."""
    from tdm.config import dump

    params = dump(cfg)
    relevant: dict = {"upstream": dict(sorted((upstream or {}).items()))}
    for name in sections:
        bookkeeping = getattr(getattr(cfg, name), "BOOKKEEPING", ())
        relevant[name] = {k: v for k, v in params[name].items() if k not in bookkeeping}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


PROGRESS_ENV = "TDM_PROGRESS_EVERY"


def progress_every() -> float | None:
    """Seconds between plain progress lines (TDM_PROGRESS_EVERY), None when unset: no lines."""
    text = os.environ.get(PROGRESS_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{PROGRESS_ENV}: expected seconds >= 0, got {text!r}")
    return value


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(stage: str, unit: str, n: int, total: int, metrics: dict, elapsed: float, done: int,
                  end: int) -> str:
    """`stage: n/total unit (p%) loss...=v | elapsed, ETA` (`done` steps of this session took `elapsed`)."""
    losses = "".join(f" {k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("loss"))
    eta = duration(elapsed / done * (end - n)) if done else "unknown"
    percent = f"{100 * n / max(1, total):.0f}%"
    return f"{stage}: {n}/{total} {unit} ({percent}){losses} | {duration(elapsed)} elapsed, ETA {eta}"


class ProgressLines:
    """Plain progress lines for a loop without a bar: `update(n)` writes `progress_line` to stderr at most every
    TDM_PROGRESS_EVERY seconds (and always at `end`); inert when it is unset. `start`: where a resumed loop
    began (the ETA counts this session's pace)."""

    def __init__(self, stage: str, unit: str, total: int, start: int = 0, end: int | None = None,
                 main_process: bool = True):
        self.every = progress_every() if main_process else None
        self.stage, self.unit, self.total, self.start = stage, unit, total, start
        self.end = total if end is None else end
        self.t0, self.last = time.perf_counter(), None

    def update(self, n: int, metrics: dict | None = None) -> None:
        if self.every is None:
            return
        now = time.perf_counter()
        if self.last is not None and now - self.last < self.every and n < self.end:
            return
        self.last = now
        print(progress_line(self.stage, self.unit, n, self.total, metrics or {}, now - self.t0, n - self.start,
                            self.end), file=sys.stderr, flush=True)


def _status(accelerator, line: str) -> None:
    """A status line for the console: stderr (stdout carries the stage's JSON result), main process only."""
    if accelerator.is_main_process:
        print(line, file=sys.stderr, flush=True)


def resumable_checkpoint(accelerator, root, fingerprint: str, stage: str):
    """(path, state) of the newest loadable checkpoint under `root` made with the same params, else None.
    Checkpoints made with other params are deleted (the run starts afresh, as DVC would)."""
    from tdm import checkpoint as ckpt

    found = ckpt.load_latest(root)
    if found is not None and found[1]["fingerprint"] != fingerprint:
        _status(accelerator, f"{stage}: params or upstream model changed since {found[0]}; starting afresh")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.prune_checkpoints(root, keep=0)
        found = None
    return found


# -- the loop --------------------------------------------------------------------------------------------------
class TrainingState(Protocol):
    """What a stage hands the loop: everything to checkpoint, and the weights to check."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def trainable(self) -> list[torch.Tensor]: ...

    # Optional: `gathers_state = True` when state_dict() is a collective (FSDP gathers shards), so every
    # process calls it at a checkpoint and the main one writes what it returns.


@dataclass(frozen=True)
class LoopSettings:
    stage: str  # names the log, the bar and the errors
    total: int  # steps of the whole run
    checkpoint_every: int
    log_every: int
    fingerprint: str  # `fingerprint(cfg, ...)`: checkpoints made with other params are not resumed
    out_dir: Path  # checkpoints/ and metrics.jsonl go here
    on_diverge: str = ""  # advice appended to the divergence error, e.g. "Lower teacher_ft.lr."
    unit: str = "step"


@dataclass
class LoopResult:
    steps: int  # where the run ended
    resumed_from: int | None  # the checkpoint step it resumed from, None for a fresh run
    train_time_s: float  # summed over every session of a resumed run
    last: dict = field(default_factory=dict)  # the last logged row ({"step": n, name: value, ...})


SPARSE_PREFIXES = ("dm_gap_",)  # per-step metrics a process may lack in an iteration


def _host_rows(accelerator, pending: list[tuple[int, dict]]) -> list[dict]:
    """Pending step metrics -> rows of floats, in one host sync (averaged over processes)."""
    keys = sorted({k for _, m in pending for k in m})
    values = torch.stack([torch.stack([torch.as_tensor(m.get(k, float("nan")), dtype=torch.float64).reshape(())
                                       .to(accelerator.device) for k in keys]) for _, m in pending])
    if accelerator.num_processes > 1:
        # Sparse diagnostics (dm_gap_*: NaN where a process drew no such point) average over the processes that
        # have them; every other column is a plain mean, so a NaN loss anywhere still reaches the NaN check.
        sparse = torch.tensor([k.startswith(SPARSE_PREFIXES) for k in keys], device=values.device)
        finite = torch.isfinite(values) | ~sparse
        total = accelerator.reduce(torch.where(finite, values, torch.zeros_like(values)), reduction="sum")
        count = accelerator.reduce(finite.to(values.dtype), reduction="sum")
        values = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    return [{"step": step, **dict(zip(keys, row))} for (step, _), row in zip(pending, values.cpu().tolist())]


def run_loop(accelerator, settings: LoopSettings, state: TrainingState, step: Callable[[int], dict],
             progress: bool = True, stop_after: int | None = None) -> LoopResult:
    """Run (or resume) `step` from the last checkpoint to `settings.total` (or `stop_after`, as a kill would:
    a checkpoint is written there). Raises TrainingDiverged as described in the module docstring."""
    from tdm import checkpoint as ckpt
    from tdm.artifacts import fault_point, remove_stale_temps
    from tdm.checkpoint import rng_state, set_rng_state
    from tdm.sharding import finite_everywhere
    from tdm.tracking import MetricsLog

    s = settings
    gathers = bool(getattr(state, "gathers_state", False))  # FSDP: state_dict() on every process
    progress_every()  # a bad TDM_PROGRESS_EVERY fails before any step
    root = s.out_dir / "checkpoints"
    if accelerator.is_main_process:  # temps a killed write left (a model save, a checkpoint, a log rewrite)
        remove_stale_temps(s.out_dir, recursive=True)
        ckpt.remove_stale_temps(root)
    start, resumed_from, past_time, last = 0, None, 0.0, {}
    found = resumable_checkpoint(accelerator, root, s.fingerprint, s.stage)
    if found is not None:
        path, saved = found
        state.load_state_dict(saved["trainer"])
        set_rng_state(saved["rng"])
        start = resumed_from = int(saved["step"])
        past_time, last = float(saved["train_time_s"]), dict(saved["last"])
        _status(accelerator, f"{s.stage}: resuming from {path} ({s.unit} {start})")
    log = MetricsLog(s.out_dir / "metrics.jsonl", resume_from_step=resumed_from) \
        if accelerator.is_main_process else None
    pending: list[tuple[int, dict]] = []
    t0 = time.perf_counter()

    def diverged(what: str) -> TrainingDiverged:
        return TrainingDiverged(f"{s.stage}: {what}; stopped (NaN/Inf). Last good checkpoint: "
                                f"{ckpt.latest_checkpoint(root) or 'none yet'}. {s.on_diverge}".rstrip())

    def flush() -> None:
        if not pending:
            return
        rows = _host_rows(accelerator, pending)
        pending.clear()
        bad = next(((r["step"], k, v) for r in rows for k, v in r.items()
                    if k.startswith("loss") and not math.isfinite(v)), None)
        if log is not None:
            log.write(rows)  # the bad row too: it is the evidence
            fault_point("log_flush")
        if bad is not None:
            raise diverged(f"non-finite {bad[1]} = {bad[2]} at {s.unit} {bad[0]}")
        last.clear()
        last.update(rows[-1])

    def save(n: int) -> None:
        flush()
        if not (finite_everywhere(accelerator, state.trainable()) if gathers else all_finite(state.trainable())):
            raise diverged(f"non-finite weights by {s.unit} {n}")
        if not replicas_identical(accelerator, state.trainable()):  # DDP / our averaging should guarantee it
            raise RuntimeError(f"{s.stage}: replicas differ across processes at {s.unit} {n}")
        trainer_state = state.state_dict() if gathers or accelerator.is_main_process else None
        if accelerator.is_main_process:
            ckpt.save_state(ckpt.step_dir(root, n), {
                "step": n, "fingerprint": s.fingerprint, "trainer": trainer_state, "rng": rng_state(),
                "last": dict(last), "train_time_s": past_time + time.perf_counter() - t0})
            ckpt.prune_checkpoints(root, keep=2)
        accelerator.wait_for_everyone()

    end = s.total if stop_after is None else min(s.total, stop_after)
    lines = ProgressLines(s.stage, s.unit, s.total, start, end, accelerator.is_main_process)
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.total, initial=start, desc=s.stage, unit=s.unit, dynamic_ncols=True)
    for i in range(start, end):
        pending.append((i + 1, step(i)))
        fault_point("iteration")
        if (i + 1) % s.log_every == 0:
            flush()
            if bar is not None and last:
                bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k.startswith("loss")})
        if bar is not None:
            bar.update(1)
        if (i + 1) % s.checkpoint_every == 0 or i + 1 == end:
            save(i + 1)
        if last and ((i + 1) % s.log_every == 0 or i + 1 == end):  # losses just flushed
            lines.update(i + 1, last)
    if bar is not None:
        bar.close()
    train_time = past_time + (time.perf_counter() - t0 if end > start else 0.0)
    return LoopResult(end, resumed_from, train_time, dict(last))
