"""Pieces both training loops (teacher SFT, TDM distillation) share: LR schedule, per-step randomness,
divergence checks and gradient averaging across processes."""
from __future__ import annotations

import hashlib
import math
from typing import Iterable

import torch


class TrainingDiverged(RuntimeError):
    """The loss or the weights went NaN/Inf; the last good checkpoint is kept."""


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warm-up, then constant or cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """Every random draw of a step comes from this generator, so a resumed run draws exactly what the
    uninterrupted run would have drawn (no RNG state to restore, no data-loader position to replay)."""
    digest = hashlib.sha256(f"{seed}/{step}/{process}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def average_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over processes, as DDP would, for parameter sets DDP cannot wrap
    (student and fake score are two adapters on one shared module in LoRA mode)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def replicas_identical(accelerator, params: Iterable[torch.Tensor]) -> bool:
    """True when every process holds the same weights (checked via a float64 signature)."""
    if accelerator.num_processes == 1:
        return True
    signature = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    everyone = accelerator.gather(signature.to(accelerator.device))
    return bool(torch.all(everyone == everyone[0]))


def resumable_checkpoint(accelerator, root, fingerprint: str, stage: str):
    """(path, state) of the newest loadable checkpoint under `root` made with the same params, else None.
    Checkpoints made with other params are deleted (the run starts afresh, as DVC would)."""
    from tdm import checkpoint as ckpt

    found = ckpt.load_latest(root)
    if found is not None and found[1]["fingerprint"] != fingerprint:
        accelerator.print(f"{stage}: params changed since {found[0]}; starting afresh")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.prune_checkpoints(root, keep=0)
        found = None
    return found
