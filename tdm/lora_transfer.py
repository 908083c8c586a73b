"""The lora_transfer stage: the TDM student's LoRA on custom models of its base's family.

For each custom model: its own samples at its usual many-step setting (DDIM + CFG) and at few-step DDIM, and
custom + TDM LoRA at the student's K steps (no CFG: it is baked into the LoRA). The sample archives and
`outputs/lora_transfer/manifest.json` go to `tdm evaluate`; the stage also scores digits rows itself
(metrics/lora_transfer.json, laid out as metrics/evaluate.json: rows with a `metrics` dict).

On the digits default a custom model is named "digits:<style>": the LoRA's base fine-tuned for a few hundred
steps on restyled digits (tdm.data.digits_style), cached under outputs/lora_transfer/custom/<style>/. Its rows
are scored against the same style's held-out images by the digits metric of that style
(`tdm.evaluation.digits.DigitsScorer(weights_dir, style)`: FID and class accuracy in the feature space of the
digit classifier trained on that style; the plain one reads thick strokes at 68%, inverted digits at 15%).
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tdm.artifacts import atomic_folder, save_samples, write_json
from tdm.config import Config, StagePaths
from tdm.evaluation.rows import EvalRow, nfe
from tdm.lora import LoRA, fuse, load_lora
from tdm.student import K_EMBEDDING_FILE, RECORD_FILE, Student, StudentRecord, load_k_embedding

STAGE = "lora_transfer"
LORA_SUFFIX = "+tdm_lora"


# -- inputs ---------------------------------------------------------------------------------------------------------
def student_folder(cfg: Config) -> Path:
    lt = cfg.lora_transfer
    return Path(lt.student) if lt.student is not None else Path(lt.lora).parent / "student"


def student_record(cfg: Config) -> StudentRecord:
    """The distilled student's record (`tdm.student`), with `lora_transfer.steps` / `total_steps` in place of
    its K / grid length when set. A LoRA without a student record (e.g. `tdm lora extract`) needs both keys."""
    lt = cfg.lora_transfer
    folder = student_folder(cfg)
    record = StudentRecord.find(folder)
    if record is None:
        if lt.steps is None or lt.total_steps is None:
            key = "lora_transfer.total_steps" if lt.total_steps is None else "lora_transfer.steps"
            raise ValueError(f"params.yaml: {key}: not set and no {RECORD_FILE} in {folder} (set it, or "
                             f"lora_transfer.student)")
        record = StudentRecord(family=cfg.model.family, k=lt.steps, total_steps=lt.total_steps)
    try:
        record = record.replace(total_steps=lt.total_steps or record.total_steps)
        record.check_k(lt.steps or record.k)
    except ValueError as err:
        raise ValueError(f"params.yaml: lora_transfer.steps: {err}") from None
    return record.replace(k=lt.steps or record.k, lora_scale=lt.scale)


def transfer_base(cfg: Config, record: StudentRecord) -> str:
    """The LoRA's base model: lora_transfer.base, else the student's teacher, else distill.teacher."""
    return cfg.lora_transfer.base or record.teacher or cfg.distill.teacher


def check_inputs(cfg: Config) -> StudentRecord:
    """Everything the stage reads, checked before any model is built; errors name the key. Returns the
    student's record. Raises FileNotFoundError (LoRA, base, custom model or K embedding missing) or ValueError
    (a model folder that does not parse or no adapter runs, a trajectory longer than the base's schedule)."""
    from tdm.backbones import check_model, train_timesteps

    lt = cfg.lora_transfer
    if not Path(lt.lora).exists():
        raise FileNotFoundError(f"params.yaml: lora_transfer.lora: not found: {lt.lora} (run `tdm distill` in LoRA "
                                f"mode, or `tdm lora extract` for a full-mode student)")
    from tdm.backbones import check_safetensors, read_json_file

    lora_path = Path(lt.lora)
    try:  # a truncated or foreign file fails naming it, before any model loads
        if lora_path.is_dir():
            for f in sorted(lora_path.glob("*.safetensors")):
                check_safetensors(f)
            if (lora_path / "adapter_config.json").is_file():
                read_json_file(lora_path / "adapter_config.json")
        elif lora_path.suffix == ".safetensors":
            check_safetensors(lora_path)
    except ValueError as err:
        raise ValueError(f"params.yaml: lora_transfer.lora: {err}") from None
    record = student_record(cfg)

    def checked(name: str, key: str) -> Path:
        try:
            folder, _ = check_model(name)
            return folder
        except FileNotFoundError as err:
            raise FileNotFoundError(f"params.yaml: {key}: {err}") from None
        except ValueError as err:
            raise ValueError(f"params.yaml: {key}: {err}") from None

    models = [(m, "lora_transfer.custom_models") for m in lt.custom_models if not m.startswith("digits:")]
    if any(m.startswith("digits:") for m in lt.custom_models):
        models.insert(0, (transfer_base(cfg, record), "lora_transfer.base"))
    for name, key in models:
        folder = checked(name, key)
        try:
            schedule_len = train_timesteps(folder)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"params.yaml: {key}: {err}") from None
        if record.total_steps > schedule_len:
            where = "lora_transfer.total_steps" if lt.total_steps is not None else f"the student's total_steps"
            raise ValueError(f"params.yaml: {key}: {name} has {schedule_len} training timesteps, fewer than "
                             f"{where} ({record.total_steps})")
    if record.unify and load_k_embedding(student_folder(cfg)) is None:
        raise FileNotFoundError(f"a TDM-unify LoRA needs its student's K embedding: no {K_EMBEDDING_FILE} in "
                                f"{student_folder(cfg)}")
    return record


# -- digits custom models -------------------------------------------------------------------------------------------
def _file_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def write_style_folder(folder: Path, style: str) -> Path:
    """The styled digits train split as an image-caption folder (PNG + metadata.jsonl, every prompt phrasing)."""
    from PIL import Image

    from tdm.backbones.base import to_uint8
    from tdm.data import PROMPT_TEMPLATES, digit_prompt, digits_split, digits_style

    images, labels = digits_split("train")
    pixels = to_uint8(digits_style(images, style)).numpy()[..., 0]
    with atomic_folder(folder) as tmp:
        rows = []
        for i, (im, label) in enumerate(zip(pixels, labels.tolist())):
            name = f"{i:04d}.png"
            Image.fromarray(im).save(tmp / name)
            rows += [json.dumps({"file_name": name, "text": digit_prompt(label, k)}) for k in range(len(PROMPT_TEMPLATES))]
        (tmp / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def digits_custom_model(cfg: Config, style: str, base: str, out_dir: Path, progress: bool) -> Path:
    """The base fine-tuned on `style` digits (teacher_ft's loop, a short run), cached by its recipe."""
    from tdm import teacher_ft
    from tdm.backbones import resolve_model_path
    from tdm.config import parse

    lt = cfg.lora_transfer
    root = out_dir / "custom" / style
    model_dir = root / "model"
    recipe = {"style": style, "base_weights": _file_digest(resolve_model_path(base)), "steps": lt.finetune_steps,
              "lr": lt.finetune_lr, "batch_size": lt.finetune_batch_size, "seed": lt.seed}
    stamp = model_dir / "tdm_custom.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return model_dir
    data = write_style_folder(root / "data", style)
    ft_cfg = parse({
        "model": {"family": "digits", "pretrained": str(base)},
        "teacher_ft": {"data": str(data), "resolution": 8, "steps": lt.finetune_steps, "batch_size": lt.finetune_batch_size,
                       "lr": lt.finetune_lr, "warmup_steps": min(20, lt.finetune_steps // 10), "ema_decay": 0.99,
                       "checkpoint_every": lt.finetune_steps, "seed": lt.seed, "eval_samples": 0},
    }, source=f"lora_transfer fine-tune of digits:{style}")
    paths = StagePaths(root / "train", root / "train" / "metrics.json")
    shutil.rmtree(paths.out_dir / "checkpoints", ignore_errors=True)  # a changed recipe starts fresh
    backbone, ema, result = teacher_ft.train(ft_cfg, paths, progress=progress)
    backbone.save(model_dir, net=ema.averaged_copy(backbone.net), extra_files={"tdm_custom.json": json.dumps(
        {"recipe": recipe, "base": str(base), "train_time_s": round(result.train_time_s, 2),
         "final_loss": result.final_loss}, indent=2)})
    shutil.rmtree(paths.out_dir / "checkpoints", ignore_errors=True)  # the model is the product, not the optimiser
    return model_dir


def style_reference(style: str) -> np.ndarray:
    """The custom style's held-out images (uint8 N x 8 x 8 x 1): the digits test split, restyled."""
    from tdm.backbones.base import to_uint8
    from tdm.data import digits_split, digits_style

    return to_uint8(digits_style(digits_split("test")[0], style)).numpy()


# -- the stage ------------------------------------------------------------------------------------------------------
def with_lora(backbone, lora: LoRA, record: StudentRecord, student: Path) -> Student:
    """The student on a custom model: a copy of its denoiser with the LoRA fused in at `record.lora_scale`, on
    the custom model's own backbone; a K-aware (TDM-unify) student's K embedding comes along (it lives beside
    the LoRA's student, not in the LoRA)."""
    net = fuse(copy.deepcopy(backbone.net), lora, record.lora_scale).eval().requires_grad_(False)
    return Student(backbone, net, record, load_k_embedding(student) if record.unify else None)


def transfer_rows(cfg: Config, name: str, model: str | Path, lora: LoRA, record: StudentRecord, prompts: list[str],
                  out_dir: Path, reference: str | None, progress: bool) -> list[EvalRow]:
    """Sample one custom model three ways; returns the manifest rows (with the npz written)."""
    from tdm.backbones import load_backbone
    from tdm.sampler import sample_student, sample_teacher

    lt = cfg.lora_transfer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(model).to(device)
    lora = lora.resolved(backbone.net)  # a LoRA of another architecture fails here, before sampling
    guidance = lt.custom_guidance if lt.custom_guidance is not None else cfg.sample.guidance
    slug = name.replace(":", "_").replace("/", "--")
    common = {"seed": lt.seed, "batch_size": lt.batch_size, "progress": progress}
    rows = []
    for steps in dict.fromkeys((lt.custom_steps, lt.few_steps)):
        t0 = time.perf_counter()
        images = sample_teacher(backbone, backbone.net, prompts, steps=steps, guidance=guidance, **common)
        path = save_samples(out_dir / f"{slug}_ddim{steps}.npz", images, prompts, steps=steps, guidance=guidance)[0]
        rows.append(EvalRow(model=name, steps=steps, nfe=nfe(steps, guidance, student=False), guidance=guidance,
                            samples=str(path), reference=reference,
                            sample_time_s=round(time.perf_counter() - t0, 2)))
    student = with_lora(backbone, lora, record, student_folder(cfg))
    k = record.k
    t0 = time.perf_counter()
    images = sample_student(student, prompts, k=k, **common)
    path = save_samples(out_dir / f"{slug}{LORA_SUFFIX}_k{k}.npz", images, prompts, steps=k, scale=lt.scale)[0]
    rows.append(EvalRow(model=name + LORA_SUFFIX, steps=k, nfe=nfe(k, 1.0, student=True), guidance=1.0,
                        lora_scale=lt.scale, samples=str(path), reference=reference,
                        sample_time_s=round(time.perf_counter() - t0, 2)))
    return rows


def score_rows(cfg: Config, rows: list[EvalRow], styles: dict[str, str]) -> tuple[list[EvalRow], dict]:
    """Each row with its digits `metrics` (fid against the style's held-out set, class accuracy, n; {} for
    models without a reference set: `tdm evaluate` scores those), and per style the real images' reference
    points (the style classifier's held-out accuracy, the FID floor at the stage's n)."""
    from tdm.artifacts import load_samples
    from tdm.evaluation.digits import DigitsScorer

    scored, references, scorers = [], {}, {}
    for row in rows:
        custom = row.model.removesuffix(LORA_SUFFIX)
        style = styles.get(custom)
        metrics = {}
        if style is not None:
            if style not in scorers:
                scorer = scorers[style] = DigitsScorer(cfg.eval.weights_dir, style)
                references[custom] = {"real_accuracy": scorer.classifier.held_out_accuracy,
                                      "fid_floor": scorer.floor(cfg.lora_transfer.n)}
            score = scorers[style].score(*load_samples(row.samples))
            metrics = {key: score[key] for key in ("fid", "accuracy", "n")}
        scored.append(row.replace(metrics=metrics))
    return scored, references


def run(cfg: Config, paths: StagePaths | None = None, progress: bool = True) -> dict:
    """The lora_transfer stage: rows for every custom model, the manifest for `tdm evaluate`, digits metrics."""
    from tdm.data import prompt_set

    paths = paths or StagePaths.of(STAGE)
    lt = cfg.lora_transfer
    record = check_inputs(cfg)
    base = transfer_base(cfg, record)
    lora = load_lora(lt.lora)
    prompts = prompt_set(lt.prompts, lt.n, seed=lt.seed)
    samples_dir = paths.out_dir / "samples"
    rows, styles, t0 = [], {}, time.perf_counter()
    for name in lt.custom_models:
        reference = None
        if name.startswith("digits:"):
            style = styles[name] = name.split(":", 1)[1]
            model = digits_custom_model(cfg, style, base, paths.out_dir, progress)
            ref_path = paths.out_dir / "references" / f"digits_{style}_test.npz"
            ref_images = style_reference(style)
            from tdm.data import digit_prompt, digits_split

            save_samples(ref_path, ref_images, [digit_prompt(int(y)) for y in digits_split("test")[1]])
            reference = str(ref_path)
        else:
            model = name
        rows += transfer_rows(cfg, name, model, lora, record, prompts, samples_dir, reference, progress)
    write_json(paths.out_dir / "manifest.json", {"rows": [r.to_dict() for r in rows], "lora": str(lt.lora),
                                                 "scale": lt.scale, "student_steps": record.k,
                                                 "total_steps": record.total_steps})
    scored, references = score_rows(cfg, rows, styles)
    # The layout of metrics/evaluate.json (rows with a `metrics` dict), so tracking and reports read both alike.
    metrics = {"rows": [r.to_dict() for r in scored], "references": references, "lora_scale": lt.scale,
               "stage_time_s": round(time.perf_counter() - t0, 2)}
    write_json(paths.metrics, metrics)
    return metrics


__all__ = ["run", "check_inputs", "digits_custom_model", "style_reference", "transfer_rows", "score_rows",
           "write_style_folder", "with_lora"]
