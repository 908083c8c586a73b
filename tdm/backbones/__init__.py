"""Model families behind one protocol (`Backbone`). The registry maps a family name to its adapter."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tdm.backbones.base import Backbone, Cond, cat_cond
from tdm.backbones.cogvideox import CogVideoXBackbone
from tdm.backbones.digits import DigitsArch, DigitsBackbone
from tdm.backbones.pipeline import PipelineBackbone, UnsupportedModel
from tdm.backbones.pixart import PixArtAlphaBackbone
from tdm.backbones.sd3 import SD3Backbone
from tdm.backbones.sd15 import SD15Backbone
from tdm.backbones.sdxl import SDXLBackbone

FAMILIES: dict[str, type[Backbone]] = {
    "digits": DigitsBackbone, "sd15": SD15Backbone, "sdxl": SDXLBackbone, "pixart_alpha": PixArtAlphaBackbone,
    "sd3": SD3Backbone, "cogvideox": CogVideoXBackbone,
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


def family_of(folder: str | Path) -> str:
    """The family a model folder belongs to: `tdm_family` in its model_index.json (folders we wrote), else
    the family that reads its pipeline class (hub checkpoints)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"not a model folder (no model_index.json): {folder}")
    meta = json.loads(index.read_text())
    family = meta.get("tdm_family") or PIPELINE_FAMILIES.get(meta.get("_class_name"))
    if family not in FAMILIES:
        raise UnsupportedModel(f"{index}: unsupported model ({meta.get('_class_name')!r}, family {family!r}); "
                               f"supported families: {', '.join(FAMILIES)} "
                               f"(pipelines: {', '.join(PIPELINE_FAMILIES)})")
    return family


def check_model(name_or_path: str | Path) -> tuple[Path, str]:
    """(folder, family) of a model, with everything checkable from its config files checked (no weights read)."""
    folder = resolve_model_path(name_or_path)
    family = family_of(folder)
    adapter = FAMILIES[family]
    if issubclass(adapter, PipelineBackbone):
        adapter.check_folder(folder)
    return folder, family


def load_backbone(name_or_path: str | Path, dtype=None) -> Backbone:
    """Load a model folder (or cached hub id) with the adapter of its family; `dtype` (real families) loads
    every part in that dtype (e.g. torch.bfloat16)."""
    folder, family = check_model(name_or_path)
    if family == "digits":
        return DigitsBackbone.load(folder)
    return FAMILIES[family].load(folder, dtype=dtype)


def build_backbone(model_cfg, seed: int = 0) -> Backbone:
    """The backbone `params.yaml`'s `model` section asks for: pretrained when given, else a fresh digits model."""
    if model_cfg.pretrained is not None:
        backbone = load_backbone(model_cfg.pretrained)
        if backbone.family != model_cfg.family:
            raise ValueError(f"model.pretrained is a {backbone.family!r} model but model.family is {model_cfg.family!r}")
        return backbone
    if model_cfg.family != "digits":
        raise ValueError(f"model.pretrained: required for family {model_cfg.family!r} (only digits starts fresh)")
    arch = DigitsArch(channels=tuple(model_cfg.channels), layers_per_block=model_cfg.layers_per_block,
                      beta_schedule=model_cfg.beta_schedule)
    return DigitsBackbone.create(arch, seed=seed)


__all__ = ["Backbone", "Cond", "cat_cond", "DigitsArch", "DigitsBackbone", "SD15Backbone",
           "SDXLBackbone", "PixArtAlphaBackbone", "SD3Backbone", "CogVideoXBackbone", "PipelineBackbone",
           "UnsupportedModel", "FAMILIES", "PIPELINE_FAMILIES", "family_of", "check_model", "load_backbone",
           "build_backbone"]
