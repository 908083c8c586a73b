"""Before / after of each speed switch and code optimisation, on the digits default iteration and on the 4-step
student's sampling, measured side by side in one process.

Iteration (distill defaults from params.yaml: LoRA mode, K=4, batch 64), one trainer per variant, all built
from the same seed; each repeat runs one iteration of every variant (same step index, so the same draws), the
order rotating from repeat to repeat so load on the machine hits every variant alike:
  - before:         the role switching as it was before this benchmark (every activate walked the module tree
                    and re-ran peft's enable_adapters(True) + set_adapter; role parameters re-found by a walk
                    over the base on every optimiser / EMA step), reproduced here on the same trainer class;
  - after:          the current code (tuner layers and parameter sets found once, student <-> fake switches
                    only swap the active adapter) = the default, switches off;
  - channels_last:  after + distill.channels_last=true;
  - compile:        after + distill.compile=true (compile time is reported, not counted in the iteration).
Sampling: the student's K-step trajectory on a batch of prompts (text encoded outside the timed region) with
the net as loaded, channels_last, compiled, and both.

    .venv/bin/python benchmarks/optimizations.py --teacher outputs/teacher_ft/model --student outputs/distill/student

On a machine with CUDA the trainers and the student run on the GPU (fp32). `--no-compile` leaves the compile rows
out (compiling the UNet's graphs takes minutes on a CPU); `--smoke` runs a tiny random model for 1 repeat into a
temporary folder. Results: benchmarks/results/optimizations.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# -- "before": the role switching of commit c181a53, bound onto a Roles instance ----------------------------------
def _activate_before(self, role):
    from peft.tuners.tuners_utils import BaseTunerLayer

    if self.mode == "lora" and role != self._active:
        for layer in self.nets["teacher"].modules():
            if isinstance(layer, BaseTunerLayer):
                if role == "teacher":
                    layer.enable_adapters(False)
                else:
                    layer.enable_adapters(True)
                    layer.set_adapter(role)
    self._active = role
    return self.nets[role]


def _named_parameters_before(self, role):
    if self.mode == "lora":
        marker = f".{role}."
        params = {n: p for n, p in self.nets["teacher"].named_parameters() if "lora_" in n and marker in n}
    else:
        params = dict(self.nets[role].named_parameters())
    if self.k_max is not None:
        params.update({f"k_embedding.{n}": p for n, p in self.k_embeddings[role].named_parameters()})
    return params


def make_before(trainer) -> None:
    trainer.roles.activate = types.MethodType(_activate_before, trainer.roles)
    trainer.roles.named_parameters = types.MethodType(_named_parameters_before, trainer.roles)


# -- measuring --------------------------------------------------------------------------------------------------
def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(runs: dict, repeats: int, warmup: int, label: str) -> dict[str, list[float]]:
    """Seconds per call of each runner, repeats interleaved (rotating order); `warmup` rounds not counted."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        seconds = {}
        for name in order:
            _sync()
            t0 = time.perf_counter()
            runs[name](r)
            _sync()
            seconds[name] = time.perf_counter() - t0
        tag = "warm-up" if r < warmup else f"repeat {r + 1 - warmup}"
        print(f"{label} {tag}: " + ", ".join(f"{n} {seconds[n]:.3f}s" for n in names), flush=True)
        if r >= warmup:
            for n in names:
                times[n].append(seconds[n])
    return times


def iteration_variants(args, compile_too: bool) -> dict:
    import torch
    from accelerate import Accelerator

    from tdm import config
    from tdm.backbones import load_backbone
    from tdm.distill import TDMTrainer

    variants = {"before": [], "after": [], "channels_last": ["distill.channels_last=true"]}
    if compile_too:
        variants["compile"] = ["distill.compile=true"]  # (+ channels_last: another set of graphs to compile)
    trainers, first_s = {}, {}
    for name, extra in variants.items():
        cfg = config.load(REPO / "params.yaml", [f"distill.teacher={args.teacher}",
                                                 f"distill.batch_size={args.batch_size}", *args.set, *extra])
        torch.manual_seed(cfg.distill.seed)
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        trainers[name] = TDMTrainer(cfg, load_backbone(args.teacher).to(accelerator.device), accelerator)
        if name == "before":
            make_before(trainers[name])
        # Iteration 0 for every variant (the same training history); with compile it compiles every graph the
        # iteration uses, timed apart from the repeats.
        t0 = time.perf_counter()
        trainers[name].iteration(0)
        first_s[name] = time.perf_counter() - t0
        print(f"{name}: first iteration{' (compiling)' if 'compile' in name else ''} {first_s[name]:.1f}s", flush=True)
    cfg = trainers["after"].cfg.distill
    runs = {name: (lambda r, t=t: t.iteration(r + 1)) for name, t in trainers.items()}
    times = interleaved(runs, args.repeats, args.warmup, "iteration")
    # Same draws, same math: the variants' last losses agree (a check that the switches did not change results).
    last = {name: {k: float(v) for k, v in t.iteration(args.warmup + args.repeats + 1).items()
                   if k in ("loss_fake", "loss_gen")} for name, t in trainers.items()}
    compile_s = {name: s for name, s in first_s.items() if "compile" in name}
    return {"mode": cfg.mode, "k": cfg.k, "batch_size": cfg.batch_size, "seconds": times, "compile_s": compile_s,
            "first_iteration_s": first_s,
            "last_losses": last}


def sampling_variants(args, compile_too: bool) -> dict:
    import torch

    from tdm.backbones import load_backbone
    from tdm.data import digit_prompt_set
    from tdm.sampler import make_noise, speed_up_net, student_sample
    from tdm.student import StudentRecord, load_k_embedding

    record = StudentRecord.load(args.student)
    k, k_embedding = record.k, load_k_embedding(args.student)
    switches = {"plain": {}, "channels_last": {"channels_last": True}}
    if compile_too:
        switches |= {"compile": {"compile": True}, "compile+channels_last": {"compile": True, "channels_last": True}}
    prompts = digit_prompt_set(args.n, seed=0)
    runs, compile_s, outputs = {}, {}, {}
    for name, kw in switches.items():
        backbone = load_backbone(args.student).to("cuda" if torch.cuda.is_available() else "cpu")
        backbone.net.eval()
        net = speed_up_net(backbone.net, **kw)
        cond = backbone.encode_prompts(prompts)
        noise = make_noise(args.n, backbone.sample_shape, 0, backbone.device)
        grid = record.timesteps(k)
        runs[name] = lambda r, b=backbone, n=net, c=cond, z=noise: student_sample(b, n, c, z, grid, k_embedding)
        if kw.get("compile"):
            t0 = time.perf_counter()
            runs[name](0)
            compile_s[name] = time.perf_counter() - t0
            print(f"sampling {name}: first call (compiling) {compile_s[name]:.1f}s", flush=True)
        outputs[name] = runs[name](0)
    max_diff = {name: float((out - outputs["plain"]).abs().max()) for name, out in outputs.items()}
    times = interleaved(runs, args.sample_repeats, args.warmup, "sampling")
    return {"k": k, "n": args.n, "seconds": times, "compile_s": compile_s, "max_abs_diff_vs_plain": max_diff}


def summarise(times: dict[str, list[float]], baseline: str) -> dict:
    med = {n: statistics.median(v) for n, v in times.items()}
    return {n: {"median_s": med[n], "after_over_before": med[n] / med[baseline], "runs_s": times[n]} for n in times}


# -- writing ----------------------------------------------------------------------------------------------------
def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"

def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    from tdm.artifacts import atomic_write_file

    text = json.dumps(result, indent=2) + "\n"
    atomic_write_file(out_dir / "optimizations.json", lambda p: Path(p).write_text(text))
    it, sa, mach, s = result["iteration"], result["sampling"], result["machine"], result["settings"]
    lines = [
        "# Speed switches and code optimisations: before / after", "",
        f"Command: `{result['command']}`", "",
        f"{mach['cpu']}, {mach['cpu_count']} cores ({mach['torch_threads']} torch thread), torch {mach['torch']}, "
        f"commit {mach['git_commit']}. Load average (1, 5, 15 min) before: {result['load_before']}, after: "
        f"{result['load_after']}. One process; variants interleaved (rotating order), medians of "
        f"{s['repeats']} iterations / {s['sample_repeats']} sampling calls after {s['warmup']} warm-up; "
        f"ratio = variant median / baseline median (below 1 = faster).", "",
        f"## One distillation iteration (digits default: {it['mode']} mode, K={it['k']}, batch {it['batch_size']})", "",
        "| variant | median (s) | vs before | vs after (switches off) | compile (s) | loss_gen after the repeats "
        "(rel. diff vs before) |",
        "|---|---|---|---|---|---|",
    ]
    after = it["summary"]["after"]["median_s"]
    gen = {n: v["loss_gen"] for n, v in it["last_losses"].items()}

    def rel(name):
        return abs(gen[name] - gen["before"]) / abs(gen["before"])

    for name, row in it["summary"].items():
        lines.append(f"| {name} | {row['median_s']:.3f} | {row['after_over_before']:.3f} | "
                     f"{row['median_s'] / after:.3f} | {_secs(it['compile_s'].get(name))} | "
                     f"{it['last_losses'][name]['loss_gen']:.6f} ({rel(name):.0e}) |")
    lines += ["", f"## Student sampling ({sa['k']} steps, batch {sa['n']})", "",
              "| variant | median (s) | vs plain | compile (s) | max abs diff vs plain |", "|---|---|---|---|---|"]
    for name, row in sa["summary"].items():
        lines.append(f"| {name} | {row['median_s']:.4f} | {row['after_over_before']:.3f} | "
                     f"{_secs(sa['compile_s'].get(name))} | {sa['max_abs_diff_vs_plain'][name]:.1e} |")
    if result.get("notes"):
        lines += ["", *result["notes"]]
    atomic_write_file(out_dir / "optimizations.md", lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(REPO / "outputs/teacher_ft/model"))
    parser.add_argument("--student", default=str(REPO / "outputs/distill/student"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=11, help="timed iterations per variant")
    parser.add_argument("--sample-repeats", type=int, default=21, help="timed sampling calls per variant")
    parser.add_argument("--n", type=int, default=100, help="sampling batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--no-compile", action="store_true", help="leave the torch.compile rows out")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 1 repeat, temporary output")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    command = ".venv/bin/python benchmarks/optimizations.py " + " ".join(sys.argv[1:])
    out_dir = args.out
    with tempfile.TemporaryDirectory(prefix="tdm-bench-opt-") as tmp:
        if args.smoke:
            from tdm.backbones import DigitsArch, DigitsBackbone

            folder = Path(tmp) / "model"
            from tdm.student import StudentRecord

            DigitsBackbone.create(DigitsArch(channels=(32, 32), text_layers=1, num_merges=2000)).save(
                folder, extra_files=StudentRecord(family="digits", k=4, total_steps=900).files())
            args.teacher = args.student = str(folder)
            args.batch_size, args.n, args.repeats, args.sample_repeats = 8, 8, 1, 1
            out_dir = Path(tempfile.mkdtemp(prefix="tdm-bench-opt-smoke-"))
        load_before = load_avg()
        iteration = iteration_variants(args, not args.no_compile)
        iteration["summary"] = summarise(iteration["seconds"], "before")
        sampling = sampling_variants(args, not args.no_compile)
        sampling["summary"] = summarise(sampling["seconds"], "plain")
        result = {"benchmark": "optimizations", "command": command, "teacher": args.teacher, "student": args.student,
                  "settings": {"repeats": args.repeats, "sample_repeats": args.sample_repeats, "warmup": args.warmup,
                               "overrides": args.set, "smoke": args.smoke},
                  "load_before": load_before, "load_after": load_avg(), "iteration": iteration, "sampling": sampling,
                  "machine": machine_info()}
        write(result, out_dir)
    print(f"\nwritten: {out_dir / 'optimizations.json'}, .md")


if __name__ == "__main__":
    main()
