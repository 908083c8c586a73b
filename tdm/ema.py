"""Exponential moving average of a set of named parameters (the teacher in SFT, the student in TDM).

Working on named tensors rather than modules lets one class average a whole UNet or just a LoRA adapter.
Under FSDP the shadow tensors are DTensors sharded like the parameters they average (each process averages its
shard); `state_dict` then holds shards (`tdm.sharding.gather_dict` makes them full), and `load_state_dict` cuts
full tensors to the shards.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from tdm.sharding import shard_like


class EMA:
    """Shadow weights with decay min(decay, (1 + n) / (10 + n)): the warm-up keeps the random or pretrained
    start from lingering in the average of a short run (after n updates the decay is at most that bound,
    e.g. 0.995 at n = 1800)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1 - d)

    def state_dict(self) -> dict:
        return {"shadow": dict(self.shadow), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("EMA state does not match the parameters it averages")
        # A full tensor (a checkpoint's) is cut to the shard of the parameter it averages under FSDP.
        self.shadow = {n: shard_like(t, self.shadow[n]).clone().float() for n, t in state["shadow"].items()}
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Write the averaged weights into `module` (matched by parameter name) and return it."""
        params = dict(module.named_parameters())
        for n, t in self.shadow.items():
            params[n].copy_(t.to(params[n].dtype))
        return module

    def averaged_copy(self, module: nn.Module) -> nn.Module:
        """A frozen copy of `module` carrying the averaged weights."""
        return self.copy_to(copy.deepcopy(module)).eval().requires_grad_(False)
