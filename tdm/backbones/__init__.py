"""Model families behind one protocol (`Backbone`). The registry maps a family name to its adapter."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tdm.backbones.base import Backbone, Cond, cat_cond
from tdm.backbones.cogvideox import CogVideoXBackbone
from tdm.backbones.digits import DigitsArch, DigitsBackbone
from tdm.backbones.flux import FluxBackbone
from tdm.backbones.zimage import ZImageBackbone
from tdm.backbones.pipeline import PipelineBackbone, UnsupportedModel
from tdm.backbones.pixart import PixArtAlphaBackbone
from tdm.backbones.pixart_sigma import PixArtSigmaBackbone
from tdm.backbones.sd3 import SD3Backbone
from tdm.backbones.sd15 import SD15Backbone
from tdm.backbones.sdxl import SDXLBackbone
from tdm.backbones.wan import WanBackbone

FAMILIES: dict[str, type[Backbone]] = {
    "digits": DigitsBackbone, "sd15": SD15Backbone, "sdxl": SDXLBackbone, "pixart_alpha": PixArtAlphaBackbone,
    "sd3": SD3Backbone, "cogvideox": CogVideoXBackbone,
    # The new-families issue (#14): SD3.5 Medium / Large load as "sd3" (same pipeline, adapter unchanged).
    "pixart_sigma": PixArtSigmaBackbone, "wan": WanBackbone, "flux": FluxBackbone,
    "zimage": ZImageBackbone,
}
# A hub checkpoint's model_index.json names its pipeline class, not our family.
PIPELINE_FAMILIES: dict[str, str] = {cls: name for name, adapter in FAMILIES.items()
                                     for cls in getattr(adapter, "pipeline_classes", ())}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local model folder, or a hub id resolved in the local HF cache (offline: nothing is downloaded)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:
            raise FileNotFoundError(f"{name}: not a local folder and not in the HF cache "
                                    f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); "
                                    f"download it on a connected machine first") from None
    raise FileNotFoundError(f"model folder not found: {name}")


def read_json_file(path: str | Path, what: str = "a JSON object") -> dict:
    """A model folder's JSON config file as a dict; ValueError naming the file when it is not UTF-8 JSON text
    or not an object, FileNotFoundError when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {what}, got a JSON {type(data).__name__}")
    return data


def family_of(folder: str | Path) -> str:
    """The family a model folder belongs to: `tdm_family` in its model_index.json (folders we wrote), else
    the family that reads its pipeline class (hub checkpoints). FileNotFoundError without model_index.json,
    ValueError naming the file when it is not a JSON object, UnsupportedModel for a family no adapter runs."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"not a model folder (no model_index.json): {folder}")
    meta = read_json_file(index)
    family = meta.get("tdm_family") or PIPELINE_FAMILIES.get(meta.get("_class_name"))
    if family not in FAMILIES:
        raise UnsupportedModel(f"{index}: unsupported model ({meta.get('_class_name')!r}, family {family!r}); "
                               f"supported families: {', '.join(FAMILIES)} "
                               f"(pipelines: {', '.join(PIPELINE_FAMILIES)})")
    return family


# Files a diffusers / transformers component folder keeps its weights in (single files or sharded indexes).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def check_safetensors(path: Path) -> None:
    """A .safetensors file whose header parses and whose size covers every tensor (a truncated copy fails here,
    naming the file, instead of deep inside a loader)."""
    import struct

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError(f"{path}: not a safetensors file (truncated or corrupt header)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError(f"{path}: not a safetensors file (header is not JSON)") from None
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated ({size} bytes, its header needs {8 + n + end})")


def check_weights(folder: Path, skipped: tuple[str, ...] = ()) -> None:
    """Every model component model_index.json lists (a subfolder with a config.json) has its weights: a weight
    file, or a shard index whose shards are all there; .safetensors headers are checked too. No tensor is read.
    `skipped`: components the adapter never loads (sd15's safety checker). Raises FileNotFoundError / ValueError
    naming the component folder or file."""
    meta = read_json_file(folder / "model_index.json")
    for name, spec in meta.items():
        if name.startswith("_") or name in skipped or not isinstance(spec, list) or len(spec) != 2 \
                or spec[1] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{folder}: component {name!r} is listed in model_index.json but {sub} is missing")
        if not (sub / "config.json").is_file():  # a scheduler, tokenizer or feature extractor: no weights
            continue
        read_json_file(sub / "config.json")
        files = [f for f in sub.iterdir() if f.is_file()]
        indexes = [f for f in files if f.name.endswith(".index.json")]
        for index in indexes:
            shards = set(read_json_file(index).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (sub / str(s)).is_file())
            if missing:
                raise FileNotFoundError(f"{index}: shard(s) missing: {', '.join(missing[:3])}")
        weights = [f for f in files if f.name.endswith(WEIGHT_SUFFIXES)]
        if not weights and not indexes:
            raise FileNotFoundError(f"{sub}: no weights (none of {', '.join('*' + s for s in WEIGHT_SUFFIXES)}); "
                                    f"an incomplete copy or download?")
        for f in weights:
            if f.suffix == ".safetensors":
                check_safetensors(f)


def check_model(name_or_path: str | Path) -> tuple[Path, str]:
    """(folder, family) of a model, with everything checkable without loading it checked: model_index.json and
    each component's config parse (errors name the file), the family is one an adapter runs, every model
    component has its weights (`check_weights`). Raises FileNotFoundError, ValueError or UnsupportedModel."""
    folder = resolve_model_path(name_or_path)
    family = family_of(folder)
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.exists():
        read_json_file(sched)
    adapter = FAMILIES[family]
    if issubclass(adapter, PipelineBackbone):
        adapter.check_folder(folder)
    load_kwargs = getattr(adapter, "load_kwargs", {}) or {}
    check_weights(folder, skipped=tuple(k for k, v in load_kwargs.items() if v is None))
    return folder, family


def train_timesteps(folder: str | Path) -> int:
    """The length of a model's training schedule (its scheduler's num_train_timesteps; diffusers' default
    1000 when the config leaves it out), read from scheduler/scheduler_config.json without loading anything."""
    sched = Path(folder) / "scheduler" / "scheduler_config.json"
    value = read_json_file(sched).get("num_train_timesteps", 1000)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(f"{sched}: num_train_timesteps must be an integer >= 2, got {value!r}")
    return value


def load_backbone(name_or_path: str | Path, dtype=None, prompt_store: str | Path | None = None,
                  quantization: str | None = None) -> Backbone:
    """Load a model folder (or cached hub id) with the adapter of its family; `dtype` (real families) loads
    every part in that dtype (e.g. torch.bfloat16). With `prompt_store` (a folder `tdm prompt-store` wrote) the
    text encoders are never constructed: the store, checked against this folder first (`tdm.backbones.stored_prompts.attach`:
    ValueError naming the mismatch when it was made with other encoders, tokenizers, settings or dtype), gives
    every prompt's conditioning. `quantization` ("int8" / "fp8", `distill.base_quantization`): the denoiser's
    `nn.Linear` weights are loaded weight-only quantised by torchao (`tdm.quantize`; convolutions and the rest
    stay in `dtype`); ValueError naming the key when torchao is missing, before anything is read."""
    folder, family = check_model(name_or_path)
    text_encoders = prompt_store is None
    quantized = {}
    if quantization is not None:
        from tdm.quantize import require_torchao

        require_torchao(quantization)
        quantized = {"quantization": quantization}
    if family == "digits":
        backbone = DigitsBackbone.load(folder, text_encoders=text_encoders, **quantized)
    else:
        backbone = FAMILIES[family].load(folder, dtype=dtype, text_encoders=text_encoders, **quantized)
    if prompt_store is not None:
        from tdm.backbones.stored_prompts import attach

        attach(backbone, prompt_store, dtype=dtype)
    return backbone


def build_backbone(model_cfg, seed: int = 0, prompt_store: str | Path | None = None) -> Backbone:
    """The backbone `params.yaml`'s `model` section asks for: pretrained when given, else a fresh digits model.
    `prompt_store`: as in `load_backbone` (a pretrained model only)."""
    if prompt_store is not None and model_cfg.pretrained is None:
        raise ValueError("prompt_store: needs model.pretrained (a fresh digits model has no saved text encoder to "
                         "match a store against)")
    if model_cfg.pretrained is not None:
        backbone = load_backbone(model_cfg.pretrained, prompt_store=prompt_store)
        if backbone.family != model_cfg.family:
            raise ValueError(f"model.pretrained is a {backbone.family!r} model but model.family is {model_cfg.family!r}")
        return backbone
    if model_cfg.family != "digits":
        raise ValueError(f"model.pretrained: required for family {model_cfg.family!r} (only digits starts fresh)")
    arch = DigitsArch(channels=tuple(model_cfg.channels), layers_per_block=model_cfg.layers_per_block,
                      beta_schedule=model_cfg.beta_schedule)
    return DigitsBackbone.create(arch, seed=seed)


__all__ = ["Backbone", "Cond", "cat_cond", "DigitsArch", "DigitsBackbone", "SD15Backbone",
           "SDXLBackbone", "PixArtAlphaBackbone", "SD3Backbone", "CogVideoXBackbone", "ZImageBackbone", "PipelineBackbone",
           "UnsupportedModel", "FAMILIES", "PIPELINE_FAMILIES", "family_of", "check_model", "check_weights",
           "train_timesteps", "read_json_file", "check_safetensors", "load_backbone", "build_backbone"]
