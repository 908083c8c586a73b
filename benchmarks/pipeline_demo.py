"""Wall time of the README's demo command on the full embedded default, with the time of each stage (from the
MLflow stage runs) and the headline metrics (from metrics/evaluate.json).

    python benchmarks/pipeline_demo.py --project /path/to/fresh/clone          # runs: bash scripts/pipeline.sh
    python benchmarks/pipeline_demo.py --project DIR --command "./run_demo.sh"  # another command, same records

Writes benchmarks/results/pipeline_demo.{json,md} in this repository. Target (issue 7): <= 30 min on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def stage_times(tracking_uri: str) -> dict[str, float]:
    """Seconds per stage of the newest pipeline run, from its MLflow child runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("tdm")
    parents = client.search_runs([exp.experiment_id], "tags.stage = 'pipeline'", order_by=["start_time DESC"],
                                 max_results=1)
    if not parents:
        return {}
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return {r.data.tags["stage"]: round((r.info.end_time - r.info.start_time) / 1000, 1) for r in children
            if r.info.end_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project", required=True, help="a clone of this repository to run the demo in")
    parser.add_argument("--command", default="bash scripts/pipeline.sh")
    parser.add_argument("--tracking-uri", default="http://127.0.0.1:5000")
    parser.add_argument("--recorded-wall-s", type=float, default=None,
                        help="record a run already made with --command (its measured wall time) instead of running")
    args = parser.parse_args()
    project = Path(args.project).resolve()
    if args.recorded_wall_s is None:
        t0 = time.perf_counter()
        code = subprocess.run(args.command, shell=True, cwd=project).returncode
        wall = time.perf_counter() - t0
    else:
        code, wall = 0, args.recorded_wall_s
    evaluation = json.loads((project / "metrics" / "evaluate.json").read_text())
    rows = [{"model": r["model"], "steps": r["steps"], "nfe": r["nfe"], **r["metrics"]} for r in evaluation["rows"]]
    result = {"benchmark": "pipeline_demo", "command": args.command, "exit_code": code,
              "wall_time_s": round(wall, 1), "target_s": 1800, "stage_time_s": stage_times(args.tracking_uri),
              "rows": rows, "machine": machine_info()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_demo.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Demo pipeline on the embedded default (`{args.command}`)", "",
             f"Wall time **{wall / 60:.1f} min** (target <= 30 min), exit code {code}.", "",
             "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in result["stage_time_s"].items()]
    lines += ["", "| model | steps | NFE | metrics |", "|---|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['nfe']} | "
              + ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k not in ("model", "steps", "nfe")
                          and isinstance(v, (int, float))) + " |" for r in rows]
    (RESULTS / "pipeline_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
