"""The student contract: what a saved TDM student is, and the one way to load and sample it.

A distilled student is a model folder (the family's diffusers layout, LoRA merged in) plus two sidecar files:

  tdm_student.json          the `StudentRecord`: family, K, the grid it was trained on, baked guidance, mode,
                            teacher, LoRA scale (everything `tdm sample`, evaluate, lora-transfer, export and the
                            report need; this module is its only reader)
  k_embedding.safetensors   TDM-unify students only: the K embedding added to the time embedding

`distill` writes both (`StudentRecord.files`); everything else reads them through `StudentRecord.load` /
`load_student`. A loaded `Student` owns its K embedding: the K condition reaches the denoiser's time
embedding through `k_conditioning` only (the same function the training roles use), never through the
backbone.

Old `tdm_student.json` files (no `version`, no `family`; some with only `k` and `total_steps`) still load:
the family is read from the folder's model_index.json and the missing fields take the values the writer of
that era used (no TDM-unify, guidance unknown).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import torch
from torch import nn

from tdm.schedule import StudentGrid

if TYPE_CHECKING:
    from tdm.backbones.base import Backbone, Cond

RECORD_FILE = "tdm_student.json"
K_EMBEDDING_FILE = "k_embedding.safetensors"
RECORD_VERSION = 2  # 2: guidance_schedule


@dataclass(frozen=True)
class StudentRecord:
    """Everything a saved student needs to be sampled or exported (the contents of tdm_student.json).

    The K-step grid is `StudentGrid(total_steps, shift, timesteps).at(K)` (tdm.schedule): uniform 899, 674, 449,
    224 for K = 4 of 900 (the authors' `generate_new`), its shift warp, or an explicit list. `guidance` is the
    CFG scale baked in at distillation (None: not recorded by the tdm that wrote the file), or, when
    `guidance_schedule` is set, the scale baked into each grid step in order (largest t first); the student itself
    samples without CFG. `solver_order` is how it is sampled by default: 1, DDIM between grid points (the
    trajectory TDM trains; what distill writes), or 2, DPM-Solver++(2M) over the same grid (an export choice,
    `tdm export --solver-order 2`; benchmarks/results/student_multistep.md).
    """

    family: str  # backbone family (tdm.backbones.FAMILIES)
    k: int  # the K it was distilled for (a TDM-unify student: its default K)
    total_steps: int  # trajectory length the grid spans (distill.total_steps)
    shift: float = 1.0  # the grid's shift warp (distill.shift)
    explicit_timesteps: tuple[int, ...] | None = None  # an explicit K-step grid (distill.timesteps)
    unify: bool = False  # TDM-unify: K-aware, trained over k_choices
    k_choices: tuple[int, ...] = ()  # the Ks it was trained over ((k,) unless unify)
    guidance: float | None = None  # CFG scale baked in (distill.guidance)
    guidance_schedule: tuple[float, ...] | None = None  # per grid step instead (distill.guidance_schedule; fixed K)
    mode: Literal["lora", "full"] = "full"  # how it was trained (LoRA on a frozen base, or full copies)
    teacher: str | None = None  # the teacher folder / hub id it was distilled from
    lora_scale: float = 1.0  # the strength its LoRA is applied at (1 = as trained)
    solver_order: int = 1  # how it samples its grid: 1 DDIM (as trained), 2 DPM-Solver++(2M) (`tdm export`)
    version: int = field(default=RECORD_VERSION)

    def __post_init__(self):
        if not self.k_choices:
            object.__setattr__(self, "k_choices", (self.k,))
        object.__setattr__(self, "k_choices", tuple(int(k) for k in self.k_choices))
        if not 1 <= self.k <= self.total_steps:
            raise ValueError(f"{RECORD_FILE}: k: must be in [1, total_steps={self.total_steps}], got {self.k}")
        if self.mode not in ("lora", "full"):
            raise ValueError(f"{RECORD_FILE}: mode: must be 'lora' or 'full', got {self.mode!r}")
        if isinstance(self.solver_order, bool) or self.solver_order not in (1, 2):
            raise ValueError(f"{RECORD_FILE}: solver_order: must be 1 (DDIM) or 2 (DPM-Solver++(2M)), got "
                             f"{self.solver_order!r}")
        if self.explicit_timesteps is not None:
            object.__setattr__(self, "explicit_timesteps", tuple(int(t) for t in self.explicit_timesteps))
        if self.guidance_schedule is not None:
            object.__setattr__(self, "guidance_schedule", tuple(float(w) for w in self.guidance_schedule))
            if len(self.guidance_schedule) != self.k or self.unify:
                raise ValueError(f"{RECORD_FILE}: guidance_schedule: one CFG scale per step of a fixed-K student "
                                 f"(k = {self.k}, unify = {self.unify}), got {list(self.guidance_schedule)}")
        try:
            self.grid.at(self.k)
        except ValueError as err:
            raise ValueError(f"{RECORD_FILE}: {err}") from None

    @property
    def grid(self) -> StudentGrid:
        return StudentGrid(self.total_steps, self.shift, self.explicit_timesteps)

    @property
    def guidance_label(self) -> str | None:
        """The baked-in CFG as text: "2" or, with a per-step schedule, "3, 1, 1, 1 per step" (None: not recorded)."""
        if self.guidance_schedule is not None:
            return ", ".join(f"{w:g}" for w in self.guidance_schedule) + " per step"
        return None if self.guidance is None else f"{self.guidance:g}"

    # -- what it samples --------------------------------------------------------------------------------------
    @property
    def sampling_ks(self) -> tuple[int, ...]:
        """The step counts it was trained to sample at: every K of k_choices (TDM-unify), else its K."""
        return tuple(sorted(set(self.k_choices))) if self.unify else (self.k,)

    def check_k(self, k: int) -> None:
        """ValueError unless the student can honour `k` steps (a K-aware student: k <= max(k_choices), the
        rows its K embedding has)."""
        if not 1 <= k <= self.total_steps:
            raise ValueError(f"steps: must be in [1, total_steps={self.total_steps}], got {k}")
        self.grid.at(k)  # an explicit grid serves its own K only
        if self.unify and k > max(self.k_choices):
            raise ValueError(f"steps: this TDM-unify student knows K up to {max(self.k_choices)} (trained on "
                             f"{list(self.k_choices)}), got {k}")

    def timesteps(self, k: int | None = None) -> torch.Tensor:
        """The student's grid at `k` steps (default its K): int64, descending (B = k entries)."""
        k = self.k if k is None else k
        self.check_k(k)
        return self.grid.at(k)

    # -- files --------------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def files(self, k_embedding: nn.Embedding | None = None) -> dict[str, str | bytes]:
        """{file name: contents} of the sidecars, for `Backbone.save(extra_files=...)` (written atomically
        with the model folder). ValueError when a K-aware record comes without its embedding or vice versa."""
        if self.unify != (k_embedding is not None):
            raise ValueError("a TDM-unify student needs its K embedding, and only a TDM-unify student has one")
        out: dict[str, str | bytes] = {RECORD_FILE: self.to_json()}
        if k_embedding is not None:
            from safetensors.torch import save

            out[K_EMBEDDING_FILE] = save({"weight": k_embedding.weight.detach().cpu().contiguous()})
        return out

    @classmethod
    def load(cls, folder: str | Path) -> StudentRecord:
        """The record of the student in `folder`. FileNotFoundError when there is none; ValueError naming the
        key when it is malformed or written by a newer tdm."""
        path = Path(folder) / RECORD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"not a distilled student (no {RECORD_FILE}): {folder}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        version = raw.get("version", 0)
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise ValueError(f"{path}: version: {version!r} is newer than this tdm reads ({RECORD_VERSION}); "
                             f"upgrade tdm")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(raw.keys() - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} (known: {sorted(known)})")
        for key in ("k", "total_steps"):
            if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool):
                raise ValueError(f"{path}: {key}: missing or not an integer ({raw.get(key)!r})")
        if "family" not in raw:  # version 0 (before the record was typed): the folder says what it is
            from tdm.backbones import family_of

            if not (Path(folder) / "model_index.json").is_file():
                raise ValueError(f"{path}: family: missing, and no model_index.json beside it to read it from")
            raw["family"] = family_of(folder)
        raw["version"] = RECORD_VERSION
        raw["k_choices"] = tuple(raw.get("k_choices") or ())
        for key in ("explicit_timesteps", "guidance_schedule"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        try:
            return cls(**raw)
        except TypeError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def find(cls, folder: str | Path) -> StudentRecord | None:
        """The record in `folder`, or None when the folder holds none (a plain model, a LoRA alone)."""
        return cls.load(folder) if (Path(folder) / RECORD_FILE).is_file() else None

    def replace(self, **changes) -> StudentRecord:
        return dataclasses.replace(self, **changes)


def load_k_embedding(folder: str | Path) -> nn.Embedding | None:
    """The K embedding saved beside a TDM-unify student (frozen, (k_max + 1, D)); None when there is none."""
    path = Path(folder) / K_EMBEDDING_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return nn.Embedding.from_pretrained(load_file(path)["weight"], freeze=True)


@contextlib.contextmanager
def k_conditioning(backbone: Backbone, net: nn.Module, embedding: nn.Embedding | None,
                   k: torch.Tensor | None) -> Iterator[None]:
    """While active, `embedding(k)` (k: (B,) int64 step counts) is added to `net`'s time embedding: how a
    K-aware (TDM-unify) network is told how many steps it takes. A no-op when either is None. The one path
    for K into a denoiser, used by the training roles and by loaded students alike."""
    if embedding is None or k is None:
        yield
        return
    with backbone.time_offset(net, embedding(k.to(embedding.weight.device))):
        yield


@dataclass
class Student:
    """A loaded student: the backbone it runs on (encoders, VAE, schedule), its denoiser, its record and, when
    K-aware, its K embedding. `net` may differ from `backbone.net` (e.g. a custom model with the TDM LoRA
    fused in, sampled on that model's backbone)."""

    backbone: Backbone
    net: nn.Module
    record: StudentRecord
    k_embedding: nn.Embedding | None = None

    def __post_init__(self):
        if self.record.unify and self.k_embedding is None:
            raise ValueError("a TDM-unify student needs its K embedding (k_embedding.safetensors)")
        if self.k_embedding is not None:
            self.k_embedding = self.k_embedding.to(self.backbone.device)

    def to(self, device: torch.device | str) -> Student:
        self.backbone.to(device)
        self.net.to(device)
        if self.k_embedding is not None:
            self.k_embedding = self.k_embedding.to(device)
        return self

    @torch.no_grad()
    def sample(self, cond: Cond, noise: torch.Tensor, k: int | None = None,
               solver_order: int | None = None) -> torch.Tensor:
        """x0 (the denoiser's space, like `noise`: (B, ...)) of the K-step trajectory from `noise`; `k` and
        `solver_order` (1 DDIM, 2 DPM-Solver++(2M)) default to the record's. ValueError when the student
        cannot honour `k` or the order is neither."""
        from tdm.sampler import student_sample

        k = self.record.k if k is None else k
        order = self.record.solver_order if solver_order is None else solver_order
        return student_sample(self.backbone, self.net, cond, noise, self.record.timesteps(k), self.k_embedding,
                              solver_order=order)


def load_student(folder: str | Path, dtype: torch.dtype | None = None,
                 prompt_store: str | Path | None = None) -> Student:
    """A distilled student folder (`outputs/distill/student`) as a `Student`. FileNotFoundError / ValueError
    (naming the file) before any weights load when the record or the K embedding is missing or malformed.
    `prompt_store`: a `tdm prompt-store` folder read instead of the text encoders (never built; `load_backbone`)."""
    from tdm.backbones import load_backbone

    record = StudentRecord.load(folder)
    embedding = load_k_embedding(folder)
    if record.unify and embedding is None:
        raise FileNotFoundError(f"{Path(folder) / K_EMBEDDING_FILE}: missing (the record says TDM-unify)")
    if embedding is not None and not record.unify:
        raise ValueError(f"{Path(folder) / K_EMBEDDING_FILE}: present but {RECORD_FILE} says unify: false")
    backbone = load_backbone(folder, dtype=dtype, prompt_store=prompt_store)
    if backbone.family != record.family:
        raise ValueError(f"{Path(folder) / RECORD_FILE}: family: {record.family!r}, but the folder holds a "
                         f"{backbone.family!r} model")
    return Student(backbone, backbone.net, record, embedding)


__all__ = ["StudentRecord", "Student", "load_student", "load_k_embedding", "k_conditioning", "RECORD_FILE",
           "K_EMBEDDING_FILE"]
