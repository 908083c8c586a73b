"""A quantised frozen base in LoRA mode (`distill.base_quantization`, issue #15; `tdm.quantize`).

On a tiny SD3 (an MMDiT: attention and feed-forward Linear layers, a convolutional patch embedding): the base's
Linear weights are int8 after loading and nothing else is; the quantised Linear keeps no dequantised weight for
backward; a LoRA-mode TDM iteration over the int8 (and fp8) base runs, its losses close to the unquantised ones,
its adapter gradients close too; the saved student is the unquantised base + the merged LoRA, exactly; the memory
plan counts the quantised base's bytes exactly; bad settings are refused by key.

torchao is kept outside the venv (scripts/bootstrap.sh: peft imports it in every process once installed), so this
module puts `.venv/extras/torchao` on sys.path; diffusers decides whether torchao exists when it is first
imported, so that must happen before any `import diffusers` (tests/conftest.py does it for a whole-suite run).
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TORCHAO_EXTRA = ROOT / ".venv/extras/torchao"  # scripts/bootstrap.sh puts it there
if importlib.util.find_spec("torchao") is None and TORCHAO_EXTRA.is_dir():
    sys.path.insert(0, str(TORCHAO_EXTRA))
pytest.importorskip("torchao", reason=f"torchao==0.18.0 is neither installed nor in {TORCHAO_EXTRA} "
                                      f"(bash scripts/bootstrap.sh)")
from diffusers.utils import is_torchao_available  # noqa: E402

if not is_torchao_available():
    pytest.skip(f"diffusers was imported before {TORCHAO_EXTRA} was on sys.path (tests/conftest.py adds it first)",
                allow_module_level=True)

import tiny_models  # noqa: E402
from tdm import config  # noqa: E402
from tdm import quantize  # noqa: E402
from tdm.backbones import load_backbone  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car in the rain"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_models.save_pipeline(tiny_models.build("sd3"), tmp_path_factory.mktemp("tiny") / "sd3")


def _cfg(folder, tmp_path, *extra):
    return config.parse(config.apply_overrides({}, [
        "model.family=sd3", f"model.pretrained={folder}", f"distill.teacher={folder}", "distill.mode=lora",
        "distill.batch_size=2", "distill.eval_samples=0", "distill.lr=1e-3", "distill.fake_lr=1e-3",
        "distill.lora_rank=4", "distill.k=2", "distill.total_steps=1000", "distill.k_choices=[1, 2]",
        f"eval.weights_dir={tmp_path / 'w'}", *extra]))


def _trainer(folder, tmp_path, kind):
    from accelerate import Accelerator

    from tdm.distill import TDMTrainer

    torch.manual_seed(0)
    extra = [f"distill.base_quantization={kind}"] if kind else []
    trainer = TDMTrainer(_cfg(folder, tmp_path, *extra), load_backbone(folder, quantization=kind),
                         Accelerator(cpu=True))
    trainer.prompts = PROMPTS
    return trainer


def test_linear_weights_are_int8_after_loading_and_nothing_else(sd3):
    from torchao.quantization import Int8Tensor

    plain, q = load_backbone(sd3), load_backbone(sd3, quantization="int8")
    linears = {n: m for n, m in q.net.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears and set(quantize.quantized_linears(q.net)) == set(linears)  # every Linear of the MMDiT
    reference = dict(plain.net.named_parameters())
    for name, m in linears.items():
        w = m.weight
        assert isinstance(m, quantize.FrozenQuantizedLinear) and isinstance(w, Int8Tensor)
        assert w.qdata.dtype == torch.int8 and w.qdata.shape == w.shape
        # Symmetric per-row int8: each element within half a step (row max / 127) of the float weight.
        ref = reference[f"{name}.weight"]
        step = ref.abs().amax(dim=1, keepdim=True) / 127
        assert ((w.dequantize() - ref).abs() <= step / 2 + 1e-6).all(), name
        assert quantize.tensor_bytes(w) == quantize.weight_bytes("int8", *w.shape)  # the memory plan's rule
    # Convolutions (the patch embedding), norms, biases: as loaded. Text encoders and VAE: untouched.
    others = {n: p for n, p in q.net.named_parameters() if not quantize.is_quantized(p)}
    assert any("pos_embed.proj" in n for n in others)
    assert all(type(p) is torch.nn.Parameter and torch.equal(p, reference[n]) for n, p in others.items())
    for name, module in q.modules().items():
        if name != "net":
            assert not any(quantize.is_quantized(p) for p in module.parameters()), name


@pytest.mark.parametrize("kind", quantize.KINDS)
def test_quantized_linear_saves_no_dequantised_weight(kind):
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    torchao_linear = torch.nn.Linear(64, 96).requires_grad_(False)
    quantize_(torchao_linear, quantize.ao_config(kind))
    ours = torch.nn.Linear(64, 96).requires_grad_(False)
    ours.load_state_dict(torchao_linear.state_dict(), assign=True)
    ours.__class__ = quantize.FrozenQuantizedLinear
    results = []
    for layer in (torchao_linear, ours):
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            y = layer(x)
        (y ** 2).sum().backward()
        results.append((y.detach(), x.grad, sum(saved)))
    (y_ao, g_ao, saved_ao), (y, g, saved_ours) = results
    assert torch.equal(y, y_ao)
    torch.testing.assert_close(g, g_ao, rtol=1e-5, atol=1e-6)  # float32 rounding of the dequantised matmul
    assert saved_ao >= 64 * 96 * 4 and saved_ours == 0  # torchao keeps a float32 copy of W; ours the int8 W only


def test_tdm_iteration_over_a_quantised_base(sd3, tmp_path):
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    runs = {kind: _trainer(sd3, tmp_path, kind) for kind in (None, "int8", "fp8")}
    assert any(isinstance(m, TorchaoLoraLinear) for m in runs["int8"].roles.nets["teacher"].modules())
    base = {n: p.qdata.clone() for n, p in runs["int8"].backbone.net.named_parameters() if quantize.is_quantized(p)}
    metrics = {kind: [t.iteration(0), t.iteration(1)] for kind, t in runs.items()}
    # Tolerance: per-row int8 moves each weight by <= 1/254 of its row's maximum (~0.2 % of a layer's output,
    # a few layers deep); fp8 e4m3 keeps 3 mantissa bits (<= 6 % per weight, ~2 % typical). Measured here: int8
    # within 0.6 %, fp8 within 3 % of the unquantised losses; the bounds leave 3-4x headroom. The losses also
    # differ at all: the quantised base is really the one computing.
    for kind, rtol in (("int8", 0.02), ("fp8", 0.12)):
        for step in range(2):
            for name in ("loss_fake", "loss_gen"):
                a, b = metrics[kind][step][name], metrics[None][step][name]
                assert torch.isfinite(a) and torch.isclose(a, b, rtol=rtol), (kind, step, name, a, b)
        assert metrics[kind][1]["loss_gen"] != metrics[None][1]["loss_gen"], kind
    # The base stayed frozen and quantised; the adapters trained.
    after = {n: p for n, p in runs["int8"].backbone.net.named_parameters() if quantize.is_quantized(p)}
    assert after.keys() == base.keys() and all(torch.equal(after[n].qdata, base[n]) for n in base)
    # Adapter gradients flow through the quantised base and match the unquantised ones' direction.
    grads = {}
    for kind in (None, "int8"):
        roles = runs[kind].roles
        roles.load_state_dict("student", runs[None].roles.state_dict("student"))
        g = torch.Generator().manual_seed(3)
        x = torch.randn((2, *runs[kind].backbone.sample_shape), generator=g)
        cond = runs[kind].backbone.encode_prompts(PROMPTS)
        x0, _ = roles.x0_eps("student", x, torch.tensor([800, 300]), cond)
        params = roles.named_parameters("student")
        grad = torch.autograd.grad(x0.square().mean(), list(params.values()))
        grads[kind] = torch.cat([t.flatten() for t in grad])
        assert all(torch.isfinite(t).all() for t in grad) and sum(t.abs().sum() for t in grad) > 0
    cosine = torch.nn.functional.cosine_similarity(grads[None], grads["int8"], dim=0)
    assert cosine > 0.99, cosine


def test_saved_student_is_the_unquantised_base_plus_the_merged_lora(sd3, tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    trainer = _trainer(sd3, tmp_path, "int8")
    trainer.iteration(0), trainer.iteration(1)  # LoRA B starts at zero: both factors move by the second step
    weights = trainer.student_weights()  # the EMA shadow: the values save_student merges
    net = quantize.merge_into_unquantized(trainer.roles, "student", weights)
    trainer.backbone.save(tmp_path / "student", net=net)  # what distill.save_student does with the merged net

    teacher = SD3Transformer2DModel.from_pretrained(sd3, subfolder="transformer")
    saved_folder = tmp_path / "student" / "transformer"
    assert "quantization_config" not in (saved_folder / "config.json").read_text()
    saved = load_file(saved_folder / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    scaling = trainer.roles.lora_config.lora_alpha / trainer.roles.lora_config.r
    merged, changed = 0, 0
    for name, w in teacher.state_dict().items():
        a_key = name.replace(".weight", ".lora_A.student.weight")
        if a_key in weights:  # W + (alpha / r) B A, from the unquantised float32 weight: peft's merge, exactly
            b = weights[a_key.replace("lora_A", "lora_B")]
            expect = w + (b @ weights[a_key]) * scaling
            assert torch.equal(saved[name], expect), name
            merged, changed = merged + 1, changed + (not torch.equal(saved[name], w))
        else:
            assert torch.equal(saved[name], w), name
    assert merged == len([n for n in weights if ".lora_A." in n]) and changed > merged // 2, (merged, changed)
    reloaded = load_backbone(tmp_path / "student")  # a normal diffusers folder
    assert not any(quantize.is_quantized(p) for p in reloaded.net.parameters())


def test_memory_plan_counts_the_quantised_base(sd3, tmp_path):
    from tdm import memory_plan as mp
    from tdm.roles import Roles

    cfg = _cfg(sd3, tmp_path, "distill.base_quantization=int8")
    plan = mp.plan(cfg, device_memory_bytes=2**30, suggestions=False)
    teacher = [line for line in plan.lines if line.section == "weights" and line.part == "teacher"]
    real = Roles(load_backbone(sd3, quantization="int8"), "lora", cfg.distill.lora_rank).nets["teacher"]
    base = [p for n, p in real.named_parameters() if "lora_" not in n]
    assert sum(line.bytes for line in teacher) == sum(quantize.tensor_bytes(p) for p in base)
    assert [line.dtype for line in teacher] == ["int8", "float32"]
    unquantised = mp.plan(_cfg(sd3, tmp_path), device_memory_bytes=2**30)
    suggestion = [s for s in unquantised.suggestions if "base_quantization=int8" in s.switch]
    assert len(suggestion) == 1 and suggestion[0].total_bytes < unquantised.total_bytes
    assert unquantised.total_bytes - suggestion[0].total_bytes == unquantised.section_bytes("weights") \
        - sum(line.bytes for line in plan.lines if line.section == "weights")


def test_bad_settings_are_refused_by_key(sd3, tmp_path):
    with pytest.raises(config.ConfigError, match="base_quantization: 'int8' quantises the frozen base of LoRA mode"):
        _cfg(sd3, tmp_path, "distill.mode=full", "distill.base_quantization=int8")
    with pytest.raises(config.ConfigError, match="base_quantization"):
        _cfg(sd3, tmp_path, "distill.base_quantization=int4")
    with pytest.raises(ValueError, match="distill.base_quantization: must be one of int8, fp8"):
        load_backbone(sd3, quantization="int4")
    # fp8 is weight-only (the matmul runs in the compute dtype), so it runs on the CPU: not refused here.
    for kind in quantize.KINDS:
        quantize.check_device(kind, "cpu")
    if not torch.cuda.is_available():  # a device that cannot run it is refused before any model is loaded
        with pytest.raises(ValueError, match=r"distill.base_quantization: fp8 weight-only quantisation does not "
                                             r"run on cuda"):
            quantize.check_device("fp8", "cuda")
