"""The evaluate stage: sample the teacher (many steps, CFG) and the student (1/2/4 steps), score every set, and
score the LoRA-transfer stage's sets (its manifest), one row per (model, NFE).

Writes outputs/evaluate/ (samples_<model>_s<steps>.npz + PNG grids, table.md) and metrics/evaluate.json:
  {"rows": [{"model", "steps", "nfe", "guidance", "n", "samples", "grid", "metrics": {...}}, ...],
   "metrics_skipped": {metric: why}}
(rows: `tdm.evaluation.rows.EvalRow`). `guidance` is the CFG scale the samples reflect: the teacher's sampling
scale, the student's distillation scale (baked in). `nfe` counts network evaluations per sample
(`tdm.evaluation.rows.nfe`): 2 per teacher step under CFG (cond + uncond), 1 per student step. The teacher
row samples exactly as `tdm sample --score` does (same prompts, noise, batches), so its digits numbers equal
that command's.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tdm.artifacts import atomic_folder, atomic_write_file, save_samples, write_json
from tdm.config import Config, StagePaths
from tdm.evaluation import DIGITS_METRICS, IMAGE_METRICS, VIDEO_FAMILIES, VIDEO_METRICS
from tdm.evaluation.rows import EvalRow, nfe

STAGE = "evaluate"


def metric_names(cfg: Config) -> tuple[str, ...]:
    e = cfg.evaluate
    if e.metrics is not None:
        return e.metrics
    if cfg.model.family == "digits":
        return DIGITS_METRICS
    return VIDEO_METRICS if cfg.model.family in VIDEO_FAMILIES else IMAGE_METRICS


def prompt_list(cfg: Config) -> list[str]:
    from tdm.data import prompt_set

    return prompt_set(cfg.evaluate.prompts, cfg.evaluate.n, seed=cfg.sample.seed)


def _model_folder(path: str | None, key: str) -> Path | None:
    if path is None:
        return None
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"evaluate.{key}: not a model folder (no model_index.json): {folder}")
    return folder


def read_manifest(path: str | None) -> list[dict]:
    """The lora_transfer stage's rows (`EvalRow` dicts); an absent file means none. Bad rows fail naming the key."""
    if path is None or not Path(path).is_file():
        return []
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected {{\"rows\": [...]}} ({err})") from None
    base = Path(path).parent
    # Relative paths are taken from the project root, else beside the manifest.
    resolve = lambda p: p if p.exists() or p.is_absolute() else base / p
    out = []
    for i, raw in enumerate(rows):
        for key in ("model", "steps", "nfe", "guidance", "samples"):
            if key not in raw:
                raise ValueError(f"{path}: rows[{i}].{key}: missing")
        try:
            row = EvalRow.from_dict(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: rows[{i}]: {err}") from None
        samples = resolve(Path(row.samples))
        if not samples.is_file():
            raise FileNotFoundError(f"{path}: rows[{i}].samples: not found: {row.samples}")
        reference = None if row.reference is None else resolve(Path(row.reference))
        if reference is not None and not reference.exists():
            raise FileNotFoundError(f"{path}: rows[{i}].reference: not found: {row.reference}")
        out.append(row.replace(samples=str(samples), reference=None if reference is None else str(reference)).to_dict())
    return out


def plan(cfg: Config) -> list[dict]:
    """The rows to sample: (model, folder, steps, guidance, student). Checks inputs, no compute."""

    e = cfg.evaluate
    rows = []
    teacher = _model_folder(e.teacher, "teacher")
    if teacher is not None:
        steps = e.teacher_steps or cfg.sample.steps
        guidance = e.teacher_guidance if e.teacher_guidance is not None else cfg.sample.guidance
        rows.append({"model": "teacher", "folder": teacher, "steps": steps, "guidance": guidance, "student": False,
                     "sample_guidance": guidance})
    student = _model_folder(e.student, "student")
    if student is not None:
        from tdm.student import StudentRecord

        try:
            record = StudentRecord.load(student)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"evaluate.student: {err} (is it a distill stage student?)") from None
        ks = e.student_steps if record.unify or e.fixed_k_steps == "all" else record.sampling_ks
        for k in sorted(set(ks)):
            record.check_k(k)
            rows.append({"model": "student", "folder": student, "steps": k, "guidance": record.guidance or 1.0,
                         "student": True, "sample_guidance": 1.0})
    return rows


def check_inputs(cfg: Config) -> list[dict]:
    """Everything the stage reads, checked before any model is built; errors name the key: the rows to sample
    (`plan`: model folders, the student's record and its K), each model's weights, the LoRA-transfer manifest
    and the prompts. Returns the plan. Raises FileNotFoundError or ValueError."""
    from tdm.backbones import check_model

    rows = plan(cfg)
    for key, folder in (("teacher", cfg.evaluate.teacher), ("student", cfg.evaluate.student)):
        if folder is not None:
            try:
                check_model(folder)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"evaluate.{key}: {err}") from None
            except ValueError as err:
                raise ValueError(f"evaluate.{key}: {err}") from None
    from tdm.data import check_sample_set, read_text

    manifest = cfg.evaluate.lora_manifest
    if manifest is not None and Path(manifest).is_file():
        read_text(Path(manifest))  # a binary manifest names its file
    for row in read_manifest(manifest):
        check_sample_set(row["samples"])
    reference = cfg.evaluate.fid_reference
    if reference is not None and Path(reference).expanduser().is_file():
        try:
            check_sample_set(Path(reference).expanduser())
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"evaluate.fid_reference: {err}") from None
    if rows:
        prompt_list(cfg)
    return rows


def run(cfg: Config, paths: StagePaths | None = None, progress: bool = True) -> dict:
    """The stage: returns (and writes to metrics/evaluate.json) {"rows": [...], "metrics_skipped": {...}}."""
    import torch

    from tdm.backbones import load_backbone
    from tdm.evaluation.runner import Evaluator, MetricSettings, score_sets
    from tdm.evaluation.table import markdown_table
    from tdm.sampler import sample_student, sample_teacher
    from tdm.student import load_student

    paths = paths or StagePaths.of(STAGE)
    e = cfg.evaluate
    start = time.perf_counter()
    # Everything that can fail without compute fails here: folders, manifest, prompts, metric weights.
    to_sample = plan(cfg)
    transfer = read_manifest(e.lora_manifest)
    prompts = prompt_list(cfg) if to_sample else []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluator = Evaluator(metric_names(cfg), MetricSettings.from_config(cfg, e.fid_reference, device),
                          skip_missing=e.skip_missing)

    rows = []
    out_dir = paths.out_dir
    with atomic_folder(out_dir) as tmp:
        loaded: dict[tuple[Path, bool], object] = {}
        for r in to_sample:
            key = (r["folder"], r["student"])
            if key not in loaded:
                loaded.clear()  # one model in memory at a time
                loaded[key] = (load_student(r["folder"]) if r["student"] else load_backbone(r["folder"])).to(device)
            model = loaded[key]
            common = {"seed": cfg.sample.seed, "batch_size": cfg.sample.batch_size, "progress": progress}
            images = (sample_student(model, prompts, k=r["steps"], **common) if r["student"] else
                      sample_teacher(model, model.net, prompts, steps=r["steps"], guidance=r["sample_guidance"],
                                     **common))
            name = f"samples_{r['model']}_s{r['steps']}.npz"
            save_samples(tmp / name, images, prompts, steps=r["steps"], guidance=r["sample_guidance"])
            rows.append(EvalRow(model=r["model"], steps=r["steps"], nfe=nfe(r["steps"], r["guidance"], r["student"]),
                                guidance=r["guidance"], n=len(prompts), samples=str(out_dir / name),
                                grid=str(out_dir / Path(name).with_suffix(".png")),
                                metrics=evaluator.score(images.numpy(), prompts)))
        loaded.clear()
        rows += score_sets(transfer, evaluator)
        table = markdown_table(rows, evaluator.skipped)
        atomic_write_file(tmp / "table.md", lambda p: Path(p).write_text(table))
    result = {"rows": [r.to_dict() for r in rows], "metrics_skipped": evaluator.skipped,
              "wall_time_s": round(time.perf_counter() - start, 2)}
    write_json(paths.metrics, result)
    return result
