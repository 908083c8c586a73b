"""Peak memory of one TDM distillation iteration: LoRA shared base vs full copies, and a bare forward+backward.

The digits model is scaled up so that weights dominate memory (default UNet widths 128/256/256, two layers per
block: 39.1M UNet parameters; the count is measured and reported). Three measurements:
  - `lora`: TDMTrainer in `distill.mode=lora` (one frozen base, two adapters), two iterations;
  - `full`: TDMTrainer in `distill.mode=full` (teacher + trainable student and fake score copies), two iterations;
  - `fwd_bwd`: one forward + backward of the bare UNet at the same batch (a reference point, no optimiser).
Two iterations, because the optimiser's state (AdamW moments) is created on the first step; the EMA of the
student (a copy of its trainable weights) is part of the trainer and so of the peak.

Each measurement runs in a fresh subprocess (this script re-invoked with `--measure MODE`), so peaks never mix,
and the modes are interleaved over repeats (medians quoted). The subprocess builds the model in memory (same
architecture and seed as the folder the parent saves, which the config names as distill.teacher), so the peak
is the iteration's, not a model loader's. On CPU it reports (a) the peak RSS of the whole process (VmHWM
from /proc/self/status; getrusage's ru_maxrss would carry over the parent's peak through exec) and (b) that
peak minus the peak RSS right after `import torch, diffusers, transformers` (the interpreter baseline); on
CUDA, torch.cuda.max_memory_allocated. The LoRA / full ratio is the figure of
merit (target <= 0.5).

Results (benchmarks/results/memory.{json,md}) come from:

    .venv/bin/python benchmarks/memory.py

GPU: add `--device cuda` (results go to memory_cuda.{json,md}). `--smoke` checks the script in seconds (tiny
model, batch 2, 1 repeat; results go to a temporary folder).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODES = ("lora", "full", "fwd_bwd")
MIB = 1024 * 1024


def peak_rss_mib() -> float:
    """This process's peak RSS. On Linux, VmHWM (the high-water mark of this process's own address space):
    getrusage's ru_maxrss is not used there because a child inherits its parent's ru_maxrss through exec
    (measured: a child of a 1.5 GB parent reports 1.5 GB before doing anything)."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; fine when not a child of a big parent
    return kib * 1024 / MIB


def arch_of(args):
    from tdm.backbones import DigitsArch

    if args.smoke:
        return DigitsArch(channels=(32, 32), text_layers=1, num_merges=2000)
    return DigitsArch(channels=tuple(args.channels), layers_per_block=args.layers_per_block)


# -- the child: one measurement in a fresh process --------------------------------------------------------------
def measure(args) -> dict:
    import torch
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    baseline = peak_rss_mib()
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from tdm import config
    from tdm.backbones import DigitsBackbone
    from tdm.distill import TDMTrainer

    device = torch.device(args.device)
    backbone = DigitsBackbone.create(arch_of(args), seed=0).to(device)
    after_model = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if args.measure == "fwd_bwd":
        net = backbone.net.train().requires_grad_(True)
        g = torch.Generator().manual_seed(0)
        x = torch.randn((args.batch_size, *backbone.sample_shape), generator=g).to(device)
        t = torch.randint(backbone.schedule.num_train_timesteps, (args.batch_size,), generator=g).to(device)
        cond = backbone.encode_prompts(["a handwritten digit seven"] * args.batch_size)
        backbone.predict(net, x, t, cond).square().mean().backward()
    else:
        cfg = config.load(REPO / "params.yaml", [f"distill.teacher={args.teacher}", f"distill.mode={args.measure}",
                                                 f"distill.batch_size={args.batch_size}"])
        trainer = TDMTrainer(cfg, backbone, Accelerator(cpu=device.type == "cpu"))
        for _ in range(2):  # the same draws twice: the second step runs with the optimiser state in place
            trainer.iteration(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = {"mode": args.measure, "seconds": time.perf_counter() - t0, "baseline_rss_mib": baseline,
           "after_model_rss_mib": after_model, "peak_rss_mib": peak_rss_mib()}
    out["peak_minus_baseline_mib"] = out["peak_rss_mib"] - baseline
    out["peak_minus_after_model_mib"] = out["peak_rss_mib"] - after_model  # what the measured work added
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return out


# -- the parent: save the model, run the children, write the results --------------------------------------------
def run_child(mode: str, args, teacher: Path) -> dict:
    cmd = [sys.executable, __file__, "--measure", mode, "--teacher", str(teacher), "--device", args.device,
           "--batch-size", str(args.batch_size), "--channels", *map(str, args.channels),
           "--layers-per-block", str(args.layers_per_block)] + (["--smoke"] if args.smoke else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"--measure {mode} failed:\n{out.stderr[-3000:]}")
    line = next(ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def summarize(runs: list[dict], device: str) -> dict:
    keys = ["peak_rss_mib", "peak_minus_baseline_mib", "peak_minus_after_model_mib", "baseline_rss_mib",
            "after_model_rss_mib", "seconds"]
    if device.startswith("cuda"):
        keys.append("cuda_peak_allocated_mib")
    return {f"{k}_median": statistics.median(r[k] for r in runs) for k in keys}


def write(result: dict, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    s, m = result["settings"], result["modes"]
    cuda = s["device"].startswith("cuda")
    ok = lambda r: "yes" if r <= 0.5 else "NO"  # noqa: E731
    lines = [
        "# Peak memory of one TDM iteration: LoRA shared base vs full copies", "",
        f"Command: `{result['command']}`", "",
        f"Model: digits UNet, widths {s['channels']}, {s['layers_per_block']} layer(s) per block: "
        f"{result['unet_parameters']:,} UNet parameters ({result['unet_parameters'] * 4 / MIB:.0f} MiB in fp32), "
        f"{result['text_encoder_parameters']:,} in the frozen text encoder. Batch {s['batch_size']}, "
        f"{s['device']}, fp32; two iterations each (the peak includes AdamW state and the student's EMA); "
        f"median of {s['repeats']} fresh processes per mode, modes interleaved. "
        f"{result['machine']['cpu']}, torch {result['machine']['torch']}, "
        f"commit {result['machine']['git_commit']}.", "",
    ]
    if cuda:
        lines += ["| measurement | peak allocated (MiB) |", "|---|---|"]
        lines += [f"| {mode} | {m[mode]['cuda_peak_allocated_mib_median']:.0f} |" for mode in MODES]
        r = result["ratio_lora_over_full"]["cuda_peak_allocated"]
        lines += ["", f"LoRA / full: **{r:.2f}** (target <= 0.5: {ok(r)})."]
    else:
        lines += ["| measurement | (a) peak RSS, whole process (MiB) | (b) peak RSS - interpreter baseline (MiB) | "
                  "RSS after imports + model built (MiB) | peak - that (MiB) | time (s) |", "|---|---|---|---|---|---|"]
        columns = ("peak_rss_mib", "peak_minus_baseline_mib", "after_model_rss_mib", "peak_minus_after_model_mib")
        for mode in MODES:
            cells = [f"{m[mode][c + '_median']:.0f}" for c in columns] + [f"{m[mode]['seconds_median']:.1f}"]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        ra, rb = result["ratio_lora_over_full"]["peak_rss"], result["ratio_lora_over_full"]["peak_minus_baseline"]
        lines += ["", f"Interpreter baseline (peak RSS after `import torch, diffusers, transformers`): "
                      f"{m['full']['baseline_rss_mib_median']:.0f} MiB. Between it and the built model lie the "
                      f"imports of accelerate, peft and tdm and the model with its tokenizer (the same in every mode).",
                  "",
                  f"LoRA / full: (a) whole process **{ra:.2f}**, (b) above the interpreter baseline **{rb:.2f}** "
                  f"(target <= 0.5: (a) {ok(ra)}, (b) {ok(rb)})."]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[128, 256, 256], help="UNet widths per level")
    parser.add_argument("--layers-per-block", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="distill.batch_size (and the fwd_bwd batch)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per mode")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny model, batch 2, 1 repeat, temp output")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.repeats = 2, 1
    if args.measure:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import machine_info

    from tdm.backbones import DigitsBackbone

    command = ".venv/bin/python benchmarks/memory.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="tdm-bench-memory-") as tmp:
        backbone = DigitsBackbone.create(arch_of(args), seed=0)
        teacher = Path(tmp) / "model"
        backbone.save(teacher)
        n_unet = sum(p.numel() for p in backbone.net.parameters())
        n_text = sum(p.numel() for p in backbone.text_encoder.parameters())
        del backbone
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for r in range(args.repeats):
            for mode in MODES:
                runs[mode].append(run_child(mode, args, teacher))
                print(f"repeat {r + 1} {mode}: " + json.dumps({k: round(v, 1) for k, v in runs[mode][-1].items()
                                                               if k != "mode"}), flush=True)
    modes = {mode: {**summarize(rs, args.device), "runs": rs} for mode, rs in runs.items()}
    ratio = lambda key: modes["lora"][f"{key}_median"] / modes["full"][f"{key}_median"]  # noqa: E731
    ratios = {"peak_rss": ratio("peak_rss_mib"), "peak_minus_baseline": ratio("peak_minus_baseline_mib")}
    if args.device.startswith("cuda"):
        ratios = {"cuda_peak_allocated": ratio("cuda_peak_allocated_mib")}
    arch = arch_of(args)
    result = {"benchmark": "memory", "command": command, "unet_parameters": n_unet, "text_encoder_parameters": n_text,
              "settings": {"channels": list(arch.channels), "layers_per_block": arch.layers_per_block,
                           "batch_size": args.batch_size, "repeats": args.repeats, "device": args.device,
                           "smoke": args.smoke},
              "modes": modes, "ratio_lora_over_full": ratios, "target_ratio": "<= 0.5", "machine": machine_info()}
    out_dir = Path(tempfile.mkdtemp(prefix="tdm-bench-memory-smoke-")) if args.smoke else RESULTS
    stem = "memory" + ("_cuda" if args.device.startswith("cuda") else "")
    write(result, out_dir, stem)
    print(f"\nwritten: {out_dir / stem}.json, .md")


if __name__ == "__main__":
    main()
