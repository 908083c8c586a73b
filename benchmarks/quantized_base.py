"""Memory of a weight-only quantised frozen base (`distill.base_quantization`, issue #15) on CPU.

A mid-size PixArt-style DiT (`PixArtTransformer2DModel`, 12 layers, width 768: 118.6 M parameters, 99.8 % of
them in `nn.Linear` weights; random, seed 0, saved once as a float32 diffusers folder) is loaded as LoRA-mode
distill loads its base, each way in a fresh subprocess:

  - `float32`, `bf16`: unquantised (mixed_precision "no" / "bf16");
  - `int8`, `fp8`: `tdm.quantize.load_denoiser` (diffusers' TorchAoConfig; Linear weights as
                   `FrozenQuantizedLinear`), the rest float32;
  - `int8_torchao_linear`: int8, but torchao's own linear (the class swap undone), to show what its saved
                   dequantised weights cost.

Per mode: the denoiser's parameter bytes (exact: `tdm.quantize.tensor_bytes`), then rank-16 LoRA adapters on the
PixArt targets and one forward + backward with grad at batch 1 (64 tokens: CPU time), reporting the bytes autograd
saved for backward (parameters' own storage excluded). RSS (after loading, and the step's peak above it) goes to
the JSON only: see the note in the results for why it does not measure the tensors on CPU.

    .venv/bin/python benchmarks/quantized_base.py          # -> benchmarks/results/quantized_base.md

torchao comes from `.venv/extras/torchao` when it is not installed (scripts/bootstrap.sh).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
EXTRA = REPO / ".venv" / "extras" / "torchao"
MODES = ("float32", "bf16", "int8", "fp8", "int8_torchao_linear")
MIB = 2 ** 20
ARCH = dict(num_attention_heads=12, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
            cross_attention_dim=768, sample_size=8, patch_size=2, caption_channels=256,
            norm_type="ada_norm_single", use_additional_conditions=False)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]  # tdm.backbones.pixart's LoRA targets


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def measure(mode: str, folder: Path) -> dict:
    import importlib.util

    if importlib.util.find_spec("torchao") is None and EXTRA.is_dir():
        sys.path.insert(0, str(EXTRA))  # before diffusers: it reads torchao's presence at import
    import ctypes
    import gc

    import torch
    from diffusers import PixArtTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from tdm import quantize

    torch.set_num_threads(1)
    base = status_mib("VmRSS")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    if mode in ("float32", "bf16"):
        net = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)
    else:
        kind = mode.split("_")[0]
        net = quantize.load_denoiser(folder, "transformer", PixArtTransformer2DModel, kind, dtype)
        if mode == "int8_torchao_linear":
            for m in quantize.quantized_linears(net).values():
                m.__class__ = torch.nn.Linear
    net.eval().requires_grad_(False)
    params = list(net.parameters())
    param_bytes = sum(quantize.tensor_bytes(p) for p in params)
    linear = sum(p.numel() for n, p in net.named_parameters()
                 if n.endswith(".weight") and isinstance(net.get_submodule(n[:-7]), torch.nn.Linear))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed load-time buffers back to the OS: RSS ~ what is live
    after_load = status_mib("VmRSS")
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS), net, adapter_name="student")
    for n, p in net.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the step's own peak from here
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8 * 2, 8 * 2, generator=g, dtype=dtype)
    cond = torch.randn(1, 16, 256, generator=g, dtype=dtype)
    storages = {p.untyped_storage().data_ptr() for p in params if not quantize.is_quantized(p)}
    saved = []

    def pack(t):
        if not quantize.is_quantized(t) and t.untyped_storage().data_ptr() not in storages:
            saved.append(t.untyped_storage().nbytes())
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x, encoder_hidden_states=cond, timestep=torch.tensor([500]), return_dict=False)[0]
    out.float().square().mean().backward()
    step_s = time.perf_counter() - t0
    return {"mode": mode, "parameters": sum(p.numel() for p in params), "linear_weight_parameters": linear,
            "param_bytes": param_bytes, "rss_after_load_mib": round(after_load - base, 1),
            "saved_for_backward_mib": round(sum(saved) / MIB, 1),
            "step_peak_rss_mib": round(status_mib("VmHWM") - after_load, 1), "step_s": round(step_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder)))
        return
    import torch
    from diffusers import PixArtTransformer2DModel

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        PixArtTransformer2DModel(**ARCH).save_pretrained(Path(tmp) / "transformer")
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--measure", mode, "--folder", tmp], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    write(rows, args.out)


def write(rows: list[dict], out_dir: Path) -> None:
    import platform

    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quantized_base.json").write_text(json.dumps(rows, indent=2) + "\n")
    ref = rows[0]
    lines = ["# A weight-only quantised frozen base (distill.base_quantization), CPU", "",
             "Command: `.venv/bin/python benchmarks/quantized_base.py`", "",
             f"Model: random PixArtTransformer2DModel (12 layers, width 768): {ref['parameters']:,} parameters, "
             f"{ref['linear_weight_parameters'] / ref['parameters']:.1%} of them in nn.Linear weights (the ones "
             f"quantised; convolutions, norms, embeddings and biases stay in the base dtype). Rank-16 LoRA on the "
             f"PixArt targets; one forward + backward at batch 1, 64 tokens. One fresh process per row. {platform.processor() or 'CPU'}, "
             f"torch {torch.__version__}.", "",
             "| base | parameter bytes (MiB) | vs float32 | saved for backward (MiB) | step time (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['param_bytes'] / MIB:.1f} | {r['param_bytes'] / ref['param_bytes']:.2f} | "
                     f"{r['saved_for_backward_mib']} | {r['step_s']} |")
    lines += ["", "Parameter bytes are exact (torchao's inner tensors: int8 / float8 data + float32 per-row scale, "
              "+ int8 zero point for int8); against bf16 the quantised base is half the bytes. "
              "`int8_torchao_linear` is int8 with torchao's own linear: it saves "
              "each layer's dequantised weight for backward, so a grad-carrying forward holds a second, "
              "full-precision copy of the base; `FrozenQuantizedLinear` (the other quantised rows) keeps only "
              "the quantised weight and dequantises one layer at a time in backward. CPU times are not GPU "
              "times (weight-only int8 / fp8 dequantise per matmul; bf16 matmuls are slow on this CPU).",
              "",
              "RSS is in quantized_base.json but not in the table: diffusers maps the safetensors file, so an "
              "unquantised float32 model's weights are file pages that count once touched (19 MiB after loading, "
              "~590 MiB more during the step), and a quantised load reads the whole float32 file, whose pages stay "
              "counted beside the int8 weights; neither is what the tensors hold. Parameter and saved bytes are "
              "exact counts of live tensors, the figures that carry over to GPU memory."]
    (out_dir / "quantized_base.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
