"""Is a multistep solver over the student's grid worth offering? DPM-Solver++(2M) (Lu et al. 2022, the data-
prediction multistep solver diffusers' DPMSolverMultistepScheduler implements as "dpmsolver++", order 2) against
the student's own single-step DDIM trajectory, on the same grid, noise and prompts; FID and class accuracy of
1000 digits samples at K = 2 and 4, for each seed.

Both run the shipped sampler: `Student.sample(cond, noise, k, solver_order=1 | 2)` (tdm.sampler.student_sample,
`NoiseSchedule.solver_step`). Order 2's first step is DDIM and its last returns x0, so at K <= 2 the two agree
exactly; the second-order extrapolation D = (1 + c) x0_i - c x0_(i-1), c = h / (2 h_prev), acts from K = 3.

    python benchmarks/student_multistep.py --student outputs/distill/student
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--student", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--weights", default="outputs/weights")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="noise / prompt seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tdm.data import digit_prompt_set
    from tdm.evaluation.digits import evaluate_samples
    from tdm.sampler import make_noise
    from tdm.student import load_student

    student = load_student(args.student)
    student.net.eval()
    rows = []
    for seed in args.seeds:
        prompts = digit_prompt_set(args.n, seed=seed)
        noise = make_noise(args.n, student.backbone.sample_shape, seed=seed)
        cond = student.backbone.encode_prompts(prompts)
        for k in (2, 4):
            for solver, order in (("ddim (solver_order 1, the student's trajectory)", 1),
                                  ("dpm-solver++ 2m (solver_order 2)", 2)):
                images = student.backbone.decode(student.sample(cond, noise, k, solver_order=order)).numpy()
                scores = evaluate_samples(images, prompts, args.weights)
                rows.append({"seed": seed, "k": k, "solver": solver, "fid": scores["fid"],
                             "accuracy": scores["accuracy"], "fid_floor": scores["fid_floor"]})
                print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "student_multistep", "command": " ".join(["benchmarks/student_multistep.py", *sys.argv[1:]]),
              "student": str(args.student), "record": json.loads(student.record.to_json()), "rows": rows,
              "machine": machine_info()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "student_multistep.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# A multistep solver over the student's grid (DPM-Solver++ 2M) vs its own DDIM trajectory", "",
             f"Command: `{result['command']}`; {args.n} samples, same noise and prompts; FID in the digit classifier's "
             f"feature space (floor {rows[0]['fid_floor']:.3f} at this n).", "",
             "| K (NFE) | solver | FID per seed | mean FID | mean class accuracy |", "|---|---|---|---:|---:|"]
    for k in (2, 4):
        for solver in dict.fromkeys(r["solver"] for r in rows):
            pick = [r for r in rows if r["k"] == k and r["solver"] == solver]
            per_seed = ", ".join(f"{r['fid']:.3f}" for r in pick)
            lines.append(f"| {k} | {solver} | {per_seed} | "
                         f"{sum(r['fid'] for r in pick) / len(pick):.3f} | "
                         f"{sum(r['accuracy'] for r in pick) / len(pick):.3f} |")
    (RESULTS / "student_multistep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
