"""The metric runner: load each requested metric once, score sample sets into rows (tdm.evaluation.rows).

Metric names (the `evaluate.metrics` list):
  digits_fid      FID in the digit classifier's feature space   -> fid_digits, fid_digits_floor
  class_accuracy  does the sample show the prompted digit        -> class_accuracy
  digits_view2    the second, independent digits view (#17): KID in the first classifier's features, and FID /
                  KID / class accuracy in a second classifier (an MLP, seed 1: digits.SECOND_VIEW)
                                                                 -> kid_digits, fid_digits_mlp(_floor), kid_digits_mlp,
                                                                    class_accuracy_mlp
  hps             HPSv2.1 (x 100)                                -> hps
  aesthetic       LAION aesthetic predictor                      -> aesthetic
  clip            CLIP score (x 100)                             -> clip_score
  fid             Inception FID against a reference folder/npz   -> fid
  vbench_<dim>    a VBench dimension on video sets (N x T x H x W x C), in VBench's own venv -> vbench_<dim>
A metric whose weights are missing raises `MissingWeights` when the Evaluator is built (before any sampling);
with `skip_missing=True` it is recorded in `skipped` instead.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tdm.evaluation import DIGITS_METRICS, IMAGE_METRICS, METRICS, is_metric  # noqa: F401 (re-exported)
from tdm.evaluation.rows import EvalRow, nfe
from tdm.evaluation.weights import MissingWeights, default_device


@dataclass(frozen=True)
class MetricSettings:
    weights_dir: str
    device: str = "cpu"
    hps_version: str = "v2.1"
    clip_model: str = "ViT-g-14:laion2b_s12b_b42k"
    aesthetic_clip_model: str = "ViT-L-14:openai"
    fid_reference: str | None = None
    vbench_venv: str = ".venv-vbench"
    hps_arch: str | None = None  # None: tdm.evaluation.hps.ARCH (ViT-H-14, the only architecture HPS ships)

    @classmethod
    def from_config(cls, cfg, fid_reference: str | None = None, device: str | None = None) -> MetricSettings:
        e = cfg.eval
        return cls(weights_dir=e.weights_dir, device=device or default_device(), hps_version=e.hps_version,
                   clip_model=e.clip_model, aesthetic_clip_model=e.aesthetic_clip_model, fid_reference=fid_reference,
                   vbench_venv=e.vbench_venv, hps_arch=getattr(e, "hps_arch", None))

    def metric_model(self, name: str) -> str:
        """The networks behind metric `name`, as rows record them (`EvalRow.metric_model`)."""
        if name in ("digits_fid", "class_accuracy"):
            return "digit classifier v1 (tdm.evaluation.digits)"
        if name == "digits_view2":
            from tdm.evaluation.digits import MLP_VERSION, SECOND_VIEW

            return (f"digit {SECOND_VIEW['arch']} {MLP_VERSION} seed {SECOND_VIEW['seed']} + KID "
                    f"(tdm.evaluation.digits.SECOND_VIEW)")
        if name == "hps":
            from tdm.evaluation import hps

            return f"HPS {self.hps_version} (open_clip {self.hps_arch or hps.ARCH})"
        if name == "aesthetic":
            return f"LAION aesthetic MLP on {self.aesthetic_clip_model}"
        if name == "clip":
            return f"CLIP {self.clip_model}"
        if name == "fid":
            return "Inception-v3 pool3 (torch-fidelity 2015-12-05)"
        if name.startswith("vbench_"):
            return "VBench 0.1.5"
        raise ValueError(f"unknown metric {name!r}")


class _Digits:
    """A metric of the digits scorer (tdm.evaluation.digits.DigitsScorer, plain digits)."""

    def __init__(self, weights_dir: str | Path) -> None:
        from tdm.evaluation.digits import DigitsScorer

        self.scorer = DigitsScorer(weights_dir)


class DigitsFID(_Digits):
    """FID in the digit classifier's feature space: against the held-out split (with the real-data floor at
    the same n), or against a row's own reference images."""

    name = "digits_fid"

    def __call__(self, images: np.ndarray, prompts: Sequence[str], reference=None) -> dict:
        if reference is not None:  # a row's own reference images (e.g. the LoRA-transfer target model's)
            from tdm.artifacts import load_samples

            return {"fid_digits": self.scorer.fid(images, reference=load_samples(reference)[0])}
        return {"fid_digits": self.scorer.fid(images), "fid_digits_floor": self.scorer.floor(len(images))}


class ClassAccuracy(_Digits):
    """Fraction of samples whose prompt names a digit that the classifier sees; None when no prompt does."""

    name = "class_accuracy"

    def __call__(self, images: np.ndarray, prompts: Sequence[str], reference=None) -> dict:
        return {"class_accuracy": self.scorer.accuracy(images, prompts)}


class DigitsSecondView:
    """The second digits view (issue #17: a claim counts when both views agree): KID (unbiased cubic-kernel MMD^2,
    Binkowski et al. 2018) in the first classifier's features, and FID / KID / class accuracy in the second
    classifier (`tdm.evaluation.digits.SECOND_VIEW`: another architecture, another seed, its own cache)."""

    name = "digits_view2"

    def __init__(self, weights_dir: str | Path) -> None:
        from tdm.evaluation.digits import SECOND_VIEW, DigitsScorer

        self.first, self.second = DigitsScorer(weights_dir), DigitsScorer(weights_dir, **SECOND_VIEW)

    def __call__(self, images: np.ndarray, prompts: Sequence[str], reference=None) -> dict:
        if reference is not None:
            from tdm.artifacts import load_samples

            ref = load_samples(reference)[0]
            return {"kid_digits": self.first.kid(images, reference=ref),
                    "fid_digits_mlp": self.second.fid(images, reference=ref),
                    "kid_digits_mlp": self.second.kid(images, reference=ref)}
        return {"kid_digits": self.first.kid(images), "fid_digits_mlp": self.second.fid(images),
                "fid_digits_mlp_floor": self.second.floor(len(images)), "kid_digits_mlp": self.second.kid(images),
                "class_accuracy_mlp": self.second.accuracy(images, prompts)}


class VBenchDimension:
    """One VBench dimension on a video set; the subprocess starts per call (a few seconds of imports)."""

    def __init__(self, dimension: str, s: MetricSettings) -> None:
        from tdm.evaluation.vbench import check_dimensions, vbench_python

        vbench_python(s.vbench_venv)
        check_dimensions([dimension], s.weights_dir)  # missing weights fail now, not after sampling
        self.dimension, self.settings = dimension, s
        self.name = f"vbench_{dimension}"

    def __call__(self, videos: np.ndarray, prompts: Sequence[str], reference=None) -> dict:
        from tdm.evaluation.vbench import run_vbench

        if np.asarray(videos).ndim != 5:
            raise ValueError(f"{self.name} scores videos (N x T x H x W x C), got shape {np.shape(videos)}")
        out = run_vbench([self.dimension], self.settings.weights_dir, self.settings.vbench_venv, videos=videos,
                         prompts=list(prompts), device=self.settings.device)
        return {self.name: out["scores"][self.dimension]}


def load_metric(name: str, s: MetricSettings) -> Callable:
    """Build one metric (loading its weights); MissingWeights if they are not on disk."""
    if name == "digits_fid":
        return DigitsFID(s.weights_dir)
    if name == "class_accuracy":
        return ClassAccuracy(s.weights_dir)
    if name == "digits_view2":
        return DigitsSecondView(s.weights_dir)
    if name == "hps":
        from tdm.evaluation import hps as hps_module
        from tdm.evaluation.hps import HPS

        return HPS(s.weights_dir, version=s.hps_version, device=s.device, arch=s.hps_arch or hps_module.ARCH)
    if name == "aesthetic":
        from tdm.evaluation.aesthetic import Aesthetic

        return Aesthetic(s.weights_dir, device=s.device, clip_model=s.aesthetic_clip_model)
    if name == "clip":
        from tdm.evaluation.clip_score import ClipScore

        return ClipScore(s.weights_dir, device=s.device, clip_model=s.clip_model)
    if name == "fid":
        from tdm.evaluation.fid import FID

        return FID(s.weights_dir, reference=s.fid_reference, device=s.device)
    if is_metric(name) and name.startswith("vbench_"):
        return VBenchDimension(name[len("vbench_"):], s)
    raise ValueError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")


class Evaluator:
    """Loads `metrics` once; `score(images, prompts, reference)` runs them all on one sample set."""

    def __init__(self, metrics: Sequence[str], settings: MetricSettings, skip_missing: bool = False) -> None:
        unknown = [m for m in metrics if not is_metric(m)]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown} (known: {', '.join(METRICS)}, vbench_<dimension>)")
        self.settings = settings
        self.metrics: dict[str, Callable] = {}
        self.skipped: dict[str, str] = {}
        for name in dict.fromkeys(metrics):
            try:
                self.metrics[name] = load_metric(name, settings)
            except MissingWeights as err:
                if not skip_missing:
                    raise
                self.skipped[name] = str(err)

    def score(self, images: np.ndarray, prompts: Sequence[str], reference: str | Path | None = None,
              names: Sequence[str] | None = None) -> dict:
        """{metric key: value} of every loaded metric (or of those in `names`) on one sample set."""
        out: dict = {}
        for name, metric in self.metrics.items():
            if names is None or name in names:
                out.update(metric(images, prompts, reference=reference))
        return out

    @property
    def metric_model(self) -> str | None:
        """The networks behind the loaded metrics, one "; "-joined string (None when none loaded)."""
        models = dict.fromkeys(self.settings.metric_model(n) for n in self.metrics)
        return "; ".join(models) or None


# --- sample sets -----------------------------------------------------------------------------

def load_sample_set(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """uint8 N x H x W x C images and their prompts, from a `tdm sample` npz or an image folder (prompts from
    its metadata.jsonl: {"file_name": ..., "text"|"prompt": ...} per line; none = empty prompts)."""
    path = Path(path)
    if path.is_file():
        from tdm.artifacts import load_samples

        return load_samples(path)
    if not path.is_dir():
        raise FileNotFoundError(f"samples not found (an npz or an image folder): {path}")
    from PIL import Image

    from tdm.evaluation.fid import list_images

    files = list_images(path, what="sample folder")
    prompts = {}
    meta = path / "metadata.jsonl"
    if meta.is_file():
        from tdm.data import read_text

        for line in read_text(meta).splitlines():
            if line.strip():
                row = json.loads(line)
                prompts[row["file_name"]] = row.get("text", row.get("prompt", ""))
    def read(f: Path) -> np.ndarray:
        with Image.open(f) as im:  # greyscale stays 1-channel (N x H x W x 1), as `tdm sample` stores digits
            return np.asarray(im.convert("L"))[..., None] if im.mode in ("L", "1") else np.asarray(im.convert("RGB"))

    images = [read(f) for f in files]
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"{path}: images differ in size; resize them to one size first")
    return np.stack(images), [str(prompts.get(str(f.relative_to(path)), "")) for f in files]


def sample_set_meta(path: str | Path) -> dict:
    """steps / guidance recorded in a `tdm sample` npz (empty for folders and other files)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k].item() for k in ("steps", "guidance") if k in z and z[k].ndim == 0}


def resolution_of(images: np.ndarray) -> str:
    """ "HxW" of uint8 N x H x W x C images or N x T x H x W x C videos (`EvalRow.resolution`)."""
    shape = np.shape(images)
    return f"{shape[-3]}x{shape[-2]}"


def score_sets(sets: Sequence[dict], evaluator: Evaluator) -> list[EvalRow]:
    """Rows for sample sets given as {"samples": npz|folder, "model"?, "steps"?, "nfe"?, "guidance"?,
    "reference"?, ...} (e.g. manifest rows); missing fields come from the npz (`tdm sample` records steps and
    guidance) or the path, a missing NFE from `rows.nfe` (a set is taken as a teacher's: a student's npz records
    guidance 1, where the two agree)."""
    rows = []
    for s in sets:
        path = Path(s["samples"])
        images, prompts = load_sample_set(path)
        meta = sample_set_meta(path)
        steps = int(s.get("steps", meta.get("steps", 0)))
        guidance = float(s.get("guidance", meta.get("guidance", 1.0)))
        grid = path.with_suffix(".png")
        rows.append(EvalRow(model=s.get("model", path.stem), steps=steps,
                            nfe=int(s.get("nfe", nfe(steps, guidance, student=False))), guidance=guidance,
                            n=len(images), samples=str(path), grid=str(grid) if grid.is_file() else None,
                            resolution=resolution_of(images), metric_model=evaluator.metric_model,
                            metrics=evaluator.score(images, prompts, reference=s.get("reference"))))
    return rows
