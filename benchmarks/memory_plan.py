"""The memory plan (tdm.memory_plan) of every profile in profiles/ at its real architecture, and the issue-15
targets, written to benchmarks/results/memory_plan.{md,json}. CPU only, configs only (meta device), offline:

    .venv/bin/python benchmarks/memory_plan.py

Each profile is planned as written on one process and on the 8 processes its header's `accelerate launch`
line uses (distill.batch_size is global), against an 80 GiB device. The targets (goals until a GPU measures
them with benchmarks/backbone_iteration.py):
  - SDXL LoRA TDM at 1024 px, batch 1 per GPU, fits in 24 GB;
  - PixArt-alpha full mode at batch 8 per GPU fits in 80 GB;
  - FLUX.1-dev LoRA TDM at 1024 px in 80 GB (batch 1 per GPU).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
GIB = 2 ** 30


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> None:
    import os

    os.chdir(REPO)  # prompt files are relative to the repository root
    from tdm import memory_plan as mp

    runs = []  # (label, profile, overrides, processes, device GiB)
    for profile in sorted((REPO / "profiles").glob("*.yaml")):
        runs.append((f"{profile.stem}, as written, 1 process", profile, [], 1, 80))
        runs.append((f"{profile.stem}, as written, 8 processes", profile, [], 8, 80))
    goals = [
        ("goal: SDXL LoRA TDM 1024 px, batch 1 per GPU, in 24 GB", REPO / "profiles/sdxl.yaml",
         ["distill.batch_size=1"], 1, 24),
        ("goal: PixArt-alpha full mode, batch 8 per GPU (8 GPUs), in 80 GB", REPO / "profiles/pixart_alpha.yaml",
         ["distill.batch_size=64"], 8, 80),
        ("goal: FLUX.1-dev LoRA TDM 1024 px, batch 1 per GPU, in 80 GB", REPO / "profiles/flux.yaml",
         ["distill.batch_size=1"], 1, 80),
    ]
    rows, texts = [], []
    for label, profile, overrides, processes, gib in runs + goals:
        cfg = mp.load_config(profile, overrides)
        t0 = time.perf_counter()
        plan = mp.plan(cfg, device_memory_bytes=gib * GIB, num_processes=processes)
        elapsed = time.perf_counter() - t0
        d = plan.to_dict()
        d.update(label=label, profile=str(profile.relative_to(REPO)), overrides=overrides, plan_s=round(elapsed, 1))
        rows.append(d)
        texts.append((label, profile, overrides, processes, gib, plan.render()))
        print(f"{label}: {plan.total_bytes / GIB:.1f} GiB, {'fits' if plan.fits else 'does not fit'} "
              f"({elapsed:.1f} s)", flush=True)

    command = "python benchmarks/memory_plan.py"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_plan.json").write_text(json.dumps({"command": command, "commit": _commit(), "rows": rows},
                                                         indent=2) + "\n")
    sec = lambda r, s: r["sections"].get(s, 0) / GIB  # noqa: E731
    md = ["# Memory plan before launch (`tdm.memory_plan`): every profile at its real architecture", "",
          f"Command: `{command}` (CPU, configs only: meta device, no weights; commit {_commit()}). "
          "A **prediction** until a GPU measures it (`benchmarks/backbone_iteration.py` on a GPU machine); "
          "method and uncertainty in docs/memory.md. GiB = 2^30 bytes, per process (per GPU).", "",
          "| run | mode | precision | ckpt | batch/GPU | weights | grads | optimizer | EMA | cond. | activations "
          "| runtime | **total** | device | verdict | plan time |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "fits" if r["fits"] else "**does not fit**"
        md.append(f"| {r['label']} | {r['mode']}{' r' + str(r['lora_rank']) if r['lora_rank'] else ''} | "
                  f"{r['mixed_precision']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                  f"{r['batch_per_process']} | {sec(r, 'weights'):.2f} | {sec(r, 'gradients'):.2f} | "
                  f"{sec(r, 'optimizer'):.2f} | {sec(r, 'ema'):.2f} | {sec(r, 'conditioning'):.2f} | "
                  f"{sec(r, 'activations'):.2f} | {sec(r, 'runtime'):.2f} | **{r['total_bytes'] / GIB:.2f}** | "
                  f"{r['device_memory_bytes'] / GIB:.0f} GiB | {verdict} | {r['plan_s']} s |")
    md += ["", "## Targets (issue 15), as predicted", ""]
    for r in rows[len(runs):]:
        md.append(f"- {r['label']}: **{r['total_bytes'] / GIB:.1f} GiB** per GPU -> "
                  f"{'fits' if r['fits'] else 'does not fit'} (prediction; `-S {' -S '.join(r['overrides'])}`, "
                  f"{r['num_processes']} process(es)).")
    md += ["", "## The plans", ""]
    for label, profile, overrides, processes, gib, text in texts:
        extra = "".join(f" -S {o}" for o in overrides)
        md += [f"### {label}", "",
               f"`tdm distill --params {profile.relative_to(REPO)}{extra} --dry-run` on {processes} process(es), "
               f"{gib} GiB device (library call: `tdm.memory_plan.run_dry(cfg, {gib} * 2**30, {processes})`)", "",
               "```", text, "```", ""]
    (RESULTS / "memory_plan.md").write_text("\n".join(md))
    print(f"wrote {RESULTS / 'memory_plan.md'} and {RESULTS / 'memory_plan.json'}")


if __name__ == "__main__":
    main()
