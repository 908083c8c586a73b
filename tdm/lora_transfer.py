"""The lora_transfer stage: the TDM student's LoRA on custom models of its base's family.

For each custom model: its own samples at its usual many-step setting (DDIM + CFG) and at few-step DDIM, and
custom + TDM LoRA at the student's K steps (no CFG: it is baked into the LoRA). The sample archives and
`outputs/lora_transfer/manifest.json` go to `tdm evaluate`; the stage also scores digits rows itself
(metrics/lora_transfer.json, laid out as metrics/evaluate.json: rows with a `metrics` dict).

On the digits default a custom model is named "digits:<style>": the LoRA's base fine-tuned for a few hundred
steps on restyled digits (tdm.data.digits_style), cached under outputs/lora_transfer/custom/<style>/. Its rows
are scored against the same style's held-out images: FID and class accuracy in the feature space of the digits
metric classifier trained on that style (the plain one reads thick strokes at 71%, inverted digits at 14%).
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
    if (folder / RECORD_FILE).is_file():
        record = StudentRecord.load(folder)
    elif lt.steps is None or lt.total_steps is None:
        key = "lora_transfer.total_steps" if lt.total_steps is None else "lora_transfer.steps"
        raise ValueError(f"params.yaml: {key}: not set and no {RECORD_FILE} in {folder} (set it, or "
                         f"lora_transfer.student)")
    else:
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


def check_inputs(cfg: Config) -> dict:
    """Everything the stage reads, checked before any model is built; errors name the key."""
    from tdm.backbones import resolve_model_path

    lt = cfg.lora_transfer
    if not Path(lt.lora).exists():
        raise FileNotFoundError(f"params.yaml: lora_transfer.lora: not found: {lt.lora} (run `tdm distill` in LoRA "
                                f"mode, or `tdm lora extract` for a full-mode student)")
    record = student_record(cfg)
    if any(m.startswith("digits:") for m in lt.custom_models):
        try:
            resolve_model_path(transfer_base(cfg, record))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"params.yaml: lora_transfer.base: {err}") from None
    for name in lt.custom_models:
        if not name.startswith("digits:"):
            try:
                resolve_model_path(name)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"params.yaml: lora_transfer.custom_models: {err}") from None
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


# -- scoring (digits) -----------------------------------------------------------------------------------------------
def style_classifier(style: str, weights_dir: str | Path, epochs: int = 25, seed: int = 0):
    """The digits metric classifier (tdm.evaluation.digits.DigitClassifier) trained on the style's train split,
    so FID features and class accuracy mean the same for a style as for plain digits (the plain classifier reads
    thick strokes at 71% and inverted digits at 14%). Trained once (seconds) and cached in `weights_dir`."""
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from tdm.artifacts import atomic_write_file
    from tdm.data import digits_split, digits_style
    from tdm.evaluation.digits import CLASSIFIER_VERSION, DigitClassifier, quantize

    path = Path(weights_dir) / f"digit_classifier-{CLASSIFIER_VERSION}-style-{style}-seed{seed}.safetensors"
    with torch.random.fork_rng(devices=[]):  # layer init must not move the caller's random state
        torch.manual_seed(seed)
        model = DigitClassifier()
    if path.is_file():
        model.load_state_dict(load_file(path))
        return model.eval()
    x, y = digits_split("train")
    x = quantize(digits_style(x, style))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), 64):
            idx = order[start:start + 64]
            # Random +-1 pixel shifts (edge-replicated, so any background colour survives).
            dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
            batch = F.pad(x[idx], (1, 1, 1, 1), mode="replicate")[:, :, dy:dy + 8, dx:dx + 8]
            loss = F.cross_entropy(model(batch), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_file(path, lambda tmp: save_file(state, tmp))
    return model


class StyleScorer:
    """FID against a style's held-out set and class accuracy, in the feature space of a digit classifier
    trained on that style."""

    def __init__(self, style: str, weights_dir: str | Path):
        from tdm.data import digits_split, digits_style

        self.style = style
        self.classifier = style_classifier(style, weights_dir)
        self.reference = self._features(style_reference(style))
        test_labels = digits_split("test")[1]
        self.real_accuracy = self._accuracy(style_reference(style), test_labels.tolist())
        self._train = digits_style(digits_split("train")[0], style)

    @torch.no_grad()
    def _features(self, images: np.ndarray) -> np.ndarray:
        from tdm.evaluation.digits import images_to_tensor, quantize

        return self.classifier.features(quantize(images_to_tensor(images))).double().numpy()

    def _accuracy(self, images: np.ndarray, labels: list) -> float | None:
        from tdm.evaluation.digits import class_accuracy, images_to_tensor

        keep = [i for i, label in enumerate(labels) if label is not None]
        if not keep:
            return None
        return class_accuracy(images_to_tensor(images)[keep], torch.tensor([labels[i] for i in keep]), self.classifier)

    def score(self, images: np.ndarray, prompts: list[str]) -> dict:
        from tdm.data import label_from_prompt
        from tdm.evaluation.digits import frechet_distance

        return {"fid": frechet_distance(self._features(images), self.reference),
                "accuracy": self._accuracy(images, [label_from_prompt(p) for p in prompts]), "n": len(images)}

    def floor(self, n: int) -> float:
        """FID of n real styled train images vs the held-out set: where a perfect generator would sit."""
        from tdm.backbones.base import to_uint8
        from tdm.evaluation.digits import frechet_distance

        pick = np.sort(np.random.default_rng(0).permutation(len(self._train))[:min(n, len(self._train))])
        return frechet_distance(self._features(to_uint8(self._train[pick]).numpy()), self.reference)


# -- the stage ------------------------------------------------------------------------------------------------------
def with_lora(backbone, lora: LoRA, record: StudentRecord, student: Path) -> Student:
    """The student on a custom model: a copy of its denoiser with the LoRA fused in at `record.lora_scale`, on
    the custom model's own backbone; a K-aware (TDM-unify) student's K embedding comes along (it lives beside
    the LoRA's student, not in the LoRA)."""
    net = fuse(copy.deepcopy(backbone.net), lora, record.lora_scale).eval().requires_grad_(False)
    return Student(backbone, net, record, load_k_embedding(student) if record.unify else None)


def transfer_rows(cfg: Config, name: str, model: str | Path, lora: LoRA, record: StudentRecord, prompts: list[str],
                  out_dir: Path, reference: str | None, progress: bool) -> list[dict]:
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
        rows.append({"model": name, "steps": steps, "nfe": steps * (2 if guidance > 1 else 1), "guidance": guidance,
                     "samples": str(path), "reference": reference, "sample_time_s": round(time.perf_counter() - t0, 2)})
    student = with_lora(backbone, lora, record, student_folder(cfg))
    k = record.k
    t0 = time.perf_counter()
    images = sample_student(student, prompts, k=k, **common)
    path = save_samples(out_dir / f"{slug}{LORA_SUFFIX}_k{k}.npz", images, prompts, steps=k, scale=lt.scale)[0]
    rows.append({"model": name + LORA_SUFFIX, "steps": k, "nfe": k, "guidance": 1.0, "lora_scale": lt.scale,
                 "samples": str(path), "reference": reference, "sample_time_s": round(time.perf_counter() - t0, 2)})
    return rows


def score_rows(cfg: Config, rows: list[dict], styles: dict[str, str]) -> tuple[list[dict], dict]:
    """Each row with its digits `metrics` (FID vs the style's held-out set, class accuracy; {} for models
    without a reference set: `tdm evaluate` scores those), and per style the real images' reference points."""
    from tdm.artifacts import load_samples

    scored, references, scorers = [], {}, {}
    for row in rows:
        custom = row["model"].removesuffix(LORA_SUFFIX)
        style = styles.get(custom)
        metrics = {}
        if style is not None:
            if style not in scorers:
                scorer = scorers[style] = StyleScorer(style, cfg.eval.weights_dir)
                references[custom] = {"real_accuracy": scorer.real_accuracy,
                                      "fid_floor": scorer.floor(cfg.lora_transfer.n)}
            images, prompts = load_samples(row["samples"])
            metrics = scorers[style].score(images, prompts)
        scored.append({**row, "metrics": metrics})
    return scored, references


def run(cfg: Config, paths: StagePaths | None = None, progress: bool = True) -> dict:
    """The lora_transfer stage: rows for every custom model, the manifest for `tdm evaluate`, digits metrics."""
    from tdm.data import digit_prompt_set, read_prompts

    paths = paths or StagePaths.of(STAGE)
    lt = cfg.lora_transfer
    record = check_inputs(cfg)
    base = transfer_base(cfg, record)
    lora = load_lora(lt.lora)
    listed = None if lt.prompts == "digits" else read_prompts(lt.prompts)
    prompts = digit_prompt_set(lt.n, seed=lt.seed) if listed is None else [listed[i % len(listed)] for i in range(lt.n)]
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
    write_json(paths.out_dir / "manifest.json", {"rows": rows, "lora": str(lt.lora), "scale": lt.scale,
                                                 "student_steps": record.k, "total_steps": record.total_steps})
    scored, references = score_rows(cfg, rows, styles)
    # The layout of metrics/evaluate.json (rows with a `metrics` dict), so tracking and reports read both alike.
    metrics = {"rows": scored, "references": references, "lora_scale": lt.scale,
               "stage_time_s": round(time.perf_counter() - t0, 2)}
    write_json(paths.metrics, metrics)
    return metrics


__all__ = ["run", "check_inputs", "digits_custom_model", "style_reference", "style_classifier", "StyleScorer",
           "transfer_rows", "score_rows", "write_style_folder", "with_lora"]
