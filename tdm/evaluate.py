"""The evaluate stage: sample the teacher (many steps, CFG; or across NFE, `evaluate.teacher_curve`) and the
student (1/2/4 steps), score every set, and score the LoRA-transfer stage's sets (its manifest), one row per
(model, NFE) and, under a protocol with groups (HPSv2's styles), one per group and its average.

An external student (`evaluate.lora`: a published LoRA, diffusers / kohya / peft file or folder, on
`evaluate.teacher` at `evaluate.lora_scale`) is one more row, `teacher+lora@<scale>`, sampled by the stock
pipeline's loop (`tdm.external.sample_external`, `evaluate.lora_steps` steps at CFG `evaluate.lora_guidance`)
from the same prompts and noise as the other rows, scored by the same metrics and protocol; its row records the
recipe (teacher, LoRA, scale, steps, guidance, scheduler config) that reproduces it in a stock pipeline.

Prompts come from `evaluate.prompts`, or from a published protocol (`evaluate.protocol`: hpsv2 / coco2014 /
vbench, `tdm.evaluation.protocols`), whose name, version, n, resolution and metric model every row records.
With a prompt-embedding store (`prompt_store`, a folder `tdm prompt-store` wrote) the models' text encoders
are replaced by the store's rows (`use_prompt_store`), which are the encoders' own outputs.

Writes outputs/evaluate/ (samples_<model>_s<steps>.npz + captioned PNG grids, table.md) and metrics/evaluate.json:
  {"rows": [{"model", "steps", "nfe", "guidance", "n", "samples", "grid", "protocol", "protocol_version",
             "group", "resolution", "metric_model", "metrics": {...}, ["lora_scale", "recipe"]}, ...],
   "metrics_skipped": {metric: why}, "protocol": {...}}
(rows: `tdm.evaluation.rows.EvalRow`). `guidance` is the CFG scale the samples reflect: the teacher's sampling
scale, the student's distillation scale (baked in). `nfe` counts network evaluations per sample
(`tdm.evaluation.rows.nfe`): 2 per teacher step under CFG (cond + uncond), 1 per student step; an external
student counts as a teacher (its CFG runs the uncond and cond passes). The teacher
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


def lora_model_name(scale: float) -> str:
    """The model name of the external-student row: "teacher+lora@<scale>" (e.g. teacher+lora@0.125)."""
    return f"teacher+lora@{float(scale):g}"


def plan(cfg: Config, lora_scheduler: str | None = None, lora_flow_shift: float | None = None) -> list[dict]:
    """The rows to sample: (model, folder, steps, guidance, student, file stem; an external student's LoRA,
    scale, scheduler, flow_shift). Checks inputs, no compute. `lora_scheduler` / `lora_flow_shift`: the
    external student's scheduler (`tdm.external.build_scheduler`; None = the teacher's own)."""

    e = cfg.evaluate
    rows = []
    if e.lora is not None and e.teacher is None:
        raise ValueError("evaluate.lora: the LoRA is sampled on top of evaluate.teacher, which is null; set "
                         "evaluate.teacher to the model the LoRA was trained on (or evaluate.lora=null)")
    try:
        teacher = _model_folder(e.teacher, "teacher")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (evaluate.lora is applied to it)" if e.lora is not None else err) from None
    if teacher is not None:
        guidance = e.teacher_guidance if e.teacher_guidance is not None else cfg.sample.guidance
        # The quality-vs-NFE curve: the teacher's DDIM at each `teacher_curve` count and at teacher_steps (the
        # reference row every table compares against stays in).
        for steps in sorted({*e.teacher_curve, e.teacher_steps or cfg.sample.steps}):
            rows.append({"model": "teacher", "folder": teacher, "steps": steps, "guidance": guidance,
                         "student": False, "sample_guidance": guidance, "stem": f"teacher_s{steps}"})
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
                         "guidance_schedule": list(record.guidance_schedule) if record.guidance_schedule else None,
                         "student": True, "sample_guidance": 1.0, "stem": f"student_s{k}"})
    if e.lora is not None:
        scale = float(e.lora_scale)
        rows.append({"model": lora_model_name(scale), "folder": teacher, "steps": e.lora_steps,
                     "guidance": e.lora_guidance, "student": False, "sample_guidance": e.lora_guidance,
                     "stem": f"teacher_lora{scale:g}_s{e.lora_steps}", "lora": str(e.lora), "lora_scale": scale,
                     "scheduler": lora_scheduler, "flow_shift": lora_flow_shift})
    return rows


# check_external's error prefixes -> the evaluate keys they concern.
_EXTERNAL_KEYS = {"model": "evaluate.teacher", "lora": "evaluate.lora", "lora_scale": "evaluate.lora_scale",
                  "scheduler": "evaluate.lora_scheduler", "flow_shift": "evaluate.lora_flow_shift"}


def check_lora(row: dict) -> None:
    """The external-student row's inputs, from files only (`tdm.external.check_external`: the teacher's family
    has a reproduced stock loop, the LoRA parses, the scale, the scheduler fits the teacher); errors name the
    evaluate key (evaluate.teacher / lora / lora_scale / lora_scheduler / lora_flow_shift)."""
    from safetensors import SafetensorError

    from tdm.external import check_external

    try:
        check_external(row["folder"], row["lora"], row["lora_scale"], row["scheduler"], row["flow_shift"])
    except SafetensorError as err:  # a file that is no safetensors file (check_external lets it through)
        raise ValueError(f"evaluate.lora: {row['lora']}: not a readable safetensors file ({err})") from None
    except (FileNotFoundError, ValueError) as err:
        text = str(err)
        head, sep, rest = text.partition(": ")
        if sep and head in _EXTERNAL_KEYS:
            text = f"{_EXTERNAL_KEYS[head]}: {rest}"
        elif sep and head == str(row["scheduler"]):
            text = f"evaluate.lora_scheduler: {text}"
        else:
            text = f"evaluate.lora: {text}"
        raise type(err)(text) from None


def prompt_store_folders(rows: list[dict]) -> list[Path]:
    """The model folders whose text encoders the prompts go through: each distinct folder of `rows`."""
    return list(dict.fromkeys(Path(r["folder"]) for r in rows))


def check_prompt_store(store: str | Path, rows: list[dict], prompts: list[str],
                       key: str = "evaluate.prompt_store") -> None:
    """Before any model loads: the store opens, was made from each sampled model's text encoders in the dtype
    evaluate loads them (the folder's own: `tdm.backbones.stored_prompts.open_for`), and holds every prompt and
    "" (CFG's unconditional row is its null entry). Errors (FileNotFoundError / KeyError / ValueError, incl.
    StoreMismatch) are prefixed by `key`."""
    from tdm.backbones.stored_prompts import open_for

    if not Path(store).expanduser().is_dir():
        raise FileNotFoundError(f"{key}: not a folder: {store} (run `tdm prompt-store` first?)")
    for folder in prompt_store_folders(rows):
        open_for(Path(store).expanduser(), folder, None, prompts, key=key)


def use_prompt_store(backbone, store: str | Path | None):
    """`backbone` reading its prompts' conditioning from `store` (None: unchanged): the whole fingerprint is
    checked against the model (`tdm.backbones.stored_prompts.attach`, StoreMismatch naming the difference);
    returns the backbone. The rows are the encoders' own outputs, so samples equal those without the store on
    the device the store was written on."""
    if store is None:
        return backbone
    from tdm.backbones.stored_prompts import attach

    attach(backbone, Path(store).expanduser())
    return backbone


def check_inputs(cfg: Config, prompt_store: str | Path | None = None, lora_scheduler: str | None = None,
                 lora_flow_shift: float | None = None) -> list[dict]:
    """Everything the stage reads, checked before any model is built; errors name the key: the rows to sample
    (`plan`: model folders, the student's record and its K, the external student's LoRA / scale / scheduler),
    each model's weights, the LoRA-transfer manifest, the prompts and the prompt store. Returns the plan.
    Raises FileNotFoundError, KeyError or ValueError."""
    from tdm.backbones import check_model

    from tdm.evaluation import protocols

    rows = plan(cfg, lora_scheduler, lora_flow_shift)
    protocol = protocols.load(cfg)
    for key, folder in (("teacher", cfg.evaluate.teacher), ("student", cfg.evaluate.student)):
        if folder is not None:
            try:
                check_model(folder)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"evaluate.{key}: {err}") from None
            except ValueError as err:
                raise ValueError(f"evaluate.{key}: {err}") from None
    for row in rows:
        if row.get("lora") is not None:
            check_lora(row)
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
        prompts = prompt_list(cfg, protocol)
        if prompt_store is not None:
            check_prompt_store(prompt_store, rows, prompts)
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


def _load(r: dict, device: str, prompt_store: str | Path | None):
    """The model a planned row samples: a Student, a teacher Backbone or an ExternalStudent, on `device`."""
    from tdm.backbones import load_backbone
    from tdm.student import load_student

    if r.get("lora") is not None:
        from tdm.external import load_external

        external = load_external(r["folder"], r["lora"], r["lora_scale"], r["scheduler"], r["flow_shift"])
        use_prompt_store(external.backbone, prompt_store)
        return external.to(device)
    if r["student"]:
        student = load_student(r["folder"])
        use_prompt_store(student.backbone, prompt_store)
        return student.to(device)
    return load_backbone(r["folder"], prompt_store=prompt_store).to(device)


def sample_row(r: dict, model, prompts: list[str], seed: int, batch_size: int, progress: bool = False):
    """The samples of one planned row (`plan`), uint8 (N, H, W, C) (videos (N, F, H, W, C)), from
    `tdm.sampler.make_noise(N, shape, seed)` like every row: the student along its K-step trajectory, the
    teacher by DDIM + CFG, the external student by its stock pipeline loop (`tdm.external.sample_external`)."""
    from tdm.sampler import sample_student, sample_teacher

    common = {"seed": seed, "batch_size": batch_size, "progress": progress}
    if r.get("lora") is not None:
        from tdm.external import sample_external

        return sample_external(model, prompts, steps=r["steps"], guidance=r["sample_guidance"], **common)
    if r["student"]:
        return sample_student(model, prompts, k=r["steps"], **common)
    return sample_teacher(model, model.net, prompts, steps=r["steps"], guidance=r["sample_guidance"], **common)


def external_recipe(r: dict, model) -> dict:
    """What reproduces an external row's samples in a stock pipeline (JSON-safe): teacher folder, LoRA, scale,
    steps, guidance, the scheduler class and config (`tdm.external.ExternalStudent.recipe`)."""
    from tdm.external import recipe_json

    return {"teacher": str(r["folder"]), **json.loads(recipe_json(model, r["steps"], r["sample_guidance"]))}


def run(cfg: Config, paths: StagePaths | None = None, progress: bool = True, prompt_store: str | Path | None = None,
        lora_scheduler: str | None = None, lora_flow_shift: float | None = None) -> dict:
    """The stage: returns (and writes to metrics/evaluate.json) {"rows": [...], "metrics_skipped": {...}}.
    `prompt_store`: a prompt-embedding store folder the models read their prompts' conditioning from instead of
    their text encoders (checked first: `check_prompt_store`); `lora_scheduler` / `lora_flow_shift`: the
    external student's scheduler (`plan`)."""
    import torch

    from tdm.evaluation.runner import Evaluator, MetricSettings, score_sets
    from tdm.evaluation.table import markdown_table

    paths = paths or StagePaths.of(STAGE)
    e = cfg.evaluate
    start = time.perf_counter()
    # Everything that can fail without compute fails here: folders, manifest, protocol files, prompts, weights.
    from tdm.evaluation import protocols
    from tdm.evaluation.grids import save_grid

    to_sample = plan(cfg, lora_scheduler, lora_flow_shift)
    protocol = protocols.load(cfg)
    transfer = read_manifest(e.lora_manifest)
    prompts = prompt_list(cfg, protocol) if to_sample else []
    for r in to_sample:
        if r.get("lora") is not None:
            check_lora(r)
    if prompt_store is not None and to_sample:
        check_prompt_store(prompt_store, to_sample, prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluator = Evaluator(metric_names(cfg, protocol), MetricSettings.from_config(cfg, e.fid_reference, device),
                          skip_missing=e.skip_missing)

    scored_by_row: dict[int, list[EvalRow]] = {}
    out_dir = paths.out_dir
    with atomic_folder(out_dir) as tmp:
        reference = None
        if protocol is not None and protocol.reference_files and to_sample:
            # The drawn reference images, resized as the protocol states (the FID reference), built once.
            reference = str(protocols.reference_folder(protocol, Path(cfg.eval.weights_dir) / "protocol_refs"))
        # The external student first: a LoRA whose modules the teacher lacks fails at load, before any sampling.
        order = sorted(range(len(to_sample)), key=lambda i: to_sample[i].get("lora") is None)
        loaded: dict[tuple, object] = {}
        for i in order:
            r = to_sample[i]
            key = (r["folder"], r["student"], r.get("lora"), r.get("lora_scale"))
            if key not in loaded:
                loaded.clear()  # one model in memory at a time
                loaded[key] = _load(r, device, prompt_store)
            model = loaded[key]
            t0 = time.perf_counter()
            images = sample_row(r, model, prompts, cfg.sample.seed, cfg.sample.batch_size, progress)
            sample_time = round(time.perf_counter() - t0, 2)
            name = f"samples_{r['stem']}.npz"
            save_samples(tmp / name, images, prompts, steps=r["steps"], guidance=r["sample_guidance"])
            images = images.numpy()
            save_grid(tmp / Path(name).with_suffix(".png"), images, prompts)  # captioned, upscaled, separated
            external = r.get("lora") is not None
            base = EvalRow(model=r["model"], steps=r["steps"], nfe=nfe(r["steps"], r["guidance"], r["student"]),
                           guidance=r["guidance"], guidance_schedule=r.get("guidance_schedule"),
                           samples=str(out_dir / name), sample_time_s=sample_time,
                           grid=str(out_dir / Path(name).with_suffix(".png")),
                           lora_scale=r["lora_scale"] if external else None,
                           recipe=external_recipe(r, model) if external else None)
            scored_by_row[i] = score_rows(base, images, prompts, evaluator, protocol, reference,
                                          prompt_source=str(e.prompts))
        loaded.clear()
        rows = [row for i in range(len(to_sample)) for row in scored_by_row[i]]
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
