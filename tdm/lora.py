"""The TDM student's LoRA outside the training loop: load, export, scale, fuse, attach, inspect, extract.

One in-memory form (`LoRA`: per module a down / up pair and its alpha) and three file formats:

- peft        a folder with `adapter_model.safetensors` + `adapter_config.json` (what `tdm distill` writes);
- diffusers   a folder with `pytorch_lora_weights.safetensors`, keys `unet.<module>.lora_A/B.weight`, and the
              peft config in the safetensors header (`lora_adapter_metadata`), so `pipe.load_lora_weights(folder)`
              restores rank and alpha (without it a LoRA with alpha != r reloads at the wrong scale);
- kohya       one `.safetensors` file in the kohya / A1111 webui layout: `lora_unet_<module_with_underscores>`
              `.lora_down.weight` / `.lora_up.weight` / `.alpha`.

A module's update is W += scale * (alpha / r) * up @ down (convolutions: down is an r x in x kh x kw conv, up a
1x1 conv, the product reshaped to the kernel). Full-mode students become a LoRA by `extract`: a truncated SVD of
each weight delta, with the approximation error reported.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the peft config in the header
FORMATS = ("diffusers", "kohya", "peft")
LORA_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LoRAModule:
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """The weight update, shaped like the layer's weight, in float32."""
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)  # (out, in * kh * kw)
        shape = (up.shape[0], *down.shape[1:])
        return product.reshape(shape) * (scale * self.alpha / self.rank)


@dataclass(frozen=True)
class LoRA:
    """A LoRA on one denoiser, keyed by module path (`down_blocks.0.attentions.0.proj_in`). A LoRA read from a
    kohya file is keyed by the flattened names (`down_blocks_0_attentions_0_proj_in`) until `resolved(net)`."""

    modules: dict[str, LoRAModule]
    meta: dict = field(default_factory=dict)

    def scaled(self, scale: float) -> LoRA:
        """The same LoRA with every update multiplied by `scale` (kept in alpha, so it survives export)."""
        return replace(self, modules={n: replace(m, alpha=m.alpha * scale) for n, m in self.modules.items()})

    def resolved(self, net: nn.Module) -> LoRA:
        """Module names mapped onto `net`'s own (dotted) paths; shapes checked. Fails before any compute."""
        table = _layer_table(net)
        out = {}
        for name, module in self.modules.items():
            layer_name = table.get(name) or table.get(name.replace(".", "_"))
            if layer_name is None:
                raise ValueError(f"LoRA module {name!r} is not a Linear/Conv2d layer of {type(net).__name__}")
            weight = net.get_submodule(layer_name).weight
            if tuple(module.delta().shape) != tuple(weight.shape):
                raise ValueError(f"LoRA module {name!r}: update shape {tuple(module.delta().shape)} does not match "
                                 f"the layer's weight {tuple(weight.shape)} (a different architecture?)")
            out[layer_name] = module
        return replace(self, modules=out, meta={**self.meta, "flat_names": False})

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def module_patterns(self) -> list[str]:
        """The touched modules with block indices folded (`down_blocks.*.resnets.*.conv1`), for a short listing."""
        import re

        return sorted({re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", n) for n in self.modules})

    def summary(self) -> list[dict]:
        """Which modules the LoRA touches: name, layer kind, weight shape, rank, alpha."""
        return [{"module": n, "kind": "conv" if m.down.ndim == 4 else "linear", "shape": list(m.delta().shape),
                 "rank": m.rank, "alpha": m.alpha} for n, m in sorted(self.modules.items())]


def _layer_table(net: nn.Module) -> dict[str, str]:
    """LoRA-able layers by dotted path and by kohya's flattened path."""
    table = {}
    for name, module in net.named_modules():
        if isinstance(module, LORA_LAYERS) and name:
            table[name] = name
            table[name.replace(".", "_")] = name
    return table


# -- peft ----------------------------------------------------------------------------------------------------------
def _pattern_value(patterns: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern lookup (a key matches a module path suffix)."""
    import re

    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def from_peft(state: dict[str, torch.Tensor], config: dict) -> LoRA:
    """A peft state dict (`<module>.lora_A.weight`, no adapter name) and its LoraConfig dict."""
    if config.get("use_dora"):
        raise ValueError("DoRA adapters are not plain LoRAs; not supported")
    pairs = _pairs(state, ".lora_A.weight", ".lora_B.weight")
    modules = {}
    for name, (down, up) in pairs.items():
        r = down.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", r)))
        if config.get("use_rslora"):  # scaling alpha / sqrt(r) == (alpha sqrt(r)) / r
            alpha *= math.sqrt(r)
        modules[name] = LoRAModule(down, up, alpha)
    return LoRA(modules, {"source_format": "peft"})


def to_peft(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, LoraConfig dict) with per-module rank / alpha where they differ from the common one."""
    from peft import LoraConfig

    if not lora.modules:
        raise ValueError("empty LoRA")
    common_r = max(lora.ranks, key=lambda r: sum(m.rank == r for m in lora.modules.values()))
    alphas = [m.alpha for m in lora.modules.values() if m.rank == common_r]
    common_alpha = max(set(alphas), key=alphas.count)
    config = LoraConfig(
        r=common_r, lora_alpha=common_alpha, target_modules=sorted(lora.modules),
        rank_pattern={_exact(n): m.rank for n, m in lora.modules.items() if m.rank != common_r},
        alpha_pattern={_exact(n): m.alpha for n, m in lora.modules.items() if m.alpha != common_alpha},
    ).to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    state = {}
    for name, m in lora.modules.items():
        state[f"{name}.lora_A.weight"] = m.down.contiguous()
        state[f"{name}.lora_B.weight"] = m.up.contiguous()
    return state, config


def _exact(name: str) -> str:
    import re

    return re.escape(name)


def _pairs(state: dict[str, torch.Tensor], down_suffix: str, up_suffix: str) -> dict[str, tuple]:
    downs = {k[: -len(down_suffix)]: v for k, v in state.items() if k.endswith(down_suffix)}
    ups = {k[: -len(up_suffix)]: v for k, v in state.items() if k.endswith(up_suffix)}
    if downs.keys() != ups.keys():
        odd = sorted(downs.keys() ^ ups.keys())
        raise ValueError(f"LoRA has unpaired down/up weights, e.g. {odd[:2]}")
    if not downs:
        raise ValueError(f"no LoRA weights found (expected keys ending in {down_suffix!r})")
    return {n: (downs[n], ups[n]) for n in downs}


# -- reading -------------------------------------------------------------------------------------------------------
def load_lora(path: str | Path, component: str = "unet") -> LoRA:
    """Read a LoRA in any of the three formats (a peft or diffusers folder, a diffusers or kohya file);
    `component` picks the denoiser's keys in a diffusers file (`unet`, or `transformer` for DiTs)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file() and (path / PEFT_WEIGHTS).is_file():
            config = json.loads((path / PEFT_CONFIG).read_text())
            lora = from_peft(load_file(path / PEFT_WEIGHTS), config)
            return replace(lora, meta={**lora.meta, "path": str(path)})
        files = [path / DIFFUSERS_WEIGHTS] if (path / DIFFUSERS_WEIGHTS).is_file() else sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path}: not a LoRA folder (expected {PEFT_WEIGHTS} + {PEFT_CONFIG}, "
                                    f"or one .safetensors file such as {DIFFUSERS_WEIGHTS})")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files must be .safetensors (pickled weights are not loaded)")
    state = load_file(path)
    with safe_open(path, "pt") as f:
        header = f.metadata() or {}
    if any(k.startswith(("lora_unet_", "lora_transformer_")) for k in state):
        lora = _from_kohya(state)
    else:
        lora = _from_diffusers(state, header, component, path)
    return replace(lora, meta={**lora.meta, "path": str(path)})


def _from_diffusers(state: dict, header: dict, component: str, path: Path) -> LoRA:
    prefix = f"{component}."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        found = sorted({k.split(".")[0] for k in state})
        raise ValueError(f"{path}: no {component!r} LoRA weights (top-level keys: {found[:5]})")
    # Older diffusers files name the pair lora.down / lora.up.
    own = {k.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight"): v
           for k, v in own.items()}
    meta = json.loads(header.get(DIFFUSERS_METADATA_KEY, "{}"))
    config = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    alphas = {k[: -len(".alpha")]: float(v) for k, v in own.items() if k.endswith(".alpha")}
    lora = from_peft({k: v for k, v in own.items() if not k.endswith(".alpha")}, config)
    if alphas:  # per-module network alphas (diffusers' kohya conversions) override the config
        lora = replace(lora, modules={n: replace(m, alpha=alphas.get(n, m.alpha)) for n, m in lora.modules.items()})
    return replace(lora, meta={"source_format": "diffusers"})


def _from_kohya(state: dict) -> LoRA:
    pairs = _pairs(state, ".lora_down.weight", ".lora_up.weight")
    modules = {}
    for key, (down, up) in pairs.items():
        if not key.startswith(("lora_unet_", "lora_transformer_")):
            continue  # text-encoder LoRAs (lora_te_*) are not the denoiser's
        name = key.split("_", 2)[2]
        alpha_t = state.get(f"{key}.alpha")
        modules[name] = LoRAModule(down, up, float(alpha_t) if alpha_t is not None else float(down.shape[0]))
    if not modules:
        raise ValueError("kohya LoRA has no lora_unet_* / lora_transformer_* modules")
    return LoRA(modules, {"source_format": "kohya", "flat_names": True})


# -- writing -------------------------------------------------------------------------------------------------------
def save_lora(lora: LoRA, out: str | Path, fmt: str, component: str = "unet") -> Path:
    """Write `lora` as `fmt` ("diffusers" / "peft": a folder; "kohya": a .safetensors file), atomically."""
    from safetensors.torch import save_file

    from tdm.artifacts import atomic_folder, atomic_write_file

    if fmt not in FORMATS:
        raise ValueError(f"LoRA format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "kohya" and lora.meta.get("flat_names"):
        raise ValueError("this LoRA was read from a kohya file: call .resolved(net) to recover module paths first")
    out = Path(out)
    if fmt == "kohya":
        if out.suffix != ".safetensors":
            raise ValueError(f"a kohya LoRA is one .safetensors file, got {out}")
        state = {}
        prefix = "lora_unet_" if component == "unet" else f"lora_{component}_"
        for name, m in lora.modules.items():
            key = prefix + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = m.down.contiguous()
            state[f"{key}.lora_up.weight"] = m.up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(m.alpha))
        ranks = sorted(lora.ranks)
        header = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[0] if len(ranks) == 1 else ranks),
                  "ss_network_alpha": str(next(iter(lora.modules.values())).alpha), "tdm": "TDM student LoRA"}
        atomic_write_file(out, lambda tmp: save_file(state, tmp, metadata=header))
        return out
    state, config = to_peft(lora)
    with atomic_folder(out) as tmp:
        if fmt == "peft":
            save_file(state, tmp / PEFT_WEIGHTS)
            (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
        else:
            packed = {f"{component}.{k}": v for k, v in state.items()}
            meta = {f"{component}.{k}": v for k, v in config.items()}
            save_file(packed, tmp / DIFFUSERS_WEIGHTS,
                      metadata={"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)})
        mask = os.umask(0)
        os.umask(mask)
        for f in tmp.iterdir():  # safetensors writes 0600: give exports the usual permissions
            os.chmod(f, 0o666 & ~mask)
    return out


# -- applying ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def fuse(net: nn.Module, lora: LoRA, scale: float = 1.0) -> nn.Module:
    """Add the LoRA's update into `net`'s weights in place (a merged model); returns `net`."""
    lora = lora.resolved(net)
    for name, m in lora.modules.items():
        weight = net.get_submodule(name).weight
        weight.add_(m.delta(scale).to(weight.device, weight.dtype))
    return net


def attach(net: nn.Module, lora: LoRA, scale: float = 1.0, adapter_name: str = "tdm") -> nn.Module:
    """Inject the LoRA as a live (unfused) peft adapter on `net`, at `scale`; returns `net`."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    lora = lora.resolved(net)
    state, config = to_peft(lora)
    keep = {k: v for k, v in config.items() if k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")}
    inject_adapter_in_model(LoraConfig(**keep), net, adapter_name=adapter_name)
    result = set_peft_model_state_dict(net, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA keys not placed on the model: {result.unexpected_keys[:3]}")
    device = next(net.parameters()).device
    for layer in net.modules():
        if isinstance(layer, LoraLayer):
            layer.set_scale(adapter_name, scale)
            layer.to(device)
    return net


def fuse_into_model(model: str | Path, lora: LoRA, out: str | Path, scale: float = 1.0) -> Path:
    """A merged checkpoint: the model folder (or cached hub id) `model` with the LoRA fused in, saved to `out`."""
    from tdm.backbones import load_backbone

    backbone = load_backbone(model)
    fuse(backbone.net, lora, scale)
    backbone.save(out, extra_files={"tdm_lora.json": json.dumps(
        {"base": str(model), "lora": lora.meta.get("path"), "scale": scale}, indent=2)})
    return Path(out)


# -- extraction ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract(base: nn.Module, tuned: nn.Module, rank: int, targets: list[str] | None = None) -> tuple[LoRA, dict]:
    """Low-rank extraction of a full-mode student: per Linear/Conv2d layer (matching `targets` suffixes when
    given), the rank-`rank` truncated SVD of tuned - base. Returns the LoRA (alpha = rank) and a report:
    `relative_error` = ||delta - approx||_F / ||delta||_F over the extracted layers, and `uncaptured_fraction`
    = the share of the whole model's delta norm^2 a LoRA cannot carry (biases, norms, untargeted layers)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    base_params, tuned_params = dict(base.named_parameters()), dict(tuned.named_parameters())
    if base_params.keys() != tuned_params.keys():
        raise ValueError("base and tuned models differ in architecture (parameter names)")
    for n in base_params:
        if base_params[n].shape != tuned_params[n].shape:
            raise ValueError(f"base and tuned models differ at {n}: {tuple(base_params[n].shape)} vs "
                             f"{tuple(tuned_params[n].shape)}")
    modules, err2, delta2, total2, captured2 = {}, 0.0, 0.0, 0.0, 0.0
    for n in base_params:
        total2 += float((tuned_params[n].double() - base_params[n].double()).pow(2).sum())
    for name, layer in base.named_modules():
        if not isinstance(layer, LORA_LAYERS) or not name:
            continue
        if targets is not None and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        delta = (tuned.get_submodule(name).weight.double() - layer.weight.double())
        d2 = float(delta.pow(2).sum())
        if d2 == 0.0:
            continue
        mat = delta.flatten(1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(rank, len(s))
        up, down = u[:, :r] * s[:r], vh[:r]
        if r < rank:  # pad to the common rank with zeros: one rank for the whole LoRA, same update
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], 1)
            down = torch.cat([down, down.new_zeros(rank - r, down.shape[1])], 0)
        err2 += float((mat - up @ down).pow(2).sum())
        delta2 += d2
        captured2 += d2
        if delta.ndim == 4:
            down = down.reshape(rank, *delta.shape[1:])
            up = up.reshape(*up.shape, 1, 1)
        dtype = layer.weight.dtype
        modules[name] = LoRAModule(down.to(dtype).contiguous(), up.to(dtype).contiguous(), float(rank))
    if not modules:
        raise ValueError("the tuned model's Linear/Conv2d weights do not differ from the base: nothing to extract")
    report = {"rank": rank, "modules": len(modules),
              "relative_error": math.sqrt(err2 / delta2),
              "uncaptured_fraction": max(0.0, 1.0 - captured2 / total2) if total2 else 0.0}
    return LoRA(modules, {"source_format": "extracted", **report}), report


__all__ = ["LoRA", "LoRAModule", "FORMATS", "load_lora", "save_lora", "from_peft", "to_peft", "fuse", "attach",
           "fuse_into_model", "extract"]
