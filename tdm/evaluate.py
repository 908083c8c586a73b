"""The evaluate stage: sample the teacher (many steps, CFG; or across NFE, `evaluate.teacher_curve`) and the
student (1/2/4 steps), score every set, and score the LoRA-transfer stage's sets (its manifest), one row per
(model, NFE) and, under a protocol with groups (HPSv2's styles), one per group and its average.

Prompts come from `evaluate.prompts`, or from a published protocol (`evaluate.protocol`: hpsv2 / coco2014 /
vbench, `tdm.evaluation.protocols`), whose name, version, n, resolution and metric model every row records.

Writes outputs/evaluate/ (samples_<model>_s<steps>.npz + captioned PNG grids, table.md) and metrics/evaluate.json:
  {"rows": [{"model", "steps", "nfe", "guidance", "n", "samples", "grid", "protocol", "protocol_version",
             "group", "resolution", "metric_model", "metrics": {...}}, ...],
   "metrics_skipped": {metric: why}, "protocol": {...}}
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


def metric_names(cfg: Config, protocol=None) -> tuple[str, ...]:
    """`evaluate.metrics`, else the protocol's metrics (hpsv2: hps; coco2014: fid, clip; vbench: the VBench
    custom_input dimensions), else the family's default."""
    e = cfg.evaluate
    if e.metrics is not None:
        return e.metrics
    if protocol is not None:
        return protocol.metrics
    if cfg.model.family == "digits":
        return DIGITS_METRICS
    return VIDEO_METRICS if cfg.model.family in VIDEO_FAMILIES else IMAGE_METRICS


def prompt_list(cfg: Config, protocol=None) -> list[str]:
    """The protocol's prompts, else `evaluate.prompts` cycled to `evaluate.n`."""
    if protocol is not None:
        return list(protocol.prompts)
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
        guidance = e.teacher_guidance if e.teacher_guidance is not None else cfg.sample.guidance
        # The quality-vs-NFE curve: the teacher's DDIM at each `teacher_curve` count, else at teacher_steps.
        for steps in e.teacher_curve or (e.teacher_steps or cfg.sample.steps,):
            rows.append({"model": "teacher", "folder": teacher, "steps": steps, "guidance": guidance,
                         "student": False, "sample_guidance": guidance})
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

    from tdm.evaluation import protocols

    rows = plan(cfg)
    protocol = protocols.load(cfg)
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
        prompt_list(cfg, protocol)
    return rows


def protocol_record(protocol) -> dict | None:
    """What metrics/evaluate.json records of the protocol (None: none): name, version, n, source, groups, seed,
    resolution and, for coco2014, the drawn image ids."""
    if protocol is None:
        return None
    out = {"name": protocol.name, "version": protocol.version, "n": protocol.n, "source": protocol.source}
    if protocol.groups:
        out["groups"] = {g: len(ix) for g, ix in protocol.groups.items()}
    if protocol.resolution is not None:
        out["resolution"] = protocol.resolution
    if protocol.seed is not None:
        out["seed"] = protocol.seed
    if protocol.image_ids:
        out["image_ids"] = list(protocol.image_ids)
    return out


def score_rows(base: EvalRow, images, prompts: list[str], evaluator, protocol=None,
               reference: str | None = None, prompt_source: str | None = None) -> list[EvalRow]:
    """The scored rows of one sample set: one row (plain prompts, coco2014, vbench), or one per HPSv2 style plus
    their average. `base` carries model / steps / NFE / paths; `reference` is the coco2014 reference folder."""
    import numpy as np

    from tdm.evaluation import protocols
    from tdm.evaluation.runner import resolution_of

    images = np.asarray(images)
    common = {"metric_model": evaluator.metric_model}
    if protocol is None:
        return [base.replace(protocol="prompts", protocol_version=prompt_source, n=len(images),
                             resolution=resolution_of(images), metrics=evaluator.score(images, prompts), **common)]
    common.update(protocol=protocol.name, protocol_version=protocol.version, seed=protocol.seed)
    if protocol.name == "coco2014":
        scored = protocols.resize_set(images, protocol.resolution)
        return [base.replace(n=len(images), resolution=resolution_of(scored), reference=reference,
                             metrics=evaluator.score(scored, prompts, reference=reference), **common)]
    if protocol.name == "vbench":
        metrics = evaluator.score(images, prompts)
        dims = {k[len("vbench_"):]: v for k, v in metrics.items() if k.startswith("vbench_")}
        metrics.update({k: v for k, v in protocols.vbench_scores(dims).items() if v is not None})
        return [base.replace(n=len(images), resolution=resolution_of(images), metrics=metrics, **common)]
    # hpsv2: per style, then the average over every image (hpsv2/evaluation.py); HPS scored once per image.
    hps = evaluator.metrics.get("hps")
    scores = hps.scores(images, prompts) if hps is not None else None
    others = [m for m in evaluator.metrics if m != "hps"]
    rows = []
    for style, ix in protocol.groups.items():
        ix = list(ix)
        metrics = evaluator.score(images[ix], [prompts[i] for i in ix], names=others) if others else {}
        if scores is not None:
            metrics["hps"] = protocols.hpsv2_group_score(scores[ix])
        rows.append(base.replace(group=style, n=len(ix), resolution=resolution_of(images), metrics=metrics,
                                 **common))
    metrics = evaluator.score(images, prompts, names=others) if others else {}
    if scores is not None:
        metrics["hps"] = float(np.mean(scores))
    rows.append(base.replace(group=protocols.HPSV2_AVERAGE, n=len(images), resolution=resolution_of(images),
                             metrics=metrics, **common))
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
    # Everything that can fail without compute fails here: folders, manifest, protocol files, prompts, weights.
    from tdm.evaluation import protocols
    from tdm.evaluation.grids import save_grid

    to_sample = plan(cfg)
    protocol = protocols.load(cfg)
    transfer = read_manifest(e.lora_manifest)
    prompts = prompt_list(cfg, protocol) if to_sample else []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluator = Evaluator(metric_names(cfg, protocol), MetricSettings.from_config(cfg, e.fid_reference, device),
                          skip_missing=e.skip_missing)

    rows = []
    out_dir = paths.out_dir
    with atomic_folder(out_dir) as tmp:
        reference = None
        if protocol is not None and protocol.reference_files and to_sample:
            # The drawn reference images, resized as the protocol states (the FID reference), built once.
            reference = str(protocols.reference_folder(protocol, Path(cfg.eval.weights_dir) / "protocol_refs"))
        loaded: dict[tuple[Path, bool], object] = {}
        for r in to_sample:
            key = (r["folder"], r["student"])
            if key not in loaded:
                loaded.clear()  # one model in memory at a time
                loaded[key] = (load_student(r["folder"]) if r["student"] else load_backbone(r["folder"])).to(device)
            model = loaded[key]
            common = {"seed": cfg.sample.seed, "batch_size": cfg.sample.batch_size, "progress": progress}
            t0 = time.perf_counter()
            images = (sample_student(model, prompts, k=r["steps"], **common) if r["student"] else
                      sample_teacher(model, model.net, prompts, steps=r["steps"], guidance=r["sample_guidance"],
                                     **common))
            sample_time = round(time.perf_counter() - t0, 2)
            name = f"samples_{r['model']}_s{r['steps']}.npz"
            save_samples(tmp / name, images, prompts, steps=r["steps"], guidance=r["sample_guidance"])
            images = images.numpy()
            save_grid(tmp / Path(name).with_suffix(".png"), images, prompts)  # captioned, upscaled, separated
            base = EvalRow(model=r["model"], steps=r["steps"], nfe=nfe(r["steps"], r["guidance"], r["student"]),
                           guidance=r["guidance"], samples=str(out_dir / name), sample_time_s=sample_time,
                           grid=str(out_dir / Path(name).with_suffix(".png")))
            scored = score_rows(base, images, prompts, evaluator, protocol, reference,
                                prompt_source=str(e.prompts))
            rows += scored
        loaded.clear()
        rows += score_sets(transfer, evaluator)
        table = markdown_table(rows, evaluator.skipped)
        atomic_write_file(tmp / "table.md", lambda p: Path(p).write_text(table))
    result = {"rows": [r.to_dict() for r in rows], "metrics_skipped": evaluator.skipped,
              "wall_time_s": round(time.perf_counter() - start, 2)}
    record = protocol_record(protocol)
    if record is not None:
        result["protocol"] = record
    write_json(paths.metrics, result)
    return result
