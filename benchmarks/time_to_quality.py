"""Time to teacher quality on the embedded default: how long TDM takes until the 4-step student first
matches its teacher's 50-step FID (same guidance), as a fraction of the teacher's own training time.

Runs `tdm distill` from scratch for a rising number of iterations (each a complete run with its own
warm-up + cosine schedule) and stops at the first that reaches the teacher's FID.

    .venv/bin/python benchmarks/time_to_quality.py --teacher outputs/teacher_ft/model
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TDM = str(Path(sys.executable).parent / "tdm")


def teacher_reference(teacher: Path) -> tuple[float, float]:
    """The teacher's 50-step FID at guidance 2 and its training time, from the recorded benchmarks."""
    rows = json.loads((RESULTS / "distill_ablations.json").read_text())["rows"]
    fid = next(r["fid"] for r in rows if r["name"] == "teacher_ddim50_g2")
    train = json.loads((RESULTS / "teacher_ft.json").read_text())["metrics"]["train_time_s"]
    return fid, train


def distill(teacher: Path, iterations: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="tdm-ttq-"))
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    subprocess.run([TDM, "--threads", "1", "distill", "-q", "-S", f"distill.teacher={teacher}",
                    "-S", f"eval.weights_dir={REPO / 'outputs/weights'}", "-S", f"distill.iterations={iterations}",
                    "-S", f"distill.warmup_steps={min(20, iterations // 5)}"], cwd=work, check=True,
                   capture_output=True)
    return json.loads((work / "metrics" / "distill.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default=str(REPO / "outputs/teacher_ft/model"))
    parser.add_argument("--iterations", type=int, nargs="*", default=[25, 50, 100, 200, 400])
    parser.add_argument("--all", action="store_true", help="run every length (the quality curve), not just until the match")
    args = parser.parse_args()
    teacher = Path(args.teacher).resolve()
    target_fid, teacher_time = teacher_reference(teacher)
    rows, reached = [], None
    for n in args.iterations:
        m = distill(teacher, n)
        rows.append({"iterations": n, "train_time_s": m["train_time_s"], "fid": m["eval_k4_fid"],
                     "accuracy": m["eval_k4_accuracy"]})
        print(rows[-1], flush=True)
        if m["eval_k4_fid"] <= target_fid and reached is None:
            reached = rows[-1]
            if not args.all:
                break
    result = {"benchmark": "time_to_quality", "teacher_fid_50steps_g2": target_fid,
              "teacher_train_time_s": teacher_time, "rows": rows, "reached": reached,
              "fraction_of_teacher_training": reached and reached["train_time_s"] / teacher_time,
              "machine": machine_info()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "time_to_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Time to teacher quality (digits default)", "",
             "Command: `.venv/bin/python benchmarks/time_to_quality.py --teacher outputs/teacher_ft/model` "
             "(each row a complete `tdm distill` run from scratch, one torch thread, run alone).", "",
             f"Teacher: 50-step DDIM at guidance 2 scores FID {target_fid:.2f}; it trained for {teacher_time:.0f} s.", "",
             "| distill iterations | distill time (s) | 4-step student FID | class acc. |", "|---|---|---|---|"]
    lines += [f"| {r['iterations']} | {r['train_time_s']:.0f} | {r['fid']:.2f} | {r['accuracy']:.3f} |" for r in rows]
    if reached:
        lines += ["", f"First match at {reached['iterations']} iterations: {reached['train_time_s']:.0f} s = "
                      f"**{result['fraction_of_teacher_training']:.1%}** of the teacher's training time (target <= 25%)."]
    else:
        lines += ["", "The student did not reach the teacher's FID within the iterations tried."]
    (RESULTS / "time_to_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
