"""Multi-stage distillation: `distill.stages` run in order inside one training loop.

The TDM paper trains its SDXL student 1k iterations at 512 px, then 1k at 1024 px with the fake score
re-initialised (as issue #16 quotes it; DMD2 does the same). Here each stage is a `TDMTrainer` built from the
distill config with the stage's keys applied; `StagedTrainer` hands the loop one global iteration counter
(one metrics log, one checkpoint series, one progress bar, exact resume anywhere, a stage boundary included) and
switches trainers at a boundary: the next one starts from the previous student (its trained weights, and its EMA
shadow when kept) and fake score (unless `reinit_fake`), with fresh optimisers and a fresh lr schedule over its
own iterations. Switching rebuilds the frozen base from the teacher folder (the previous stage is freed first),
so peak memory is one stage's.
"""
from __future__ import annotations

import gc
import sys
from typing import Callable

import torch

from tdm.config import Config


def stage_configs(cfg: Config) -> list[Config]:
    """One Config per stage: distill with the stage's non-null keys applied and `stages` emptied; a config
    without stages is its own one stage. Pure."""
    d = cfg.distill
    if not d.stages:
        return [cfg]
    out = []
    for st in d.stages:
        keys = {k: v for k, v in st.model_dump().items() if v is not None and k not in ("resolution", "reinit_fake")}
        out.append(cfg.model_copy(update={"distill": d.model_copy(update={**keys, "stages": ()})}))
    return out


def stage_starts(cfg: Config) -> list[int]:
    """The global iteration each stage starts at (0 first)."""
    starts, n = [], 0
    for c in stage_configs(cfg):
        starts.append(n)
        n += c.distill.iterations
    return starts


class StagedTrainer:
    """The loop's TrainingState over `distill.stages`: `iteration(step)` with the global step (per-step RNG as in
    one stage), `state_dict` = the current stage's trainer state plus its index. `build(stage_cfg, resolution)`
    makes a stage's TDMTrainer (the frozen base loaded at that resolution)."""

    def __init__(self, cfg: Config, build: Callable[[Config, int | None], object], main_process: bool = True):
        self.cfg, self.build, self.main_process = cfg, build, main_process
        self.configs, self.starts = stage_configs(cfg), stage_starts(cfg)
        self.specs = cfg.distill.stages
        self.index: int | None = None
        self.current = None
        self._enter(0, carry=None)
        # Every stage's resolution checked on stage 0's backbone now, not when the stage is reached (after the
        # earlier stages trained): ValueError naming distill.stages[i].resolution.
        backbone = self.current.backbone
        for i, spec in enumerate(self.specs):
            backbone.set_resolution(spec.resolution, where=f"distill.stages[{i}].resolution")
        backbone.set_resolution(self.specs[0].resolution if self.specs else None)

    def stage_of(self, step: int) -> int:
        return max(i for i, s in enumerate(self.starts) if s <= step)

    def _carry(self) -> dict[str, dict]:
        """What the next stage inherits, on the CPU: the student's trained weights (and EMA), the fake score's."""
        t = self.current

        def host(state: dict) -> dict:
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

        carry = {"student": host(t.roles.state_dict("student")), "fake": host(t.roles.state_dict("fake"))}
        if t.ema is not None:
            carry["ema"] = {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                            for k, v in t.ema.state_dict().items()}
        return carry

    def _enter(self, index: int, carry: dict | None) -> None:
        spec = self.specs[index] if self.specs else None
        if self.current is not None:  # free the previous stage before the next base is loaded
            self.current = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        trainer = self.build(self.configs[index], spec.resolution if spec else None)
        if carry is not None:
            trainer.roles.load_state_dict("student", carry["student"])
            if not spec.reinit_fake:
                trainer.roles.load_state_dict("fake", carry["fake"])
            if trainer.ema is not None and "ema" in carry:
                trainer.ema.load_state_dict(carry["ema"])
        self.current, self.index = trainer, index
        if spec is not None and self.main_process:  # on the console (stderr: stdout carries the stage's JSON)
            print(self.describe(index), file=sys.stderr, flush=True)

    def describe(self, index: int) -> str:
        spec, d = self.specs[index], self.configs[index].distill
        size = f"{spec.resolution} px" if spec.resolution is not None else "native size"
        fake = ", fake score re-initialised" if spec.reinit_fake else ""
        return (f"distill: stage {index + 1}/{len(self.specs)} from iteration {self.starts[index]}: {d.iterations} "
                f"iterations at {size}{fake}")

    # -- the loop's protocol ------------------------------------------------------------------------------------
    def iteration(self, step: int) -> dict[str, torch.Tensor]:
        index = self.stage_of(step)
        if index != self.index:
            self._enter(index, self._carry())
        metrics = self.current.iteration(step)
        if self.specs:
            metrics["stage"] = torch.tensor(float(index))
        return metrics

    def state_dict(self) -> dict:
        return {"stage_index": self.index, "trainer": self.current.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        index = int(state["stage_index"])
        if index != self.index:
            self._enter(index, carry=None)
        self.current.load_state_dict(state["trainer"])

    def trainable(self) -> list[torch.Tensor]:
        return self.current.trainable()
