"""The typed, validated view of params.yaml: the only reader of that file.

One section per stage. Unknown keys, wrong types and out-of-range values fail before any compute, with one
message naming the key (`ConfigError: params.yaml: teacher_ft.lr: Input should be greater than 0 (got -1)`).
Overrides use DVC's syntax, `section.key=value` (as in `dvc exp run -S teacher_ft.lr=1e-3`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """Bad parameters: the message names the key."""


def _prompt_source(v: str) -> str:
    """A prompts setting: "digits" or a prompt file that reads (`tdm.data.read_prompts`: a .txt/.jsonl/.csv
    with at least one prompt, UTF-8 text), so an empty, binary or malformed file fails before any model loads."""
    if v == "digits":
        return v
    if not Path(v).expanduser().is_file():
        raise ValueError(f"must be 'digits' or a prompt file; not found: {v}")
    from tdm.data import read_prompts

    try:
        read_prompts(Path(v).expanduser())
    except OSError as err:
        raise ValueError(f"{v}: cannot read ({err.strerror or err})") from None
    return v


def _step_counts(v: tuple[int, ...]) -> tuple[int, ...]:
    """A set of step counts (K values): at least one, each >= 1; sorted, duplicates dropped."""
    if not v or any(k < 1 for k in v):
        raise ValueError("need at least one step count, each >= 1")
    return tuple(sorted(set(v)))


PromptSource = Annotated[str, AfterValidator(_prompt_source)]


def _store_path(v: Optional[str]) -> Optional[str]:
    """A prompt-store setting: null, or a folder path. Like `distill.teacher` it is an upstream stage's output, so
    it is checked when the consuming stage starts (`tdm.backbones.stored_prompts.open_for`: present, complete, made for that
    model, holding every prompt), not when params.yaml is read."""
    if v is not None and not v.strip():
        raise ValueError("must be null or a prompt store folder")
    return v
StepCounts = Annotated[tuple[int, ...], AfterValidator(_step_counts)]
# Every seed: a non-negative 63-bit integer (what torch.Generator.manual_seed and numpy's default_rng both take;
# -1 or 2**70 would otherwise fail only after the models are loaded).
SEED_MAX = 2**63 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class _Section(BaseModel):
    # allow_inf_nan=False: every numeric range is a finite range (`lr: .inf` passes `gt=0` otherwise).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Section):
    # digits (the embedded default) or a real backbone (docs/backbones.md): sd15 (and its fine-tunes), sdxl,
    # pixart_alpha, sd3, cogvideox.
    family: Literal["digits", "sd15", "sdxl", "pixart_alpha", "pixart_sigma", "sd3", "cogvideox", "wan",
                    "flux", "zimage"] = "digits"
    # A diffusers folder or hub id to start from; null = a fresh digits model (there is no pretrained one).
    pretrained: Optional[str] = Field(None, validate_default=True)
    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    # Noise schedule of a fresh model (a pretrained one keeps its own): DDPM's "linear", SD's "scaled_linear",
    # or the cosine "squaredcos_cap_v2" (Nichol & Dhariwal), which wastes fewer steps on tiny images.
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"

    @field_validator("channels")
    @classmethod
    def _unet_levels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not 2 <= len(v) <= 4 or any(c <= 0 or c % 8 for c in v):
            raise ValueError("need 2-4 UNet levels (8x8 down to 1x1), each a positive multiple of 8 (GroupNorm)")
        return v

    @field_validator("pretrained")
    @classmethod
    def _folder_or_cached_hub_id(cls, v: Optional[str], info) -> Optional[str]:
        if v is None and info.data.get("family", "digits") != "digits":
            raise ValueError(f"required for family {info.data['family']!r} (a diffusers folder or cached hub id; "
                             f"only digits starts fresh)")
        if v is not None:
            from tdm.backbones import check_model

            try:  # a missing folder, uncached hub id or model no adapter runs fails here, before any compute
                _, family = check_model(v)
            except (FileNotFoundError, ValueError) as err:
                raise ValueError(str(err)) from None
            if family != info.data.get("family", "digits"):
                raise ValueError(f"{v} is a {family!r} model but model.family is {info.data.get('family')!r}")
        return v


class TeacherFTConfig(_Section):
    data: str = "digits"  # "digits" or an image-caption folder (images + metadata.jsonl)
    resolution: int = Field(8, ge=8)
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    cfg_dropout: float = Field(0.1, ge=0, le=1)  # probability of training on the empty prompt
    ema_decay: float = Field(0.999, ge=0, lt=1)
    snr_gamma: Optional[float] = Field(5.0, gt=0)  # min-SNR loss weighting; null = plain MSE
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)  # losses are moved to the host (and NaN-checked) every log_every steps
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: Seed = 0
    # Teacher quality check after training (digits): samples with the `sample` settings, scored by the toy metrics.
    eval_samples: int = Field(1000, ge=0)
    # A prompt-embedding store (`tdm prompt-store` made from model.pretrained, holding every caption) read instead
    # of running the text encoders, which are then never loaded; null = encode with them (tdm/prompt_store.py).
    prompt_store: Optional[str] = None
    # Keys that do not change the trained weights: a checkpoint made with other values still resumes.
    BOOKKEEPING: ClassVar[tuple[str, ...]] = ("eval_samples", "checkpoint_every", "log_every", "prompt_store")

    @field_validator("prompt_store")
    @classmethod
    def _store_folder(cls, v: Optional[str]) -> Optional[str]:
        return _store_path(v)

    @field_validator("data")
    @classmethod
    def _data_folder(cls, v: str) -> str:
        meta = Path(v).expanduser() / "metadata.jsonl"
        if v != "digits" and not meta.is_file():
            raise ValueError(f"must be 'digits' or a folder with metadata.jsonl; not found: {meta}")
        if v != "digits":
            from tdm.data import read_text

            try:
                text = read_text(meta)
            except OSError as err:
                raise ValueError(f"{meta}: cannot read ({err.strerror or err})") from None
            if not text.strip():
                raise ValueError(f"{meta} has no rows")
        return v


class DistillStage(_Section):
    """One stage of a multi-stage distillation (`distill.stages`): it runs `iterations` from where the previous
    stage left the student (and the fake score, unless `reinit_fake`), with fresh optimisers and lr schedule;
    the keys left null take distill's own. The TDM paper's SDXL recipe: 512 px, then 1024 px with the fake score
    re-initialised (as issue #16 quotes it)."""

    iterations: int = Field(ge=1)
    resolution: Optional[int] = Field(None, ge=8)  # square side in pixels; null = the model's native size
    reinit_fake: bool = False  # start the fake score afresh from the teacher (LoRA: a new adapter; full: a copy)
    lr: Optional[float] = Field(None, gt=0)
    fake_lr: Optional[float] = Field(None, gt=0)
    guidance: Optional[float] = Field(None, ge=1)
    batch_size: Optional[int] = Field(None, ge=1)
    warmup_steps: Optional[int] = Field(None, ge=0)


class DistillConfig(_Section):
    """TDM distillation. Our defaults are ours (measured on digits); the official TDM trainer's values are noted
    beside each switch (/work/shared/notes/recipes.md: generator lr 4e-6 = fake lr 2e-5 / 5, AdamW betas (0, 0.95),
    weight decay 1e-2, grad clip 1.0 on the generator only, the fake score unclipped at a constant lr, no EMA)."""

    teacher: str = "outputs/teacher_ft/model"  # model folder or hub id (checked when the stage starts)
    prompts: PromptSource = "digits"  # "digits" (the ten digits, four phrasings) or a .txt/.jsonl/.csv prompt file
    # A prompt-embedding store (`tdm prompt-store`, outputs/prompt_store/store) read instead of running the teacher's
    # text encoders, which are then never loaded; null = encode with them. Same iteration bit for bit.
    prompt_store: Optional[str] = None
    mode: Literal["lora", "full"] = "full"
    lora_rank: int = Field(16, ge=1)
    lora_alpha: Optional[float] = Field(None, gt=0)  # null = rank (scale 1)
    k: int = Field(4, ge=1)  # student steps
    total_steps: int = Field(900, ge=2)  # trajectory top: the student starts at t = total_steps - 1
    # The student's grid (tdm.schedule.StudentGrid): the uniform grid warped by `shift` (the flow-matching shift,
    # 1 = uniform), or an explicit descending list of K timesteps (e.g. the authors' CogVideoX grid
    # [999, 856, 665, 399], which is shift 2 over 1000).
    shift: float = Field(1.0, gt=0)
    timesteps: Optional[tuple[int, ...]] = None
    guidance: float = Field(2.0, ge=1)  # teacher CFG baked into the student
    # The teacher's CFG per student step i = 0..K-1 (e.g. [3.0, 1.0, 1.0, 1.0]: guidance only where the first step
    # decides the content); null = `guidance` at every step. A fixed K only (not TDM-unify).
    guidance_schedule: Optional[tuple[Annotated[float, Field(ge=1)], ...]] = None
    iterations: int = Field(400, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-5, gt=0)  # generator; official: 4e-6 (= fake lr / 5)
    fake_lr: float = Field(1e-4, gt=0)  # official: 2e-5
    # Fake-score updates per generator update (DMD2's two time-scale update rule uses 5; each extra one on a fresh
    # student batch); `iterations` and the lr schedules count generator updates. Official TDM: 1.
    fake_updates: int = Field(1, ge=1)
    # DMD's data-free regression loss (tdm/regression.py): the student's x0 at the teacher's own DDIM trajectory
    # (from the student's starting noise, through its grid points) pulled toward that trajectory's endpoint, added
    # to the generator loss with this weight; 0 = off (TDM). Over regression_pairs trajectories made once at the
    # start, regression_teacher_steps DDIM steps each (split evenly over the K intervals, so rounded to a multiple
    # of K).
    regression_weight: float = Field(0.0, ge=0)
    regression_pairs: int = Field(1024, ge=1)
    regression_teacher_steps: int = Field(48, ge=1)
    # TDM-unify: the student's K embedding's own lr (null = lr); the fake score's K embedding trains at fake_lr.
    k_embed_lr: Optional[float] = Field(None, gt=0)
    betas: tuple[float, float] = (0.0, 0.95)  # official: (0, 0.95), both optimisers
    weight_decay: float = Field(0.0, ge=0)  # generator (and the fake score unless fake_weight_decay); official: 1e-2
    fake_weight_decay: Optional[float] = Field(None, ge=0)  # null = weight_decay
    # "adamw" (torch), or "adamw8bit" (bitsandbytes' 8-bit AdamW states, ~1/4 of the optimiser memory; official
    # option; CPU and CUDA with bitsandbytes >= 0.48).
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    warmup_steps: int = Field(20, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # generator (warm-up, then this); official: ~constant
    # The fake score's lr schedule: "same" as the generator's, or "constant" (no warm-up, no decay; official).
    fake_lr_schedule: Literal["same", "constant"] = "same"
    interval: Literal["separate", "shared"] = "separate"  # tau in (t_mid, t_i] per step, or [t_mid, total_steps)
    random_mid: bool = False  # draw t_mid in [t_{i+1}, t_i - 20) instead of the next grid point
    tau_min: int = Field(20, ge=0)  # the authors' margins: tau >= max(tau_min, t_mid), tau < upper - tau_gap
    tau_gap: int = Field(10, ge=1)
    metric: Literal["huber", "huber_sample", "l2"] = "huber"
    huber_c: Optional[float] = Field(None, gt=0)  # null: 1e-3 (huber), 0.00054 sqrt(d) (huber_sample)
    snr_clamp: float = Field(5.0, gt=0)
    grad_clip: float = Field(1.0, gt=0)  # generator gradient-norm clip; official 1.0
    fake_grad_clip: Optional[float] = Field(1.0, gt=0)  # the fake score's; null = no clipping (official)
    ema_decay: float = Field(0.99, ge=0, lt=1)
    # Which student is saved: "ema" (the average, ema_decay) or "raw" (the trained weights, no EMA kept; official).
    student_weights: Literal["ema", "raw"] = "ema"
    # Multi-stage distillation (tdm/stages.py): stages run in order in one `tdm distill` (one loop, one log, one
    # checkpoint series); [] = one stage of `iterations`. The last stage trains at the native size (resolution
    # null), the size the student is saved and sampled at; `iterations` must equal the stages' sum.
    stages: tuple[DistillStage, ...] = ()
    unify: bool = False  # TDM-unify: student and fake conditioned on K, trained over k_choices
    k_choices: StepCounts = (1, 2, 4)
    # TDM-unify: the probability of drawing each K of k_choices per iteration (normalised; e.g. [1, 1, 2] draws
    # K = 4 half the time); null = uniform (the paper's). One K per iteration, shared by the batch.
    k_weights: Optional[tuple[Annotated[float, Field(ge=0)], ...]] = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # LoRA mode: the frozen base denoiser held weight-only quantised (torchao: int8, or float8 e4m3 on GPUs that
    # support it); the adapters stay float32 and the saved student is merged into the unquantised base.
    base_quantization: Optional[Literal["int8", "fp8"]] = None
    # Speed switches (docs/performance.md): same results within float tolerance; not part of a resume check.
    compile: bool = False  # torch.compile the denoiser (one graph per role / grad mode; minutes to compile on CPU)
    channels_last: bool = False  # NHWC weights for UNet families (digits, sd15, sdxl; checked at stage start)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)  # losses are moved to the host (and NaN-checked) every log_every steps
    seed: Seed = 0
    eval_samples: int = Field(1000, ge=0)  # student samples scored after training (digits)
    # Keys that do not change the trained weights (speed switches agree within float tolerance).
    BOOKKEEPING: ClassVar[tuple[str, ...]] = ("eval_samples", "checkpoint_every", "log_every", "compile",
                                              "channels_last", "prompt_store")

    @field_validator("prompt_store")
    @classmethod
    def _store_folder(cls, v: Optional[str]) -> Optional[str]:
        return _store_path(v)

    @model_validator(mode="after")
    def _grid(self) -> "DistillConfig":
        if self.stages:
            if self.stages[-1].resolution is not None:
                raise ValueError(f"stages[{len(self.stages) - 1}].resolution: the last stage trains at the model's "
                                 f"native size, the one the student is saved and sampled at (set it to null)")
            total = sum(st.iterations for st in self.stages)
            if total != self.iterations:
                raise ValueError(f"iterations: {self.iterations}, but the stages sum to {total} iterations "
                                 f"(set distill.iterations: {total})")
        if self.base_quantization is not None and self.mode != "lora":
            raise ValueError(f"base_quantization: {self.base_quantization!r} quantises the frozen base of LoRA mode; "
                             f"mode is {self.mode!r} (full mode trains every weight)")
        if self.guidance_schedule is not None:
            staged = [i for i, st in enumerate(self.stages) if st.guidance is not None]
            if staged:
                raise ValueError(f"stages[{staged[0]}].guidance: guidance_schedule sets the teacher's CFG of every "
                                 f"stage; drop one of the two")
            if self.unify:
                raise ValueError("guidance_schedule: one scale per step of a fixed K; TDM-unify (unify: true) trains "
                                 "several K (use guidance)")
            if len(self.guidance_schedule) != self.k:
                raise ValueError(f"guidance_schedule: {len(self.guidance_schedule)} entries for k = {self.k} (one "
                                 f"per student step)")
        if self.regression_weight > 0:
            if self.unify:
                raise ValueError("regression_weight: the teacher pairs follow one fixed-K grid; TDM-unify (unify: "
                                 "true) trains several K (set regression_weight: 0)")
            if self.stages:
                raise ValueError("regression_weight: the teacher pairs are made once at one resolution; distill.stages "
                                 "change it (set regression_weight: 0)")
            if self.regression_teacher_steps < self.k:
                raise ValueError(f"regression_teacher_steps: {self.regression_teacher_steps} < k = {self.k} (at least "
                                 f"one teacher step per student interval)")
        if self.k_weights is not None:
            if not self.unify:
                raise ValueError("k_weights: the K draw of TDM-unify (unify: true); a fixed-K run draws no K")
            if len(self.k_weights) != len(self.k_choices):
                raise ValueError(f"k_weights: {len(self.k_weights)} entries for k_choices {list(self.k_choices)} "
                                 f"(one per K)")
            if sum(self.k_weights) <= 0:
                raise ValueError("k_weights: at least one weight must be positive")
        ts = self.timesteps
        if ts is None:
            return self
        if self.unify:
            raise ValueError("timesteps: an explicit grid serves one K; TDM-unify (unify: true) takes shift instead")
        if len(ts) != self.k:
            raise ValueError(f"timesteps: {len(ts)} entries for k = {self.k}")
        if any(a <= b for a, b in zip(ts, ts[1:])) or ts[0] > self.total_steps - 1 or ts[-1] < 0:
            raise ValueError(f"timesteps: must be strictly descending within [0, total_steps - 1 = "
                             f"{self.total_steps - 1}], got {list(ts)}")
        if self.shift != 1.0:
            raise ValueError("shift: an explicit grid (timesteps) takes no shift")
        return self


class PromptStoreConfig(_Section):
    """The prompt_store stage (tdm/prompt_store.py): a prompt set encoded once by a model's text encoders."""

    # Whose text encoders: null = distill.teacher (what distill reads the store for; a profile's hub id included);
    # checked when the stage starts.
    model: Optional[str] = None
    # Prompt sources, all stored: "digits" (every digits phrasing), .txt/.jsonl/.csv prompt files, or image- /
    # video-caption folders (their metadata.jsonl captions, for teacher_ft.prompt_store); null = distill.prompts.
    # "" is always stored.
    prompts: Optional[tuple[str, ...]] = None
    # The dtype the encoders load in, which the consumer must load them in too: "auto" = as distill loads its
    # frozen base (LoRA mode under bf16 / fp16: that dtype; else the model's own), "model", "bf16", "fp16".
    dtype: Literal["auto", "model", "bf16", "fp16"] = "auto"
    batch_size: int = Field(64, ge=1)  # prompts per encoder forward

    @field_validator("prompts")
    @classmethod
    def _sources(cls, v: Optional[tuple[str, ...]]) -> Optional[tuple[str, ...]]:
        if v is None:
            return v
        if not v:
            raise ValueError("need at least one prompt source")
        for source in v:
            if source == "digits" or Path(source).expanduser().is_dir():
                continue
            _prompt_source(source)
        return v


class LoraTransferConfig(_Section):
    """The TDM LoRA on custom models of its base's family: each custom model at its usual many-step setting
    (and at few-step DDIM) against custom + TDM LoRA at the student's K steps."""

    lora: str = "outputs/distill/student_lora"  # a TDM LoRA: peft/diffusers folder or kohya .safetensors
    student: Optional[str] = None  # folder with tdm_student.json (K, total_steps); null = "student" beside the LoRA
    base: Optional[str] = None  # the LoRA's base model (digits styles fine-tune it); null = the student's teacher
    # "digits:<style>" (a short fine-tune of the base on restyled digits: thick, invert), or model folders / hub ids
    custom_models: tuple[str, ...] = ("digits:thick",)
    scale: float = Field(1.0, ge=0)  # LoRA strength (0 = the custom model alone)
    steps: Optional[int] = Field(None, ge=1)  # student steps with the LoRA; null = the student's K
    total_steps: Optional[int] = Field(None, ge=2)  # null = the student's (tdm_student.json)
    custom_steps: int = Field(50, ge=1)  # the custom model's usual many-step DDIM setting
    custom_guidance: Optional[float] = Field(None, ge=1)  # its CFG; null = sample.guidance
    few_steps: int = Field(4, ge=1)  # the custom model's own few-step DDIM baseline
    n: int = Field(1000, ge=2)  # samples per row
    prompts: PromptSource = "digits"  # "digits" or a .txt/.jsonl/.csv prompt file (cycled to n)
    batch_size: int = Field(250, ge=1)
    seed: Seed = 0
    finetune_steps: int = Field(300, ge=1)  # digits styles: fine-tune length from the base (cached per style)
    finetune_lr: float = Field(1e-3, gt=0)
    finetune_batch_size: int = Field(128, ge=1)

    @field_validator("custom_models")
    @classmethod
    def _known_styles(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from tdm.data import DIGIT_STYLES

        if not v:
            raise ValueError("need at least one custom model")
        for name in v:
            if name.startswith("digits:") and name.split(":", 1)[1] not in DIGIT_STYLES:
                raise ValueError(f"unknown digits style in {name!r} (known: "
                                 f"{', '.join('digits:' + s for s in DIGIT_STYLES)})")
        if len(set(v)) != len(v):
            raise ValueError("custom models must be distinct")
        return v


class SampleConfig(_Section):
    steps: int = Field(50, ge=1)  # teacher DDIM steps
    guidance: float = Field(1.5, ge=1)  # classifier-free guidance scale (1 = off)
    batch_size: int = Field(250, ge=1)
    seed: Seed = 0


class EvalConfig(_Section):
    """Metric settings shared by every scorer (docs/evaluation.md lists the weight files)."""

    weights_dir: str = "outputs/weights"  # metric weights and caches (the digit classifier lives here)
    hps_version: Literal["v2.1", "v2"] = "v2.1"
    clip_model: str = "ViT-g-14:laion2b_s12b_b42k"  # CLIP score model, open_clip ARCH:TAG
    aesthetic_clip_model: str = "ViT-L-14:openai"  # the aesthetic MLP reads this model's embeddings
    vbench_venv: str = ".venv-vbench"  # built by scripts/vbench_env.sh

    @field_validator("clip_model", "aesthetic_clip_model")
    @classmethod
    def _arch_tag(cls, v: str) -> str:
        arch, sep, tag = v.partition(":")
        if not (arch and sep and tag):
            raise ValueError("must be an open_clip ARCH:TAG, e.g. ViT-L-14:openai")
        return v


class EvaluateConfig(_Section):
    """The evaluate stage: teacher and student (and LoRA-transfer rows) sampled and scored per (model, NFE)."""

    teacher: Optional[str] = "outputs/teacher_ft/model"  # model folder; null = no teacher rows
    teacher_steps: Optional[int] = Field(None, ge=1)  # null = sample.steps
    teacher_guidance: Optional[float] = Field(None, ge=1)  # null = sample.guidance
    student: Optional[str] = "outputs/distill/student"  # student folder (tdm_student.json); null = none
    student_steps: StepCounts = (1, 2, 4)  # a TDM-unify student is sampled at each
    fixed_k_steps: Literal["own", "all"] = "own"  # a fixed-K student: its own K only, or student_steps too
    n: int = Field(1000, ge=2)  # samples per row
    prompts: PromptSource = "digits"  # "digits" or a .txt/.jsonl/.csv prompt file (cycled to n)
    metrics: Optional[tuple[str, ...]] = None  # null = digits_fid + class_accuracy (digits), else hps/aesthetic/clip/fid
    fid_reference: Optional[str] = None  # reference image folder (or npz) for `fid`
    skip_missing: bool = False  # skip (and record) a metric whose weights are missing instead of failing
    lora_manifest: Optional[str] = "outputs/lora_transfer/manifest.json"  # absent file = no transfer rows
    # A published evaluation protocol instead of `prompts` (docs/evaluation.md): "hpsv2" (the HPSv2 benchmark's
    # four style prompt files, per-style and average HPS), "coco2014" (a seeded caption draw from
    # captions_val2014.json, FID against the matching val2014 images + CLIP score), "vbench" (VBench's standard
    # prompt suite). Its inputs are read from `protocol_path`; nothing is downloaded at run time.
    protocol: Optional[Literal["hpsv2", "coco2014", "vbench"]] = None
    protocol_path: Optional[str] = None  # hpsv2: the benchmark prompt folder; coco2014: captions_val2014.json
    coco_images: Optional[str] = None  # coco2014: the val2014 image folder (FID reference, matched by image id)
    # The quality-vs-NFE curve: the teacher's DDIM at each of these step counts (CFG counted in NFE); empty =
    # the teacher at `teacher_steps` only.
    teacher_curve: tuple[int, ...] = ()
    # An external student (e.g. a published TDM LoRA) on top of `teacher`: a diffusers / kohya / peft LoRA
    # file or folder, at `lora_scale`, sampled `lora_steps` steps at guidance `lora_guidance`.
    lora: Optional[str] = None
    lora_scale: float = Field(1.0, ge=0)
    lora_steps: int = Field(4, ge=1)
    lora_guidance: float = Field(1.0, ge=1)
    # The external student's scheduler: null = the teacher's own; a diffusers class name (e.g.
    # DPMSolverMultistepScheduler, built from the teacher's config) or a scheduler_config.json
    # (tdm.external.build_scheduler); `lora_flow_shift` its flow shift (the SD3 releases vary it between 1 and 6).
    lora_scheduler: Optional[str] = None
    lora_flow_shift: Optional[float] = Field(None, gt=0)
    # coco2014: the side FID's images are centre-cropped and resized to; null = 256 (GigaGAN's COCO protocol).
    protocol_resolution: Optional[int] = Field(None, ge=8)
    # A prompt-embedding store holding every prompt the rows sample (and made from the sampled models' encoders):
    # the models load without text encoders (tdm/prompt_store.py); null = encode with them.
    prompt_store: Optional[str] = None

    @field_validator("prompt_store")
    @classmethod
    def _store_folder(cls, v: Optional[str]) -> Optional[str]:
        return _store_path(v)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: Optional[tuple[str, ...]]) -> Optional[tuple[str, ...]]:
        from tdm.evaluation import METRICS, is_metric

        if v is not None:
            unknown = [m for m in v if not is_metric(m)]
            if unknown or not v:
                raise ValueError(f"unknown metric(s) {unknown} (known: {', '.join(METRICS)}, vbench_<dimension>)"
                                 if unknown
                                 else "need at least one metric (or null for the family's default)")
        return v


    @field_validator("fid_reference")
    @classmethod
    def _reference(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not Path(v).expanduser().exists():
            raise ValueError(f"reference images not found: {v}")
        return v

    @field_validator("protocol_path", "coco_images", "lora")
    @classmethod
    def _exists(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not Path(v).expanduser().exists():
            raise ValueError(f"not found: {v}")
        return v

    @field_validator("teacher_curve")
    @classmethod
    def _curve(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(n < 1 for n in v) or len(set(v)) != len(v):
            raise ValueError(f"step counts must be distinct integers >= 1, got {list(v)}")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _protocol_inputs(self) -> "EvaluateConfig":
        if self.protocol is not None and self.protocol_path is None:
            raise ValueError(f"protocol_path: required for protocol {self.protocol!r} (docs/evaluation.md)")
        if self.protocol is None and self.protocol_path is not None:
            raise ValueError("protocol_path: set without a protocol")
        if self.coco_images is not None and self.protocol != "coco2014":
            raise ValueError("coco_images: only for protocol coco2014")
        return self


class Config(_Section):
    model: ModelConfig = ModelConfig()
    teacher_ft: TeacherFTConfig = TeacherFTConfig()
    distill: DistillConfig = DistillConfig()
    prompt_store: PromptStoreConfig = PromptStoreConfig()
    lora_transfer: LoraTransferConfig = LoraTransferConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


@dataclass(frozen=True)
class StagePaths:
    """Where a stage writes: outputs/<stage>/ and metrics/<stage>.json, under the project root."""

    out_dir: Path
    metrics: Path

    @classmethod
    def of(cls, stage: str, root: str | Path = ".") -> "StagePaths":
        root = Path(root)
        return cls(root / "outputs" / stage, root / "metrics" / f"{stage}.json")


class _Yaml12Loader(yaml.SafeLoader):
    """YAML as DVC reads it (1.2 booleans): only true/false are booleans, so `mixed_precision: no` stays the
    string "no" even after `dvc exp run -S` rewrites params.yaml without the quotes."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


def _duplicate_key(node, prefix: str = "") -> str | None:
    """The dotted path of the first key repeated within one mapping (DVC's loader refuses such a file; PyYAML
    would silently keep the last value), with its line; None when there is none."""
    visited: set[int] = set()  # aliases share nodes: each is walked once (no exponential "billion laughs")

    def walk(node, prefix: str) -> str | None:
        if not isinstance(node, yaml.MappingNode) or id(node) in visited:
            return None
        visited.add(id(node))
        seen = set()
        for key_node, value_node in node.value:
            # A scalar key by its text; a list or mapping used as a key (refused later) by its tag and position.
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else f"<{key_node.tag}>"
            name = f"{prefix}{key}"
            if isinstance(key_node, yaml.ScalarNode) and key in seen:
                return f"{name} (line {key_node.start_mark.line + 1})"
            seen.add(key)
            found = walk(value_node, name + ".")
            if found:
                return found
        return None

    return walk(node, prefix)


def parse_override(item: str) -> tuple[str, str, object]:
    """`section.key=value` -> (section, key, value parsed as YAML 1.2, as DVC's `-S` does); ConfigError
    naming the override when it is malformed or names an unknown section."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r}: expected section.key=value")
    section, name = parts
    if section not in Config.model_fields:
        raise ConfigError(f"override {item!r}: unknown section {section!r} (known: {', '.join(Config.model_fields)})")
    try:
        return section, name, yaml_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: {key.strip()}: value is not valid YAML: {_yaml_problem(err)}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides to a raw params dict, copy-on-write; ConfigError naming the override
    when it is malformed or its section is not a mapping."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        section, name, value = parse_override(item)
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"override {item!r}: {section} is not a section")
        out[section][name] = value
    return out


def parse(raw: dict | None, source: str = "params") -> Config:
    """Validate a raw params dict; every problem is reported with its dotted key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            # A section-level check names its key in the message; echoing the whole section would bury it.
            shown = "" if e["type"] == "extra_forbidden" or isinstance(e["input"], dict) else f" (got {e['input']!r})"
            lines.append(f"{source}: {key}: {msg}{shown}")
        raise ConfigError("\n".join(lines)) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{' '.join(str(problem).split())}{where}"


def load(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Config:
    """Read params.yaml (a missing file means all defaults only when no path was asked for), apply overrides.
    Raises ConfigError naming the file (unreadable, not UTF-8, not YAML, duplicate key, not a mapping of
    sections) or the dotted key (unknown, wrong type, out of range)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: not a params file (a {'folder' if path.is_dir() else 'special file'})")
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM (editors on Windows) is not a key
            duplicate = _duplicate_key(yaml.compose(text, Loader=_Yaml12Loader))
            if duplicate:
                raise ConfigError(f"{path}: duplicate key {duplicate}: refused, as DVC refuses it")
            raw = yaml_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a params file") from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, distill:, ...), got a YAML "
                              f"{type(raw).__name__}")
    elif path == DEFAULT_PARAMS:
        raw = {}
    else:
        raise ConfigError(f"params file not found: {path}")
    return parse(apply_overrides(raw or {}, overrides or []), source=str(path))


def dump(cfg: Config) -> dict:
    """The fully resolved params as plain YAML-able data (recorded beside every output)."""
    return cfg.model_dump(mode="json")
