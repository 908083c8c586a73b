"""Exponential moving average of a model's weights (used for the teacher in SFT and the student in TDM)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps a frozen copy of `model` whose weights track it with decay min(decay, (1 + n) / (10 + n)):
    the warm-up stops the random initialisation from lingering in the average of a short run."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
