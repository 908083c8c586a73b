"""Students for stock pipelines: what `tdm export` writes so plain diffusers samples exactly what tdm samples.

`tdm export --student outputs/distill/student --out exported/` writes one diffusers pipeline folder per K
(`exported/k4/`, ...): the family's pipeline with the student's denoiser, its scheduler replaced by the TDM
scheduler of the student's grid (`tdm.scheduling_tdm.from_student`), and the student's record for K. With tdm
installed, `DiffusionPipeline.from_pretrained("exported/k4")(prompt, num_inference_steps=4,
guidance_scale=1.0)` then gives exactly `tdm sample --student --steps 4` (tested per family).

A stock pipeline knows nothing of TDM-unify's K embedding (`tdm.student.k_conditioning` adds it to the time
embedding through a hook). For one chosen K the embedding is a constant offset of the time embedding, so it
can be folded into the weights: every family's time embedding is diffusers' `TimestepEmbedding` (linear_1,
activation, linear_2, optional post_act), and with no post-activation the offset is exactly a change of
linear_2's bias. A K-aware student therefore exports as one plain model per K; a family whose time embedding
ends otherwise is refused, never exported without its K.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def fold_k_embedding(backbone, net: nn.Module, embedding: nn.Embedding, k: int) -> nn.Module:
    """A copy of `net` that computes, without any hook, what `net` computes under
    `k_conditioning(backbone, net, embedding, k)`: embedding(k) (shape (D,)) added to the bias of the last Linear
    of the family's time embedding (`backbone.time_embedding`: diffusers' `linear_2`, Z-Image's `mlp[-1]`). ValueError when that module cannot absorb a constant
    offset exactly (a post-activation after linear_2, or no bias) or when K has no row in the embedding."""
    if not 0 <= k < embedding.num_embeddings:
        raise ValueError(f"K = {k} has no row in the K embedding (it knows K up to {embedding.num_embeddings - 1})")
    folded = copy.deepcopy(net)
    target = backbone.time_embedding(folded)
    linear = getattr(target, "linear_2", None)
    if linear is None and isinstance(getattr(target, "mlp", None), nn.Sequential):  # Z-Image's TimestepEmbedder
        linear = target.mlp[-1]
    if not isinstance(linear, nn.Linear) or getattr(target, "post_act", None) is not None:
        raise ValueError(f"{type(target).__name__} of the {backbone.family} denoiser does not end in a plain Linear: "
                         f"its K embedding cannot be folded into the weights exactly")
    if linear.bias is None:
        raise ValueError(f"the {backbone.family} time embedding's linear_2 has no bias: its K embedding cannot be "
                         f"folded into the weights")
    with torch.no_grad():
        offset = embedding.weight[k].to(device=linear.bias.device, dtype=torch.float32)
        linear.bias.copy_((linear.bias.float() + offset).to(linear.bias.dtype))
    return folded


def export_student(folder, out, ks=None, solver_order: int | None = None) -> list:
    """Write the student in `folder` as one stock pipeline folder per K under `out` (`out/k<K>/`); `ks` defaults
    to the Ks it was trained for, `solver_order` (1 DDIM, 2 DPM-Solver++(2M)) to the record's; both the exported
    scheduler config and the exported record carry it, so `tdm sample --student out/k<K>` and the stock pipeline
    agree. Returns the folders. ValueError (before anything is written) when a K cannot be honoured, the order is
    neither, or a K embedding cannot be folded; each folder is written atomically."""
    from pathlib import Path

    from tdm.sampler import check_solver_order
    from tdm.scheduling_tdm import from_student
    from tdm.student import load_student

    student = load_student(folder)
    record = student.record
    if solver_order is not None:
        record = record.replace(solver_order=check_solver_order(solver_order))
    ks = list(record.sampling_ks if ks is None else ks)
    for k in ks:
        record.check_k(k)
    backbone = student.backbone
    plans = []
    for k in ks:  # everything that can fail is built first
        net = student.net if student.k_embedding is None else fold_k_embedding(backbone, student.net,
                                                                               student.k_embedding, k)
        at_k = record.replace(k=k, unify=False, k_choices=(k,))
        scheduler = from_student(at_k, backbone.scheduler.config)
        plans.append((k, net, at_k, scheduler))
    written = []
    for k, net, at_k, scheduler in plans:
        target = Path(out) / f"k{k}"
        backbone.save(target, net=net, extra_files=at_k.files(), scheduler=scheduler)
        written.append(target)
    return written


__all__ = ["fold_k_embedding", "export_student"]
