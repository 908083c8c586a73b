"""TDM on the embedded default: the student against its teacher, and the paper's ablations.

Every row is measured the same way: 1000 samples, the same seeds, FID in the digit classifier's feature
space against the held-out split, class accuracy of the prompted digit. Rows run two at a time (one torch
thread each) and results are written after every row, so an interrupted run keeps what it measured.

    .venv/bin/python benchmarks/distill_ablations.py --teacher outputs/teacher_ft/model [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TDM = str(Path(sys.executable).parent / "tdm")

# name -> (overrides, the K values the student is scored at)
VARIANTS: dict[str, list[str]] = {
    "tdm_k4_g2": [],
    "tdm_k4_g2_seed1": ["distill.seed=1"],
    "tdm_k4_g2_seed2": ["distill.seed=2"],
    "tdm_k4_g1": ["distill.guidance=1"],
    "tdm_k1_g2": ["distill.k=1"],
    "tdm_k1_g2_top1000": ["distill.k=1", "distill.total_steps=1000"],  # K=1 from t=999, not 899
    "tdm_k4_g2_l2": ["distill.metric=l2"],
    "tdm_k4_g2_huber_sample": ["distill.metric=huber_sample"],
    "tdm_k4_g2_shared": ["distill.interval=shared"],
    "tdm_k4_g2_random_mid": ["distill.random_mid=true"],
    "tdm_unify_g2": ["distill.unify=true", "distill.k_choices=[1, 2, 4]"],
    "tdm_k4_g2_lora": ["distill.mode=lora"],
    # The student's grid (distill.shift / distill.timesteps), K = 4 of 900, LoRA mode: uniform is the row above.
    "tdm_k4_g2_lora_shift2": ["distill.mode=lora", "distill.shift=2.0"],  # toward noise: 899 770 599 359
    "tdm_k4_g2_lora_shift0.5": ["distill.mode=lora", "distill.shift=0.5"],  # toward data: 899 539 299 127
    "tdm_k4_g2_lora_explicit": ["distill.mode=lora", "distill.timesteps=[899, 799, 599, 299]"],
}
TEACHER_ROWS = [(steps, g) for g in (1.0, 2.0) for steps in (1, 2, 4, 50)]


def _fresh_dir(teacher: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="tdm-bench-distill-"))
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    return work


def run_variant(name: str, overrides: list[str], teacher: Path, weights: Path) -> dict:
    work = _fresh_dir(teacher)
    args = [TDM, "--threads", "1", "distill", "-q", "-S", f"distill.teacher={teacher}",
            "-S", f"eval.weights_dir={weights}", *[a for o in overrides for a in ("-S", o)]]
    out = subprocess.run(args, cwd=work, capture_output=True, text=True)
    if out.returncode != 0:
        return {"name": name, "overrides": overrides, "error": out.stderr[-2000:]}
    metrics = json.loads((work / "metrics" / "distill.json").read_text())
    return {"name": name, "overrides": overrides, **metrics}


def run_teacher(steps: int, guidance: float, teacher: Path, weights: Path) -> dict:
    work = _fresh_dir(teacher)
    (work / "params.yaml").write_text((work / "params.yaml").read_text().replace(
        "weights_dir: outputs/weights", f"weights_dir: {weights}"))
    args = [TDM, "--threads", "1", "sample", "-q", "--model", str(teacher), "--steps", str(steps), "--guidance",
            str(guidance), "--n", "1000", "--out", "t.npz", "--score"]
    out = subprocess.run(args, cwd=work, capture_output=True, text=True, check=True)
    scores = json.loads(out.stdout)
    return {"name": f"teacher_ddim{steps}_g{guidance:g}", "steps": steps, "guidance": guidance,
            "nfe": steps * (2 if guidance != 1 else 1), "fid": scores["fid"], "accuracy": scores["accuracy"],
            "fid_floor": scores["fid_floor"]}


def write(rows: list[dict], teacher: Path) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_ablations.json").write_text(json.dumps(
        {"benchmark": "distill_ablations", "teacher": str(teacher), "rows": rows, "machine": machine_info()},
        indent=2) + "\n")
    lines = ["# TDM on the embedded default: student vs teacher, and ablations", "",
             "Command: `.venv/bin/python benchmarks/distill_ablations.py --teacher outputs/teacher_ft/model`.",
             "1000 samples per row, same seeds; FID in the digit classifier's feature space vs the held-out split.",
             "", "| row | overrides | steps (NFE) | FID | class acc. | distill time (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {' '.join(r['overrides'])} | | error | | |")
        elif r["name"].startswith("teacher"):
            lines.append(f"| {r['name']} | guidance {r['guidance']:g} | {r['steps']} ({r['nfe']}) | "
                         f"{r['fid']:.2f} | {r['accuracy']:.3f} | |")
        else:
            ks = sorted(int(k.split("_")[1][1:]) for k in r if k.startswith("eval_k") and k.endswith("_fid"))
            for k in ks:
                lines.append(f"| {r['name']} | {' '.join(r['overrides']) or 'defaults'} | {k} ({k}) | "
                             f"{r[f'eval_k{k}_fid']:.2f} | {r[f'eval_k{k}_accuracy']:.3f} | {r['train_time_s']:.0f} |")
    (RESULTS / "distill_ablations.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default=str(REPO / "outputs/teacher_ft/model"))
    parser.add_argument("--only", nargs="*", help="variant names (default: all, plus the teacher rows)")
    parser.add_argument("--no-teacher", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    teacher = Path(args.teacher).resolve()
    weights = REPO / "outputs" / "weights"
    rows: list[dict] = []
    existing = RESULTS / "distill_ablations.json"
    if existing.is_file():  # keep rows of earlier partial runs, replace those re-measured now
        rows = json.loads(existing.read_text())["rows"]
    jobs = []
    with ThreadPoolExecutor(args.workers) as pool:
        if not args.no_teacher:
            jobs += [pool.submit(run_teacher, s, g, teacher, weights) for s, g in TEACHER_ROWS]
        names = list(VARIANTS) if args.only is None else args.only
        jobs += [pool.submit(run_variant, n, VARIANTS[n], teacher, weights) for n in names]
        for job in jobs:
            row = job.result()
            rows = [r for r in rows if r["name"] != row["name"]] + [row]
            write(rows, teacher)
            print(json.dumps(row)[:300], flush=True)


if __name__ == "__main__":
    main()
