"""A frozen base held weight-only quantised: `distill.base_quantization` in LoRA mode (issue #15).

LoRA mode trains two small float32 adapters over one frozen base denoiser (`tdm.roles`). That base is only ever
read, so its `nn.Linear` weights can be stored in one byte each instead of two (bf16) or four (float32):

- "int8": torchao's `Int8WeightOnlyConfig` (symmetric per-row int8, float32 scale + int8 zero point per row);
- "fp8": torchao's `Float8WeightOnlyConfig` (float8 e4m3 per row, float32 scale per row).

Both are *weight-only*: activations stay in the compute dtype and each layer's weight is dequantised for its
matmul ("the actual matmul will be computed in original precision", torchao's docs), so the gradients that reach
the adapters are exact functions of the (rounded) base weights. Only `nn.Linear` weights are quantised (what
diffusers' `TorchAoHfQuantizer.check_if_quantized_param` picks): convolutions, norms, embeddings, biases and the
model's `_keep_in_fp32_modules` stay as loaded, which is why a UNet (SD1.5 / SDXL / digits: many convolutions)
saves less than a transformer (PixArt, SD3, FLUX, Wan: nearly all Linear).

The denoiser is loaded with diffusers' own `TorchAoConfig` (`load_denoiser`): each Linear weight is quantised as it
is read, the model carries `hf_quantizer`, and peft (`tuners/lora/torchao.py`, `TorchaoLoraLinear`) then puts the
LoRA adapters on the quantised layers with the re-quantisation recipe it needs. The saved student is never merged
into the rounded weights: `merge_into_unquantized` reloads the base from the teacher folder unquantised and merges
the adapter there, so the student folder is a normal diffusers folder.

torchao is optional (pyproject's `memory` extra, pinned `TORCHAO`); once importable, peft imports it in every
process (through transformers' torchao quantizer, ~3 s here), which is why the test venv keeps it in
`.venv/extras/torchao` (scripts/bootstrap.sh).
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

KEY = "distill.base_quantization"
KINDS = ("int8", "fp8")
TORCHAO = "torchao==0.18.0"  # the version tested with torch 2.14.1 / diffusers 0.42.1 / peft 0.21.2


def _check_kind(kind: str, key: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{key}: must be one of {', '.join(KINDS)} (or null), got {kind!r}")


def require_torchao(kind: str, key: str = KEY) -> None:
    """Fail fast (ValueError naming `key`) when `kind` is unknown or torchao cannot serve it: not installed, or
    installed after diffusers was imported (diffusers reads torchao's presence once, at its own import)."""
    _check_kind(kind, key)
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"{key}: {kind} needs torchao (pip install -e '.[memory]' in tdm's clone, i.e. {TORCHAO})")
    from diffusers.utils import is_torchao_available

    if not is_torchao_available():
        raise ValueError(f"{key}: torchao was put on sys.path after diffusers was imported; diffusers did not see "
                         f"it (make it importable before the first `import diffusers`)")


def ao_config(kind: str):
    """The torchao config of `kind` ("int8": `Int8WeightOnlyConfig()`, "fp8": `Float8WeightOnlyConfig()`; both per
    row, torchao's defaults)."""
    _check_kind(kind, KEY)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()


def loading_config(kind: str):
    """diffusers' `TorchAoConfig` for `from_pretrained(..., quantization_config=...)`: every `nn.Linear` weight of
    the model quantised to `kind` as it loads."""
    require_torchao(kind)
    from diffusers import TorchAoConfig

    return TorchAoConfig(ao_config(kind))


@contextlib.contextmanager
def _quiet():
    """diffusers' torchao quantizer warns that integer quantisation "only supports bfloat16" for every other
    dtype (weight-only int8 runs in float32 too: tested), and that a torchao 0.18 lacks pre-0.15 tensor classes
    (only needed for checkpoints saved quantised, which tdm never reads)."""
    import logging

    loggers = [logging.getLogger(n) for n in ("diffusers.quantizers.torchao.torchao_quantizer",
                                              "diffusers.models.modeling_utils")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """y = x W^T + b for a frozen quantised W, keeping W *quantised* for backward. torchao's own linear saves the
    dequantised weight (a compute-dtype copy of every Linear weight, alive from the grad-carrying forward of
    the student / fake score to its backward: more than the unquantised base holds, whose saved weight is a
    view of the parameter). Here backward dequantises one layer at a time: dL/dx = dL/dy W (W has no grad)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight, ctx.x_dtype = weight, x.dtype  # a parameter of the model: no copy, no reference cycle
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.weight.dequantize().to(grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None, None


class FrozenQuantizedLinear(nn.Linear):
    """An `nn.Linear` whose weight is a frozen torchao quantised tensor (`load_denoiser` turns each quantised
    Linear into one; peft still sees an `nn.Linear` and wraps it as `TorchaoLoraLinear`). Same outputs and
    input gradients as torchao's linear (tested), without its saved dequantised weight; a weight or bias that
    requires grad takes the plain path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trainable = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if trainable or not torch.is_grad_enabled() or not x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return _FrozenQuantizedMatmul.apply(x, self.weight, self.bias)


def load_denoiser(folder: str | Path, subfolder: str, model_class: type, kind: str,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """`model_class.from_pretrained(folder, subfolder=...)` with its Linear weights quantised to `kind` (torchao
    tensor subclasses: `Int8Tensor` / `Float8Tensor`; each such layer a `FrozenQuantizedLinear`), everything else
    in `dtype` (default float32, what an unquantised load gives: diffusers' torchao quantizer would otherwise
    switch the model to bfloat16)."""
    config = loading_config(kind)
    with _quiet():
        net = model_class.from_pretrained(folder, subfolder=subfolder, quantization_config=config,
                                          torch_dtype=dtype or torch.float32)
    for module in quantized_linears(net).values():
        module.__class__ = FrozenQuantizedLinear  # same attributes, one forward changed
    return net


def check_device(kind: str, device: torch.device | str, key: str = KEY) -> None:
    """Refuse (ValueError naming `key`) a device that cannot run `kind`, before any model is loaded: a 32 x 32
    Linear is quantised on `device` and run forward and backward (the adapters' gradients pass through the
    base). Weight-only fp8 and int8 both run on CPU and on CUDA GPUs (the matmul is in the compute dtype); a
    device without float8 / int8 kernels (e.g. Apple MPS has no float8 dtype) fails here."""
    require_torchao(kind, key)
    from torchao.quantization import quantize_

    try:
        probe = nn.Linear(32, 32).to(device)
        quantize_(probe, ao_config(kind))
        x = torch.randn(2, 32, device=device, requires_grad=True)
        probe(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("no finite gradient through the quantised layer")
    except Exception as err:  # the device's own error, named with the key that asked for it
        raise ValueError(f"{key}: {kind} weight-only quantisation does not run on {device} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                         f"use {'int8' if kind == 'fp8' else 'null'} on this device") from None


def is_quantized(weight) -> bool:
    """Whether a parameter is a torchao quantised tensor (never, while torchao has not been imported)."""
    if "torchao" not in sys.modules:
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def quantized_linears(net: nn.Module) -> dict[str, nn.Linear]:
    """name -> every `nn.Linear` of `net` whose weight is quantised (peft's wrappers see through to their base)."""
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.Linear) and is_quantized(m.weight)}


def weight_bytes(kind: str, out_features: int, in_features: int) -> int:
    """Bytes one quantised (out, in) Linear weight holds: 1 byte per element plus per-row metadata (int8: float32
    scale + int8 zero point; fp8: float32 scale). Torchao 0.18's `Int8Tensor` / `Float8Tensor` layouts
    (qdata, scale[, zero_point]); checked against real tensors in tests/unit/test_quantized_base.py."""
    _check_kind(kind, KEY)
    per_row = 4 + 1 if kind == "int8" else 4
    return out_features * in_features + out_features * per_row


def tensor_bytes(weight) -> int:
    """Bytes a (possibly torchao-quantised) tensor holds: the sum of its inner tensors for a subclass."""
    if is_quantized(weight):
        names, _ = weight.__tensor_flatten__()
        return sum(tensor_bytes(getattr(weight, n)) for n in names)
    return weight.numel() * weight.element_size()


def skipped_by_diffusers(model_class: type, module_name: str) -> bool:
    """Whether diffusers' torchao quantizer leaves this Linear unquantised: it belongs to one of the model's
    `_keep_in_fp32_modules` (the quantizer's own `modules_to_not_convert` test on the weight's name)."""
    param = f"{module_name}.weight"
    return any(key + "." in param or key == param for key in (getattr(model_class, "_keep_in_fp32_modules", None)
                                                                or []))


@torch.no_grad()
def merge_into_unquantized(roles, role: str = "student", weights: dict[str, torch.Tensor] | None = None,
                           folder: str | Path | None = None) -> nn.Module:
    """The denoiser computing `role` with its LoRA merged into the *unquantised* base: the base is reloaded from
    `folder` (default: the folder the backbone was loaded from, i.e. the teacher) in float32 on the CPU, the role's
    adapter (its current values, or `weights`' values, e.g. the EMA; names as `roles.named_parameters(role)`)
    is put on it with the same `LoraConfig` and merged by peft (`merge_and_unload`: W + (alpha / r) B A), so the
    result is a plain diffusers model, exactly what the same merge gives on an unquantised float32 base. float32,
    as `Roles.merged_net` returns; on the CPU, so no second full-precision copy lands on the training device.
    Raises ValueError when the role's adapter names do not match the reloaded base."""
    import copy

    from peft.tuners.lora import LoraModel

    backbone = roles.backbone
    folder = Path(folder or backbone.source_folder)
    net_cls = type(backbone.net)
    subfolder = getattr(backbone, "net_name", "unet")
    fresh = net_cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=torch.float32)
    if any(is_quantized(p) for p in fresh.parameters()):
        raise ValueError(f"{folder / subfolder}: saved quantised; the student must be merged into unquantised weights")
    own = {n: p for n, p in roles.named_parameters(role).items() if not n.startswith("k_embedding.")}
    values = {n: (weights[n] if weights is not None else p) for n, p in own.items()}
    model = LoraModel(fresh, copy.deepcopy(roles.lora_config), role)
    params = dict(model.model.named_parameters())
    missing = sorted(set(values) - set(params))
    if missing:
        raise ValueError(f"{role} adapter does not match the reloaded base {folder / subfolder}: {missing[:3]}")
    for name, value in values.items():
        params[name].copy_(value.detach().to(params[name].device, params[name].dtype))
    merged = model.merge_and_unload(adapter_names=[role])
    return merged.eval().requires_grad_(False)
