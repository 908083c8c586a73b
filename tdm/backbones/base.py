"""The backbone protocol: everything the TDM math needs from a model family, and nothing more.

A backbone owns the frozen parts (tokenizer, text encoder, VAE, schedule) and the *teacher* denoiser `net`.
Student and fake score are the same architecture (copies or LoRA adapters on `net`) and are passed to
`predict` explicitly, so one backbone serves all three roles.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from tdm.schedule import NoiseSchedule

# Conditioning is a dict of batch-first tensors: {"encoder_hidden_states": (B, L, D)} for SD-style UNets,
# plus pooled embeddings / time ids for families that take them.
Cond = dict[str, torch.Tensor]


def cat_cond(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch (e.g. cond and uncond for one batched CFG forward)."""
    keys = conds[0].keys()
    if any(c.keys() != keys for c in conds):
        raise ValueError("cannot concatenate conditionings with different keys")
    return {k: torch.cat([c[k] for c in conds]) for k in keys}


class Backbone(ABC):
    """One model family behind one interface (docs/design.md, "backbones/")."""

    family: str
    net: nn.Module  # the teacher denoiser (UNet / transformer)
    schedule: NoiseSchedule
    prediction_type: str
    clip_x0: float | None = None  # samplers clip x0 to [-c, c] (pixel-space models); None for latents
    image_channels: int = 3  # channels of the images `encode_images` takes (RGB for VAE-based families)
    # A prompt-embedding store (`tdm.backbones.stored_prompts.PromptStore`) attached with its `attach`: while set,
    # `encode_prompts` and `null_cond` read it instead of running the text encoders.
    prompt_store = None
    source_folder: Path | None = None  # the folder the backbone was loaded from (None: built in memory)
    skipped_components: tuple[str, ...] = ()  # components not loaded (text encoders, when a store replaces them)

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample in the space the denoiser works in (latents, or pixels for digits)."""

    def set_resolution(self, pixels: int | None, where: str = "resolution") -> None:
        """Train / sample at `pixels` x `pixels` instead of the native size (pipeline families); ValueError here."""
        if pixels is not None:
            raise ValueError(f"{where}: the {self.family} model has one native size (got {pixels} px)")

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Text conditioning for `prompts`, without building a graph."""

    def null_cond(self, n: int) -> Cond:
        """The unconditional (empty prompt) conditioning, repeated n times; encoded once (or read from the attached
        prompt store) and cached."""
        if getattr(self, "_null_cache", None) is None:
            store = self.prompt_store
            self._null_cache = store.null(self) if store is not None else self._null()
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null_cache.items()}

    def _null(self) -> Cond:
        """The family's unconditional conditioning for one sample (the encoding of "" unless the family says
        otherwise: SDXL's zeros)."""
        return self.encode_prompts([""])

    def prompt_settings(self) -> dict:
        """Everything besides the text encoders' and tokenizers' files that decides what `encode_prompts` /
        `null_cond` return (sequence lengths, SDXL's time ids, FLUX's embedded guidance): JSON values, part of a
        prompt store's fingerprint (`tdm.backbones.stored_prompts`). Readable without the text encoders."""
        return {}

    def missing_text_encoders(self) -> None:
        """Raise when the text encoders were not loaded and no prompt store stands in for them."""
        if self.skipped_components and self.prompt_store is None:
            raise RuntimeError(f"{self.family}: loaded without its text encoders ({', '.join(self.skipped_components)}) "
                               f"and no prompt store is attached (tdm.backbones.stored_prompts.attach)")

    @abstractmethod
    def predict(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The raw model output of `net` (teacher, student or fake score) at (x_t, t)."""

    def predict_x0_eps(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                       cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from `net`'s output at (x_t, t), whatever its prediction type."""
        return self.schedule.to_x0_eps(self.predict(net, x_t, t, cond), x_t, t, self.prediction_type)

    @contextlib.contextmanager
    def time_offset(self, net: nn.Module, offset: torch.Tensor) -> Iterator[None]:
        """While active, `offset` (B, D) is added to `net`'s time embedding (how TDM-unify feeds K: see
        `tdm.student.k_conditioning`, its one caller)."""
        handle = self.time_embedding(net).register_forward_hook(lambda m, i, out: out + offset.to(out.dtype))
        try:
            yield
        finally:
            handle.remove()

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W) -> the denoiser's space (VAE latents; identity in pixel space)."""

    @abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Samples in the denoiser's space -> uint8 images (B, H, W, C); video families give frames
        (B, F, H, W, C)."""

    def time_embedding(self, net: nn.Module) -> nn.Module:
        """The module whose output is the denoiser's time embedding (TDM-unify adds its K embedding there)."""
        return net.time_embedding

    def time_embed_dim(self, net: nn.Module) -> int:
        return self.time_embedding(net).linear_2.out_features

    @property
    @abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Module names a LoRA on `net` should target."""

    @abstractmethod
    def save(self, folder: str | Path, net: nn.Module | None = None,
             extra_files: dict[str, str | bytes] | None = None, scheduler=None) -> None:
        """Write a diffusers-style model folder atomically (with `net` in place of the teacher and `scheduler`
        in place of the model's when given, plus `extra_files` {name: text or bytes}, e.g. a student's
        sidecars)."""

    def load_lora(self, folder: str | Path, adapter_name: str = "default") -> nn.Module:
        """Inject a LoRA (any layout `tdm.lora.load_lora` reads: the peft folder `tdm distill` writes to
        `student_lora/`, diffusers, kohya) into `net` as a live adapter and activate it; returns `net`. Works for
        every family, PixArt too (diffusers has no LoRA mixin for it). FileNotFoundError / ValueError naming the
        path or the module when it is not a LoRA or does not fit this model."""
        from tdm.lora import attach, load_lora

        return attach(self.net, load_lora(folder), adapter_name=adapter_name)

    def to(self, device: torch.device | str) -> "Backbone":
        for module in self.modules().values():
            module.to(device)
        self._null_cache = None
        return self

    def copy_skipped_components(self, tmp: Path) -> None:
        """A folder being saved from a backbone loaded without some components (`skipped_components`): those
        components' folders are linked (or copied) from `source_folder` and their model_index.json entries
        restored, so the saved folder is complete and its text encoders are byte-identical to the source's."""
        if not self.skipped_components:
            return
        import json
        import shutil

        if self.source_folder is None:
            raise RuntimeError(f"{self.family}: components {self.skipped_components} were not loaded and the source "
                               f"folder is unknown: cannot save a complete model folder")
        source = json.loads((Path(self.source_folder) / "model_index.json").read_text())
        index_file = Path(tmp) / "model_index.json"
        index = json.loads(index_file.read_text())
        for name in self.skipped_components:
            shutil.rmtree(Path(tmp) / name, ignore_errors=True)
            shutil.copytree(Path(self.source_folder) / name, Path(tmp) / name, copy_function=_link_or_copy)
            index[name] = source[name]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def modules(self) -> dict[str, nn.Module]:
        """The torch modules the backbone holds, by name (for device moves and freezing)."""
        return {"net": self.net}


def forget_call_settings(*tokenizers) -> None:
    """Clear the truncation / padding a fast tokenizer's backend keeps from its last call (transformers sets
    them again on every call), so `save_pretrained` writes the same tokenizer.json whether or not the tokenizer
    ran in this process: a resumed run saves the same bytes as an uninterrupted one (and DVC sees no change)."""
    for tokenizer in tokenizers:
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "no_truncation"):
            backend.no_truncation()
            backend.no_padding()


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link to `src`'s target (symlinks followed, as in the HF cache), or a copy across file systems."""
    import os
    import shutil

    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def write_extra_files(folder: Path, files: dict[str, str | bytes] | None) -> None:
    for name, content in (files or {}).items():
        (Path(folder) / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 (B, H, W, C)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
