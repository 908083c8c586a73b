"""Teacher, student and fake score: three roles over one architecture.

LoRA mode keeps ONE frozen base network (the teacher) with two peft adapters on it, "student" and "fake";
the teacher's predictions run with the adapters disabled, so memory holds one model. Full mode keeps three
copies. Either way callers ask for a role by name and never touch adapters themselves.

TDM-unify: with `k_max` set, student and fake each own a zero-initialised embedding of K that is added to
the denoiser's time embedding (a forward hook), so at init they equal the unconditioned teacher exactly.
"""
from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from tdm.backbones.base import Backbone, Cond
from tdm.quantize import is_quantized
from tdm.sharding import shard_like
from tdm.student import k_conditioning

Role = Literal["teacher", "student", "fake"]
TRAINABLE: tuple[Role, Role] = ("student", "fake")


class Roles:
    def __init__(self, backbone: Backbone, mode: Literal["lora", "full"], lora_rank: int = 16,
                 lora_alpha: float | None = None, k_max: int | None = None):
        if mode not in ("lora", "full"):
            raise ValueError(f"distill.mode must be 'lora' or 'full', got {mode!r}")
        self.backbone, self.mode = backbone, mode
        base = backbone.net.eval().requires_grad_(False)
        if mode == "lora":
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, init_lora_weights=True,
                                target_modules=backbone.lora_target_modules)
            with warnings.catch_warnings():  # peft warns on a second adapter: two is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                for role in TRAINABLE:
                    inject_adapter_in_model(config, base, adapter_name=role)
            # Adapters train in float32 even over a bf16/fp16 base (peft casts their output back).
            for name, p in base.named_parameters():
                if "lora_" in name and p.dtype != torch.float32:
                    p.data = p.data.float()
            self.lora_config = config
            self.nets = {"teacher": base, "student": base, "fake": base}
        else:
            self.nets = {"teacher": base, **{r: copy.deepcopy(base).train().requires_grad_(True) for r in TRAINABLE}}
        self._active: Role | None = None
        # Found once: walking the module tree and re-running peft's switches on every activate cost ~8% of a
        # digits iteration (benchmarks/results/optimizations.md); parameter sets never change identity.
        self._tuner_layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
        # A base loaded weight-only quantised (tdm.quantize): merges go into its unquantised weights instead.
        self.quantized_base = any(is_quantized(p) for p in base.parameters())
        self._named: dict[Role, dict[str, nn.Parameter]] = {}
        self._callables: dict[Role, nn.Module] = {}  # compiled forms (speed_up(compile=True))
        # TDM-unify: one zero-initialised K embedding per trainable role, added to the time embedding.
        self.k_max = k_max
        self.k_embeddings = nn.ModuleDict()
        if k_max is not None:
            dim = backbone.time_embed_dim(base)
            for role in TRAINABLE:
                self.k_embeddings[role] = nn.Embedding(k_max + 1, dim).to(backbone.device)
                nn.init.zeros_(self.k_embeddings[role].weight)
        self.activate("teacher")

    # -- switching ----------------------------------------------------------------------------------------
    def activate(self, role: Role) -> nn.Module:
        """Make `role` the one the shared network computes (LoRA mode) and return its network (the compiled
        form after `speed_up(compile=True)`)."""
        if self.mode == "lora" and role != self._active:
            # student <-> fake only swaps the active adapter: they are already enabled (peft's
            # enable_adapters(True) would re-run set_adapter on the old one first; same end state).
            enable = role != "teacher" and self._active in ("teacher", None)
            for layer in self._tuner_layers:
                if role == "teacher":
                    layer.enable_adapters(False)
                else:
                    if enable:
                        layer.enable_adapters(True)
                    layer.set_adapter(role)
        self._active = role
        return self._callables.get(role, self.nets[role])

    def speed_up(self, compile: bool = False, channels_last: bool = False) -> None:
        """Optional speed switches (distill.compile, distill.channels_last; docs/performance.md). Call before
        the optimisers are built. LoRA mode compiles the shared base once: adapter switches are attribute
        changes that torch.compile guards on, so each role gets its own graph and stays exact."""
        from tdm.sampler import speed_up_net

        done: dict[int, nn.Module] = {}
        for role, net in self.nets.items():
            if id(net) not in done:
                done[id(net)] = speed_up_net(net, compile=compile, channels_last=channels_last)
            if compile:
                self._callables[role] = done[id(net)]

    # -- FSDP2 (tdm.sharding) -------------------------------------------------------------------------------
    sharded = False

    def shard(self, **fsdp_kwargs) -> None:
        """Shard every distinct network per block, then at its root (`tdm.sharding.shard`), and each K
        embedding as one unit: full mode the teacher, student and fake score each; LoRA mode the one base with
        both adapters (frozen and trained parameters in the same units). Call before the optimisers are built:
        the parameters become new DTensor objects. A meta-device skeleton of each network is kept for `gather`."""
        from torch.distributed.fsdp import fully_shard

        from tdm.sharding import meta_skeleton, shard

        distinct = {id(net): net for net in self.nets.values()}
        self._skeletons = {key: meta_skeleton(net) for key, net in distinct.items()}
        self._skeletons.update({f"k_{role}": meta_skeleton(emb) for role, emb in self.k_embeddings.items()})
        for net in distinct.values():
            shard(net, **fsdp_kwargs)
        for emb in self.k_embeddings.values():
            fully_shard(emb, **fsdp_kwargs)
        self._named.clear()
        self.sharded = True

    def gather(self, keep: bool) -> None:
        """Undo `shard` for saving (a collective: every process calls it): where `keep`, every network and K
        embedding becomes a plain module on the CPU holding the full tensors (the backbone's `net` too, it is
        the teacher), so `state_dict`, `merged_net`, `k_embedding` and `adapter_state_dict` work unchanged;
        elsewhere the roles are released (they cannot compute afterwards)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        plain: dict = {}
        for key, net in {id(net): net for net in self.nets.values()}.items():
            full = get_model_state_dict(net, options=options)  # on rank 0 only (cpu_offload)
            plain[key] = self._from_full(self._skeletons[key], full) if keep else None
        for role, emb in self.k_embeddings.items():
            full = get_model_state_dict(emb, options=options)
            plain[f"k_{role}"] = self._from_full(self._skeletons[f"k_{role}"], full) if keep else None
        self.nets = {role: plain[id(net)] for role, net in self.nets.items()}
        self.k_embeddings = nn.ModuleDict({role: plain[f"k_{role}"] for role in self.k_embeddings}) if keep \
            else nn.ModuleDict()
        self.backbone.net = self.nets["teacher"]
        self.sharded, self._skeletons, self._named, self._callables = False, {}, {}, {}
        self._tuner_layers = [m for m in self.nets["teacher"].modules() if isinstance(m, BaseTunerLayer)] \
            if keep else []
        self._active = None
        if keep:
            self.activate("teacher")

    @staticmethod
    def _from_full(skeleton: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
        skeleton.load_state_dict(full, assign=True)  # the meta parameters take the gathered CPU tensors
        return skeleton

    # -- predictions -----------------------------------------------------------------------------------------
    def x0_eps(self, role: Role, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
               k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.activate(role)
        embedding = self.k_embeddings[role] if role in self.k_embeddings else None  # the teacher has none
        with k_conditioning(self.backbone, self.nets[role], embedding, k):
            return self.backbone.predict_x0_eps(net, x_t, t, cond)

    def teacher_guided_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        from tdm.sampler import guided_x0_eps

        return guided_x0_eps(self.backbone, self.activate("teacher"), x_t, t, cond, guidance)[0]

    # -- parameters and state --------------------------------------------------------------------------------
    def named_parameters(self, role: Role) -> dict[str, nn.Parameter]:
        """The trainable parameters of a role (adapter weights in LoRA mode, the whole copy in full mode)."""
        if role not in self._named:  # found once (a walk over every parameter of the base each call)
            if self.mode == "lora":
                marker = f".{role}."
                params = {n: p for n, p in self.nets["teacher"].named_parameters() if "lora_" in n and marker in n}
            else:
                params = dict(self.nets[role].named_parameters())
            if self.k_max is not None:
                params.update({f"k_embedding.{n}": p for n, p in self.k_embeddings[role].named_parameters()})
            self._named[role] = params
        return dict(self._named[role])

    def parameters(self, role: Role) -> list[nn.Parameter]:
        return list(self.named_parameters(role).values())

    def state_dict(self, role: Role) -> dict[str, torch.Tensor]:
        # Contiguous copies: channels_last weights (distill.channels_last) are saved as plain tensors.
        return {n: p.detach().clone(memory_format=torch.contiguous_format)
                for n, p in self.named_parameters(role).items()}

    def k_embedding(self, role: Role, weights: dict[str, torch.Tensor] | None = None) -> nn.Embedding | None:
        """A copy of the role's K embedding (with `weights`' values when given), for a saved K-aware model."""
        if self.k_max is None:
            return None
        emb = copy.deepcopy(self.k_embeddings[role]).requires_grad_(False)
        if weights is not None:
            emb.weight.copy_(weights["k_embedding.weight"])
        return emb

    @torch.no_grad()
    def load_state_dict(self, role: Role, state: dict[str, torch.Tensor]) -> None:
        params = self.named_parameters(role)
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise ValueError(f"{role} state does not match: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        for name, p in params.items():
            p.copy_(shard_like(state[name], p))  # a full tensor cut to this process's shard (FSDP); else as is

    def adapter_state_dict(self, role: Role) -> dict[str, torch.Tensor]:
        """LoRA mode: the role's adapter in peft's naming (for export)."""
        return get_peft_model_state_dict(self.nets["teacher"], adapter_name=role)

    def merged_net(self, role: Role, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A plain copy of the architecture computing `role` (LoRA merged into the base), optionally with
        `weights` (e.g. the EMA) in place of the role's current trainable parameters. Over a quantised base
        (`distill.base_quantization`) the LoRA is merged into the unquantised weights reloaded from the teacher
        folder (`tdm.quantize.merge_into_unquantized`; float32, on the CPU)."""
        if self.mode == "lora" and self.quantized_base:
            from tdm.quantize import merge_into_unquantized

            return merge_into_unquantized(self, role, weights)
        if self.mode == "full":
            net = copy.deepcopy(self.nets[role])
            if weights is not None:
                with torch.no_grad():
                    for n, p in net.named_parameters():
                        p.copy_(weights[n])
            return net.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)
        shared = copy.deepcopy(self.nets["teacher"])
        if weights is not None:
            own = {n: p for n, p in shared.named_parameters() if "lora_" in n and f".{role}." in n}
            with torch.no_grad():
                for n, p in own.items():
                    p.copy_(weights[n])
        for layer in shared.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge(adapter_names=[role])
        plain = {}
        for name, tensor in shared.state_dict().items():
            if "lora_" in name:
                continue
            plain[name.replace(".base_layer.", ".")] = tensor
        net = type(self.backbone.net).from_config(self.backbone.net.config) if hasattr(self.backbone.net, "config") \
            else copy.deepcopy(self.backbone.net)
        net.load_state_dict(plain)
        return net.to(self.backbone.device).eval().requires_grad_(False)
