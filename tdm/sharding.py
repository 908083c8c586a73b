"""FSDP2 for distillation: whether a run shards, which modules become FSDP units, and full tensors in and out.

The accelerate config decides (`accelerate launch --config_file configs/accelerate/fsdp.yaml ...`): a run
shards when accelerate's FSDP plugin is on with `fsdp_version: 2` and more than one process. The denoiser is
sharded per block with `torch.distributed.fsdp.fully_shard` (`shard_units`: every element of each
`nn.ModuleList` directly under the network's root, which is how every family's diffusers model holds its
blocks, and a UNet's `mid_block`), then at the root for what is left (embeddings, norms, conv_in / conv_out).
Parameters become `DTensor`s sharded on dim 0 (`Shard(0)`); FSDP all-gathers a unit before its forward /
backward, frees it after (`reshard_after_forward`), and reduce-scatters its gradients (the mean over processes).

Checkpoints stay in the format of an unsharded run (gathered full tensors, written by rank 0): `gather` /
`shard_like` turn shards into full CPU tensors and back, so a checkpoint made under FSDP resumes with or
without it, and the other way round.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

FSDP2_ENV = "ACCELERATE_USE_FSDP"


def fsdp_requested() -> bool:
    """True when `accelerate launch` was given an FSDP config (it sets ACCELERATE_USE_FSDP=true for the
    processes); read before any model is built, e.g. to refuse a stage that does not shard."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env(FSDP2_ENV, default=False)


def fsdp_plugin(accelerator):
    """The run's accelerate `FullyShardedDataParallelPlugin`, or None when the run does not shard (no FSDP
    config, or a single process: nothing to shard across).

    accelerate 1.15 turns FSDP on only for GPU-like distributed types (`AcceleratorState`: a CPU run under an
    FSDP config stays MULTI_CPU), so on CPU the plugin is built from the same environment `accelerate launch`
    set: one config decides on CPUs (gloo) and GPUs alike. ValueError for `fsdp_version: 1` (tdm shards with
    FSDP2's `fully_shard` only)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.num_processes < 2:
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif fsdp_requested():
        plugin = FullyShardedDataParallelPlugin()
    else:
        return None
    if plugin.fsdp_version != 2:
        raise ValueError(f"accelerate config fsdp_config.fsdp_version: tdm distill shards with FSDP2 "
                         f"(fully_shard); set fsdp_version: 2 (got {plugin.fsdp_version}; "
                         f"configs/accelerate/fsdp.yaml)")
    return plugin


def fsdp_kwargs(accelerator, plugin, lora: bool) -> dict:
    """`fully_shard` arguments from the plugin: a 1-D mesh over every process on the run's device type, its
    `reshard_after_forward` (for every unit, the root included) and CPU offload policy. No
    `MixedPrecisionPolicy` casting: tdm's own autocast (`distill.mixed_precision`) computes in bf16 / fp16
    exactly as an unsharded run does, and gradients are reduced in the parameters' dtype (float32 for every
    trained parameter). ValueError for `fsdp_reshard_after_forward: false` in LoRA mode: peft switches adapters
    by setting `requires_grad` on the module's parameters, which must then be the shards FSDP copies it from."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

    reshard = plugin.reshard_after_forward
    if lora and reshard is not True:
        raise ValueError(f"accelerate config fsdp_config.fsdp_reshard_after_forward: must be true for "
                         f"distill.mode: lora (got {reshard!r})")
    return {"mesh": init_device_mesh(accelerator.device.type, (accelerator.num_processes,)),
            "reshard_after_forward": reshard, "offload_policy": plugin.cpu_offload or OffloadPolicy(),
            "mp_policy": MixedPrecisionPolicy()}


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The modules of `net` that become FSDP units of their own, in registration order: each element of every
    `nn.ModuleList` directly under the root (UNet `down_blocks` / `up_blocks`; DiT `transformer_blocks`,
    Flux `single_transformer_blocks`, Wan `blocks`, Z-Image `layers` / `noise_refiner` / `context_refiner`)
    and a `mid_block` (UNet). The root is sharded after them and holds the rest."""
    units = []
    for name, child in net.named_children():
        if isinstance(child, nn.ModuleList):
            units.extend(child)
        elif name == "mid_block" and child is not None:
            units.append(child)
    return units


def shard(module: nn.Module, **kwargs) -> nn.Module:
    """`fully_shard` each of `shard_units(module)`, then `module` (in place; returned for convenience)."""
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(module):
        fully_shard(unit, **kwargs)
    fully_shard(module, **kwargs)
    return module


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters live on the meta device (no memory) and whose buffers are real
    copies: the plain architecture a gathered full state dict is loaded into (`load_state_dict(assign=True)`)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gather(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The full tensor of a shard (a collective: every process calls it) as a CPU tensor where `keep`, else
    None (only the writing process holds the full state); a plain tensor is returned as is (detached)."""
    if not is_sharded(t):
        return t.detach()
    full = t.detach().full_tensor()
    return full.cpu() if keep else None


def gather_dict(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor | None]:
    return {n: gather(t, keep) for n, t in tensors.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut to this process's shard of `like` (same mesh and placements; no communication: every process
    holds `full`, read from the same checkpoint); `full` itself when `like` is not sharded."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def local(t: torch.Tensor) -> torch.Tensor:
    """A metric's value as a plain tensor: a DTensor (a norm over shards: Partial placement) is reduced."""
    return t.full_tensor() if is_sharded(t) else t


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The global 2-norm of the gradients of sharded parameters (over every process's shards), clipping them
    to `max_norm` first unless it is None; a plain 0-d tensor, the same on every process. torch's
    `get_total_norm` over DTensors gives a partial norm, `full_tensor()` all-reduces it (the torchtitan recipe);
    then `clip_grads_with_norm_`, as `clip_grad_norm_` does."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = local(torch.nn.utils.get_total_norm(grads))
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def gather_optimizer_state(opt: torch.optim.Optimizer, keep: bool) -> dict:
    """`opt.state_dict()` with every sharded state tensor (AdamW's exp_avg, exp_avg_sq) gathered: the format of
    an unsharded run's optimiser (a collective)."""
    state = opt.state_dict()
    return {**state, "state": {i: {k: gather(v, keep) if torch.is_tensor(v) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def shard_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> dict:
    """A gathered optimiser state (`gather_optimizer_state`, or an unsharded run's) cut to this process's shards,
    ready for `opt.load_state_dict`: each tensor shaped like its parameter takes the parameter's placements."""
    params = [p for group in opt.param_groups for p in group["params"]]
    out = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out[i] = {k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
    return {**state, "state": out}


def finite_everywhere(accelerator, tensors: Iterable[torch.Tensor]) -> bool:
    """True when every tensor is finite on every process (shards are checked where they live; the verdict is
    all-reduced so every process raises, or none)."""
    ok = all(bool(torch.isfinite(t.to_local() if is_sharded(t) else t).all()) for t in tensors)
    if accelerator.num_processes == 1:
        return ok
    flag = accelerator.reduce(torch.tensor([float(ok)], device=accelerator.device), reduction="sum")
    return bool(flag.item() == accelerator.num_processes)
