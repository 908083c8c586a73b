"""Every LoRA layout users bring loads exactly (or is refused by name), and every file tdm writes loads at the
intended strength in its target's stock loader: per family and format, tdm writes -> the stock diffusers pipeline's
`load_lora_weights` (+ `set_adapters` scale) / peft's `PeftModel.from_pretrained` reads -> the output equals tdm's own
fuse at the same scale (issue #18 items 1 and 2)."""
from __future__ import annotations

import copy
import json
import math
import re

import pytest
import tiny_models
import torch
from safetensors.torch import load_file, save_file

from tdm import lora as L
from tdm.cli import main


# -- digits: the layouts ---------------------------------------------------------------------------------------------
def _out(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return net(torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 500]),
                   encoder_hidden_states=torch.randn(2, 16, 64, generator=g), return_dict=False)[0]


@pytest.fixture(scope="module")
def peft_folder(tiny_digits, tmp_path_factory):
    """A standard peft adapter folder: PeftModel.save_pretrained (keys `base_model.model.<module>...`)."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("peft") / "adapter"
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(tiny_digits.net), LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"],
                                                                      init_lora_weights=False))
    model.save_pretrained(folder)
    assert all(k.startswith("base_model.model.") for k in load_file(folder / L.PEFT_WEIGHTS))
    return folder, model


def test_peft_save_pretrained_folder_fuses_to_the_peft_model(peft_folder, tiny_digits):
    folder, model = peft_folder
    lora = L.load_lora(folder)
    assert not any(n.startswith("base_model") for n in lora.modules)
    assert lora.meta["source_format"] == "peft" and {m.alpha for m in lora.modules.values()} == {8.0}
    model.eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        x, h = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
        expected = model(x, torch.tensor([10, 500]), encoder_hidden_states=h).sample
    fused = L.fuse(copy.deepcopy(tiny_digits.net), lora)
    with torch.no_grad():
        got = fused(x, torch.tensor([10, 500]), encoder_hidden_states=h).sample
    assert (got - expected).abs().max() < 1e-5
    assert (got - _out(tiny_digits.net)).abs().max() > 1e-3  # the adapter does something


def test_peft_folder_through_the_cli_exports_loadable_keys(peft_folder, tiny_digits, tmp_path, capsys):
    folder, _ = peft_folder
    tiny_digits.save(tmp_path / "teacher")
    assert main(["lora", "fuse", str(folder), "--model", str(tmp_path / "teacher"), "--out", str(tmp_path / "m")]) == 0
    assert main(["lora", "export", str(folder), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert main(["lora", "export", str(folder), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    kohya = load_file(tmp_path / "k.safetensors")
    diffusers = load_file(tmp_path / "d" / L.DIFFUSERS_WEIGHTS)
    assert all(re.match(r"lora_unet_(down|up|mid)_block", k) for k in kohya)
    assert all(re.match(r"unet\.(down|up|mid)_block", k) for k in diffusers)
    from tdm.backbones import load_backbone

    reference = _out(L.fuse(copy.deepcopy(tiny_digits.net), L.load_lora(folder)))
    assert torch.equal(_out(load_backbone(tmp_path / "m").net), reference)
    for path in (tmp_path / "k.safetensors", tmp_path / "d"):
        torch.testing.assert_close(_out(L.fuse(copy.deepcopy(tiny_digits.net), L.load_lora(path))), reference,
                                   atol=1e-6, rtol=1e-5)


def _reference_lora(net, targets=("to_q", "to_v", "to_out.0", "conv1", "proj_in"), seed=1) -> L.LoRA:
    """A LoRA over `net`'s `targets` layers: mixed ranks (4 and 2) and alphas (1, 3), conv and linear."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (name, layer) in enumerate(sorted(net.named_modules())):
        if not isinstance(layer, L.LORA_LAYERS) or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        r = 2 if i % 3 == 0 else 4
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(r, layer.in_channels, *layer.kernel_size, generator=g) * 0.2
            up = torch.randn(layer.out_channels, r, 1, 1, generator=g) * 0.2
        else:
            down = torch.randn(r, layer.in_features, generator=g) * 0.2
            up = torch.randn(layer.out_features, r, generator=g) * 0.2
        modules[name] = L.LoRAModule(down, up, 3.0 if i % 2 else 1.0)
    assert len(modules) > 4 and len({m.rank for m in modules.values()}) == 2
    return L.LoRA(modules)


def _flat(name):
    return name.replace(".", "_")


def _processor(name):  # diffusers' attention-processor spelling of a layer path
    name = re.sub(r"\.(attn[12])\.(to_[qkv])$", r".\1.processor.\2", name)
    return re.sub(r"\.(attn[12])\.to_out\.0$", r".\1.processor.to_out", name)


LAYOUTS = {  # name -> (key for a module's down, up, alpha (None: not stored), per-module alpha stored?)
    "peft_bare": (lambda n: f"{n}.lora_A.weight", lambda n: f"{n}.lora_B.weight", None),
    "peft_prefixed": (lambda n: f"base_model.model.{n}.lora_A.weight", lambda n: f"base_model.model.{n}.lora_B.weight",
                      None),
    "peft_adapter_name": (lambda n: f"{n}.lora_A.default.weight", lambda n: f"{n}.lora_B.default.weight", None),
    "diffusers_network_alphas": (lambda n: f"unet.{n}.lora_A.weight", lambda n: f"unet.{n}.lora_B.weight",
                                 lambda n: f"unet.{n}.alpha"),
    "diffusers_old_lora_down": (lambda n: f"unet.{n}.lora.down.weight", lambda n: f"unet.{n}.lora.up.weight",
                                lambda n: f"unet.{n}.alpha"),
    "diffusers_processor": (lambda n: f"unet.{_processor(n)}_lora.down.weight" if _processor(n) != n else
                            f"unet.{n}.lora.down.weight",
                            lambda n: f"unet.{_processor(n)}_lora.up.weight" if _processor(n) != n else
                            f"unet.{n}.lora.up.weight", None),
    "kohya": (lambda n: f"lora_unet_{_flat(n)}.lora_down.weight", lambda n: f"lora_unet_{_flat(n)}.lora_up.weight",
              lambda n: f"lora_unet_{_flat(n)}.alpha"),
    "kohya_no_alpha": (lambda n: f"lora_unet_{_flat(n)}.lora_down.weight",
                       lambda n: f"lora_unet_{_flat(n)}.lora_up.weight", None),
    "onetrainer_transformer": (lambda n: f"lora_transformer_{_flat(n)}.lora_down.weight",
                               lambda n: f"lora_transformer_{_flat(n)}.lora_up.weight",
                               lambda n: f"lora_transformer_{_flat(n)}.alpha"),
    "lycoris_locon": (lambda n: f"lycoris_{_flat(n)}.lora_down.weight", lambda n: f"lycoris_{_flat(n)}.lora_up.weight",
                      lambda n: f"lycoris_{_flat(n)}.alpha"),
}


@pytest.mark.parametrize("layout,with_config", [(layout, cfg) for layout in sorted(LAYOUTS)
                                                 for cfg in ((False, True) if layout.startswith(("peft", "diffusers"))
                                                            and LAYOUTS[layout][2] is None else (False,))])
def test_every_layout_loads_exactly(tiny_digits, tmp_path, layout, with_config):
    """A file in each layout (alpha per module, in a peft config, or absent = rank) fuses to the same network."""
    lora = _reference_lora(tiny_digits.net)
    down_key, up_key, alpha_key = LAYOUTS[layout]
    state = {}
    for n, m in lora.modules.items():
        state[down_key(n)], state[up_key(n)] = m.down, m.up
        if alpha_key:
            state[alpha_key(n)] = torch.tensor(m.alpha)
    if alpha_key:
        expected = lora
    elif with_config:  # alpha from a peft config with per-module patterns
        expected = lora
    else:  # no alpha anywhere: every loader reads alpha = rank (scale 1)
        expected = replace_alpha(lora, lambda m: float(m.rank))
    folder = tmp_path / "lora"
    folder.mkdir()
    if with_config and not alpha_key:
        _, config = L.to_peft(lora)
        if layout.startswith("peft"):
            save_file(state, folder / L.PEFT_WEIGHTS)
            (folder / L.PEFT_CONFIG).write_text(json.dumps(config))
        else:  # the peft config in the diffusers header
            header = {L.DIFFUSERS_METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in config.items()})}
            save_file(state, folder / L.DIFFUSERS_WEIGHTS, metadata=header)
    else:
        save_file(state, folder / "any_name.safetensors")
    back = L.load_lora(folder)
    if layout.startswith(("kohya", "onetrainer", "lycoris")):
        assert back.meta["flat_names"]
    got = _out(L.fuse(copy.deepcopy(tiny_digits.net), back))
    want = _out(L.fuse(copy.deepcopy(tiny_digits.net), expected))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (want - _out(tiny_digits.net)).abs().max() > 1e-3


def replace_alpha(lora, alpha):
    from dataclasses import replace

    return replace(lora, modules={n: replace(m, alpha=alpha(m)) for n, m in lora.modules.items()})


def test_rslora_config_scales_by_sqrt_rank(tiny_digits, tmp_path):
    lora = _reference_lora(tiny_digits.net)
    state, config = L.to_peft(replace_alpha(lora, lambda m: 2.0))
    back = L.from_peft(state, {**config, "use_rslora": True})
    for n, m in back.modules.items():
        assert m.alpha == pytest.approx(2.0 * math.sqrt(m.rank))


# -- refusals -------------------------------------------------------------------------------------------------------
def _one_pair(prefix="unet.", name="down_blocks.0.attentions.0.proj_in"):
    return {f"{prefix}{name}.lora_A.weight": torch.zeros(2, 32), f"{prefix}{name}.lora_B.weight": torch.zeros(32, 2)}


REFUSED_STATES = {
    "DoRA": ({**_one_pair(), "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.ones(32)}, "DoRA"),
    "DoRA_kohya": ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
                    "lora_unet_x.dora_scale": torch.ones(1, 4)}, "DoRA"),
    "LoHa": ({"lora_unet_x.hada_w1_a": torch.zeros(4, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 4)}, "LoHa"),
    "LoKr": ({"lycoris_x.lokr_w1": torch.zeros(2, 2)}, "LoKr"),
    "Tucker": ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4, 1, 1), "lora_unet_x.lora_up.weight":
                torch.zeros(4, 2, 1, 1), "lora_unet_x.lora_mid.weight": torch.zeros(2, 2, 3, 3)}, "Tucker"),
    "full_diff": ({"lora_unet_x.diff": torch.zeros(4, 4)}, "full weight differences"),
    "lora_bias": ({**_one_pair(), "unet.down_blocks.0.attentions.0.proj_in.lora_B.bias": torch.zeros(32)},
                  "LoRA biases"),
    "text_encoder_kohya": ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight":
                            torch.zeros(4, 2), "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                            torch.zeros(2, 4)}, "text-encoder"),
    "text_encoder_diffusers": ({**_one_pair(), "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight":
                                torch.zeros(2, 4)}, "text-encoder"),
    "mixed_layouts": ({**_one_pair("unet."), **_one_pair("lora_unet_", "x")}, "mix layouts"),
    "unpaired": ({"unet.a.lora_A.weight": torch.zeros(2, 4)}, "unpaired"),
    "unknown_key": ({**_one_pair(), "unet.down_blocks.0.attentions.0.proj_in.weight": torch.zeros(32, 32)},
                    "not a LoRA weight"),
    "two_adapters": ({"a.lora_A.one.weight": torch.zeros(2, 4), "a.lora_B.one.weight": torch.zeros(4, 2),
                      "b.lora_A.two.weight": torch.zeros(2, 4), "b.lora_B.two.weight": torch.zeros(4, 2)},
                     "several peft adapters"),
    "rank_mismatch": ({"unet.a.lora_A.weight": torch.zeros(2, 4), "unet.a.lora_B.weight": torch.zeros(4, 3)},
                      "rank mismatch"),
    "orphan_alpha": ({**_one_pair(), "unet.b.alpha": torch.tensor(1.0)}, "alpha without LoRA weights"),
    "partial_alphas": ({"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
                        "lora_unet_a.alpha": torch.tensor(1.0), "lora_unet_b.lora_down.weight": torch.zeros(2, 4),
                        "lora_unet_b.lora_up.weight": torch.zeros(4, 2)}, "per-module alphas for some modules only"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_STATES))
def test_unsupported_layouts_are_refused_by_name(tmp_path, case):
    state, message = REFUSED_STATES[case]
    path = tmp_path / "lora.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError, match=message) as err:
        L.load_lora(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("field,value,message", [
    ("use_dora", True, "DoRA"), ("peft_type", "LOHA", "LOHA adapter is not a LoRA"),
    ("fan_in_fan_out", True, "fan_in_fan_out"), ("bias", "all", "trained biases"),
    ("modules_to_save", ["conv_in"], "modules_to_save"), ("layer_replication", [[0, 1]], "layer replication")])
def test_unsupported_peft_configs_are_refused_by_name(tmp_path, field, value, message):
    from peft import LoraConfig

    save_file(_one_pair("base_model.model."), tmp_path / L.PEFT_WEIGHTS)
    config = {**LoraConfig(r=2, target_modules=["proj_in"]).to_dict(), field: value}
    (tmp_path / L.PEFT_CONFIG).write_text(json.dumps(config, default=list))
    with pytest.raises(ValueError, match=message):
        L.load_lora(tmp_path)


def test_pickled_peft_weights_are_refused(tmp_path):
    (tmp_path / L.PEFT_CONFIG).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickled"):
        L.load_lora(tmp_path)


@pytest.mark.parametrize("layout", ["file", "peft"])
def test_a_corrupt_safetensors_file_is_one_named_value_error(tmp_path, layout):
    # safetensors raises its own SafetensorError; callers (tdm sample --lora, evaluate.lora) catch ValueError
    if layout == "file":
        path = tmp_path / "lora.safetensors"
        path.write_bytes(b"not a safetensors header")
    else:
        path = tmp_path
        (path / L.PEFT_CONFIG).write_text("{}")
        (path / L.PEFT_WEIGHTS).write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        L.load_lora(path)


def test_unknown_module_names_fail_naming_the_module(tiny_digits, tmp_path):
    save_file({"diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.zeros(2, 32),
               "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.zeros(32, 2)},
              tmp_path / "ldm.safetensors")
    lora = L.load_lora(tmp_path / "ldm.safetensors")
    with pytest.raises(ValueError, match="diffusion_model.input_blocks.1.1.proj_in' is not a Linear/Conv2d layer"):
        L.fuse(copy.deepcopy(tiny_digits.net), lora)


def test_writer_refuses_files_that_would_load_as_a_no_op(tiny_digits, tmp_path):
    unet_lora = _reference_lora(tiny_digits.net)
    dit_lora = L.LoRA({"transformer_blocks.0.attn.to_q": L.LoRAModule(torch.zeros(2, 8), torch.zeros(8, 2), 1.0)})
    with pytest.raises(ValueError, match="kohya format is written for UNet denoisers only.*--format diffusers"):
        L.save_lora(dit_lora, tmp_path / "k.safetensors", "kohya", component="transformer")
    with pytest.raises(ValueError, match="component 'unet' does not fit.*component='transformer'"):
        L.save_lora(dit_lora, tmp_path / "d", "diffusers", component="unet")
    with pytest.raises(ValueError, match="component 'transformer' does not fit.*component='unet'"):
        L.save_lora(unet_lora, tmp_path / "d", "diffusers", component="transformer")
    with pytest.raises(ValueError, match="component must be"):
        L.save_lora(unet_lora, tmp_path / "d", "diffusers", component="prior")
    # None: the component from the module paths.
    L.save_lora(dit_lora, tmp_path / "auto", "diffusers", component=None)
    assert all(k.startswith("transformer.") for k in load_file(tmp_path / "auto" / L.DIFFUSERS_WEIGHTS))
    assert not (tmp_path / "k.safetensors").exists() and not (tmp_path / "d").exists()


# -- the families: tdm writes, the stock loader reads -----------------------------------------------------------------
def _run(family, pipe):
    common = dict(prompt="a photo of a cat", num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    if family in ("sd15", "sdxl"):
        return pipe(**common).images
    if family == "pixart_alpha":
        return pipe(**common, height=16, width=16, max_sequence_length=tiny_models.TEXT_LEN, clean_caption=False,
                    use_resolution_binning=False).images
    if family == "sd3":
        return pipe(**common, height=16, width=16, max_sequence_length=tiny_models.TEXT_LEN).images
    return pipe(**common, num_frames=9, height=16, width=16, use_dynamic_cfg=False,
                max_sequence_length=tiny_models.TEXT_LEN).frames


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _pixart_512():
    """The tiny PixArt-alpha without micro-conditions (the 512 px layout: the pipeline passes none at 16 px)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    pipe = tiny_models.build("pixart_alpha")
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(1)
    transformer = PixArtTransformer2DModel(**{**config, "use_additional_conditions": False})
    return PixArtAlphaPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                               transformer=transformer, scheduler=pipe.scheduler)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (saved tiny pipeline folder, a fresh-stock-pipeline maker, a LoRA over tdm's targets)."""
    from tdm.backbones import load_backbone

    root, cache = tmp_path_factory.mktemp("families"), {}

    def get(family):
        if family not in cache:
            import diffusers

            pipe = tiny_models.build(family) if family != "pixart_alpha" else _pixart_512()
            folder = tiny_models.save_pipeline(pipe, root / family)
            cls = getattr(diffusers, type(pipe).__name__)
            kwargs = {"safety_checker": None, "feature_extractor": None,
                      "requires_safety_checker": False} if family == "sd15" else {}

            def fresh():
                p = cls.from_pretrained(folder, **kwargs)
                p.set_progress_bar_config(disable=True)
                return p

            lora = _reference_lora(_denoiser(pipe), targets=load_backbone(folder).lora_target_modules)
            cache[family] = (folder, fresh, lora)
        return cache[family]

    return get


def _max_diff(got, want) -> float:
    """max |got - want|, relative to the output's scale where that exceeds 1 (the tiny PixArt's latents reach ~500)."""
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def _tdm_fused(fresh, family, lora, scale):
    pipe = fresh()
    L.fuse(_denoiser(pipe), lora, scale)
    return _run(family, pipe)


STOCK_LOADABLE = [("sd15", "diffusers"), ("sd15", "kohya"), ("sdxl", "diffusers"), ("sdxl", "kohya"),
                  ("sd3", "diffusers"), ("cogvideox", "diffusers")]


@pytest.mark.parametrize("family,fmt", STOCK_LOADABLE)
def test_stock_load_lora_weights_matches_tdm_fuse(built, tmp_path, family, fmt):
    """pipe.load_lora_weights(tdm's file) at adapter weight 0.5 == tdm's fuse at scale 0.5 (mixed ranks, alpha !=
    rank: a reload that loses either changes the output)."""
    folder, fresh, lora = built(family)
    component = "unet" if family in ("sd15", "sdxl") else "transformer"
    path = L.save_lora(lora, tmp_path / ("lora.safetensors" if fmt == "kohya" else "lora"), fmt, component)
    pipe = fresh()
    pipe.load_lora_weights(str(path), adapter_name="tdm")
    pipe.set_adapters(["tdm"], adapter_weights=[0.5])
    got, want = _run(family, pipe), _tdm_fused(fresh, family, lora, 0.5)
    assert _max_diff(got, want) < 1e-5
    assert _max_diff(_run(family, fresh()), want) > 1e-3  # the LoRA matters
    pipe.set_adapters(["tdm"], adapter_weights=[1.0])
    assert _max_diff(_run(family, pipe), _tdm_fused(fresh, family, lora, 1.0)) < 1e-5


@pytest.mark.parametrize("family", ["sd3", "cogvideox", "pixart_alpha"])
def test_kohya_export_of_a_transformer_is_refused(built, tmp_path, family):
    _, _, lora = built(family)
    with pytest.raises(ValueError, match="UNet denoisers only"):
        L.save_lora(lora, tmp_path / "k.safetensors", "kohya", "transformer")


@pytest.mark.parametrize("family", ["pixart_alpha", "sd3", "sd15"])
def test_peft_export_loads_with_peft_model_from_pretrained(built, tmp_path, family):
    """The peft folder loads with peft's own PeftModel.from_pretrained; for PixArt-alpha (no diffusers LoRA loader:
    PixArtAlphaPipeline has no load_lora_weights) that is the stock route, run inside the stock pipeline."""
    from peft import PeftModel

    folder, fresh, lora = built(family)
    path = L.save_lora(lora, tmp_path / "peft", "peft")
    pipe = fresh()
    wrapped = PeftModel.from_pretrained(_denoiser(pipe), path)
    wrapped.eval()
    got, want = _run(family, pipe), _tdm_fused(fresh, family, lora, 1.0)
    assert _max_diff(got, want) < 1e-5
    assert _max_diff(_run(family, fresh()), want) > 1e-3
    if family == "pixart_alpha":
        assert not hasattr(pipe, "load_lora_weights")


def _comfy_like_read(state: dict, net, family: str) -> dict[str, torch.Tensor]:
    """Deltas as ComfyUI's key conventions read a file (recipes notes: UNets `lora_unet_<diffusers path with
    underscores>`; DiTs `transformer.<diffusers path>`; pairs lora_up/lora_down or lora_B/lora_A; `.alpha` honoured,
    missing alpha = scale 1). Keys matching no layer are returned under "unmatched"."""
    keys = {}
    for name, layer in net.named_modules():
        if isinstance(layer, L.LORA_LAYERS):
            keys["lora_unet_" + _flat(name) if family in ("sd15", "sdxl") else f"transformer.{name}"] = name
    deltas, matched = {}, set()
    for key, name in keys.items():
        for down_s, up_s in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
            if key + down_s in state:
                down, up = state[key + down_s].float(), state[key + up_s].float()
                alpha = float(state[key + ".alpha"]) if key + ".alpha" in state else down.shape[0]
                deltas[name] = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * (
                    alpha / down.shape[0])
                matched |= {key + down_s, key + up_s, key + ".alpha"}
    deltas["unmatched"] = sorted(set(state) - matched)
    return deltas


@pytest.mark.parametrize("family,fmt", [("sd15", "kohya"), ("sdxl", "kohya"), ("sd3", "diffusers"),
                                        ("pixart_alpha", "diffusers"), ("cogvideox", "diffusers")])
def test_written_keys_follow_comfyui_conventions_at_full_strength(built, tmp_path, family, fmt):
    """The file a ComfyUI user takes (kohya for UNets, diffusers `transformer.` keys for DiTs) matches ComfyUI's key
    conventions key by key and, read with its alpha rule (none = scale 1), carries the intended update."""
    folder, fresh, lora = built(family)
    component = "unet" if family in ("sd15", "sdxl") else "transformer"
    path = L.save_lora(lora, tmp_path / ("lora.safetensors" if fmt == "kohya" else "lora"), fmt, component)
    state = load_file(path if fmt == "kohya" else path / L.DIFFUSERS_WEIGHTS)
    deltas = _comfy_like_read(state, _denoiser(fresh()), family)
    assert deltas.pop("unmatched") == []
    assert deltas.keys() == lora.modules.keys()
    for name, m in lora.modules.items():
        torch.testing.assert_close(deltas[name], m.delta(), atol=1e-6, rtol=1e-5)


def _sgm_name(name: str, layers_per_block: int = 1) -> str:
    """The original (sgm) UNet's name of a diffusers UNet path, as kohya's SDXL files spell modules (tiny SDXL:
    two down blocks, the second with attention; the up blocks mirrored)."""
    n = layers_per_block + 1
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        kind, b, inner, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        block = f"input_blocks.{1 + b * n + j}" if kind == "down_blocks" else f"output_blocks.{b * n + j}"
        return f"{block}.{0 if inner == 'resnets' else 1}.{resnet.get(rest, rest)}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", name)
    if m:
        return f"input_blocks.{1 + int(m[1]) * n + layers_per_block}.0.op"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", name)
    if m:
        return f"output_blocks.{int(m[1]) * n + layers_per_block}.2.conv"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[1], m[2])]
        return f"middle_block.{index}.{resnet.get(m[3], m[3])}"
    raise AssertionError(name)


def test_kohya_sdxl_file_with_original_names_loads_as_the_stock_sdxl_loader_reads_it(built, tmp_path):
    """Kohya's SDXL LoRAs name modules as the sgm checkpoint does (`lora_unet_input_blocks_4_1_...`): tdm maps them
    with diffusers' own SDXL conversion; tdm's fuse, the stock StableDiffusionXLPipeline and the reference agree."""
    folder, fresh, lora = built("sdxl")
    lora = replace_alpha(lora, lambda m: 2.0)
    state = {}
    for name, m in lora.modules.items():
        key = "lora_unet_" + _flat(_sgm_name(name))
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = m.down, m.up
        state[f"{key}.alpha"] = torch.tensor(m.alpha)
    assert any("input_blocks" in k for k in state) and any("skip_connection" in k for k in state)
    save_file(state, tmp_path / "sdxl_kohya.safetensors")
    ours = L.load_lora(tmp_path / "sdxl_kohya.safetensors")
    pipe = fresh()
    assert ours.resolved(pipe.unet).modules.keys() == lora.modules.keys()
    want = _tdm_fused(fresh, "sdxl", lora, 1.0)
    assert _max_diff(_tdm_fused(fresh, "sdxl", ours, 1.0), want) < 1e-6
    pipe.load_lora_weights(str(tmp_path / "sdxl_kohya.safetensors"))
    assert _max_diff(_run("sdxl", pipe), want) < 1e-5
    mixed = {**state, "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
             "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2),
             "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(2.0)}
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(ValueError, match="mixes original"):
        L.load_lora(tmp_path / "mixed.safetensors").resolved(pipe.unet)


def test_diffusers_model_and_pipeline_savers_load_exactly(tiny_digits, built, tmp_path):
    """What diffusers itself writes: a model's `save_lora_adapter` (bare keys, the config unprefixed in the header)
    and a DiT pipeline's `save_lora_weights` (`transformer.` keys): read at the adapter's own alpha."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    net = copy.deepcopy(tiny_digits.net)
    torch.manual_seed(0)
    net.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "conv1"], init_lora_weights=False))
    net.save_lora_adapter(tmp_path / "model_level")
    assert not any(k.startswith("unet.") for k in load_file(tmp_path / "model_level" / L.DIFFUSERS_WEIGHTS))
    lora = L.load_lora(tmp_path / "model_level")
    assert {m.alpha for m in lora.modules.values()} == {6.0}
    torch.testing.assert_close(_out(L.fuse(copy.deepcopy(tiny_digits.net), lora)), _out(net), atol=1e-5, rtol=1e-4)

    folder, fresh, _ = built("sd3")
    pipe = fresh()
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=["to_q", "add_k_proj"],
                                            init_lora_weights=False))
    config = pipe.transformer.peft_config["default"].to_dict()
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "pipeline_level",
                                               transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                               transformer_lora_adapter_metadata=config)
    lora = L.load_lora(tmp_path / "pipeline_level", component="unet")  # the CLI's default component: still read
    assert {m.alpha for m in lora.modules.values()} == {1.0} and lora.ranks == {2}
    assert _max_diff(_tdm_fused(fresh, "sd3", lora, 1.0), _run("sd3", pipe)) < 1e-5


def test_cli_refuses_a_transformer_kohya_export_and_writes_its_diffusers_one(built, tmp_path, capsys):
    _, _, lora = built("sd3")
    src = L.save_lora(lora, tmp_path / "src", "peft")
    out = tmp_path / "k.safetensors"
    assert main(["lora", "export", str(src), "--format", "kohya", "--component", "transformer", "--out", str(out)]) == 2
    assert "UNet denoisers only" in capsys.readouterr().err and not out.exists()
    assert main(["lora", "export", str(src), "--format", "diffusers", "--component", "unet",
                 "--out", str(tmp_path / "u")]) == 2
    assert "pass component='transformer'" in capsys.readouterr().err and not (tmp_path / "u").exists()  # a no-op
    # Without --component the module paths say which denoiser it is.
    assert main(["lora", "export", str(src), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert all(k.startswith("transformer.") for k in load_file(tmp_path / "d" / L.DIFFUSERS_WEIGHTS))


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_folding_alpha_into_half_precision_weights_stays_exact(tiny_digits, tmp_path, fmt):
    """A bf16 LoRA whose alpha / r (or alpha ratio) is no power of two: the folded up weights are kept in float32,
    so the reloaded update equals the original one (a bf16 up times 0.75 would round by up to 2**-8)."""
    lora = _reference_lora(tiny_digits.net)
    lora = L.LoRA({n: L.LoRAModule(m.down.bfloat16(), m.up.bfloat16(), m.alpha) for n, m in lora.modules.items()})
    path = L.save_lora(lora, tmp_path / ("k.safetensors" if fmt == "kohya" else "d"), fmt)
    back = L.load_lora(path).resolved(tiny_digits.net)
    for name, m in lora.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), atol=1e-7, rtol=1e-6)
    assert any(m.up.dtype == torch.float32 for m in back.modules.values())
    assert all(m.down.dtype == torch.bfloat16 for m in back.modules.values())
