"""Distillation throughput with 1 and 2 processes on CPU (data parallel through accelerate / torch.distributed).

Each run is a real `tdm distill` launched by torch.distributed.run in a fresh folder (nothing to resume):

    python -m torch.distributed.run --nproc_per_node N -m tdm.cli distill -q -S distill.teacher=DIR
        -S distill.iterations=I -S distill.batch_size=B -S distill.eval_samples=0 -S distill.checkpoint_every=I

with OMP_NUM_THREADS=1 and TDM_NUM_THREADS=1 (one torch thread per process). The global batch B is split across
the N processes. Throughput = I * B / train_time_s, with iterations and train_time_s read from the run's
metrics/distill.json (train_time_s is the training loop: every iteration including the first, the loss flushes
every distill.log_every steps and the one checkpoint at the end; not process start-up, model loading or the
student export). Repeats interleave N = 1 and N = 2 (order alternating), and medians are quoted; the ratio
N=2 / N=1 is the figure of merit (target >= 1.6). Both processes share the machine's cores: on a 2-core machine
the 2-process run has one core per process and nothing to spare for anything else running there.

Results (benchmarks/results/scaling.{json,md}) come from:

    .venv/bin/python benchmarks/scaling.py --teacher outputs/teacher_ft/model

(defaults: I = 60, B = 64, 3 repeats; about 1 s per iteration for 1 process on 2 AMD EPYC cores with the
embedded default). `--smoke` checks the script on a tiny random model (I = 4, B = 8, 1 repeat; results go to a
temporary folder).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_teacher(tmp: Path) -> Path:
    """A tiny random digits model saved to `tmp` (the smoke run's teacher)."""
    from tdm.backbones import DigitsArch, DigitsBackbone

    folder = tmp / "teacher"
    DigitsBackbone.create(DigitsArch(channels=(32, 32), text_layers=1, num_merges=2000)).save(folder)
    return folder


def run_once(nproc: int, args) -> dict:
    """One `tdm distill` with `nproc` processes in a fresh folder; its metrics and throughput."""
    work = Path(tempfile.mkdtemp(prefix=f"tdm-bench-scaling-{nproc}p-"))
    try:
        shutil.copy(REPO / "params.yaml", work / "params.yaml")
        overrides = [f"distill.teacher={args.teacher}", f"distill.iterations={args.iterations}",
                     f"distill.batch_size={args.batch_size}", "distill.eval_samples=0",
                     f"distill.checkpoint_every={args.iterations}", *args.set]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "tdm.cli", "distill", "-q",
               *[a for o in overrides for a in ("-S", o)]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TDM_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        load = os.getloadavg()[0]  # the box is shared: what else was running when this run started
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"{nproc}-process run failed:\n{out.stderr[-3000:]}")
        metrics = json.loads((work / "metrics" / "distill.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    iterations, train_time = int(metrics["iterations"]), float(metrics["train_time_s"])
    return {"nproc": nproc, "iterations": iterations, "train_time_s": train_time, "wall_s": wall,
            "load_avg_1min_at_start": round(load, 2), "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
            "samples_per_s": iterations * args.batch_size / train_time}


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    s, mach = result["settings"], result["machine"]
    ratio = result["ratio_2_over_1"]
    lines = [
        "# Distillation throughput: 1 vs 2 processes on CPU", "",
        f"Command: `{result['command']}`", "",
        f"`tdm distill` under torch.distributed.run, fresh folder per run, {s['iterations']} iterations at global "
        f"batch {s['batch_size']} (split across processes), overrides {s['overrides'] or 'none'} on the committed "
        f"params.yaml; one torch thread per process (OMP_NUM_THREADS=1, TDM_NUM_THREADS=1). Throughput = "
        f"iterations x batch / train_time_s (metrics/distill.json); median of {s['repeats']} interleaved repeats. "
        f"{mach['cpu']}, {mach['cpu_count']} cores, torch {mach['torch']}, commit {mach['git_commit']}.", "",
        "| processes | samples / s (median) | train time (s, median) | whole command (s, median) |",
        "|---|---|---|---|",
    ]
    for n, row in result["by_nproc"].items():
        lines.append(f"| {n} | {row['samples_per_s_median']:.1f} | {row['train_time_s_median']:.1f} | "
                     f"{row['wall_s_median']:.1f} |")
    loads = [r[k] for rows in result["by_nproc"].values() for r in rows["runs"]
             for k in ("load_avg_1min_at_start", "load_avg_1min_at_end")]
    lines += ["", f"1-minute load average over the runs: {min(loads):.2f} to {max(loads):.2f} (at the start of "
                  f"the benchmark: {result['load_before']}; the 1-process runs themselves add about 1, the "
                  f"2-process runs about 2).", ""]
    lines += [f"2 processes / 1 process: **{ratio:.2f}x** (target >= 1.6: {'yes' if ratio >= 1.6 else 'NO'}; "
                  f"per repeat: {', '.join(f'{r:.2f}' for r in result['ratio_per_repeat'])}).", "",
              f"The 2 processes share this machine's {mach['cpu_count']} cores (one thread each), so 2.0x is the "
              f"ceiling; gradient averaging (gloo all-reduce), the replica check at the checkpoint and anything "
              f"else running on the machine come out of it."]
    (out_dir / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(REPO / "outputs/teacher_ft/model"), help="teacher model folder")
    parser.add_argument("--iterations", type=int, default=60, help="I: distillation iterations per run")
    parser.add_argument("--batch-size", type=int, default=64, help="B: global batch (divisible by 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra `tdm distill` override (e.g. distill.mode=lora)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, I=4, B=8, 1 repeat, temp output")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    command = ".venv/bin/python benchmarks/scaling.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="tdm-bench-scaling-") as tmp:
        out_dir = RESULTS
        if args.smoke:
            args.teacher = str(smoke_teacher(Path(tmp)))
            args.iterations, args.batch_size, args.repeats = 4, 8, 1
            out_dir = Path(tempfile.mkdtemp(prefix="tdm-bench-scaling-smoke-"))
        args.teacher = str(Path(args.teacher).resolve())
        load_before = [round(x, 2) for x in os.getloadavg()]
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(args.repeats):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                row = run_once(n, args)
                runs[n].append(row)
                print(f"repeat {r + 1}, {n} process(es): {row['samples_per_s']:.1f} samples/s "
                      f"(train {row['train_time_s']:.1f} s, whole command {row['wall_s']:.1f} s)", flush=True)

    by_nproc = {n: {f"{k}_median": statistics.median(row[k] for row in rows)
                    for k in ("samples_per_s", "train_time_s", "wall_s")} | {"runs": rows}
                for n, rows in runs.items()}
    result = {
        "benchmark": "scaling", "command": command, "teacher": args.teacher,
        "settings": {"iterations": args.iterations, "batch_size": args.batch_size, "repeats": args.repeats,
                     "overrides": args.set, "smoke": args.smoke, "omp_num_threads": 1, "tdm_num_threads": 1},
        "by_nproc": by_nproc,
        "load_before": load_before,
        "ratio_2_over_1": by_nproc[2]["samples_per_s_median"] / by_nproc[1]["samples_per_s_median"],
        "ratio_per_repeat": [b["samples_per_s"] / a["samples_per_s"] for a, b in zip(runs[1], runs[2])],
        "target_ratio": ">= 1.6",
        "note": "the 2 processes share the machine's cores (one torch thread each)",
        "machine": machine_info(),
    }
    write(result, out_dir)
    print(f"\nwritten: {out_dir / 'scaling.json'}, .md")


if __name__ == "__main__":
    main()
