"""Where metric weights live: one folder (`eval.weights_dir`), looked up without touching the network.

Every weight file is found either flat in the folder (`<weights_dir>/<file>`) or in the Hugging Face cache
inside it (`<weights_dir>/hub`, what `HF_HOME=<weights_dir> hf download <repo> <file>` leaves). A missing
file raises `MissingWeights` at once, naming the file, its size and where to get it: no hub retry loop.
The same folder is handed to subprocesses and libraries as HF_HOME / TORCH_HOME / VBENCH_CACHE_DIR.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


class MissingWeights(FileNotFoundError):
    """A metric's weights are not on disk. The message names the file and where to get it."""


@dataclass(frozen=True)
class WeightFile:
    """One downloadable weight file: its flat name in weights_dir, its hub location, its size."""

    name: str  # flat file name under weights_dir
    size: str  # human-readable, for the error message and the docs
    repo: str | None = None  # Hugging Face repo holding it
    repo_file: str | None = None  # file name in that repo (default: name)
    url: str | None = None  # a direct download address where there is no hub copy

    def source(self) -> str:
        if self.repo:
            return f"https://huggingface.co/{self.repo}/blob/main/{self.repo_file or self.name}"
        return self.url or "(no known source)"


def weights_env(weights_dir: str | Path) -> dict[str, str]:
    """Environment variables that point libraries (and subprocesses) at the weights folder, offline."""
    root = str(Path(weights_dir).expanduser().resolve())
    return {"HF_HOME": root, "TORCH_HOME": root, "VBENCH_CACHE_DIR": str(Path(root) / "vbench"),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}


def find_weights(weights_dir: str | Path, wf: WeightFile, metric: str) -> Path:
    """The local path of `wf`, or MissingWeights (in well under a second) saying where to put it."""
    root = Path(weights_dir).expanduser()
    flat = root / wf.name
    if flat.is_file():
        return flat
    if wf.repo:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(wf.repo, wf.repo_file or wf.name, cache_dir=str(root / "hub"))
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached)
    how = (f"`HF_HOME={root} hf download {wf.repo} {wf.repo_file or wf.name}` on a connected machine, or copy "
           f"the file to {flat}" if wf.repo else f"download it and place it at {flat}")
    raise MissingWeights(f"{metric}: weights not found: {flat} ({wf.size}); get it from {wf.source()} ({how}); "
                         "see docs/evaluation.md")


def load_state_dict(path: Path, metric: str) -> dict:
    """A checkpoint's tensors, loaded with weights_only=True (no code runs from the file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (a truncated download or a foreign pickle: say which file)
        raise ValueError(f"{metric}: cannot read {path} as a PyTorch checkpoint: {err}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
