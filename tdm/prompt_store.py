"""The prompt_store stage (`tdm prompt-store`, before distill): a prompt set encoded once by a model's text encoders
into outputs/prompt_store/store. The store's layout, fingerprint and reader are `tdm.backbones.stored_prompts`
(imported by the backbones, so it reads no config); this module is the stage around it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tdm.backbones.stored_prompts import (PromptStore, StoreMismatch, attach, digit_prompts, dtype_name,  # noqa: F401
                                          fingerprint, frozen_dtype, open_for, write_store)

STAGE = "prompt_store"


# -- the stage -------------------------------------------------------------------------------------------------
def source_prompts(source: str) -> list[str]:
    """The prompts of one source: "digits" (`digit_prompts`), a prompt file (`tdm.data.read_prompts`), or an
    image- / video-caption folder (its metadata.jsonl captions, as teacher-ft trains on them)."""
    from tdm.data import ImageCaptionFolder, VideoCaptionFolder, holds_clips, read_prompts

    if source == "digits":
        return digit_prompts()
    path = Path(source).expanduser()
    if path.is_dir():
        data = VideoCaptionFolder.open(path) if holds_clips(path) else ImageCaptionFolder.open(path)
        return list(data.captions)
    return read_prompts(path)


def load_dtype(cfg) -> torch.dtype | None:
    """The dtype the store's encoders load in: prompt_store.dtype, "auto" = as distill loads its frozen base
    (`frozen_dtype`)."""
    choice = cfg.prompt_store.dtype
    if choice == "auto":
        return frozen_dtype(cfg.distill.mode, cfg.distill.mixed_precision)
    return {"model": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def stage_sources(cfg) -> tuple[str, ...]:
    """prompt_store.prompts, or (null) the distill prompt source."""
    return cfg.prompt_store.prompts if cfg.prompt_store.prompts is not None else (cfg.distill.prompts,)


def stage_prompts(cfg) -> list[str]:
    out: list[str] = []
    for source in stage_sources(cfg):
        out += source_prompts(source)
    return out


def store_model(cfg) -> str:
    """The model whose text encoders the stage runs: `prompt_store.model`, else `distill.teacher`."""
    return cfg.prompt_store.model or cfg.distill.teacher


def check_inputs(cfg) -> None:
    """The model folder and every prompt source, checked before any model loads; errors name the key."""
    from tdm.backbones import check_model

    key = "prompt_store.model" if cfg.prompt_store.model is not None else "prompt_store.model (= distill.teacher)"
    try:
        check_model(store_model(cfg))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}: {err} (run `tdm teacher-ft` first?)") from None
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    for source in stage_sources(cfg):
        try:
            source_prompts(source)
        except (OSError, ValueError) as err:
            raise ValueError(f"prompt_store.prompts: {source}: {err}") from None


def run(cfg, paths=None, progress: bool = True) -> dict:
    """The prompt_store stage: encode `prompt_store.prompts` with `prompt_store.model`'s text encoders into
    outputs/prompt_store/store, write metrics/prompt_store.json."""
    from tdm.artifacts import write_json
    from tdm.backbones import load_backbone, resolve_model_path
    from tdm.config import StagePaths

    paths = paths or StagePaths.of(STAGE)
    check_inputs(cfg)
    ps = cfg.prompt_store
    dtype = load_dtype(cfg)
    folder = resolve_model_path(store_model(cfg))
    backbone = load_backbone(folder, dtype=dtype)
    backbone.to("cuda" if torch.cuda.is_available() else "cpu")
    summary = write_store(backbone, folder, stage_prompts(cfg), paths.out_dir / "store", dtype=dtype,
                          batch_size=ps.batch_size, progress=progress)
    metrics = {**summary, "family": backbone.family, "load_dtype": dtype_name(dtype)}
    write_json(paths.metrics, metrics)
    return metrics


__all__ = ["PromptStore", "StoreMismatch", "attach", "open_for", "write_store", "fingerprint",
           "digit_prompts", "source_prompts", "stage_prompts", "load_dtype", "run", "check_inputs", "STAGE"]
