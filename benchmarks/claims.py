"""The recipe / paper-claim questions of issues #16 and #17 on the digits default, scored in both metric views.

Every row: 1000 samples of the digits prompt set, sampling seeds 0, 1, 2 (the same noise and prompts in every
row of a seed), scored by `tdm.evaluation.digits.two_view_scores` (view 1: the recorded CNN, FID + KID; view 2:
the MLP of another seed, FID + KID). A claim "A beats B" counts only when every figure of both views agrees on
every seed (`views_agree`); the seed spread (min..max over the sampling seeds) is given beside each mean.

Rows:
- the iteration-0 student: the teacher's own weights run on the student's grid (K = 4 over total_steps 900, no
  CFG, the student's trajectory: what distillation starts from, LoRA adapters zero at init), and the guided
  teacher (CFG 2, the baked guidance) on that grid;
- the teacher's own DDIM at the student's NFE (4 steps no CFG; 2 steps CFG 2 = 4 NFE); its usual 50-step CFG 1.5
  50-step DDIM at the CFG scales given with --teacher-50 G [G ...] (bare: 1.5, its sampling setting; first seed
  only unless --teacher-50-all-seeds: 50-100 NFE per sample), or from a saved npz (--npz NAME=FILE);
- per distill run (`--run NAME=DIR`, DIR holding outputs/distill/checkpoints/step-N and outputs/distill/student):
  the raw student and the EMA student of the same final checkpoint (no extra training), at its K (a TDM-unify
  student at each of its K), and, for a TDM-unify run, the K embedding's per-K norms (raw, EMA, and the saved
  k_embedding.safetensors).

    python benchmarks/claims.py --teacher /tmp/demo/outputs/teacher_ft/model --weights /tmp/rr/weights \\
        --run ours=/tmp/demo --run official=/tmp/rr/official --run k1_3x=/tmp/rr/k1_3x --run unify=/tmp/rr/unify
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = ("fid", "kid", "fid_mlp", "kid_mlp", "accuracy", "accuracy_mlp")


def _run_state(run_dir: Path) -> tuple[dict, dict, Path]:
    """(the run's params, its final checkpoint's trainer state, the student folder)."""
    from tdm.checkpoint import latest_checkpoint, load_state

    distill = run_dir / "outputs" / "distill"
    ckpt = latest_checkpoint(distill / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{distill / 'checkpoints'}: no checkpoint (has the run finished?)")
    student = distill / "student"
    if (student / "tdm_params.json").is_file():
        params = json.loads((student / "tdm_params.json").read_text())
    else:  # an unfinished run: its params.yaml and the -S overrides it was started with (overrides.txt)
        from tdm.config import dump, load

        extra = run_dir / "overrides.txt"
        params = dump(load(run_dir / "params.yaml",
                           extra.read_text().split() if extra.is_file() else []))
    return params, load_state(ckpt)["trainer"], student


def state_step(run_dir: Path) -> int:
    from tdm.checkpoint import latest_checkpoint

    return int(latest_checkpoint(run_dir / "outputs" / "distill" / "checkpoints").name.split("-")[-1])


def _student_nets(teacher: str, params: dict, state: dict) -> dict:
    """{"raw": (net, k_embedding), "ema": (...)} merged from the checkpoint, on a fresh teacher backbone."""
    from tdm.backbones import load_backbone
    from tdm.roles import Roles

    d = params["distill"]
    backbone = load_backbone(teacher)
    roles = Roles(backbone, d["mode"], d["lora_rank"], d["lora_alpha"],
                  k_max=max(d["k_choices"]) if d["unify"] else None)
    out = {"raw": state["student"]}
    if state.get("ema") is not None:
        out["ema"] = state["ema"]["shadow"]
    return backbone, {name: (roles.merged_net("student", w), roles.k_embedding("student", w))
                      for name, w in out.items()}, out


@torch.no_grad()
def _time_embedding_norms(teacher: str, timesteps) -> dict:
    """The norm of the teacher's time embedding (the tensor a K embedding is added to) at each grid timestep:
    the scale a K embedding's norm compares with."""
    from tdm.backbones import load_backbone

    backbone = load_backbone(teacher)
    net, seen = backbone.net.eval(), []
    handle = backbone.time_embedding(net).register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    try:
        ts = torch.tensor([int(t) for t in timesteps])
        x = torch.zeros((len(ts), *backbone.sample_shape))
        backbone.predict_x0_eps(net, x, ts, backbone.encode_prompts(["a handwritten digit one"] * len(ts)))
    finally:
        handle.remove()
    return {str(int(t)): float(v.norm()) for t, v in zip(ts, seen[0])}


def _k_norms(weights: dict) -> dict | None:
    w = weights.get("k_embedding.weight")
    return None if w is None else {str(k): float(w[k].norm()) for k in range(w.shape[0])}


# (A, B) pairs whose "which is better" the report checks in both views on every seed.
PAIRS = [
    ("ours ema", "ours raw"), ("official raw", "official ema"), ("official raw", "ours ema"),
    ("official raw", "ours raw"), ("ours ema", "iteration 0 (teacher on the student's grid, no CFG)"),
    ("ours ema", "teacher DDIM 4 steps, CFG 1"), ("ours ema", "teacher DDIM 2 steps, CFG 2"),
    ("iteration 0 (teacher on the student's grid, no CFG)", "teacher DDIM 4 steps, CFG 1"),
    ("k1_3x ema", "k1_3x raw"), ("unify_b16 ema", "unify_b16 raw"),
]


def write_report(json_path: Path, md_path: Path, notes: str = "") -> None:
    """claims.md from claims.json: per row mean and min..max over the sampling seeds, and each pair's verdict
    (`views_agree` on every seed: a claim counts only when all figures of both views agree on all seeds)."""
    from tdm.evaluation.digits import views_agree

    result = json.loads(json_path.read_text())
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["model"], r["steps"]), []).append(r)

    def cell(rows, k, fmt):
        vals = [r[k] for r in rows if r.get(k) is not None]
        if not vals:
            return "-"
        mean = sum(vals) / len(vals)
        return (fmt % mean) + (f" ({fmt % min(vals)}..{fmt % max(vals)})" if len(vals) > 1 else "")

    lines = ["# Recipe and paper-claim questions on the digits default, in two metric views (#16, #17)", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += [f"Command(s): `{c}`" for c in result.get("commands", [result["command"]])]
    lines += ["", f"n = {result['n']} per row; sampling seeds {result['seeds']} (same prompts and noise in every row of "
              "a seed); mean (min..max over seeds). View 1: the recorded CNN classifier (FID, KID); view 2: the MLP "
              "of seed 1 (FID, KID). KID is x 1e3. Real-data floors at n = 1000: FID "
              f"{cell(result['rows'][:1], 'fid_floor', '%.2f')} (view 1), {cell(result['rows'][:1], 'fid_floor_mlp', '%.2f')} "
              "(view 2); KID floors (real train n = 1000 vs the held-out split, x1e3): -16.93 (view 1), -15.06 (view 2).", "",
              "| model | K / steps | seeds | FID v1 | KID v1 (x1e3) | FID v2 | KID v2 (x1e3) | class acc. v1 | class acc. v2 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (model, steps), rows in groups.items():
        scaled = [{**r, "kid": r["kid"] * 1e3, "kid_mlp": r["kid_mlp"] * 1e3} for r in rows]
        lines.append(f"| {model} | {steps if steps is not None else '-'} | {len(rows)} | {cell(scaled, 'fid', '%.2f')} | "
                     f"{cell(scaled, 'kid', '%.2f')} | {cell(scaled, 'fid_mlp', '%.2f')} | {cell(scaled, 'kid_mlp', '%.2f')} | "
                     f"{cell(rows, 'accuracy', '%.3f')} | {cell(rows, 'accuracy_mlp', '%.3f')} |")
    lines += ["", "## Which is better, in both views on every seed", "",
              "| A | B | K of A | per-seed verdicts | seeds where A is lower, per figure | claim |",
              "|---|---|---|---|---|---|"]
    verdicts = []
    for a, b in PAIRS:
        for (ma, sa), ra in groups.items():
            if ma != a:
                continue
            rb = groups.get((b, sa)) or next((v for (mb, _), v in groups.items() if mb == b), None)
            if not rb:
                continue
            by_seed = {r["seed"]: r for r in rb}
            both = [(r, by_seed[r["seed"]]) for r in ra if r["seed"] in by_seed]
            per = [views_agree(x, y) for x, y in both]
            lower = {k: sum(x[k] < y[k] for x, y in both) for k in ("fid", "kid", "fid_mlp", "kid_mlp")}
            if not per:
                continue
            claim = ("A better" if all(v == "a" for v in per) else "B better" if all(v == "b" for v in per)
                     else "no claim (the views or seeds disagree)")
            verdicts.append({"a": a, "b": b, "k": sa, "per_seed": per, "a_lower_seeds": lower, "claim": claim})
            counts = ", ".join(f"{k} {n}/{len(both)}" for k, n in lower.items())
            lines.append(f"| {a} | {b} | {sa} | {', '.join(str(v) for v in per)} | {counts} | {claim} |")
    if result.get("extras"):
        lines += ["", "## TDM-unify K embedding (row norms per K)", ""]
        for name, e in result["extras"].items():
            lines.append(f"- {name}: " + json.dumps(e))
    lines += ["", f"Machine: {result['machine'].get('cpu')}, torch {result['machine'].get('torch')}, "
              f"commit {result['machine'].get('git_commit')}."]
    result["verdicts"] = verdicts
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {md_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="the digits teacher model folder (required unless --report)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="a finished distill run")
    parser.add_argument("--weights", default="outputs/weights", help="metric cache (eval.weights_dir)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--no-teacher-rows", action="store_true")
    parser.add_argument("--teacher-50", type=float, nargs="*", default=None, metavar="GUIDANCE",
                        help="also the 50-step teacher at each CFG scale given (bare flag: 1.5, its sampling default) "
                             "on the first seed (50-100 NFE per sample: slow on CPU; --teacher-50-all-seeds for all)")
    parser.add_argument("--teacher-50-all-seeds", action="store_true",
                        help="the 50-step teacher rows on every seed, for claims measured against them")
    parser.add_argument("--npz", action="append", default=[], metavar="NAME=FILE",
                        help="also score a saved sample set (tdm sample / tdm evaluate npz) in both views")
    parser.add_argument("--out", default=str(RESULTS / "claims.json"))
    parser.add_argument("--report", metavar="NOTES_MD", nargs="?", const="",
                        help="only write claims.md from --out (optionally with a notes file on top), no scoring")
    args = parser.parse_args()
    if args.report is not None:
        notes = Path(args.report).read_text() if args.report else ""
        write_report(Path(args.out), Path(args.out).with_suffix(".md"), notes)
        return
    if not args.teacher:
        parser.error("--teacher is required (unless --report)")
    torch.set_num_threads(1)
    from tdm.backbones import load_backbone
    from tdm.data import digit_prompt_set
    from tdm.evaluation.digits import two_view_scores
    from tdm.sampler import make_noise, student_sample, teacher_sample
    from tdm.schedule import StudentGrid
    from tdm.student import load_k_embedding

    runs = {}
    for item in args.run:
        name, sep, folder = item.partition("=")
        if not sep:
            raise SystemExit(f"--run: expected NAME=DIR, got {item!r}")
        runs[name] = Path(folder)
        _run_state(runs[name])  # a missing checkpoint fails before any sampling

    def batched(fn, cond_fn, prompts, noise):
        out = []
        for s in range(0, len(prompts), args.batch_size):
            out.append(fn(cond_fn(prompts[s:s + args.batch_size]), noise[s:s + args.batch_size]))
        return torch.cat(out)

    rows, extras = [], {}
    started = time.time()

    def score(row: dict, backbone, x0: torch.Tensor, prompts) -> None:
        images = backbone.decode(x0).numpy()
        s = two_view_scores(images, prompts, args.weights)
        rows.append({**row, **{k: s[k] for k in FIGURES}, "fid_floor": s["fid_floor"],
                     "fid_floor_mlp": s["fid_floor_mlp"], "n": s["n"]})
        print(json.dumps(rows[-1]), flush=True)

    grid4 = StudentGrid(900).at(4)
    if not args.no_teacher_rows:
        teacher = load_backbone(args.teacher)
        net = teacher.net.eval()
        for seed in args.seeds:
            prompts = digit_prompt_set(args.n, seed=seed)
            noise = make_noise(args.n, teacher.sample_shape, seed)
            enc = teacher.encode_prompts
            score({"model": "iteration 0 (teacher on the student's grid, no CFG)", "steps": 4, "nfe": 4,
                   "seed": seed}, teacher,
                  batched(lambda c, z: student_sample(teacher, net, c, z, grid4), enc, prompts, noise), prompts)
            for steps, guidance in ((4, 1.0), (2, 2.0)):
                score({"model": f"teacher DDIM {steps} steps, CFG {guidance:g}", "steps": steps,
                       "nfe": steps * (2 if guidance != 1 else 1), "seed": seed}, teacher,
                      batched(lambda c, z: teacher_sample(teacher, net, c, z, steps, guidance), enc, prompts, noise),
                      prompts)
            if args.teacher_50 is not None and (args.teacher_50_all_seeds or seed == args.seeds[0]):
                for guidance in args.teacher_50 or [1.5]:
                    score({"model": f"teacher DDIM 50 steps, CFG {guidance:g}", "steps": 50,
                           "nfe": 50 * (2 if guidance != 1 else 1), "seed": seed}, teacher,
                          batched(lambda c, z: teacher_sample(teacher, net, c, z, 50, guidance), enc, prompts, noise),
                          prompts)

    for item in args.npz:
        from tdm.artifacts import load_samples

        name, _, path = item.partition("=")
        images, prompts = load_samples(path)[:2]
        s = two_view_scores(images, list(prompts), args.weights)
        rows.append({"model": name, "npz": path, "steps": None, "seed": None,
                     **{k: s[k] for k in FIGURES}, "fid_floor": s["fid_floor"], "fid_floor_mlp": s["fid_floor_mlp"],
                     "n": s["n"]})
        print(json.dumps(rows[-1]), flush=True)

    for name, folder in runs.items():
        params, state, student_folder = _run_state(folder)
        d = params["distill"]
        backbone, nets, weights = _student_nets(args.teacher, params, state)
        ks = d["k_choices"] if d["unify"] else [d["k"]]
        grid = StudentGrid(d["total_steps"], d["shift"], d["timesteps"])
        if d["unify"]:
            saved = load_k_embedding(student_folder) if student_folder.is_dir() else None
            extras[name] = {"checkpoint_step": state_step(folder),
                            "k_embedding_norm": {w: _k_norms(v) for w, v in weights.items()},
                            "k_embedding_norm_saved": _k_norms({"k_embedding.weight": saved.weight}) if saved else None,
                            "time_embedding_norm": _time_embedding_norms(args.teacher, grid.at(max(ks))),
                            "k_embed_lr": d.get("k_embed_lr"), "lr": d["lr"]}
            print(json.dumps({name: extras[name]}), flush=True)
        overrides = {k: d[k] for k in ("k", "lr", "fake_lr", "weight_decay", "lr_schedule", "warmup_steps",
                                       "grad_clip", "ema_decay", "unify", "seed")}
        overrides.update({k: d[k] for k in ("fake_grad_clip", "fake_lr_schedule", "student_weights") if k in d})
        for seed in args.seeds:
            prompts = digit_prompt_set(args.n, seed=seed)
            noise = make_noise(args.n, backbone.sample_shape, seed)
            for which, (net, emb) in nets.items():
                for k in ks:
                    score({"model": f"{name} {which}", "run": name, "weights": which, "steps": k, "nfe": k,
                           "seed": seed, "iteration": state_step(folder), "distill": overrides}, backbone,
                          batched(lambda c, z: student_sample(backbone, net, c, z, grid.at(k), emb),
                                  backbone.encode_prompts, prompts, noise), prompts)

    result = {"benchmark": "claims", "command": " ".join(["python benchmarks/claims.py", *sys.argv[1:]]),
              "n": args.n, "seeds": args.seeds, "runs": {k: str(v) for k, v in runs.items()}, "rows": rows,
              "extras": extras, "wall_s": round(time.time() - started, 1), "machine": machine_info()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else None
    if old is not None:  # runs scored in an earlier call stay (rows of the same model + seed are replaced)
        mine = {(r["model"], r["steps"], r["seed"]) for r in rows}
        result["rows"] = [r for r in old["rows"] if (r["model"], r["steps"], r["seed"]) not in mine] + rows
        result["extras"] = {**old.get("extras", {}), **extras}
        result["runs"] = {**old.get("runs", {}), **result["runs"]}
        result["commands"] = [*old.get("commands", [old["command"]]), result["command"]]
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out} ({len(result['rows'])} rows)")


if __name__ == "__main__":
    main()
