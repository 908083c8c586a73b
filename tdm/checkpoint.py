"""Atomic training-state checkpoints: every tensor in one safetensors file, the rest in JSON.

A state is any nest of dicts / lists / tuples / scalars / tensors (model and optimiser state dicts, EMA, RNG
states, step, data position). Tensors are flattened to `a/b/0/c` keys; the skeleton keeps the structure.
A checkpoint folder is written beside its final name and renamed into place, so a crash (even SIGKILL)
never leaves a half-written checkpoint under a valid name.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tdm.artifacts import atomic_folder, in_use
from tdm.artifacts import remove_stale_temps as remove_stale_artifacts

_TENSOR = "__tensor__"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        # JSON keys are strings: remember int keys (optimiser state is keyed by param index).
        return {"__dict__": [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix or '<root>'}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj["tuple"] else items
    return obj


def save_state(folder: str | Path, state: dict) -> Path:
    """Write `state` to `folder` atomically (temp folder + rename); replaces an existing folder."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    with atomic_folder(folder) as tmp:
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(skeleton))
    return folder


def load_state(folder: str | Path) -> dict:
    folder = Path(folder)
    for name in ("state.safetensors", "state.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"incomplete checkpoint, missing {folder / name}")
    tensors = load_file(folder / "state.safetensors")
    return _unflatten(json.loads((folder / "state.json").read_text()), tensors)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp folders from a crash are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and
             (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_latest(root: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, falling back to older ones if the newest is damaged."""
    for path in reversed(list_checkpoints(root)):
        try:
            return path, load_state(path)
        except Exception as err:  # a truncated file after a power loss, say
            print(f"checkpoint {path} does not load ({err}); trying an older one", file=sys.stderr)
    return None


def remove_stale_temps(root: str | Path) -> list[Path]:
    """Remove the temp folders under `root` that a killed checkpoint write left (no live writer holds them:
    `tdm.artifacts.in_use`), with a note on stderr; also the unmarked `.step-*` ones of earlier versions."""
    root = Path(root)
    removed = remove_stale_artifacts(root)
    for p in sorted(root.glob(".step-*")) if root.is_dir() else []:
        if p.exists() and not in_use(p):
            print(f"tdm: removed {p} (left by an interrupted write)", file=sys.stderr, flush=True)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep=0: all of them), and any temp folder a killed write
    left behind."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    root = Path(root)
    found = list_checkpoints(root)
    for p in found[:len(found) - keep]:
        shutil.rmtree(p, ignore_errors=True)
    remove_stale_temps(root)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
