"""tdm.memory_plan: the plan before launch (configs only, meta device).

- the recorded real architectures (tdm/arch) build on the meta device with the published parameter counts;
- on the tiny model of every family (and digits), in LoRA and full mode, the plan's weight, optimiser-state and
  EMA bytes equal those of the real `TDMTrainer` after one iteration, by role / component and dtype, exactly;
- the activation meter counts the same bytes on the meta device as on real CPU tensors, and scales with the batch;
- every profile in profiles/ is planned at its real architecture (the time is printed: the issue asks < 30 s);
- bad input is a clear ValueError.
"""
import json
import math
import time
from pathlib import Path

import pytest
import torch

import tiny_models
from tdm import config
from tdm import memory_plan as mp

ROOT = Path(__file__).resolve().parents[2]
# Z-Image's profile is planned once the family is registered (tdm.backbones.FAMILIES; test_zimage.py says how).
ZIMAGE_REGISTERED = "zimage" in __import__("tdm.backbones", fromlist=["FAMILIES"]).FAMILIES
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
PLANNED = [p if p.stem != "zimage" or ZIMAGE_REGISTERED else
           pytest.param(p, marks=pytest.mark.skip(reason="zimage is not in tdm.backbones.FAMILIES yet"))
           for p in PROFILES]
PROMPTS = ROOT / "profiles" / "prompts" / "example.txt"
TINY = ("digits", *tiny_models.FAMILIES, *tiny_models.NEW_FAMILIES)
# Z-Image's tiny model (tests/tiny_zimage.py) goes through the registry too: planned once zimage is registered.
ZIMAGE = pytest.param("zimage", marks=pytest.mark.skipif(not ZIMAGE_REGISTERED,
                                                         reason="zimage is not in tdm.backbones.FAMILIES yet"))
PROFILE_OF = {"sd35": "sd35_medium", "flux_schnell": "flux"}  # tiny family -> its profile


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# -- real architectures ---------------------------------------------------------------------------------------
T5_XXL_ENCODER = 4_762_310_656  # published (google/t5-v1_1-xxl encoder, embeddings tied)
PUBLISHED = {  # parameter counts of the published checkpoints (model cards / safetensors headers)
    "sd15.json": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sdxl_base_1.0.json": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                           "vae": 83_653_863},
    "pixart_xl_2_1024_ms.json": {"transformer": 611_349_152, "vae": 83_653_863},
    "sd3_medium.json": {"transformer": 2_028_328_000, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
                        "vae": 83_819_683},
    "cogvideox_2b.json": {"transformer": 1_693_783_872, "vae": 215_583_907},
    "cogvideox_5b.json": {"transformer": 5_570_283_072, "vae": 215_583_907},
    "flux1_dev.json": {"transformer": 11_901_408_320, "text_encoder": 123_060_480},
    # Z-Image / Z-Image-Turbo: Qwen3-4B without its LM head (4,022,468,096) and FLUX.1's VAE; the transformer's
    # published size is "6.15B" (checked below to 0.1 %).
    "zimage.json": {"text_encoder": 4_022_468_096, "vae": 83_819_683},
}
ZIMAGE_TRANSFORMER = 6.15e9
# Model-card sizes (nominal, rounded: "1.3B", "2.5B"): checked loosely; the exact counts are what tdm builds.
NOMINAL = {"sd35_medium.json": 2.5e9, "pixart_sigma_xl_2_1024_ms.json": 0.6e9, "flux1_schnell.json": 12e9,
           "wan21_t2v_1.3b.json": 1.3e9, "wan21_t2v_14b.json": 14e9}
UMT5_XXL_ENCODER = 5.7e9  # umt5-xxl's encoder (Wan's text encoder), nominal


def test_every_recorded_architecture_is_checked():
    assert {f.name for f in mp.ARCH_DIR.glob("*.json")} == set(PUBLISHED) | set(NOMINAL)


@pytest.mark.parametrize("name", sorted(set(PUBLISHED) | set(NOMINAL)))
def test_recorded_architectures_have_the_published_parameter_counts(name):
    spec = json.loads((mp.ARCH_DIR / name).read_text())
    counts = {part: sum(p.numel() for p in mp.build_component(entry).parameters())
              for part, entry in spec["components"].items()}
    print(name, counts)
    for part, n in PUBLISHED.get(name, {}).items():
        assert counts[part] == n, (part, counts[part])
    if name in NOMINAL:
        assert counts["transformer"] == pytest.approx(NOMINAL[name], rel=0.15)
    if name == "zimage.json":
        assert counts["transformer"] == pytest.approx(ZIMAGE_TRANSFORMER, rel=1e-3)
    for part, entry in spec["components"].items():
        if entry["class"] == "UMT5EncoderModel":
            assert counts[part] == pytest.approx(UMT5_XXL_ENCODER, rel=0.01)
    for part, entry in spec["components"].items():
        if entry["class"] == "T5EncoderModel":
            # encoder.embed_tokens is `shared` (tied even with the published tie_word_embeddings: false, which is
            # about the LM head); built under accelerate's init_empty_weights, transformers 5 would untie it
            # (+ 32128 x 4096), which is why tdm.memory_plan builds under torch.device("meta").
            assert counts[part] == T5_XXL_ENCODER
    assert all(p.is_meta for p in mp.build_component(spec["components"]["vae"]).parameters())


def test_every_profile_teacher_is_recorded():
    known = mp.known_architectures()
    for profile in PROFILES:
        raw = config.yaml_load(profile.read_text())
        assert raw["distill"]["teacher"] in known, profile


# -- plan == real instantiation on the tiny models --------------------------------------------------------------
def _tiny_cfg(tmp_path, family: str, mode: str, *extra: str):
    """The family's profile (params.yaml for digits) pointed at a saved tiny model of the family."""
    folder = tmp_path / "model"
    if family == "digits":
        from tdm.backbones import DigitsBackbone

        DigitsBackbone.create().save(folder)
        source = ROOT / "params.yaml"
    elif family == "zimage":
        import tiny_zimage

        tiny_zimage.save(tiny_zimage.tiny_zimage(), folder)
        source = ROOT / "profiles" / "zimage.yaml"
    else:
        tiny_models.save_pipeline(tiny_models.build(family), folder)
        source = ROOT / "profiles" / f"{PROFILE_OF.get(family, family)}.yaml"
    overrides = [f"model.pretrained={folder}", f"distill.teacher={folder}", f"distill.prompts={PROMPTS}",
                 "distill.lora_rank=4", "distill.batch_size=2", f"distill.mode={mode}", *extra]
    return mp.load_config(source, overrides), folder  # (families tdm.config does not list yet too)


def _by_dtype(params) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in {id(p): p for p in params}.values():
        key = str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


def _plan_bytes(plan, section: str, part: str, device: bool = True) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in plan.lines:
        if line.section == section and line.part == part and line.device == device:
            out[line.dtype] = out.get(line.dtype, 0) + line.bytes
    return out


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("family", [*TINY, ZIMAGE])
def test_plan_bytes_equal_a_real_instantiation(family, mode, tmp_path):
    from accelerate import Accelerator

    from tdm.backbones import load_backbone
    from tdm.distill import TDMTrainer

    cfg, folder = _tiny_cfg(tmp_path, family, mode)
    d = cfg.distill
    plan = mp.plan(cfg, device_memory_bytes=2**30, suggestions=False)
    assert plan.family == cfg.model.family and plan.source == str(folder)

    # the real thing, built as tdm.distill.train builds it, one iteration run (it creates AdamW's state)
    base_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(d.mixed_precision) if mode == "lora" else None
    backbone = load_backbone(folder, dtype=base_dtype)
    trainer = TDMTrainer(cfg, backbone, Accelerator(mixed_precision=d.mixed_precision, cpu=True))
    trainer.iteration(0)
    roles = trainer.roles

    base = [p for n, p in roles.nets["teacher"].named_parameters() if "lora_" not in n]
    assert _plan_bytes(plan, "weights", "teacher") == _by_dtype(base)
    for role in ("student", "fake"):
        assert _plan_bytes(plan, "weights", role) == _by_dtype(roles.parameters(role)), role
        state = trainer.opt[role].state
        assert len(state) == len(roles.parameters(role))
        moments = sum(s[k].numel() * s[k].element_size() for s in state.values() for k in ("exp_avg", "exp_avg_sq"))
        steps = sum(s["step"].numel() * s["step"].element_size() for s in state.values())
        assert all(not s["step"].is_meta and s["step"].device.type == "cpu" for s in state.values())
        assert sum(_plan_bytes(plan, "optimizer", role).values()) == moments, role
        assert sum(_plan_bytes(plan, "optimizer", role, device=False).values()) == steps, role
    ema = trainer.ema.shadow.values() if trainer.ema is not None else ()  # student_weights: raw keeps none
    assert sum(_plan_bytes(plan, "ema", "student").values()) == sum(t.numel() * t.element_size() for t in ema)
    grads = [line for line in plan.lines if line.section == "gradients"]
    assert grads[0].bytes == max(sum(p.numel() * p.element_size() for p in roles.parameters(r))
                                 for r in ("student", "fake"))
    components = {name: m for name, m in backbone.modules().items() if name != "net"}
    assert {line.part for line in plan.lines if line.section == "weights"} - {"teacher", "student", "fake"} \
        == set(components)
    for name, module in components.items():
        assert _plan_bytes(plan, "weights", name) == _by_dtype(module.parameters()), name
    assert plan.sample_shape == tuple(backbone.sample_shape)
    assert plan.section_bytes("activations") > 0 and plan.fits is not None


# -- activations ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "pixart_alpha", "cogvideox", ZIMAGE])
def test_activation_meter_counts_the_same_on_meta_as_on_real_tensors(family, tmp_path):
    """The meta build's saved-tensor bytes equal those of the real tiny model on CPU (same meter, float32: in
    bf16, CPU's layer norm keeps its statistics in bf16 where CUDA and the meta kernels keep float32), so the
    meta device changes nothing about the shapes and storages autograd keeps."""
    from tdm.backbones import load_backbone
    from tdm.roles import Roles

    cfg, folder = _tiny_cfg(tmp_path, family, "lora", 'distill.mixed_precision="no"')
    b = mp._build(cfg, mp.architecture_spec(cfg), "lora")
    meta = mp.measure_activations(b["backbone"], b["roles"], b["parts"], family, 2, None, cfg.distill.unify)

    real = load_backbone(folder)
    roles = Roles(real, "lora", cfg.distill.lora_rank, k_max=max(cfg.distill.k_choices) if cfg.distill.unify else None)
    parts = {"net": real.net, **{k: v for k, v in real.modules().items() if k != "net"}}
    cpu = mp.measure_activations(real, roles, parts, family, 2, None, cfg.distill.unify)
    assert meta["saved"] == cpu["saved"] > 0
    assert meta["saved_checkpointed"] == cpu["saved_checkpointed"] > 0  # (one-layer tiny models: not smaller)
    assert meta["attention_calls"] == cpu["attention_calls"] > 0


def test_saved_activations_scale_with_the_batch_at_real_size():
    cfg = mp.load_config(ROOT / "profiles" / "sd15.yaml", ["distill.lora_rank=4"])
    b = mp._build(cfg, mp.architecture_spec(cfg), "lora")
    one, two = (mp.measure_activations(b["backbone"], b["roles"], b["parts"], "sd15", n, b["compute_dtype"],
                                       cfg.distill.unify) for n in (1, 2))
    assert two["saved"] == pytest.approx(2 * one["saved"], rel=1e-3)
    assert two["saved_checkpointed"] == pytest.approx(2 * one["saved_checkpointed"], rel=1e-3)
    assert one["autocast_cache"] == two["autocast_cache"] > 0  # weights, not activations


# -- every profile at its real architecture -----------------------------------------------------------------
@pytest.mark.parametrize("profile", PLANNED, ids=lambda p: p.stem)
def test_every_profile_is_planned_at_real_architecture(profile, capsys):
    cfg = mp.load_config(profile)
    t0 = time.perf_counter()
    plan = mp.plan(cfg, device_memory_bytes=80 * 2**30)
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n{profile.stem}: plan in {elapsed:.1f} s (issue 15 asks < 30 s), total "
              f"{plan.total_bytes / 2**30:.1f} GiB per process")
    arch = json.loads(Path(mp.known_architectures()[cfg.distill.teacher]).read_text())
    net = next(iter(arch["components"].values()))  # the denoiser is recorded first
    count = sum(p.numel() for p in mp.build_component(net).parameters())
    assert sum(line.params for line in plan.lines if line.part == "teacher") == count
    text = plan.render()
    assert "total per process" in text and ("FITS" in text or "DOES NOT FIT" in text)
    d = plan.to_dict()
    json.dumps(d)
    assert d["total_bytes"] == sum(line["bytes"] for line in d["lines"] if line["device"])
    assert plan.suggestions and all(s.status in ("exists", "") for s in plan.suggestions)


def test_run_dry_prints_the_table_and_returns_the_dict(tmp_path):
    import io

    cfg, _ = _tiny_cfg(tmp_path, "sdxl", "lora")
    out = io.StringIO()
    d = mp.run_dry(cfg, device_memory_bytes=24 * 2**30, num_processes=2, stream=out)
    assert "memory plan: sdxl" in out.getvalue() and d["num_processes"] == 2 and d["batch_per_process"] == 1
    assert any(line["what"].startswith("all-reduce") for line in d["lines"])  # manual averaging with 2 processes


def test_planned_switches_remove_what_they_remove(tmp_path):
    cfg, _ = _tiny_cfg(tmp_path, "pixart_alpha", "full")
    plain = mp.plan(cfg, 2**30, suggestions=False)
    store = mp.plan(cfg, 2**30, embedding_store=True, suggestions=False)
    assert not any(line.part.startswith("text_encoder") for line in store.lines)
    text = sum(line.bytes for line in plain.lines if line.part.startswith("text_encoder"))
    assert plain.total_bytes - store.total_bytes == text > 0
    cfg2, _ = _tiny_cfg(tmp_path / "b", "pixart_alpha", "full")
    sharded = mp.plan(config.load(ROOT / "profiles/pixart_alpha.yaml", [
        f"model.pretrained={tmp_path / 'model'}", f"distill.teacher={tmp_path / 'model'}",
        f"distill.prompts={PROMPTS}", "distill.batch_size=4"]), 2**30, num_processes=2, fsdp=True,
        suggestions=False)
    teacher = sum(line.bytes for line in plain.lines if line.part == "teacher")
    assert sum(line.bytes for line in sharded.lines if line.part == "teacher") == -(-teacher // 2)


def test_the_plan_follows_the_configs_switches(tmp_path):
    """distill.prompt_store / optimizer / student_weights are real switches now: the plan reads them from the
    config (no text encoders, 8-bit AdamW moments, no EMA shadow) exactly as the explicit options do."""
    cfg, _ = _tiny_cfg(tmp_path, "sd15", "lora")
    store = tmp_path / "store"
    store.mkdir()
    on = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={
        "prompt_store": str(store), "optimizer": "adamw8bit", "student_weights": "raw"})})
    plain = mp.plan(cfg, 2**30, suggestions=False)
    switched = mp.plan(on, 2**30, suggestions=False)
    assert switched.options["embedding_store"] and switched.options["adam8bit"]
    assert not any(line.part.startswith("text_encoder") for line in switched.lines)
    assert not any(line.section == "ema" for line in switched.lines)
    assert any(line.section == "ema" for line in plain.lines)
    explicit = mp.plan(cfg, 2**30, embedding_store=True, adam8bit=True, suggestions=False)
    ema = sum(line.bytes for line in plain.lines if line.section == "ema")
    assert explicit.total_bytes - switched.total_bytes == ema > 0
    suggested = {x.switch.split(" (")[0]: x.status for x in mp.plan(cfg, 2**30).suggestions}
    assert suggested["-S distill.student_weights=raw"] == "exists"
    assert suggested["-S distill.prompt_store=outputs/prompt_store/store"] == "exists"
    assert suggested["-S distill.optimizer=adamw8bit"] == "exists"


# -- bad input ------------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_value_error(tmp_path):
    cfg, _ = _tiny_cfg(tmp_path, "sd15", "lora")
    for bad in (0, -1, float("nan"), True, "24GB"):
        with pytest.raises(ValueError, match="device memory must be a positive number"):
            mp.plan(cfg, device_memory_bytes=bad)
    with pytest.raises(ValueError, match="num_processes"):
        mp.plan(cfg, 2**30, num_processes=0)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        mp.plan(cfg, 2**30, num_processes=3)
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"family": "kandinsky"})})
    with pytest.raises(ValueError, match=r"unknown family 'kandinsky'; supported: digits, sd15"):
        mp.plan(other, 2**30)
    unknown = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher": "someone/unknown-model"})})
    with pytest.raises(ValueError, match="no architecture for distill.teacher 'someone/unknown-model'"):
        mp.plan(unknown, 2**30)


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """`tdm distill --dry-run`: the table on stderr, the plan as JSON on stdout, exit 0; no output folder, no
    lock, no weights; bad flags are one `tdm: error:` line (exit 2)."""
    from tdm.cli import main

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "--params", str(params), "--dry-run", "--device-memory", "8",
                 "--num-processes", "2"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["family"] == "digits" and result["num_processes"] == 2 and result["fits"] is True
    assert result["device_memory_bytes"] == 8 * 2**30 and "total per process" in err
    assert list(tmp_path.iterdir()) == []
    assert main(["distill", "--params", str(params), "--dry-run", "--device-memory", "0"]) == 2
    assert "--device-memory must be > 0" in capsys.readouterr().err


def test_the_plan_counts_the_regression_batch_and_the_teacher_pairs(tmp_path):
    cfg, _ = _tiny_cfg(tmp_path, "sd15", "lora")
    on = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"regression_weight": 0.25,
                                                                           "regression_pairs": 100})})
    plain, reg = mp.plan(cfg, 2**30, suggestions=False), mp.plan(on, 2**30, suggestions=False)
    by_what = {line.what: line for line in reg.lines}
    saved = next(line.bytes for line in plain.lines if line.what == "saved for backward (one grad forward)")
    assert by_what["saved for backward (regression batch)"].bytes == saved > 0
    pairs = by_what["teacher pairs (K grid points + endpoint each)"]
    assert not pairs.device  # host memory
    assert pairs.bytes == (cfg.distill.k + 1) * 100 * 4 * math.prod(reg.sample_shape)
