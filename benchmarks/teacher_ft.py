"""Teacher quality and training time on the embedded default (issue: foundation, "Done means").

Runs `tdm teacher-ft` with the committed params.yaml in a fresh folder (so nothing is resumed) and records
the training time and the 50-step teacher's FID / class accuracy into benchmarks/results/teacher_ft.{json,md}.

    .venv/bin/python benchmarks/teacher_ft.py            # ~11 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def record(metrics: dict, wall_s: float, command: str) -> None:
    import torch

    torch.set_num_threads(1)
    result = {"benchmark": "teacher_ft", "command": command, "wall_s": round(wall_s, 1), "metrics": metrics,
              "targets": {"train_time_s": "<= 600", "eval_fid": "<= 6", "eval_accuracy": ">= 0.97"},
              "machine": machine_info()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "teacher_ft.json").write_text(json.dumps(result, indent=2) + "\n")
    m = metrics
    ok = lambda c: "yes" if c else "NO"  # noqa: E731
    md = f"""# Teacher fine-tuning on the embedded default

Command: `{command}` (committed `params.yaml`, fresh folder, 1 torch thread), commit {result['machine']['git_commit']},
{result['machine']['cpu']}, torch {result['machine']['torch']}.

| metric | value | target | met |
|---|---|---|---|
| training time | {m['train_time_s']:.0f} s ({m['steps']} steps, batch 128) | <= 600 s | {ok(m['train_time_s'] <= 600)} |
| 50-step FID (guidance {m['eval_guidance']}, {m['eval_n']} samples) | {m['eval_fid']:.2f} | <= 6 | {ok(m['eval_fid'] <= 6)} |
| class accuracy | {m['eval_accuracy']:.3f} | >= 0.97 | {ok(m['eval_accuracy'] >= 0.97)} |
| real-vs-real FID floor (same n) | {m['eval_fid_floor']:.2f} | | |
| sampling 1000 x 50 steps | {m['eval_sample_time_s']:.0f} s | | |

Parameters: {m['parameters']:,} (UNet). Whole stage wall time incl. sampling and scoring: {wall_s:.0f} s.
"""
    (RESULTS / "teacher_ft.md").write_text(md)
    print(md)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="tdm-bench-teacher-"))
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    command = "tdm teacher-ft"
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "tdm"), "--threads", "1", "teacher-ft", "-q"], cwd=work,
                   check=True)
    wall = time.perf_counter() - t0
    record(json.loads((work / "metrics" / "teacher_ft.json").read_text()), wall, command)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--record":  # record a run made by hand: --record WORKDIR
        work = Path(sys.argv[2])
        record(json.loads((work / "metrics" / "teacher_ft.json").read_text()),
               float((work / "wall_s").read_text()) if (work / "wall_s").exists() else float("nan"), "tdm teacher-ft")
    else:
        main()
