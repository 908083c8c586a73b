"""The memory plan before launch: what `tdm distill` will hold on each device, from configs alone.

`plan(cfg)` builds the teacher's architecture on the meta device (no weights are read or allocated: configs
only), sets it up exactly as the distill stage does (`tdm.roles.Roles`: LoRA adapters via peft with the
family's target modules and rank, or three copies in full mode; the TDM-unify K embeddings; AdamW for student
and fake; the EMA of the student) and counts, per process:

- **weights** by role and dtype: the frozen base / teacher, the student and fake trainables, the resident frozen
  parts (text encoders, VAE) in the dtype `tdm.distill.train` loads them in (LoRA mode: the mixed-precision
  dtype, adapters float32; full mode: float32 everywhere; the trainable float32 weights *are* the master copies,
  there is no second copy); with `distill.base_quantization` (LoRA mode) the base's `nn.Linear` weights at
  `tdm.quantize.weight_bytes` each (1 byte per element + per-row scales, torchao's layouts), the rest as loaded;
- **gradients**: one role's trainables at a time (each `_update` ends with `zero_grad(set_to_none=True)`, so the
  fake score's gradients are gone before the student's exist), plus the flat all-reduce buffers of
  `tdm.training.average_gradients` with more than one process;
- **optimiser state**: AdamW's two moments (param dtype) for both roles; its per-tensor `step` counters live on
  the host (float32 scalars, torch's non-capturable AdamW) and are listed but not counted against the device;
  8-bit AdamW (`distill.optimizer: adamw8bit`) keeps 2 bytes per parameter;
- **EMA**: float32 shadow of the student's trainables (none with `distill.student_weights: raw`);
- **conditioning**: the batch's prompt embeddings (cond, null and the CFG concatenation), and what one prompt
  costs in the prompt-embedding store (`tdm prompt-store`; with `distill.prompt_store` the text encoders are
  not resident);
- **activations**: *measured*, not guessed: one grad-carrying forward of the student (the fake's forward is the
  same network at the same shape, and its graph is freed by its backward before the student's forward) is run on
  the meta device at the real latent shape, and every tensor autograd saves for backward is counted once per
  storage (`torch.autograd.graph.saved_tensors_hooks`; parameters excluded, they are counted above). Mixed
  precision is emulated (a `TorchFunctionMode` applying CUDA autocast's cast policy to the ops that dominate
  these networks: matmul/linear/conv/attention in the low dtype, norms and softmax in float32, and autocast's
  cache of low-precision copies of trainable float32 weights, which is listed as its own line). Attention is
  counted as a fused kernel (flash / memory-efficient SDPA: q, k, v, output and a float32 log-sum-exp are
  saved), never the (L x L) matrix of the math path. With gradient checkpointing, the checkpointed units'
  inputs are counted plus the largest unit's own activations (its recompute during backward). Measured at
  batch 1 and multiplied by the batch (every saved activation carries the batch dimension: batch 2 measures
  2.000x batch 1 within 0.1 %, tested).
  What it does not see: allocator fragmentation and caching (PyTorch's caching allocator typically reserves
  5-20 % above the live peak), the transient gradients of activations during backward, the no-grad teacher
  forward at 2 x batch (a few layers live at a time), and cuDNN / cuBLAS workspaces; a fixed 10 % margin on the activations stands for them (`ACTIVATION_MARGIN`), and the CUDA
  context (~0.5 GiB) is added as its own line. Treat the activation line as +/- 25 % until a GPU measures it
  (`benchmarks/backbone_iteration.py` prints measured peaks beside the plan).

Real architectures without the hub: `tdm/arch/*.json` records the public component configs (config.json values)
of the checkpoints the profiles name; a teacher that is a local folder (or cached hub id) is read from its own
config files instead. Bytes are bytes (GiB = 2**30 in the table). Families: every family `tdm.backbones.FAMILIES`
runs (digits, sd15, sdxl, pixart_alpha, pixart_sigma, sd3 (SD3 / SD3.5), cogvideox, wan, flux, and zimage once
registered); others are refused with a ValueError. Z-Image's prompts are planned at the full padded length
(`tdm.backbones.zimage.MAX_SEQUENCE_LENGTH` tokens per prompt, its adapter's meta-device reading): an upper bound
on the caption tokens real prompts give.

The CLI: `tdm distill --dry-run` loads with `load_config(params, overrides)` (a hub id need not be cached: a
plan reads configs, not weights) and calls `run_dry(cfg, device_memory_bytes=..., num_processes=...)`.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tdm.quantize import skipped_by_diffusers, weight_bytes  # byte rules only: a plan never imports torchao

ARCH_DIR = Path(__file__).resolve().parent / "arch"
GIB = 2 ** 30
CUDA_CONTEXT_BYTES = 512 * 2 ** 20  # CUDA context + kernels: a typical 0.4-0.6 GiB (not measured here: no GPU)
ACTIVATION_MARGIN = 0.10  # backward transients, workspaces (see the module docstring)


def supported_families() -> tuple[str, ...]:
    from tdm.backbones import FAMILIES

    return tuple(FAMILIES)

_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- the result -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """One entry of the plan: `bytes` held on each device (host-side entries have device=False)."""

    section: str  # weights | gradients | optimizer | ema | conditioning | activations | runtime
    what: str
    params: int  # elements (0 where not a parameter count)
    dtype: str
    bytes: int
    note: str = ""
    device: bool = True
    part: str = ""  # what it belongs to, for machines: teacher, student, fake, a component name, or ""


@dataclass(frozen=True)
class Suggestion:
    switch: str  # how to turn it on
    status: str  # "exists" ("" for a combination)
    total_bytes: int  # the per-process total with this switch (alone) applied
    fits: bool | None


@dataclass
class Plan:
    family: str
    source: str  # where the architecture came from (tdm/arch/<file> or the teacher folder)
    mode: str
    mixed_precision: str
    gradient_checkpointing: bool
    unify: bool
    lora_rank: int | None
    batch_size: int  # global (distill.batch_size)
    num_processes: int
    sample_shape: tuple[int, ...]
    options: dict  # switches on: embedding_store (distill.prompt_store), adam8bit, fsdp, base_quantization
    lines: list[Line]
    device_memory_bytes: int | None
    device_name: str | None
    activation_method: str
    suggestions: list[Suggestion] = field(default_factory=list)
    build_s: float = 0.0

    @property
    def batch_per_process(self) -> int:
        return self.batch_size // self.num_processes

    @property
    def total_bytes(self) -> int:
        """Per-process device bytes: every device-side line."""
        return sum(line.bytes for line in self.lines if line.device)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory_bytes is None else self.total_bytes <= self.device_memory_bytes

    def section_bytes(self, section: str) -> int:
        return sum(line.bytes for line in self.lines if line.section == section and line.device)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("lines", "suggestions")}
        d["sample_shape"] = list(self.sample_shape)
        d["batch_per_process"] = self.batch_per_process
        d["lines"] = [asdict(line) for line in self.lines]
        d["sections"] = {s: self.section_bytes(s) for s in dict.fromkeys(line.section for line in self.lines)}
        d["total_bytes"], d["fits"] = self.total_bytes, self.fits
        d["suggestions"] = [asdict(s) for s in self.suggestions]
        return d

    def render(self) -> str:
        gib = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
        head = (f"memory plan: {self.family} ({self.source}), {self.mode} mode"
                f"{f' rank {self.lora_rank}' if self.mode == 'lora' else ''}{' + unify' if self.unify else ''}, "
                f"{self.mixed_precision}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
                f"batch {self.batch_per_process}/process x {self.num_processes} process(es), "
                f"sample {'x'.join(map(str, self.sample_shape))}")
        on = [k for k, v in self.options.items() if v]
        rows = [head] + ([f"switches on: {', '.join(on)}"] if on else []) + [
            f"{'section':<13}{'what':<44}{'params':>15} {'dtype':<9}{'GiB':>8}  note", "-" * 110]
        for line in self.lines:
            params = f"{line.params:,}" if line.params else ""
            where = "" if line.device else " (host)"
            rows.append(f"{line.section:<13}{line.what[:43]:<44}{params:>15} {line.dtype:<9}{gib(line.bytes)}  "
                        f"{line.note}{where}")
        rows.append("-" * 110)
        rows.append(f"{'total per process (device)':<57}{'':>15} {'':<9}{gib(self.total_bytes)}")
        if self.device_memory_bytes is not None:
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            rows.append(f"device: {self.device_name or 'given'} {self.device_memory_bytes / GIB:.1f} GiB -> {verdict} "
                        f"({self.total_bytes / self.device_memory_bytes:.0%} of it)")
        else:
            rows.append("device memory unknown (no CUDA device here): pass device_memory_bytes / --device-memory")
        rows.append(f"activations: {self.activation_method}")
        if self.suggestions:
            rows.append("switches (each alone; total per process):")
            for s in self.suggestions:
                fit = "" if s.fits is None else ("  fits" if s.fits else "  still too big")
                rows.append(f"  {s.switch:<70} {s.status:<20}{gib(s.total_bytes)} GiB{fit}")
        return "\n".join(rows)


# -- architectures --------------------------------------------------------------------------------------------
def known_architectures() -> dict[str, Path]:
    """Hub id -> the tdm/arch file recording that checkpoint's public component configs."""
    out = {}
    for f in sorted(ARCH_DIR.glob("*.json")):
        for hub_id in json.loads(f.read_text())["hub_ids"]:
            out[hub_id] = f
    return out


def _spec_from_folder(folder: Path) -> dict:
    """The component configs of a diffusers model folder (model_index.json + each component's config.json)."""
    from tdm.backbones import family_of, read_json_file

    index = read_json_file(folder / "model_index.json")
    comps = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        cfg_file = folder / name / "config.json"
        if entry[0] in ("diffusers", "transformers") and cfg_file.is_file():
            comps[name] = {"library": entry[0], "class": entry[1], "config": read_json_file(cfg_file)}
    limits = {}  # tokenizer lengths (the adapters cap their T5 sequence lengths at them)
    for name, entry in index.items():
        tok = folder / name / "tokenizer_config.json"
        if name.startswith("tokenizer") and tok.is_file():
            length = read_json_file(tok).get("model_max_length")
            if isinstance(length, int):
                limits[name] = length
    settings = read_json_file(folder / "tdm_backbone.json") if (folder / "tdm_backbone.json").is_file() else {}
    return {"family": family_of(folder), "components": comps, "source": str(folder), "tokenizer_max_length": limits,
            "settings": settings}


def architecture_spec(cfg) -> dict:
    """{family, components: {name: {library, class, config}}, source} of `cfg.distill.teacher`: the teacher's
    own config files when it is a local folder (or cached hub id), else the tdm/arch record of its hub id.
    Raises ValueError for an unsupported family or a teacher with no known architecture."""
    family = cfg.model.family
    if family not in supported_families():
        raise ValueError(f"memory plan: unknown family {family!r}; supported: {', '.join(supported_families())}")
    teacher = cfg.distill.teacher
    from tdm.backbones import resolve_model_path

    try:
        folder = resolve_model_path(teacher)
    except FileNotFoundError:
        folder = None
    if folder is not None and (folder / "model_index.json").is_file():
        spec = _spec_from_folder(folder)
        if spec["family"] != family:
            raise ValueError(f"memory plan: distill.teacher {teacher} is a {spec['family']!r} model but model.family "
                             f"is {family!r}")
        return spec
    if family == "digits":  # a fresh digits teacher: the architecture of params.yaml's model section
        return {"family": "digits", "components": None, "source": "model section (fresh digits architecture)"}
    known = known_architectures()
    for hub_id in (teacher, cfg.model.pretrained):
        if hub_id in known:
            spec = json.loads(known[hub_id].read_text())
            if spec["family"] != family:
                raise ValueError(f"memory plan: {hub_id} is a {spec['family']!r} model but model.family is {family!r}")
            return {**spec, "source": f"tdm/arch/{known[hub_id].name}"}
    raise ValueError(f"memory plan: no architecture for distill.teacher {teacher!r}: not a local model folder and "
                     f"not one of the recorded checkpoints ({', '.join(sorted(known))})")


def build_component(entry: dict) -> nn.Module:
    """One component on the meta device from its config (diffusers `from_config`, transformers config class)."""
    import diffusers
    import transformers

    cfg = {k: v for k, v in entry["config"].items() if not k.startswith("_")}
    # torch.device("meta"), not accelerate's init_empty_weights: under the latter transformers 5 loses weight
    # tying (T5's encoder.embed_tokens would become its own copy of `shared`).
    with torch.device("meta"), _quiet():
        if entry["library"] == "diffusers":
            return getattr(diffusers, entry["class"]).from_config(cfg)
        cfg.pop("architectures", None)
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        return getattr(transformers, entry["class"])(config)


@contextlib.contextmanager
def _quiet():
    import logging

    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


class _MetaBackbone:
    """Just enough of a family adapter for `Roles` and `predict` on meta modules: the family class's own
    methods (LoRA targets, time embedding, predict) over `net`, `vae` and the text encoders."""

    def __new__(cls, family: str, parts: dict[str, nn.Module], settings: dict | None = None):
        from tdm.backbones import FAMILIES

        adapter = FAMILIES[family]
        obj = adapter.__new__(adapter)
        obj.net = parts["net"]
        obj.vae = parts.get("vae")
        obj._parts = parts
        obj._null_cache = None
        # native shape / embedded guidance of Wan and FLUX (tdm.backbones.native_shape): the adapter's defaults
        obj.settings = {**getattr(adapter, "defaults", {}), **(settings or {})}
        if family == "flux":
            import diffusers

            obj.pipe = types.SimpleNamespace(
                _prepare_latent_image_ids=diffusers.FluxPipeline._prepare_latent_image_ids)
        if family == "cogvideox":
            import diffusers

            ns = types.SimpleNamespace(transformer=obj.net, vae_scale_factor_spatial=obj.vae_scale_factor)
            ns._prepare_rotary_positional_embeddings = types.MethodType(
                diffusers.CogVideoXPipeline._prepare_rotary_positional_embeddings, ns)
            obj.pipe = ns
        return obj


def _net_name(family: str) -> str:
    from tdm.backbones import FAMILIES

    return getattr(FAMILIES[family], "net_name", "unet")


def build_parts(cfg, spec: dict, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Every resident module as `tdm.distill.train` loads it (meta device, in `dtype`): "net" (the denoiser)
    plus the text encoders and VAE the family's adapter keeps."""
    from tdm.backbones import FAMILIES

    family = spec["family"]
    if spec["components"] is None:  # fresh digits (there is no pretrained digits model)
        from accelerate import init_empty_weights

        from tdm.backbones import DigitsArch, DigitsBackbone

        m = cfg.model
        with init_empty_weights(include_buffers=False), torch.random.fork_rng(devices=[]):
            b = DigitsBackbone.create(DigitsArch(channels=tuple(m.channels), layers_per_block=m.layers_per_block,
                                                 beta_schedule=m.beta_schedule))
        return {"net": b.net.to("meta"), "text_encoder": b.text_encoder.to("meta")}
    adapter = FAMILIES[family]
    comps = spec["components"]
    keep = [_net_name(family)] + list(getattr(adapter, "text_encoders", ("text_encoder",)))
    if family != "digits":
        keep.append("vae")
    parts = {}
    for name in keep:
        if name in comps:
            with _quiet():  # diffusers warns about fp32 modules on .to(dtype): _keep_in_fp32 restores them
                module = build_component(comps[name]).to(device="meta", dtype=dtype)  # buffers too
            _keep_in_fp32(module, comps[name]["library"], dtype)
            parts["net" if name == _net_name(family) else name] = module.eval().requires_grad_(False)
    if "net" not in parts:
        raise ValueError(f"memory plan: {spec['source']}: no {_net_name(family)} component")
    return parts


def _keep_in_fp32(module: nn.Module, library: str, dtype: torch.dtype) -> None:
    """What `from_pretrained(dtype=...)` keeps in float32 (a plain `.to(dtype)` does not): a diffusers model's
    `_keep_in_fp32_modules` at any low dtype (e.g. Wan's time embedder and norms), a transformers model's only
    at float16 (e.g. T5's `wo`), matched per dotted name part as the loaders match them."""
    keep = getattr(module, "_keep_in_fp32_modules", None)
    if not keep or dtype == torch.float32 or (library == "transformers" and dtype != torch.float16):
        return
    for name, p in module.named_parameters():
        if any(m in name.split(".") for m in keep):
            p.data = p.data.float()


# -- counting helpers -----------------------------------------------------------------------------------------
QUANTIZED_DTYPES = {"int8": "int8", "fp8": "float8_e4m3fn"}  # the element type of each distill.base_quantization


def quantized_base_weights(net: nn.Module, model_class: type) -> list[torch.Tensor]:
    """The weights `tdm.quantize.load_denoiser` quantises in `net` (a meta-device base, peft-wrapped or not):
    every `nn.Linear` weight outside the LoRA adapters and outside the model's `_keep_in_fp32_modules` (diffusers'
    torchao quantizer leaves those as loaded). Convolutions, norms, embeddings and biases are not among them."""
    return [m.weight for name, m in net.named_modules() if isinstance(m, nn.Linear) and "lora_" not in name
            and not skipped_by_diffusers(model_class, name.replace(".base_layer", ""))]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (element count x element size), each storage-sharing parameter once."""
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _by_dtype(params) -> dict[torch.dtype, tuple[int, int]]:
    out: dict[torch.dtype, list[int]] = {}
    seen = set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        n, b = out.setdefault(p.dtype, [0, 0])
        out[p.dtype] = [n + p.numel(), b + p.numel() * p.element_size()]
    return {k: tuple(v) for k, v in out.items()}


def adamw_state_bytes(params) -> tuple[int, int]:
    """(device bytes, host bytes) of torch AdamW's state after a step: exp_avg and exp_avg_sq in each
    parameter's dtype on its device; one float32 `step` scalar per tensor on the host (non-capturable AdamW)."""
    params = list({id(p): p for p in params}.values())
    return 2 * sum(p.numel() * p.element_size() for p in params), 4 * len(params)


def cond_shapes(family: str, parts: dict[str, nn.Module], batch: int, dtype: torch.dtype,
                tokenizer_max_length: dict[str, int] | None = None) -> dict[str, tuple]:
    """{name: (shape, dtype)} of the conditioning one batch carries into the denoiser (what the family adapter's
    `_encode` returns), from the text encoder configs and the adapters' sequence lengths (capped by the
    tokenizers' `model_max_length` where the adapter caps them and the folder says it)."""
    from tdm.backbones.pixart import MAX_SEQUENCE_LENGTH
    from tdm.backbones.sd3 import MAX_SEQUENCE_LENGTH as SD3_MAX

    from tdm.backbones import FAMILIES
    from tdm.backbones.flux import MAX_SEQUENCE_LENGTH as FLUX_MAX
    from tdm.backbones.wan import MAX_SEQUENCE_LENGTH as WAN_MAX
    from tdm.backbones.zimage import MAX_SEQUENCE_LENGTH as ZIMAGE_MAX

    limits = tokenizer_max_length or {}
    pixart_max = getattr(FAMILIES.get(family), "max_tokens", MAX_SEQUENCE_LENGTH)
    PIXART_LEN = min(pixart_max, limits.get("tokenizer", pixart_max))
    SD3_LEN = min(SD3_MAX, limits.get("tokenizer_3", SD3_MAX))

    def te(name):
        return parts[name].config

    if family in ("digits", "sd15"):
        c = te("text_encoder")
        return {"encoder_hidden_states": ((batch, c.max_position_embeddings, c.hidden_size), dtype)}
    if family == "sdxl":
        c1, c2 = te("text_encoder"), te("text_encoder_2")
        return {"encoder_hidden_states": ((batch, c1.max_position_embeddings, c1.hidden_size + c2.hidden_size), dtype),
                "text_embeds": ((batch, c2.projection_dim), dtype), "time_ids": ((batch, 6), torch.float32)}
    if family in ("pixart_alpha", "pixart_sigma"):
        c = te("text_encoder")
        return {"encoder_hidden_states": ((batch, PIXART_LEN, c.d_model), dtype),
                "encoder_attention_mask": ((batch, PIXART_LEN), torch.int64)}
    if family == "sd3":
        c1, c2, c3 = te("text_encoder"), te("text_encoder_2"), te("text_encoder_3")
        return {"encoder_hidden_states": ((batch, c1.max_position_embeddings + SD3_LEN, c3.d_model), dtype),
                "pooled_projections": ((batch, c1.projection_dim + c2.projection_dim), dtype)}
    if family == "cogvideox":
        c = te("text_encoder")
        return {"encoder_hidden_states": ((batch, parts["net"].config.max_text_seq_length, c.d_model), dtype)}
    if family == "wan":
        c, length = te("text_encoder"), min(WAN_MAX, limits.get("tokenizer", WAN_MAX))
        return {"encoder_hidden_states": ((batch, length, c.d_model), dtype)}
    if family == "flux":
        c1, c2 = te("text_encoder"), te("text_encoder_2")
        length = min(FLUX_MAX, limits.get("tokenizer_2", FLUX_MAX))
        out = {"encoder_hidden_states": ((batch, length, c2.d_model), dtype),
               "pooled_projections": ((batch, c1.hidden_size), dtype)}
        if parts["net"].config.guidance_embeds:
            out["guidance"] = ((batch,), torch.float32)
        return out
    if family == "zimage":  # Qwen3's hidden states padded to the sequence length + the kept-token mask
        c, length = te("text_encoder"), min(ZIMAGE_MAX, limits.get("tokenizer", ZIMAGE_MAX))
        return {"encoder_hidden_states": ((batch, length, c.hidden_size), dtype),
                "encoder_attention_mask": ((batch, length), torch.int64)}
    raise ValueError(f"memory plan: unknown family {family!r}")


def sample_shape(family: str, parts: dict[str, nn.Module], settings: dict | None = None) -> tuple[int, ...]:
    """One sample in the denoiser's space (what the family adapter's `sample_shape` gives; Wan and FLUX at their
    native shape: `settings`, tdm_backbone.json or the adapter's defaults)."""
    from tdm.backbones import FAMILIES

    c = parts["net"].config
    if family in ("wan", "flux", "zimage"):
        s = {**FAMILIES[family].defaults, **(settings or {})}
        if family in ("flux", "zimage"):  # FLUX: packed 2x2 inside predict, so in_channels = 4 x latent channels
            f = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
            return (c.in_channels // (4 if family == "flux" else 1), s["height"] // f, s["width"] // f)
        v = parts["vae"].config
        frames = (s["num_frames"] - 1) // v.scale_factor_temporal + 1
        return (c.in_channels, frames, s["height"] // v.scale_factor_spatial, s["width"] // v.scale_factor_spatial)
    if family == "cogvideox":
        frames = (c.sample_frames - 1) // parts["vae"].config.temporal_compression_ratio + 1
        return (frames, c.in_channels, c.sample_height, c.sample_width)
    size = c.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (c.in_channels, h, w)


def _tokenizer_limits(backbone) -> dict[str, int]:
    """The tokenizers' model_max_length of a loaded (real) backbone."""
    pipe = getattr(backbone, "pipe", None)
    out = {}
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None) if pipe is not None else getattr(backbone, name, None)
        if tok is not None:
            out[name] = tok.model_max_length
    return out


def _shape_bytes(shapes: dict[str, tuple]) -> int:
    return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in shapes.values())


# -- activation measurement (meta device) ---------------------------------------------------------------------
class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for flash / memory-efficient SDPA: saves what those kernels save (q, k, v, the output,
    a float32 log-sum-exp per query) and never the (L x L) probabilities the meta device's math path would."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run (nothing is differentiated on meta)
        q, k, v = ctx.saved_tensors[:3]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


_LOW = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul,
        torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.mm, torch.addmm, torch.einsum}
_FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.exp,
         torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.rsqrt, torch.Tensor.rsqrt}


class _Autocast(TorchFunctionMode):
    """CUDA autocast's policy for the ops these networks spend their activations in, on meta tensors (autocast
    itself does not run on the meta device). `low` None: no mixed precision, only the attention stand-in.
    Low-precision copies of float32 leaf parameters that require grad are cached for the region, as autocast
    does (`cache` holds them; their bytes are the plan's "autocast weight cache" line)."""

    def __init__(self, low: torch.dtype | None, exclude: set[int]):
        super().__init__()
        self.low, self.cache, self.exclude, self.attention_calls = low, {}, exclude, 0

    def _to(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype == dtype:
            return x
        if isinstance(x, nn.Parameter) and x.requires_grad and dtype == self.low:
            if id(x) not in self.cache:
                self.cache[id(x)] = x.to(dtype)
                self.exclude.add(self.cache[id(x)].untyped_storage()._cdata)  # its own line, not an activation
            return self.cache[id(x)]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask")
            q, k, v, mask = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
            if self.low:
                q, k, v = (self._to(a, self.low) for a in (q, k, v))
            self.attention_calls += 1
            return _FusedAttention.apply(q, k, v, mask)
        if self.low is not None and func in _LOW:
            args = tuple(self._to(a, self.low) for a in args)
            kwargs = {k: self._to(v, self.low) for k, v in kwargs.items()}
        elif self.low is not None and func in _FP32:
            if any(isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) for a in args[:1]):
                args = tuple(self._to(a, torch.float32) for a in args)
                kwargs = {k: self._to(v, torch.float32) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _SavedTensors:
    """Bytes autograd saves for backward, once per storage, parameters (and autocast's weight cache) excluded;
    split into the checkpointed units' own activations (recomputed in backward) and the rest."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.outer: dict[int, int] = {}
        self.units: list[dict[int, int]] = []
        self.unit_inputs: dict[int, int] = {}
        self._scope: dict[int, int] | None = None
        self._alive: list[torch.Tensor] = []  # storages stay alive (no key reuse) for the measurement

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.exclude:
            (self._scope if self._scope is not None else self.outer)[key] = storage.nbytes()
            self._alive.append(t)
        return t

    def checkpoint(self, module, *args):
        """A gradient_checkpointing_func: the unit runs with grad, its saved tensors go to its own scope (what
        recompute holds during backward); its tensor inputs are what checkpointing keeps."""
        for a in args:
            if isinstance(a, torch.Tensor):
                s = a.untyped_storage()
                if s._cdata not in self.exclude:
                    self.unit_inputs[s._cdata] = s.nbytes()
                    self._alive.append(a)
        outer, self._scope = self._scope, {}
        try:
            return module(*args)
        finally:
            self.units.append(self._scope)
            self._scope = outer

    def totals(self, checkpointing: bool) -> int:
        if not checkpointing:
            everything = dict(self.outer)
            for unit in self.units:
                everything.update(unit)
            return sum(everything.values())
        kept = {**self.outer, **self.unit_inputs}
        return sum(kept.values()) + max((sum(u.values()) for u in self.units), default=0)


def _set_checkpointing(net: nn.Module, func) -> bool:
    if not getattr(net, "_supports_gradient_checkpointing", False):
        return False
    net.enable_gradient_checkpointing(gradient_checkpointing_func=func)
    return True


def measure_activations(backbone, roles, parts: dict[str, nn.Module], family: str, batch: int,
                        compute_dtype: torch.dtype | None, unify: bool) -> dict:
    """One grad-carrying student forward on the meta device at `batch`, run with every checkpointable unit
    passed through `_SavedTensors.checkpoint` (the same ops as without checkpointing; each unit's saved tensors
    are kept in its own scope), so one pass gives both: {"saved": bytes autograd keeps without checkpointing,
    "saved_checkpointed": unit inputs + the rest + the largest unit, "autocast_cache": bytes of autocast's
    low-precision weight copies, "attention_calls", "checkpointed_units"}."""
    from tdm.student import k_conditioning

    net = roles.activate("student")
    modules = [*parts.values(), *roles.nets.values(), roles.k_embeddings]
    param_keys = {p.untyped_storage()._cdata for m in modules for p in m.parameters()}
    meter = _SavedTensors(param_keys)
    dt = compute_dtype or torch.float32
    dev = next(net.parameters()).device  # meta for a plan; a real device in the tests that check the meter
    x = torch.empty((batch, *sample_shape(family, parts, getattr(backbone, "settings", None))), device=dev,
                    dtype=torch.float32)
    t = torch.zeros((batch,), device=dev, dtype=torch.int64)
    limits = getattr(backbone, "_tokenizer_max_length", None) or _tokenizer_limits(backbone)
    # Attention masks all ones (every token kept, the longest prompt): the saved shapes do not depend on the values,
    # and an adapter that reads the mask on real tensors (Z-Image's per-prompt lengths) sees full-length prompts,
    # what it assumes on the meta device.
    cond = {k: (torch.ones if k.endswith("attention_mask") else torch.zeros)(s, device=dev, dtype=d)
            for k, (s, d) in cond_shapes(family, parts, batch, dt, limits).items()}
    k = torch.zeros((batch,), device=dev, dtype=torch.int64) if unify else None
    embedding = roles.k_embeddings["student"] if unify else None
    had = getattr(net, "is_gradient_checkpointing", False)
    checkpointing = _set_checkpointing(net, meter.checkpoint)
    mode = _Autocast(compute_dtype, param_keys)
    try:
        with torch.enable_grad(), mode, torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            with k_conditioning(backbone, net, embedding, k):
                backbone.predict(net, x, t, cond)
    finally:
        if checkpointing and not had and hasattr(net, "disable_gradient_checkpointing"):
            net.disable_gradient_checkpointing()
    cache = sum(c.numel() * c.element_size() for c in mode.cache.values())
    return {"saved": meter.totals(False), "saved_checkpointed": meter.totals(checkpointing),
            "autocast_cache": cache, "attention_calls": mode.attention_calls,
            "checkpointed_units": len(meter.units)}


# -- the plan -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Setup:
    mode: str
    gradient_checkpointing: bool
    batch_per_process: int
    embedding_store: bool = False
    adam8bit: bool = False
    fsdp: bool = False
    raw_student: bool = False  # distill.student_weights: raw (no EMA shadow)
    quantization: str | None = None  # distill.base_quantization: the frozen base's Linear weights int8 / fp8


def _lines(cfg, setup: _Setup, built: dict, num_processes: int, activations: dict) -> list[Line]:
    d = cfg.distill
    roles, parts = built["roles"], built["parts"]
    family = built["family"]
    n_shard = num_processes if setup.fsdp else 1
    shard_note = f" / {n_shard} (FSDP)" if n_shard > 1 else ""
    lines = []

    def add(section, what, params, dtype, nbytes, note="", device=True, shard=False, part=""):
        if shard and n_shard > 1:
            nbytes, note = -(-nbytes // n_shard), (note + shard_note).strip()
        lines.append(Line(section, what, params, dtype, nbytes, note, device, part))

    # weights: the denoiser roles
    base = [p for n, p in roles.nets["teacher"].named_parameters() if "lora_" not in n]
    frozen_what = "teacher = frozen base (shared)" if setup.mode == "lora" else "teacher (frozen copy)"
    if setup.quantization is not None and setup.mode == "lora":
        quantized = quantized_base_weights(roles.nets["teacher"], type(parts["net"]))
        n = sum(w.numel() for w in quantized)
        b = sum(weight_bytes(setup.quantization, *w.shape) for w in quantized)
        add("weights", "frozen base: Linear weights (quantised)", n, QUANTIZED_DTYPES[setup.quantization], b,
            "no grad; torchao weight-only, per-row scales (distill.base_quantization)", shard=True, part="teacher")
        done = {id(w) for w in quantized}
        base = [p for p in base if id(p) not in done]
    for dtype, (n, b) in _by_dtype(base).items():
        add("weights", frozen_what, n, _dtype_name(dtype), b, "no grad", shard=True, part="teacher")
    for role in ("student", "fake"):
        what = f"{role} {'LoRA adapter' if setup.mode == 'lora' else '(trained copy)'}"
        for dtype, (n, b) in _by_dtype(roles.parameters(role)).items():
            add("weights", what + (" + K embedding" if d.unify else ""), n, _dtype_name(dtype), b,
                "trained; the fp32 weights are the master copy" if dtype == torch.float32 else "trained", shard=True,
                part=role)
    for name, module in parts.items():
        if name == "net":
            continue
        if name.startswith("text_encoder") and setup.embedding_store:
            continue
        for dtype, (n, b) in _by_dtype(module.parameters()).items():
            add("weights", f"{name} (frozen)", n, _dtype_name(dtype), b,
                "resident: prompts encoded every iteration" if name.startswith("text") else "resident", part=name)
    # gradients, optimiser, EMA
    per_role = {r: roles.parameters(r) for r in ("student", "fake")}
    grad = max(tensor_bytes(ps) for ps in per_role.values())
    n_grad = max(sum(p.numel() for p in ps) for ps in per_role.values())
    add("gradients", "one role at a time (set_to_none after step)", n_grad, "float32", grad, shard=True)
    if n_shard > 1:  # FSDP2: one block gathered at a time plus the prefetched next; its full grads in backward
        from tdm.sharding import shard_units

        net = roles.nets["student"]
        units = shard_units(net) or [net]
        trained = {id(p) for ps in per_role.values() for p in ps}
        add("weights", "FSDP all-gather: largest block unsharded x 2 (prefetch)", 0, "",
            2 * max(tensor_bytes(list(u.parameters())) for u in units), "transient")
        add("gradients", "FSDP: largest block's full gradients before reduce-scatter", 0, "float32",
            max(tensor_bytes([p for p in u.parameters() if id(p) in trained]) for u in units), "transient")
    if num_processes > 1 and not setup.fsdp:
        add("gradients", "all-reduce buffers (average_gradients)", 0, "float32", 2 * grad,
            "torch.cat copy + the reduced mean")
    for role, ps in per_role.items():
        dev, host = adamw_state_bytes(ps)
        n = sum(p.numel() for p in {id(p): p for p in ps}.values())
        if setup.adam8bit:
            add("optimizer", f"8-bit AdamW {role}: 2 moments x 1 byte", n, "uint8", 2 * n,
                "bitsandbytes (distill.optimizer: adamw8bit); + block scales", shard=True, part=role)
        else:
            add("optimizer", f"AdamW {role}: exp_avg + exp_avg_sq", n, "float32", dev, shard=True, part=role)
            add("optimizer", f"AdamW {role}: step counters", len(ps), "float32", host, "per tensor", device=False,
                part=role)
    if not setup.raw_student:  # distill.student_weights "raw" (the official recipe) keeps no average
        ema = [p for p in per_role["student"]]
        add("ema", "student EMA shadow", sum(p.numel() for p in ema), "float32",
            4 * sum(p.numel() for p in ema), shard=True, part="student")
    # conditioning and the rollout
    dt = built["compute_dtype"] or built["base_dtype"]
    B = setup.batch_per_process
    enc = built["base_dtype"]  # the encoders' output dtype
    per_sample = _shape_bytes(cond_shapes(family, parts, 1, enc, built["backbone"]._tokenizer_max_length))
    add("conditioning", "prompt embeddings (cond + CFG concat: 3 x batch)", 0, _dtype_name(enc), 3 * B * per_sample,
        f"{per_sample / 2**20:.2f} MiB per prompt in the embedding store")
    sample = math.prod(built["sample_shape"]) * 4
    add("activations", f"rollout ({d.k if not d.unify else max(d.k_choices)} steps x inputs, x0, eps) + loss",
        0, "float32", (3 * (max(d.k_choices) if d.unify else d.k) + 8) * B * sample,
        "no-grad trajectory kept for both losses")
    a = activations[setup.mode]
    saved = B * a["saved_checkpointed" if setup.gradient_checkpointing else "saved"]
    add("activations", "saved for backward (one grad forward)", 0, _dtype_name(dt), saved,
        f"measured on meta at batch 1, x {B}" + (", checkpointed" if setup.gradient_checkpointing else ""))
    if d.regression_weight > 0:  # tdm/regression.py: a second student grad forward, the pairs on the host
        add("activations", "saved for backward (regression batch)", 0, _dtype_name(dt), saved,
            "distill.regression_weight: one more student forward in the generator's graph")
        add("conditioning", "teacher pairs (K grid points + endpoint each)", 0, "float32",
            (d.k + 1) * d.regression_pairs * sample, f"distill.regression_pairs {d.regression_pairs}", device=False)
        saved *= 2  # the margin below covers both
    add("activations", f"margin {ACTIVATION_MARGIN:.0%}: backward transients, workspaces", 0, "", int(
        ACTIVATION_MARGIN * saved), "estimate")
    if a["autocast_cache"] and not setup.fsdp:  # tdm turns autocast's cache off under FSDP (TDMTrainer._autocast)
        add("activations", "autocast weight cache (low-precision copies)", 0, _dtype_name(dt),
            2 * a["autocast_cache"],
            "student + fake trainables cast once per autocast region", shard=True)
    add("runtime", "CUDA context", 0, "", CUDA_CONTEXT_BYTES, "typical")
    return lines


def _build(cfg, spec: dict, mode: str) -> dict:
    from tdm.roles import Roles

    d = cfg.distill
    mp = _DTYPES[d.mixed_precision]
    # as tdm.distill.train: LoRA mode loads every part in the mixed-precision dtype; full mode in float32
    base_dtype = mp if mode == "lora" else torch.float32
    if spec["family"] == "digits":  # DigitsBackbone.load takes no dtype: float32 always
        base_dtype = torch.float32
    parts = build_parts(cfg, spec, base_dtype)
    backbone = _MetaBackbone(spec["family"], parts, spec.get("settings"))
    from accelerate import init_empty_weights

    with _quiet(), init_empty_weights(include_buffers=False):  # peft's new adapter weights are born on meta
        roles = Roles(backbone, mode, d.lora_rank, d.lora_alpha, k_max=max(d.k_choices) if d.unify else None)
    backbone._tokenizer_max_length = spec.get("tokenizer_max_length") or {}
    return {"family": spec["family"], "parts": parts, "backbone": backbone, "roles": roles, "base_dtype": base_dtype,
            "compute_dtype": mp if d.mixed_precision != "no" else None,
            "sample_shape": sample_shape(spec["family"], parts, spec.get("settings"))}


def _device_memory(device_memory_bytes) -> tuple[int | None, str | None]:
    if device_memory_bytes is not None:
        if isinstance(device_memory_bytes, bool) or not isinstance(device_memory_bytes, (int, float)) \
                or not math.isfinite(device_memory_bytes) or device_memory_bytes <= 0:
            raise ValueError(f"memory plan: device memory must be a positive number of bytes, got "
                             f"{device_memory_bytes!r}")
        return int(device_memory_bytes), None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), props.name
    return None, None


def plan(cfg, device_memory_bytes: int | float | None = None, num_processes: int = 1, *,
         embedding_store: bool | None = None, adam8bit: bool | None = None, fsdp: bool = False,
         suggestions: bool = True) -> Plan:
    """The per-process memory plan of `tdm distill` with `cfg` (a `tdm.config.Config`) on `num_processes`
    devices of `device_memory_bytes` each (default: CUDA device 0's total memory when there is one, else no
    verdict). `embedding_store` (no text encoders resident: `distill.prompt_store`) and `adam8bit`
    (`distill.optimizer: adamw8bit`) default to what `cfg` sets; `fsdp`: FSDP2 full shard assumed on (configs/accelerate/fsdp.yaml).
    Reads configs only.
    Raises ValueError for an unknown family, a teacher with no known architecture, device memory <= 0, or a
    process count that does not divide distill.batch_size."""
    t0 = time.perf_counter()
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"memory plan: num_processes must be an integer >= 1, got {num_processes!r}")
    d = cfg.distill
    if d.batch_size % num_processes:
        raise ValueError(f"memory plan: distill.batch_size {d.batch_size} is not divisible by {num_processes} "
                         f"processes")
    memory, name = _device_memory(device_memory_bytes)
    spec = architecture_spec(cfg)
    if embedding_store is None:
        embedding_store = d.prompt_store is not None
    if adam8bit is None:
        adam8bit = d.optimizer == "adamw8bit"
    setup = _Setup(d.mode, d.gradient_checkpointing, d.batch_size // num_processes, embedding_store, adam8bit, fsdp,
                   raw_student=d.student_weights == "raw", quantization=d.base_quantization)
    cache: dict[str, dict] = {}
    activations: dict[str, dict] = {}

    def built(mode):
        if mode not in cache:
            cache[mode] = _build(cfg, spec, mode)
        return cache[mode]

    def acts(mode):
        if mode not in activations:
            b = built(mode)
            activations[mode] = measure_activations(b["backbone"], b["roles"], b["parts"], b["family"], 1,
                                                    b["compute_dtype"], d.unify)
        return activations

    def lines_for(s: _Setup):
        return _lines(cfg, s, built(s.mode), num_processes, acts(s.mode))

    lines = lines_for(setup)
    b = built(d.mode)
    a = activations[d.mode]
    method = (f"saved-tensor bytes of one student forward with grad, measured on the meta device at the real shape "
              f"(batch 1 x batch; {a['attention_calls']} attention calls as fused kernels; autocast policy emulated; "
              f"{a['checkpointed_units']} checkpointable units), + {ACTIVATION_MARGIN:.0%}; about +/-25 % until "
              f"measured on a GPU")
    result = Plan(family=b["family"], source=spec["source"], mode=d.mode, mixed_precision=d.mixed_precision,
                  gradient_checkpointing=d.gradient_checkpointing, unify=d.unify,
                  lora_rank=d.lora_rank if d.mode == "lora" else None, batch_size=d.batch_size,
                  num_processes=num_processes, sample_shape=tuple(b["sample_shape"]),
                  options={"embedding_store": embedding_store, "adam8bit": adam8bit, "fsdp": fsdp,
                           "base_quantization": d.base_quantization},
                  lines=lines, device_memory_bytes=memory, device_name=name, activation_method=method)
    if suggestions:
        total = lambda ls: sum(x.bytes for x in ls if x.device)  # noqa: E731
        fits = lambda t: None if memory is None else t <= memory  # noqa: E731
        options = []
        if d.mode == "full":
            options.append(("-S distill.mode=lora", "exists", replace(setup, mode="lora")))
        if not d.gradient_checkpointing:
            options.append(("-S distill.gradient_checkpointing=true", "exists",
                            replace(setup, gradient_checkpointing=True)))
        if setup.batch_per_process > 1:
            half = max(1, setup.batch_per_process // 2)
            options.append((f"-S distill.batch_size={half * num_processes} (batch {half}/process)", "exists",
                            replace(setup, batch_per_process=half)))
            options.append((f"-S distill.batch_size={num_processes} (batch 1/process)", "exists",
                            replace(setup, batch_per_process=1)))
        if not embedding_store:
            options.append(("-S distill.prompt_store=outputs/prompt_store/store (tdm prompt-store)", "exists",
                            replace(setup, embedding_store=True)))
        if not adam8bit:
            options.append(("-S distill.optimizer=adamw8bit (bitsandbytes)", "exists", replace(setup, adam8bit=True)))
        if not setup.raw_student:
            options.append(("-S distill.student_weights=raw (no EMA shadow)", "exists",
                            replace(setup, raw_student=True)))
        if setup.quantization is None:  # LoRA mode only (full mode trains every weight): after the mode switch
            label = "-S distill.base_quantization=int8 (torchao)"
            options.append(((label if d.mode == "lora" else f"-S distill.mode=lora {label}"), "exists",
                            replace(setup, mode="lora", quantization="int8")))
        if not fsdp and num_processes > 1:
            options.append((f"FSDP2 over {num_processes} processes (configs/accelerate/fsdp.yaml)", "exists",
                            replace(setup, fsdp=True)))
        # Together: tdm's FSDP refuses 8-bit AdamW and a quantised base (TDMTrainer.check_fsdp), so the
        # combinations are the ones a run can launch: every switch without FSDP, and FSDP with the others.
        every = replace(setup, mode="lora", gradient_checkpointing=True, batch_per_process=1, embedding_store=True,
                        adam8bit=True, fsdp=False, raw_student=True, quantization=setup.quantization or "int8")
        if every != setup:
            options.append(("all of the above but FSDP" if num_processes > 1 else "all of the above", "", every))
        if num_processes > 1:
            sharded = replace(every, fsdp=True, adam8bit=False, quantization=None)
            if sharded != setup:
                options.append(("FSDP2 + all but adamw8bit, base_quantization", "", sharded))
        for label, status, s in options:
            t = total(lines_for(s))
            result.suggestions.append(Suggestion(label, status, t, fits(t)))
    result.build_s = round(time.perf_counter() - t0, 2)
    return result


def run_dry(cfg, device_memory_bytes: int | float | None = None, num_processes: int = 1, stream=None) -> dict:
    """`tdm distill --dry-run`: the plan's table to `stream` (default stderr), its dict returned."""
    result = plan(cfg, device_memory_bytes=device_memory_bytes, num_processes=num_processes)
    print(result.render(), file=stream or sys.stderr)
    return result.to_dict()


def load_config(path, overrides: list[str] | None = None):
    """`tdm.config.load` for a plan: a `model.pretrained` hub id that is not in this machine's HF cache is taken
    to be the recorded checkpoint of its family when tdm/arch has it (a plan needs configs, not weights); every
    other check is the stage's own."""
    import tdm.backbones
    from tdm import config

    real = tdm.backbones.check_model
    known = known_architectures()

    def check(name):
        try:
            return real(name)
        except FileNotFoundError:
            if name in known:
                return ARCH_DIR, json.loads(known[name].read_text())["family"]
            raise

    tdm.backbones.check_model = check
    try:
        return config.load(path, overrides or [])
    finally:
        tdm.backbones.check_model = real
