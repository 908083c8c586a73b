"""Two runs of the pipeline side by side: every figure of metrics/<stage>.json of a `--before` project (e.g. a
worktree of an older commit) against an `--after` one, with the difference. Used to show that a refactor leaves the
demo pipeline's figures unchanged.

    python benchmarks/compare_runs.py --before /tmp/before --after /tmp/demo --out benchmarks/results/refactor_before_after

Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

STAGES = ("teacher_ft", "distill", "lora_transfer", "evaluate")
# Wall-clock figures depend on the machine's load, not on the code: listed, not compared.
TIMES = ("train_time_s", "sample_time_s", "stage_time_s", "wall_time_s", "eval_sample_time_s")


def figures(project: Path) -> dict[str, float]:
    """stage/name -> value for every numeric figure (evaluation rows keyed by model and steps)."""
    out: dict[str, float] = {}
    for stage in STAGES:
        path = project / "metrics" / f"{stage}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for key, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{stage}/{key}"] = float(value)
        for row in data.get("rows", []):
            for key, value in (row.get("metrics") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{stage}/{row['model']}@{row['steps']}/{key}"] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--out", required=True, help="output path without suffix")
    args = parser.parse_args()
    before, after = figures(Path(args.before)), figures(Path(args.after))
    rows = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        timing = key.rsplit("/", 1)[-1] in TIMES or key.endswith("_time_s")
        diff = None if a is None or b is None or timing else b - a
        rows.append({"figure": key, "before": a, "after": b, "difference": diff, "timing": timing})
    compared = [r for r in rows if r["difference"] is not None]
    identical = sum(1 for r in compared if r["difference"] == 0)
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "compared": len(compared),
              "identical": identical, "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    fmt = lambda v: "" if v is None else (f"{v:.6g}" if math.isfinite(v) else str(v))  # noqa: E731
    lines = [f"# Before / after: `{result['command']}`", "",
             f"{identical} of {len(compared)} compared figures identical; timings (machine load) listed only.", "",
             "| figure | before | after | difference |", "|---|---:|---:|---:|"]
    lines += [f"| {r['figure']} | {fmt(r['before'])} | {fmt(r['after'])} | "
              f"{'(timing)' if r['timing'] else fmt(r['difference'])} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"{identical}/{len(compared)} identical -> {out}.md")


if __name__ == "__main__":
    main()
