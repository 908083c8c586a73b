"""The shared half of every real backbone: a diffusers pipeline folder behind the `Backbone` protocol.

A family adapter (sd15.py, sdxl.py, pixart.py, sd3.py, cogvideox.py) says which pipeline class it reads, which
denoiser classes, prediction types and schedulers it handles, and how its denoiser is called. This module does
the rest once: checks a folder before loading any weights, loads it with `from_pretrained` (a local folder or a
cached hub id), builds the schedule view from the scheduler, encodes prompts without a graph, moves images to
latents and back through the VAE (scaling and shift factors), and saves a folder that diffusers and
`load_backbone` both read back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from tdm.backbones.base import Backbone, Cond, forget_call_settings, to_uint8, write_extra_files
from tdm.schedule import FlowSchedule, NoiseSchedule, VPSchedule

# The LoRA targets of diffusers' SD/SDXL UNets (attention, feed-forward, resnets, resamplers): the set the
# authors' and DMD2's UNet LoRAs use.
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "TDMFlowScheduler")
TDM_SCHEDULERS = "tdm.scheduling_tdm"  # the module model_index.json names for a `tdm export`ed folder's scheduler


def scheduler_class(library: str | None, name: str | None):
    """The scheduler class a model_index.json entry [library, name] names: diffusers', or tdm's own (the
    student schedulers of an exported folder); None when unknown."""
    if library == TDM_SCHEDULERS:
        from tdm import scheduling_tdm as module
    else:
        import diffusers as module
    return getattr(module, str(name), None)


def text_encoder_components(meta: dict) -> tuple[str, ...]:
    """The text encoder components a model_index.json lists (text_encoder, text_encoder_2, ...), null ones left out."""
    return tuple(name for name, spec in meta.items() if name.startswith("text_encoder") and isinstance(spec, list)
                 and len(spec) == 2 and spec[1] is not None)


class UnsupportedModel(ValueError):
    """A folder this adapter cannot run: wrong pipeline or denoiser class, prediction type or schedule."""


def read_model_index(folder: Path) -> dict:
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"not a model folder (no model_index.json): {folder}")
    return json.loads(index.read_text())


def schedule_view(scheduler, where: str) -> tuple[NoiseSchedule, str]:
    """(schedule, prediction type) of a diffusers scheduler: VP from `alphas_cumprod`, or rectified flow."""
    name = type(scheduler).__name__
    if name in FLOW_SCHEDULERS:
        if getattr(scheduler.config, "invert_sigmas", False):
            raise UnsupportedModel(f"{where}: {name} with invert_sigmas is not handled")
        return FlowSchedule(scheduler.config.num_train_timesteps), "flow"
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise UnsupportedModel(f"{where}: {name} is neither a VP scheduler (alphas_cumprod) nor a flow-matching "
                               f"one ({', '.join(FLOW_SCHEDULERS)}); its schedule is not handled")
    schedule = VPSchedule.from_scheduler(scheduler)
    return schedule, scheduler.config.prediction_type


class PipelineBackbone(Backbone):
    """A diffusers pipeline as a backbone; subclasses fill in the family specifics."""

    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s this family reads
    net_name: str = "unet"  # the denoiser's component name
    net_classes: tuple[str, ...] = ("UNet2DConditionModel",)
    prediction_types: tuple[str, ...] = ("epsilon", "v_prediction")
    text_encoders: tuple[str, ...] = ("text_encoder",)
    load_kwargs: dict = {}  # extra `from_pretrained` arguments (e.g. no safety checker)

    def __init__(self, pipe, where: str = "model"):
        self.pipe = pipe
        self.net = getattr(pipe, self.net_name)
        self.vae = pipe.vae.eval().requires_grad_(False)
        for name in self.text_encoders:
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                encoder.eval().requires_grad_(False)
        self.scheduler = pipe.scheduler
        self.schedule, self.prediction_type = self.check_schedule(pipe.scheduler, where)
        self._null_cache = None

    # -- checks (cheap: config files only) ----------------------------------------------------------------------
    @classmethod
    def check_schedule(cls, scheduler, where: str) -> tuple[NoiseSchedule, str]:
        schedule, ptype = schedule_view(scheduler, where)
        if ptype not in cls.prediction_types:
            raise UnsupportedModel(f"{where}: prediction type {ptype!r} of {type(scheduler).__name__} is not handled "
                                   f"by the {cls.family} adapter (handles {', '.join(cls.prediction_types)})")
        if schedule.zero_terminal_snr and ptype == "epsilon":
            raise UnsupportedModel(f"{where}: an epsilon model on a zero-terminal-SNR schedule has no x0 at t = T; "
                                   f"not handled")
        return schedule, ptype

    @classmethod
    def check_folder(cls, folder: Path) -> None:
        """Fail before loading any weights if this adapter cannot run the folder."""
        meta = read_model_index(folder)
        where = str(Path(folder) / "model_index.json")
        if meta.get("_class_name") not in cls.pipeline_classes:
            raise UnsupportedModel(f"{where}: pipeline {meta.get('_class_name')!r} is not a {cls.family} model "
                                   f"(expects {', '.join(cls.pipeline_classes)})")
        net = (meta.get(cls.net_name) or [None, None])[1]
        if net not in cls.net_classes:
            raise UnsupportedModel(f"{where}: {cls.net_name} class {net!r} is not handled by the {cls.family} adapter "
                                   f"(expects {', '.join(cls.net_classes)})")
        library, sched_name = (meta.get("scheduler") or [None, None])
        sched_cls = scheduler_class(library, sched_name)
        if sched_cls is None:
            raise UnsupportedModel(f"{where}: unknown scheduler class {sched_name!r}")
        config_file = Path(folder) / "scheduler" / "scheduler_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: missing (the schedule is read from it)")
        cls.check_schedule(sched_cls.from_config(json.loads(config_file.read_text())), str(config_file))

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype | None = None,
             text_encoders: bool = True, quantization: str | None = None) -> "PipelineBackbone":
        """The backbone of a pipeline folder; `text_encoders=False` does not construct the text encoders at all
        (a prompt store stands in for them: `tdm.backbones.stored_prompts`); saving such a backbone links their folders.
        `quantization` ("int8" / "fp8"): the denoiser's Linear weights held weight-only quantised (`tdm.quantize`)."""
        folder = Path(folder)
        cls.check_folder(folder)
        pipe, skipped = cls.load_pipeline(folder, dtype, text_encoders, quantization)
        return cls.with_source(cls(pipe, where=str(folder)), folder, skipped)

    @classmethod
    def load_pipeline(cls, folder: Path, dtype: torch.dtype | None, text_encoders: bool = True,
                      quantization: str | None = None):
        """(pipeline, components skipped): `from_pretrained` of the folder's pipeline class, the text encoders
        passed as None (never built) unless `text_encoders`; with `quantization` the denoiser is loaded first by
        `tdm.quantize.load_denoiser` (diffusers' TorchAoConfig, Linear weights only) and handed to the pipeline."""
        import diffusers

        meta = read_model_index(folder)
        skipped = () if text_encoders else text_encoder_components(meta)
        given = {name: None for name in skipped}
        if quantization is not None:
            from tdm.quantize import load_denoiser

            net_cls = getattr(diffusers, meta[cls.net_name][1])
            given[cls.net_name] = load_denoiser(folder, cls.net_name, net_cls, quantization, dtype)
        pipe = getattr(diffusers, meta["_class_name"]).from_pretrained(
            folder, dtype=dtype, **cls.load_kwargs, **given)
        return pipe, skipped

    @staticmethod
    def with_source(backbone: "PipelineBackbone", folder: Path, skipped: tuple[str, ...]) -> "PipelineBackbone":
        backbone.source_folder, backbone.skipped_components = Path(folder), tuple(skipped)
        return backbone

    def save(self, folder: str | Path, net: nn.Module | None = None,
             extra_files: dict[str, str | bytes] | None = None, scheduler=None) -> None:
        """The whole pipeline with `save_pretrained` (diffusers reads it back as is), `net` in place of the
        teacher and `scheduler` in place of the pipeline's when given (model_index.json then names its module,
        e.g. ["tdm.scheduling_tdm", "TDMScheduler"], which diffusers imports on load). Written atomically. The
        pipeline class in model_index.json names the family (a `tdm_family` key there would make diffusers warn
        on every load)."""
        from tdm.artifacts import atomic_folder

        swaps = {self.net_name: net, "scheduler": scheduler}
        with atomic_folder(folder) as tmp:
            originals = {name: getattr(self.pipe, name) for name in swaps}
            try:
                for name, module in swaps.items():
                    if module is not None:
                        self.pipe.register_modules(**{name: module})
                forget_call_settings(*(getattr(self.pipe, n) for n in self.pipe.components if n.startswith("tokenizer")))
                self.pipe.save_pretrained(tmp)
            finally:
                self.pipe.register_modules(**originals)
            self.copy_skipped_components(tmp)
            write_extra_files(tmp, extra_files)

    # -- shapes ---------------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # A training size other than the native one (a `distill.stages` entry's resolution), in latents; None = native.
    latent_override: tuple[int, int] | None = None

    @property
    def native_latent_size(self) -> tuple[int, int]:
        """(height, width) of the latents the denoiser is configured for."""
        size = self.net.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the latents tdm samples and trains at: the native size unless `set_resolution`."""
        return self.latent_override or self.native_latent_size

    @property
    def latent_multiple(self) -> int:
        """What a latent side must be a multiple of: the denoiser's spatial patch (1 for UNets)."""
        patch = getattr(self.net.config, "patch_size", None) or 1
        return int(patch[-1] if isinstance(patch, (tuple, list)) else patch)

    def set_resolution(self, pixels: int | None, where: str = "resolution") -> None:
        """Train / sample square `pixels` x `pixels` images instead of the native size (None: back to native),
        e.g. the 512 px first stage of a multi-stage SDXL distillation (the TDM paper's SDXL recipe). SDXL's size
        time ids follow. Raises ValueError naming `where` for a side that is not a multiple of the VAE factor x
        the patch, or larger than the native size (positional embeddings are sized for it)."""
        if pixels is None:
            self.latent_override = None
            return
        m = self.vae_scale_factor * self.latent_multiple
        native = self.native_latent_size
        if pixels % m:
            raise ValueError(f"{where}: {pixels} px is not a multiple of {m} (the VAE's factor "
                             f"{self.vae_scale_factor} x the denoiser's patch {self.latent_multiple})")
        side = pixels // self.vae_scale_factor
        if side > min(native):
            raise ValueError(f"{where}: {pixels} px exceeds the model's native "
                             f"{native[0] * self.vae_scale_factor}x{native[1] * self.vae_scale_factor} px")
        self.latent_override = None if (side, side) == tuple(native) else (side, side)

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        h, w = self.latent_size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.net.config.in_channels, *self.latent_size)

    @staticmethod
    def net_inputs(net: nn.Module, x_t: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, Cond]:
        """x_t and the float conditioning in the denoiser's dtype: a saved student (float32 denoiser) may sit
        beside bf16 text encoders, and sampling runs without autocast."""
        dtype = getattr(net, "dtype", x_t.dtype)
        return x_t.to(dtype), {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}

    # -- prompts --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """The pipeline's own encoding of `prompts` (batch-first tensors on the backbone's device), or the attached
        prompt store's rows (bit-identical; `tdm.prompt_store`). RuntimeError when the text encoders were not
        loaded and no store is attached; KeyError naming a prompt the store lacks."""
        if self.prompt_store is not None:
            return self.prompt_store.encode(list(prompts), self)
        self.missing_text_encoders()
        return self._encode(list(prompts))

    def prompt_settings(self) -> dict:
        length = getattr(self, "max_sequence_length", None)
        return {} if length is None else {"max_sequence_length": int(length)}

    def _encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    # -- latents --------------------------------------------------------------------------------------------------
    def _shift(self) -> float:
        return getattr(self.vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents (the VAE posterior mean: deterministic)."""
        latents = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        return ((latents - self._shift()) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        latents = x0.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor + self._shift()
        return to_uint8(self.vae.decode(latents, return_dict=False)[0].float())

    # -- LoRA -----------------------------------------------------------------------------------------------------
    @property
    def lora_target_modules(self) -> list[str]:
        return list(UNET_LORA_TARGETS)

    def modules(self) -> dict[str, nn.Module]:
        mods = {"net": self.net, "vae": self.vae}
        for name in self.text_encoders:
            if getattr(self.pipe, name, None) is not None:
                mods[name] = getattr(self.pipe, name)
        return mods
