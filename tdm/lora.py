"""The TDM student's LoRA outside the training loop: load, export, scale, fuse, attach, inspect, extract.

One in-memory form (`LoRA`: per module a down / up pair and its alpha). Reading (`load_lora`, `from_state_dict`)
takes every layout users bring: peft folders (with or without `PeftModel`'s `base_model.model.` prefix),
diffusers files (`unet.` / `transformer.` / bare paths, old `lora.down` and attention-processor naming),
kohya / webui / OneTrainer / LyCORIS-LoCon files (`lora_unet_`, `lora_transformer_`, `lycoris_`, SDXL's original
block names), per-module alpha or none; anything else (DoRA, LoHa, LoKr, text-encoder weights, ...) is refused by
name. Writing (`save_lora`) gives the layout each format's loaders read:

- peft        a folder as `PeftModel.save_pretrained` writes it (`base_model.model.<module>.lora_A.weight` +
              adapter_config.json), for `PeftModel.from_pretrained(denoiser, folder)`;
- diffusers   a folder with `pytorch_lora_weights.safetensors`, keys `<component>.<module>.lora_A/B.weight`, the
              peft config in the header (`lora_adapter_metadata`), alpha / r folded into the up weights (so
              readers that ignore the header, ComfyUI among them, load it at the same strength);
- kohya       one `.safetensors` file in the kohya / A1111 webui layout, `lora_unet_<module_with_underscores>`
              `.lora_down.weight` / `.lora_up.weight` / `.alpha` with one alpha: UNet denoisers only (diffusers'
              transformer loaders ignore kohya keys; such a file would load as a no-op, so it is refused).

A module's update is W += scale * (alpha / r) * up @ down (convolutions: down is an r x in x kh x kw conv, up a
1x1 conv, the product reshaped to the kernel). Full-mode students become a LoRA by `extract`: a truncated SVD of
each weight delta, with the approximation error reported. docs/lora.md has the tables per family.
"""
from __future__ import annotations

import json
import math
import os
import re
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
        """Module names mapped onto `net`'s own (dotted) paths; shapes checked. Fails before any compute. Kohya's
        flattened names are matched against the flattened paths of `net`'s layers (SDXL's original `input_blocks_*`
        / `middle_block_*` / `output_blocks_*` names through diffusers' own SDXL key conversion)."""
        flat = bool(self.meta.get("flat_names"))
        modules = _sgm_to_diffusers(self.modules, net) if flat else self.modules
        table, ambiguous = _layer_table(net)
        out = {}
        for name, module in modules.items():
            key = name.replace(".", "_") if flat else name
            if flat and key in ambiguous:
                raise ValueError(f"LoRA module {name!r}: the flattened name fits several layers of "
                                 f"{type(net).__name__} ({sorted(ambiguous[key])}); use a dotted-path format")
            layer_name = table.get(key) if flat else (name if name in table.values() else None)
            if layer_name is None:
                example = next(iter(sorted(table.values())), "?")
                raise ValueError(f"LoRA module {name!r} is not a Linear/Conv2d layer of {type(net).__name__} "
                                 f"(its layers are named like {example!r}: a LoRA of another architecture, or a "
                                 f"module naming tdm does not map)")
            weight = net.get_submodule(layer_name).weight
            shape = (module.up.shape[0], *module.down.shape[1:])
            if tuple(shape) != tuple(weight.shape):
                raise ValueError(f"LoRA module {name!r}: update shape {tuple(shape)} does not match "
                                 f"the layer's weight {tuple(weight.shape)} (a different architecture?)")
            if layer_name in out:
                raise ValueError(f"LoRA modules map twice onto layer {layer_name!r} of {type(net).__name__}")
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


def _layer_table(net: nn.Module) -> tuple[dict[str, str], dict[str, set[str]]]:
    """LoRA-able layers by dotted path and by kohya's flattened path; flattened names shared by several layers."""
    table, seen = {}, {}
    for name, module in net.named_modules():
        if isinstance(module, LORA_LAYERS) and name:
            table[name] = name
            seen.setdefault(name.replace(".", "_"), set()).add(name)
    ambiguous = {k: v for k, v in seen.items() if len(v) > 1}
    table.update({k: next(iter(v)) for k, v in seen.items() if len(v) == 1})
    return table, ambiguous


def _sgm_to_diffusers(modules: dict[str, LoRAModule], net: nn.Module) -> dict[str, LoRAModule]:
    """Kohya's SDXL files name a UNet's modules as the original (sgm) checkpoint does (`input_blocks_4_1_...`):
    those names go through diffusers' own conversion (the one `StableDiffusionXLPipeline.load_lora_weights` runs),
    given `net`'s config. Other names pass unchanged."""
    sgm = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_2")
    if not any(n.startswith(sgm) for n in modules):
        return modules
    diffusers_style = ("down_blocks_", "mid_block_", "up_blocks_")
    if any(n.startswith(diffusers_style) for n in modules):  # diffusers would drop the sgm ones silently
        raise ValueError(f"LoRA mixes original (sgm) module names ({next(n for n in modules if n.startswith(sgm))!r}) "
                         f"and diffusers ones ({next(n for n in modules if n.startswith(diffusers_style))!r})")
    config = getattr(net, "config", None)
    if config is None or "layers_per_block" not in config:
        raise ValueError(f"LoRA modules named as an original SD/SDXL checkpoint (e.g. "
                         f"{next(n for n in modules if n.startswith(sgm))!r}) need a diffusers UNet to map onto, "
                         f"not {type(net).__name__}")
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    state = {}
    for n, m in modules.items():
        state[f"lora_unet_{n}.lora_down.weight"] = m.down
        state[f"lora_unet_{n}.lora_up.weight"] = m.up
    mapped = _maybe_map_sgm_blocks_to_diffusers(state, config)
    by_tensor = {id(m.down): m for m in modules.values()}
    out = {}
    for key, value in mapped.items():
        if key.endswith(".lora_down.weight"):
            diffusers_key = _convert_unet_lora_key(key)  # <path>.lora.down.weight or <proc>.to_q_lora.down.weight
            name = re.sub(r"(_lora|\.lora)\.down\.weight$", "", diffusers_key)
            out[_module_name(name, "_lora.down" in diffusers_key).replace(".", "_")] = by_tensor[id(value)]
    if len(out) != len(modules):
        raise ValueError(f"LoRA modules with original (sgm) names: {len(modules)} modules map onto {len(out)} diffusers "
                         f"paths of {type(net).__name__} (a block layout diffusers' SDXL conversion does not fit)")
    return out


# -- the layouts ---------------------------------------------------------------------------------------------------
# Every LoRA file is a flat state dict; a key is <prefix><module><pair suffix> or <prefix><module>.alpha. Prefixes
# say whose module it is (the denoiser's, a text encoder's) and how module paths are spelled (dotted diffusers
# paths, or kohya's flattened ones); pair suffixes are the naming variants of the down / up weights.
DENOISER_PREFIXES = {  # prefix -> (layout, flattened names?)
    "base_model.model.": ("peft", False),     # PeftModel.save_pretrained
    "unet.": ("diffusers", False),            # pipe.save_lora_weights (UNet families)
    "transformer.": ("diffusers", False),     # pipe.save_lora_weights (DiT families), ComfyUI's DiT layout
    "lora_unet_": ("kohya", True),            # kohya / A1111 webui / ComfyUI
    "lora_transformer_": ("kohya", True),     # OneTrainer / ComfyUI for DiTs
    "lycoris_": ("kohya", True),              # LyCORIS LoCon (plain LoRA weights)
}
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "lora_te_", "lora_te1_", "lora_te2_",
                         "lora_te3_")
_PAIR_KEYS = [  # (pattern, which group is down / up): the naming variants of one module's pair
    (re.compile(r"^(?P<m>.+)\.lora_(?P<w>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$"), {"A": "down", "B": "up"}),  # peft
    (re.compile(r"^(?P<m>.+)\.lora_(?P<w>down|up)\.weight$"), None),                      # kohya / LyCORIS
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.(?P<w>down|up)\.weight$"), None),   # older diffusers
    (re.compile(r"^(?P<m>.+)_lora\.(?P<w>down|up)\.weight$"), None),       # diffusers attention processors
]
_ALPHA_KEY = re.compile(r"^(?P<m>.+)\.alpha$")
_UNSUPPORTED_KEYS = [  # (pattern, what it is): adapters that are not a plain low-rank update, refused by name
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA (weight-decomposed LoRA)"),
    (re.compile(r"\.hada_"), "LoHa (LyCORIS)"),
    (re.compile(r"\.lokr_"), "LoKr (LyCORIS)"),
    (re.compile(r"\.lora_mid\."), "LoCon with a Tucker mid weight (LyCORIS)"),
    (re.compile(r"\.(diff|diff_b)$"), "full weight differences (LyCORIS 'full')"),
    (re.compile(r"\.(w_norm|b_norm)$"), "norm-layer weights (LyCORIS)"),
    (re.compile(r"\.lora_(A|B|down|up)(\.[^.]+)?\.bias$|\.lora_linear_layer\.(down|up)\.bias$"),
     "LoRA biases (peft lora_bias)"),
    (re.compile(r"lora_embedding_[AB]"), "LoRA on embedding layers"),
    (re.compile(r"modules_to_save"), "fully trained modules (peft modules_to_save)"),
    (re.compile(r"\.(oft_|boft_)"), "OFT / BOFT"),
]
_PEFT_CONFIG_REFUSED = {  # LoraConfig fields whose non-default values make the adapter something else
    "use_dora": "DoRA (weight-decomposed LoRA)", "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
    "lora_bias": "LoRA biases", "layer_replication": "layer replication", "target_parameters": "LoRA on parameters",
    "modules_to_save": "fully trained modules (modules_to_save)", "trainable_token_indices": "trainable tokens",
    "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA", "alora_invocation_tokens": "activated LoRA",
}


def _refuse_unsupported_config(config: dict, where: str) -> None:
    peft_type = str(config.get("peft_type") or "LORA").upper().rsplit(".", 1)[-1]
    if peft_type != "LORA":
        raise ValueError(f"{where}: a peft {peft_type} adapter is not a LoRA; only LORA adapters are supported")
    for key, what in _PEFT_CONFIG_REFUSED.items():
        if config.get(key):
            raise ValueError(f"{where}: LoraConfig {key}={config[key]!r}: {what} is not supported (a plain LoRA only)")
    if config.get("bias", "none") not in ("none", None):
        raise ValueError(f"{where}: LoraConfig bias={config['bias']!r}: trained biases are not supported")


def _split_prefix(key: str) -> tuple[str, str]:
    """(denoiser prefix or "", the rest); text-encoder keys raise."""
    if key.startswith(TEXT_ENCODER_PREFIXES):
        raise ValueError(f"text-encoder LoRA weights ({key!r}): tdm applies a LoRA to the denoiser only, so this "
                         f"file would not load exactly; remove the text encoder's keys to use its denoiser part")
    for prefix in DENOISER_PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix):]
    return "", key


def _module_name(m: str, processor_style: bool) -> str:
    """diffusers' attention-processor naming (`attn1.processor.to_out_lora`) -> the layer's path (`attn1.to_out.0`)."""
    if processor_style or ".processor." in m:
        m = m.replace(".processor.", ".")
        if m.endswith(".to_out"):
            m += ".0"
    return m


def from_state_dict(state: dict[str, torch.Tensor], config: dict | None = None, where: str = "LoRA") -> LoRA:
    """A LoRA from a state dict in any layout tdm reads (peft with or without `base_model.model.`, diffusers
    `unet.` / `transformer.` / bare paths, kohya / webui `lora_unet_` / `lora_transformer_` / `lycoris_`; pairs named
    `lora_A/B`, `lora_down/up`, `lora.down/up`, `lora_linear_layer.down/up`, `<proj>_lora.down/up`; per-module
    `.alpha` or the peft config's alpha, else alpha = rank). Anything else is refused, naming the key."""
    config = dict(config or {})
    _refuse_unsupported_config(config, where)
    downs, ups, alphas, layouts, adapters = {}, {}, {}, set(), set()
    for key, value in state.items():
        for pattern, what in _UNSUPPORTED_KEYS:
            if pattern.search(key):
                raise ValueError(f"{where}: key {key!r} is {what}, which tdm does not support (a plain LoRA only)")
        try:
            prefix, rest = _split_prefix(key)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        layouts.add(prefix)
        alpha_match = _ALPHA_KEY.match(rest)
        if alpha_match:
            if value.numel() != 1:
                raise ValueError(f"{where}: alpha {key!r} is not a scalar (shape {tuple(value.shape)})")
            alphas[_module_name(alpha_match["m"], False)] = float(value)
            continue
        for i, (pattern, names) in enumerate(_PAIR_KEYS):
            match = pattern.match(rest)
            if match:
                break
        else:
            raise ValueError(f"{where}: key {key!r} is not a LoRA weight tdm knows (expected <module>.lora_A/B.weight, "
                             f".lora_down/up.weight, .lora.down/up.weight or .alpha)")
        if match.groupdict().get("adapter"):
            adapters.add(match["adapter"])
        which = names[match["w"]] if names else match["w"]
        name = _module_name(match["m"], processor_style=i == 3)
        table = downs if which == "down" else ups
        if name in table:
            raise ValueError(f"{where}: module {name!r} has two {which} weights (naming variants mixed?)")
        table[name] = value
    if not downs and not ups:
        raise ValueError(f"{where}: no LoRA weights found")
    if len(layouts) > 1:
        raise ValueError(f"{where}: keys mix layouts (prefixes {sorted(p or '<none>' for p in layouts)})")
    if len(adapters) > 1:
        raise ValueError(f"{where}: several peft adapters in one state dict ({sorted(adapters)}); save one at a time")
    if downs.keys() != ups.keys():
        odd = sorted(downs.keys() ^ ups.keys())
        raise ValueError(f"{where}: LoRA has unpaired down/up weights, e.g. module {odd[0]!r}")
    if not alphas.keys() <= downs.keys():
        raise ValueError(f"{where}: alpha without LoRA weights, e.g. module {sorted(alphas.keys() - downs.keys())[0]!r}")
    if alphas and alphas.keys() != downs.keys():  # loaders disagree: kohya / ComfyUI read rank, diffusers the common alpha
        raise ValueError(f"{where}: per-module alphas for some modules only (none for e.g. "
                         f"{sorted(downs.keys() - alphas.keys())[0]!r}): loaders read the missing ones differently "
                         f"(kohya and ComfyUI as alpha = rank, diffusers as the most common alpha)")
    from peft.utils.other import get_pattern_key

    (prefix,) = layouts
    layout, flat = DENOISER_PREFIXES.get(prefix, ("diffusers", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = {}
    for name, down in downs.items():
        up = _check_pair(name, down, ups[name], where)
        r = down.shape[0]
        if name in alphas:
            alpha = alphas[name]
        else:
            alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.get("lora_alpha", r)))
            if config.get("use_rslora"):  # scaling alpha / sqrt(r) == (alpha sqrt(r)) / r
                alpha *= math.sqrt(r)
        modules[name] = LoRAModule(down, up, alpha)
    meta = {"source_format": layout, "layout": prefix or "<bare module paths>"}
    if flat:
        meta["flat_names"] = True
    return LoRA(modules, meta)


def _check_pair(name: str, down: torch.Tensor, up: torch.Tensor, where: str) -> torch.Tensor:
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise ValueError(f"{where}: module {name!r}: down {tuple(down.shape)} / up {tuple(up.shape)} are not a "
                         f"Linear (2-d) or Conv2d (4-d) LoRA pair")
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"{where}: module {name!r}: rank mismatch, down {tuple(down.shape)} vs up {tuple(up.shape)}")
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise ValueError(f"{where}: module {name!r}: a {tuple(up.shape[2:])} up convolution is not supported (1x1 only)")
    return up


# -- peft ----------------------------------------------------------------------------------------------------------
def from_peft(state: dict[str, torch.Tensor], config: dict) -> LoRA:
    """A peft state dict (`<module>.lora_A.weight` or `base_model.model.<module>...`, no adapter name) and its
    LoraConfig dict."""
    lora = from_state_dict(state, config, where="peft adapter")
    return replace(lora, meta={**lora.meta, "source_format": "peft"})


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
    return re.escape(name)


# -- reading -------------------------------------------------------------------------------------------------------
def load_lora(path: str | Path, component: str | None = None) -> LoRA:
    """Read a LoRA in any layout tdm knows (`from_state_dict`): a peft folder (adapter_config.json +
    adapter_model.safetensors, with or without the `base_model.model.` prefix), a diffusers folder or file
    (`unet.` / `transformer.` / bare keys, the peft config in the header), a kohya / webui / LyCORIS-LoCon file.
    The denoiser's keys are read whatever their prefix (`component` is kept for compatibility and not needed: a
    file holds one denoiser's keys, and applying the LoRA checks its module paths against the model);
    text-encoder keys and non-LoRA adapters are refused by name."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            if not (path / PEFT_WEIGHTS).is_file():
                pickled = (path / "adapter_model.bin").is_file()
                raise (ValueError if pickled else FileNotFoundError)(
                    f"{path}: {PEFT_CONFIG} without {PEFT_WEIGHTS}" +
                    (" (adapter_model.bin: pickled weights are not loaded; save with safe_serialization)" if pickled else ""))
            try:
                config = json.loads((path / PEFT_CONFIG).read_text())
                state = load_file(path / PEFT_WEIGHTS)
            except Exception as err:  # a truncated / foreign file: one named error, not a safetensors traceback
                raise ValueError(f"{path}: unreadable peft adapter ({err})") from None
            lora = from_state_dict(state, config, where=str(path))
            return replace(lora, meta={**lora.meta, "source_format": "peft", "path": str(path)})
        files = [path / DIFFUSERS_WEIGHTS] if (path / DIFFUSERS_WEIGHTS).is_file() else sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path}: not a LoRA folder (expected {PEFT_WEIGHTS} + {PEFT_CONFIG}, "
                                    f"or one .safetensors file such as {DIFFUSERS_WEIGHTS})")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files must be .safetensors (pickled weights are not loaded)")
    try:
        state = load_file(path)
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError / ValueError)
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    prefixes = {_split_prefix(k)[0] for k in state if not k.startswith(TEXT_ENCODER_PREFIXES)}
    dotted = sorted(p for p in prefixes if p in ("unet.", "transformer."))
    config = {}
    if DIFFUSERS_METADATA_KEY in header:  # diffusers keeps the peft config as {"<component>.<field>": value}
        meta = json.loads(header[DIFFUSERS_METADATA_KEY])
        own = dotted[0] if dotted else ""
        config = {k[len(own):]: v for k, v in meta.items() if k.startswith(own) and "." not in k[len(own):]}
    lora = from_state_dict(state, config, where=str(path))
    return replace(lora, meta={**lora.meta, "path": str(path)})


# -- writing -------------------------------------------------------------------------------------------------------
UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.")
TRANSFORMER_ROOTS = ("transformer_blocks.", "single_transformer_blocks.")


def denoiser_component(lora: LoRA) -> str | None:
    """`unet` or `transformer` from the LoRA's module paths (diffusers' UNets vs its DiTs); None if they don't say."""
    unet = any(n.startswith(UNET_ROOTS) for n in lora.modules)
    dit = any(n.startswith(TRANSFORMER_ROOTS) for n in lora.modules)
    return None if unet == dit else ("unet" if unet else "transformer")


def save_lora(lora: LoRA, out: str | Path, fmt: str, component: str | None = "unet") -> Path:
    """Write `lora` as `fmt`, atomically, in the layout the format's loaders read:

    - "peft": a folder as `PeftModel.save_pretrained` writes it (keys `base_model.model.<module>.lora_A.weight`,
      alpha in adapter_config.json), so `PeftModel.from_pretrained(denoiser, folder)` loads it;
    - "diffusers": a folder with `pytorch_lora_weights.safetensors`, keys `<component>.<module>.lora_A/B.weight`, for
      `pipe.load_lora_weights(folder)`; alpha / r is folded into the up weights (the header says lora_alpha = r),
      so readers that ignore the header (ComfyUI reads `transformer.` keys without alpha at scale 1) load it at the
      same strength;
    - "kohya": one .safetensors, `lora_unet_<module_with_underscores>.lora_down/up.weight` + `.alpha`: UNet
      denoisers only. diffusers' DiT loaders (SD3, CogVideoX) ignore kohya's `lora_transformer_` keys, so a
      transformer's kohya file would load as a no-op: refused (the diffusers format is what they and ComfyUI read).

    `component` is the denoiser's name in the pipeline (`unet` / `transformer`; None: from the module paths); one
    that contradicts the module paths is refused (the file would load as a no-op)."""
    from safetensors.torch import save_file

    from tdm.artifacts import atomic_folder, atomic_write_file

    if fmt not in FORMATS:
        raise ValueError(f"LoRA format must be one of {FORMATS}, got {fmt!r}")
    if lora.meta.get("flat_names"):
        raise ValueError("this LoRA was read from a kohya file: call .resolved(net) to recover module paths first")
    if not lora.modules:
        raise ValueError("empty LoRA")
    inferred = denoiser_component(lora)
    component = component or inferred or "unet"
    if component not in ("unet", "transformer"):
        raise ValueError(f"component must be 'unet' or 'transformer' (the denoiser's pipeline name), got {component!r}")
    if fmt != "peft" and inferred is not None and component != inferred:  # peft keys carry no component
        example = next(n for n in sorted(lora.modules) if n.startswith(UNET_ROOTS + TRANSFORMER_ROOTS))
        raise ValueError(f"component {component!r} does not fit this LoRA: its modules (e.g. {example!r}) are a "
                         f"{inferred}'s, and a pipeline would find no keys for its {inferred} (pass component="
                         f"{inferred!r})")
    out = Path(out)
    if fmt == "kohya":
        if component != "unet":
            raise ValueError("kohya format is written for UNet denoisers only (lora_unet_* keys): diffusers' "
                             "transformer loaders (StableDiffusion3Pipeline, CogVideoXPipeline) ignore kohya's "
                             "lora_transformer_* keys, so the file would load as a no-op; export --format diffusers "
                             "(keys transformer.<module>, read by pipe.load_lora_weights and by ComfyUI)")
        if out.suffix != ".safetensors":
            raise ValueError(f"a kohya LoRA is one .safetensors file, got {out}")
        table = {}
        for name in lora.modules:
            table.setdefault(name.replace(".", "_"), []).append(name)
        clash = next((v for v in table.values() if len(v) > 1), None)
        if clash:
            raise ValueError(f"modules {clash} have the same kohya name; kohya's flattened names cannot tell them apart")
        lora = _common_alpha(lora)
        state = {}
        for name, m in lora.modules.items():
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = m.down.contiguous()
            state[f"{key}.lora_up.weight"] = m.up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(m.alpha))
        ranks = sorted(lora.ranks)
        header = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[0] if len(ranks) == 1 else ranks),
                  "ss_network_alpha": str(next(iter(lora.modules.values())).alpha), "tdm": "TDM student LoRA"}
        atomic_write_file(out, lambda tmp: save_file(state, tmp, metadata=header))
        return out
    if fmt == "diffusers":
        lora = replace(lora, modules={n: _fold_alpha(m) for n, m in lora.modules.items()})
    state, config = to_peft(lora)
    with atomic_folder(out) as tmp:
        if fmt == "peft":
            save_file({f"base_model.model.{k}": v for k, v in state.items()}, tmp / PEFT_WEIGHTS)
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


def _common_alpha(lora: LoRA) -> LoRA:
    """The same updates with one alpha for every module (the most common one; each other module's up multiplied
    by its alpha / the common one). diffusers' kohya conversion does not map per-module alphas of attention layers
    onto them (they fall back to the most common alpha), so a kohya file with mixed alphas would load at the wrong
    strength there."""
    alphas = [m.alpha for m in lora.modules.values() if m.alpha != 0] or [0.0]
    common = max(set(alphas), key=alphas.count)
    if common == 0:
        return lora
    return replace(lora, modules={n: m if m.alpha == common else LoRAModule(
        m.down, _times(m.up, m.alpha / common), common) for n, m in lora.modules.items()})


def _fold_alpha(m: LoRAModule) -> LoRAModule:
    """The same update with alpha = r: up multiplied by alpha / r."""
    if m.alpha == m.rank:
        return m
    return LoRAModule(m.down, _times(m.up, m.alpha / m.rank), float(m.rank))


def _times(up: torch.Tensor, factor: float) -> torch.Tensor:
    """`up * factor` in float32; kept in the up's dtype when that is exact (a power of two, or float32 / 64),
    else float32 (a half-precision up times 0.75 would round)."""
    product = up.float() * factor
    exact = up.dtype in (torch.float32, torch.float64) or (factor != 0 and math.frexp(abs(factor))[0] == 0.5)
    return product.to(up.dtype) if exact or factor == 0 else product


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


__all__ = ["LoRA", "LoRAModule", "FORMATS", "load_lora", "save_lora", "from_peft", "to_peft", "from_state_dict",
           "denoiser_component", "fuse", "attach",
           "fuse_into_model", "extract"]
