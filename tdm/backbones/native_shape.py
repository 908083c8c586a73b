"""The native sample shape of families whose denoiser config does not carry it (Wan, FLUX).

SD / PixArt / SD3 transformers and CogVideoX store their sample size (and frames) in the denoiser's config; Wan's
and FLUX's do not: their pipelines take height / width / num_frames per call, defaulting to 480x832x81 (WanPipeline)
and 1024x1024 (FluxPipeline: default_sample_size 128 x the VAE's 8). tdm samples, trains and decodes at one native
shape per model, so these adapters read it from `tdm_backbone.json` in the model folder when present (tdm writes it
into every folder it saves from such a backbone; the tiny test models declare their 16 px shape there), else use
the pipeline's defaults. The same file carries FLUX's embedded guidance (`embedded_guidance`, docs/backbones.md).
"""
from __future__ import annotations

import json
from pathlib import Path

from tdm.backbones.pipeline import PipelineBackbone

SETTINGS_FILE = "tdm_backbone.json"


class FolderSettings(PipelineBackbone):
    """A pipeline backbone with per-folder settings (`SETTINGS_FILE`): `defaults` holds every key it reads
    (ints for shapes, floats otherwise), `check_settings` validates them against the loaded model."""

    defaults: dict = {}

    def __init__(self, pipe, where: str = "model", settings: dict | None = None):
        super().__init__(pipe, where)
        self.settings = {**self.defaults, **(settings or {})}
        self.check_settings(where)

    def check_settings(self, where: str) -> None:
        for key, value in self.settings.items():
            want = type(self.defaults[key])
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (want is int and (not isinstance(value, int) or value < 1)):
                raise ValueError(f"{where}: {SETTINGS_FILE}: {key} must be a "
                                 f"{'positive integer' if want is int else 'number'}, got {value!r}")

    @classmethod
    def read_settings(cls, folder: Path) -> dict:
        path = Path(folder) / SETTINGS_FILE
        if not path.is_file():
            return {}
        from tdm.backbones import read_json_file

        data = read_json_file(path)
        unknown = sorted(set(data) - set(cls.defaults))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} for the {cls.family} adapter "
                             f"(it reads {sorted(cls.defaults)})")
        return data

    @classmethod
    def load(cls, folder, dtype=None, text_encoders: bool = True, quantization: str | None = None) -> "FolderSettings":
        """As `PipelineBackbone.load`, with the folder's settings."""
        folder = Path(folder)
        cls.check_folder(folder)
        settings = cls.read_settings(folder)
        pipe, skipped = cls.load_pipeline(folder, dtype, text_encoders, quantization)
        return cls.with_source(cls(pipe, where=str(folder), settings=settings), folder, skipped)

    def save(self, folder, net=None, extra_files=None, scheduler=None) -> None:
        """As `PipelineBackbone.save`, plus `SETTINGS_FILE` (so the saved model keeps its shape / guidance)."""
        files = {SETTINGS_FILE: json.dumps(self.settings, indent=2), **(extra_files or {})}
        super().save(folder, net=net, extra_files=files, scheduler=scheduler)
