"""Peak memory of TDM distillation with and without the prompt-embedding store, LoRA vs full, on CPU.

The digits model scaled to a mid-size shape: the UNet of benchmarks/memory.py (widths 128/256/256, two layers per
block: 39.1M parameters) and a CLIP text encoder the size of CLIP ViT-B/32's text tower in width and depth (512
wide, 12 layers; its vocabulary is the digits' 10k-merge prefix of CLIP's), so the text encoder is a real share of
the frozen base. The parent builds the model once, saves it, and writes a store of every digits prompt
(`tdm.backbones.stored_prompts.write_store`); each measurement then runs in a fresh subprocess (this script with
`--measure MODE STORE`): `load_backbone(folder[, prompt_store=store])` + `TDMTrainer` + two iterations (AdamW
state is created on the first; the student's EMA is part of the trainer).

Memory is the peak RSS of the subprocess (VmHWM from /proc/self/status, as benchmarks/memory.py), reported whole
and minus the peak right after `import torch, diffusers, transformers` (the interpreter baseline). The
subprocess also asserts that with the store no transformers model was constructed. Median of `--repeats`
processes per setting, settings interleaved.

    .venv/bin/python benchmarks/prompt_store_memory.py            # -> benchmarks/results/prompt_store_memory.{json,md}
    .venv/bin/python benchmarks/prompt_store_memory.py --smoke    # tiny model, seconds; results to a temp folder
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: its own address space's high-water mark, not inherited through exec)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def measure(args) -> dict:
    import diffusers  # noqa: F401
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(1)
    baseline = peak_rss_mib()
    from accelerate import Accelerator
    from transformers import PreTrainedModel

    from tdm import config
    from tdm.backbones import load_backbone
    from tdm.distill import TDMTrainer

    built = []
    original = PreTrainedModel.__init__

    def counting(module, *a, **k):
        built.append(type(module).__name__)
        return original(module, *a, **k)

    PreTrainedModel.__init__ = counting
    mode, use_store = args.measure
    t0 = time.perf_counter()
    store = args.store if use_store == "store" else None
    backbone = load_backbone(args.folder, prompt_store=store)
    after_load = current_rss_mib()
    cfg = config.parse(config.apply_overrides({}, [
        f"distill.teacher={args.folder}", f"distill.mode={mode}", f"distill.batch_size={args.batch_size}",
        "distill.iterations=2", "distill.eval_samples=0", "eval.weights_dir=/tmp/unused"]))
    torch.manual_seed(0)
    trainer = TDMTrainer(cfg, backbone, Accelerator(cpu=True))
    losses = [float(trainer.iteration(i)["loss_gen"]) for i in range(2)]
    if store is not None:
        assert built == [], built
    return {"mode": mode, "store": use_store == "store", "seconds": time.perf_counter() - t0,
            "baseline_rss_mib": baseline, "after_load_rss_mib": after_load, "peak_rss_mib": peak_rss_mib(),
            "peak_minus_baseline_mib": peak_rss_mib() - baseline, "text_encoders_built": built,
            "loss_gen": losses}


def build(folder: Path, store: Path, smoke: bool) -> dict:
    import torch

    from tdm.backbones import DigitsArch, DigitsBackbone, load_backbone
    from tdm.backbones.stored_prompts import digit_prompts, write_store

    arch = (DigitsArch(channels=(32, 32), text_layers=1, num_merges=2000) if smoke else
            DigitsArch(channels=(128, 256, 256), layers_per_block=2, text_dim=512, text_layers=12))
    DigitsBackbone.create(arch, seed=0).save(folder)
    backbone = load_backbone(folder)
    summary = write_store(backbone, folder, digit_prompts(), store)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"arch": {"channels": list(arch.channels), "layers_per_block": arch.layers_per_block,
                     "text_dim": arch.text_dim, "text_layers": arch.text_layers},
            "unet_parameters": count(backbone.net), "text_encoder_parameters": count(backbone.text_encoder),
            "store_bytes": summary["bytes"], "store_prompts": summary["prompts"], "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", nargs=2, metavar=("MODE", "STORE"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    if args.smoke:
        args.batch_size, args.repeats = 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        folder, store = Path(tmp) / "model", Path(tmp) / "store"
        model = build(folder, store, args.smoke)
        settings = [(m, s) for m in ("lora", "full") for s in ("encoders", "store")]
        runs: dict[str, list[dict]] = {f"{m}/{s}": [] for m, s in settings}
        for _ in range(args.repeats):
            for m, s in settings:
                cmd = [sys.executable, __file__, "--measure", m, s, "--folder", str(folder), "--store", str(store),
                       "--batch-size", str(args.batch_size)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
                runs[f"{m}/{s}"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = ("peak_rss_mib", "peak_minus_baseline_mib", "after_load_rss_mib", "seconds")
    table = {name: {k: statistics.median(r[k] for r in rs) for k in keys} | {
        "text_encoders_built": rs[0]["text_encoders_built"], "loss_gen": rs[0]["loss_gen"]} for name, rs in runs.items()}
    for m in ("lora", "full"):  # the iteration is the same with and without the store
        assert table[f"{m}/store"]["loss_gen"] == table[f"{m}/encoders"]["loss_gen"], m
    import platform

    result = {"model": model, "batch_size": args.batch_size, "repeats": args.repeats, "results": table,
              "machine": platform.processor() or platform.machine(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=REPO).stdout.strip()}
    out = Path(tempfile.mkdtemp()) if args.smoke else RESULTS
    (out / "prompt_store_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "prompt_store_memory.md").write_text(markdown(result, " --smoke" if args.smoke else ""))
    print(markdown(result, ""))
    return 0


def markdown(r: dict, flags: str) -> str:
    m = r["model"]
    lines = [
        "# Peak memory of TDM distillation with and without the prompt-embedding store (CPU)", "",
        f"Command: `.venv/bin/python benchmarks/prompt_store_memory.py{flags}`", "",
        f"Model: digits UNet widths {m['arch']['channels']}, {m['arch']['layers_per_block']} layer(s) per block: "
        f"{m['unet_parameters']:,} UNet parameters; CLIP text encoder {m['arch']['text_dim']} wide, "
        f"{m['arch']['text_layers']} layers: {m['text_encoder_parameters']:,} parameters "
        f"({m['text_encoder_parameters'] * 4 / 2**20:.0f} MiB fp32). Store: {m['store_prompts']} prompts, "
        f"{m['store_bytes'] / 2**20:.2f} MiB. Batch {r['batch_size']}, fp32, two iterations (AdamW state and the "
        f"student's EMA included); median of {r['repeats']} fresh processes per setting, interleaved. "
        f"torch {m['torch']}, commit {r['commit']}.", "",
        "Peak RSS = VmHWM of the process; 'above baseline' subtracts the peak right after "
        "`import torch, diffusers, transformers`. With the store no transformers model is constructed (asserted); "
        "the iterations' losses are identical with and without it (asserted).", "",
        "| mode | conditioning | peak RSS (MiB) | peak above baseline (MiB) | RSS after load (MiB) | time (s) | "
        "text encoders built |", "|---|---|---|---|---|---|---|"]
    t = r["results"]
    for name, row in t.items():
        mode, cond = name.split("/")
        lines.append(f"| {mode} | {'store' if cond == 'store' else 'text encoders'} | {row['peak_rss_mib']:.0f} | "
                     f"{row['peak_minus_baseline_mib']:.0f} | {row['after_load_rss_mib']:.0f} | "
                     f"{row['seconds']:.1f} | {', '.join(row['text_encoders_built']) or 'none'} |")
    lines.append("")
    for mode in ("lora", "full"):
        a, b = t[f"{mode}/encoders"], t[f"{mode}/store"]
        lines.append(f"- {mode}: the store saves {a['peak_rss_mib'] - b['peak_rss_mib']:.0f} MiB of peak RSS "
                     f"({b['peak_minus_baseline_mib'] / a['peak_minus_baseline_mib']:.2f}x above baseline).")
    lora, full = t["lora/store"], t["full/store"]
    lines.append(f"- LoRA / full with the store: {lora['peak_minus_baseline_mib'] / full['peak_minus_baseline_mib']:.2f}"
                 f" above baseline ({lora['peak_rss_mib'] / full['peak_rss_mib']:.2f} whole process).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
