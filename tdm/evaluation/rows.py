"""The evaluation row: one scored (or to-be-scored) sample set, as every stage writes it.

`metrics/evaluate.json`, `metrics/lora_transfer.json` and `outputs/lora_transfer/manifest.json` hold lists of
`EvalRow.to_dict()`; `tdm/tracking.py` logs a row's `metrics` under its `model` and `nfe`, `tdm/report.py` and
the Prefect flow render rows with `tdm.evaluation.table`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def nfe(steps: int, guidance: float, student: bool) -> int:
    """Network evaluations per sample: a student's `steps` (its CFG is baked in); a teacher's `steps`, doubled
    under classifier-free guidance (guidance != 1: the conditional and unconditional passes,
    `tdm.sampler.guided_x0_eps`, which runs one pass only at guidance 1)."""
    if student or guidance == 1.0:
        return int(steps)
    return 2 * int(steps)


@dataclass
class EvalRow:
    """One (model, steps) sample set, or one group of it. `guidance` is the CFG scale the samples reflect (a
    teacher's sampling scale, a student's baked-in scale); `nfe` as `nfe()` counts it; `reference` is the row's
    own FID reference (a LoRA-transfer custom style's held-out images, a protocol's resized reference images),
    `metrics` the scores (None: not scored yet).

    The protocol the scores follow (`tdm.evaluation.protocols`): `protocol` ("hpsv2", "coco2014", "vbench", or
    "prompts": `evaluate.prompts`; None: not recorded, e.g. an older file), `protocol_version` (hpsv2: the HPS
    version; coco2014: the split; vbench: the suite file; prompts: the prompt source), `group` (a subset scored as its own row: an HPSv2 style or
    "average"), `n` (samples the row's scores are over), `resolution` ("HxW" px the metrics were given, after
    any protocol resize), `metric_model` (the networks behind the scores, e.g. "HPS v2.1 (open_clip ViT-H-14)"),
    `seed` (the protocol's caption draw seed). An external student's row (`tdm evaluate` with `evaluate.lora`)
    carries its `lora_scale` and its `recipe`: what reproduces the samples in a stock diffusers pipeline
    (teacher, lora, lora_scale, steps, guidance, scheduler: the scheduler's class and config)."""

    model: str
    steps: int
    nfe: int
    guidance: float
    guidance_schedule: list[float] | None = None  # a student's per-step baked-in CFG (then `guidance` is unused)
    n: int | None = None
    lora_scale: float | None = None
    samples: str | None = None
    grid: str | None = None
    reference: str | None = None
    sample_time_s: float | None = None
    protocol: str | None = None
    protocol_version: str | None = None
    group: str | None = None
    resolution: str | None = None
    metric_model: str | None = None
    seed: int | None = None
    recipe: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        """The JSON layout: every field that is set (None fields are left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, row: dict) -> EvalRow:
        """A row as `to_dict` (or an older stage) wrote it; unknown or missing keys fail naming them."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(row) - set(names))
        if unknown:
            raise ValueError(f"evaluation row: unknown key(s) {unknown} (known: {', '.join(names)})")
        missing = [k for k in ("model", "steps", "nfe", "guidance") if k not in row]
        if missing:
            raise ValueError(f"evaluation row: missing key(s) {missing}")
        return cls(**row)

    def replace(self, **changes) -> EvalRow:
        return dataclasses.replace(self, **changes)


def as_rows(rows) -> list[EvalRow]:
    """EvalRows from EvalRows or their dicts."""
    return [r if isinstance(r, EvalRow) else EvalRow.from_dict(r) for r in rows]
