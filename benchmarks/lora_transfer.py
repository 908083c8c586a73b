"""LoRA transfer on the embedded default: does the TDM LoRA, distilled on the digits teacher, give 4-step
sampling on a custom model it never saw (the teacher fine-tuned on restyled digits)?

Runs the `lora_transfer` stage (custom model fine-tuned per style, then sampled at its 50-step CFG setting, at
4-step DDIM, and with the TDM LoRA at 4 student steps; FID against the style's held-out set + class accuracy),
adds the base teacher's rows for reference (50-step, 4-step DDIM, base + LoRA, and the saved merged student, which
must equal base + LoRA), a LoRA scale sweep per style, and low-rank extraction of the merged student.

    .venv/bin/python benchmarks/lora_transfer.py --run /path/with/outputs   # outputs/teacher_ft/model, outputs/distill
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(REPO), help="folder holding outputs/teacher_ft/model and outputs/distill")
    parser.add_argument("--out", default=None, help="stage output folder (default: <run>/outputs/lora_transfer)")
    parser.add_argument("--styles", nargs="+", default=["thick", "invert"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--scales", type=float, nargs="*", default=[0.5, 0.75, 1.25, 1.5, 2.0])
    parser.add_argument("--extract-ranks", type=int, nargs="*", default=[2, 4, 8, 16])
    args = parser.parse_args()
    torch.set_num_threads(1)

    from tdm import lora_transfer
    from tdm.backbones import load_backbone
    from tdm.config import StagePaths, load
    from tdm.data import digit_prompt_set
    from tdm.evaluation.digits import DigitsScorer, evaluate_samples
    from tdm.lora import load_lora
    from tdm.sampler import sample_student, sample_teacher
    from tdm.student import load_student

    run = Path(args.run).resolve()
    teacher, student = run / "outputs/teacher_ft/model", run / "outputs/distill/student"
    out = Path(args.out) if args.out else run / "outputs/lora_transfer"
    # Metric weights: a copy beside the stage's outputs (the style classifiers are cached there; the run's own
    # outputs are only read).
    weights = out / "weights"
    if (run / "outputs/weights").is_dir() and not weights.exists():
        shutil.copytree(run / "outputs/weights", weights)
    overrides = [f"lora_transfer.lora={run / 'outputs/distill/student_lora'}", f"lora_transfer.base={teacher}",
                 f"lora_transfer.custom_models={json.dumps(['digits:' + s for s in args.styles])}",
                 f"lora_transfer.n={args.n}", f"lora_transfer.finetune_steps={args.finetune_steps}",
                 f"eval.weights_dir={weights}"]
    cfg = load(REPO / "params.yaml", overrides)
    lt = cfg.lora_transfer
    distilled = load_student(student)
    record = distilled.record

    # 1. The stage itself (custom models fine-tuned by an earlier run are reused: the stage caches them).
    cached = [s for s in args.styles if (out / "custom" / s / "model" / "tdm_custom.json").is_file()]
    t0 = time.perf_counter()
    stage = lora_transfer.run(cfg, StagePaths(out, out / "metrics.json"), progress=False)
    stage_time = time.perf_counter() - t0
    rows = []
    for row in stage["rows"]:
        custom = row["model"].removesuffix("+tdm_lora")
        rows.append({"model": row["model"], "steps": row["steps"], "nfe": row["nfe"], "guidance": row["guidance"],
                     "fid": row["metrics"]["fid"], "accuracy": row["metrics"]["accuracy"],
                     "reference": f"{custom} held-out", "sample_time_s": row["sample_time_s"]})
    refs = stage["references"]
    ft_times = {s: json.loads((out / "custom" / s / "model" / "tdm_custom.json").read_text())["train_time_s"]
                for s in args.styles}

    # 2. The base teacher for reference: its 50-step and 4-step DDIM, base + LoRA, and the saved merged student.
    lora = load_lora(lt.lora)
    prompts = digit_prompt_set(lt.n, seed=lt.seed)
    base = load_backbone(teacher)
    g = cfg.sample.guidance
    k, total = record.k, record.total_steps
    common = {"seed": lt.seed, "batch_size": lt.batch_size}
    samples = {}
    for steps in (lt.custom_steps, lt.few_steps):
        samples[("base", steps)] = (sample_teacher(base, base.net, prompts, steps=steps, guidance=g, **common),
                                    steps * 2, g)
    on_base = lora_transfer.with_lora(base, lora, record.replace(lora_scale=1.0), student)
    samples[("base+tdm_lora", k)] = (sample_student(on_base, prompts, **common), k, 1.0)
    merged = distilled.backbone
    samples[("distilled student (merged)", k)] = (sample_student(distilled, prompts, **common), k, 1.0)
    same = samples[("base+tdm_lora", k)][0]
    merged_diff = int((same.int() - samples[("distilled student (merged)", k)][0].int()).abs().max())
    for (name, steps), (images, nfe, guidance) in samples.items():
        s = evaluate_samples(images.numpy(), prompts, weights)
        rows.append({"model": name, "steps": steps, "nfe": nfe, "guidance": guidance, "fid": s["fid"],
                     "accuracy": s["accuracy"], "reference": "digits held-out"})
    base_floor = evaluate_samples(same.numpy(), prompts, weights)["fid_floor"]

    # 3. LoRA scale sweep on every style.
    sweeps = {}
    for style in args.styles:
        scorer = DigitsScorer(weights, style)
        custom = load_backbone(out / "custom" / style / "model")
        sweeps[style] = []
        for scale in sorted({*args.scales, 1.0}):
            on_custom = lora_transfer.with_lora(custom, lora, record.replace(lora_scale=scale), student)
            scores = scorer.score(sample_student(on_custom, prompts, **common).numpy(), prompts)
            sweeps[style].append({"scale": scale, **{key: scores[key] for key in ("fid", "accuracy", "n")}})

    # 4. Low-rank extraction (the full-mode path): the merged student's delta from the teacher at lower ranks.
    from tdm.lora import extract

    extraction = []
    for rank in args.extract_ranks:
        extracted, report = extract(base.net, merged.net, rank, targets=base.lora_target_modules)
        images = sample_student(lora_transfer.with_lora(base, extracted, record.replace(lora_scale=1.0), student),
                                prompts, **common)
        s = evaluate_samples(images.numpy(), prompts, weights)
        extraction.append({"rank": rank, "relative_error": report["relative_error"],
                           "uncaptured_fraction": report["uncaptured_fraction"], "fid": s["fid"],
                           "accuracy": s["accuracy"]})

    result = {"command": " ".join(["benchmarks/lora_transfer.py", *sys.argv[1:]]), "machine": machine_info(),
              "n": lt.n, "student": {"k": k, "total_steps": total, "baked_guidance": record.guidance,
                                    "lora_rank": sorted(lora.ranks), "lora_modules": len(lora.modules)},
              "finetune_steps": args.finetune_steps, "finetune_time_s": ft_times, "stage_time_s": round(stage_time, 1),
              "finetunes_cached": cached,
              "rows": rows, "style_references": refs, "digits_fid_floor": base_floor,
              "merged_student_vs_base_plus_lora_max_pixel_diff": merged_diff, "scale_sweep": sweeps,
              "extraction": extraction}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora_transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "lora_transfer.md").write_text(markdown(result))
    print(markdown(result))


def _f(v, digits=2):
    return "" if v is None else f"{v:.{digits}f}"


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# LoRA transfer: the TDM LoRA on custom digits models it never saw", "",
        f"Command: `.venv/bin/python {r['command']}`", "",
        f"Device: {m['cpu']} (1 torch thread), commit {m['git_commit']}, torch {m['torch']}. "
        f"{r['n']} samples per row, the same prompts and starting noise in every row. The TDM LoRA (rank "
        f"{r['student']['lora_rank']}, {r['student']['lora_modules']} modules) was distilled on the base digits "
        f"teacher (K = {r['student']['k']}, total_steps {r['student']['total_steps']}, CFG "
        f"{r['student']['baked_guidance']} baked in). Each custom model is the base teacher fine-tuned for "
        f"{r['finetune_steps']} steps on restyled digits (`digits:thick`: strokes one pixel wider; `digits:invert`: "
        f"dark on light); fine-tune time {', '.join(f'{k} {v:.0f} s' for k, v in r['finetune_time_s'].items())}; "
        f"whole stage {r['stage_time_s']:.0f} s"
        + (f" (fine-tunes of {', '.join(r['finetunes_cached'])} reused from the stage's cache)."
           if r.get("finetunes_cached") else "."), "",
        "FID and class accuracy are measured against the row's reference set (a style's held-out images: the "
        "digits test split, restyled) with the digits metric classifier trained on that style (on plain digits "
        "for the base rows); its accuracy on the real held-out images is the ceiling (below).", "",
        "| model | steps | NFE | CFG | FID | class accuracy | reference |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {row['steps']} | {row['nfe']} | {row['guidance']} | {_f(row['fid'])} | "
                     f"{_f(row['accuracy'], 3)} | {row['reference']} |")
    lines += ["", "Reference points (real images, same n): "
              + "; ".join(f"{k}: FID floor {_f(v['fid_floor'])}, real accuracy {_f(v['real_accuracy'], 3)}"
                          for k, v in r["style_references"].items())
              + f"; plain digits: FID floor {_f(r['digits_fid_floor'])}.", "",
              f"Base + TDM LoRA (the LoRA file fused into the teacher) vs the saved merged student: max pixel "
              f"difference {r['merged_student_vs_base_plus_lora_max_pixel_diff']} (of 255).", ""]
    styles = list(r["scale_sweep"])
    lines += ["LoRA scale sweep (custom + TDM LoRA at 4 student steps; FID / class accuracy):", "",
              "| scale | " + " | ".join(styles) + " |", "|---|" + "---|" * len(styles)]
    for i, first in enumerate(r["scale_sweep"][styles[0]]):
        cells = [f"{_f(r['scale_sweep'][st][i]['fid'])} / {_f(r['scale_sweep'][st][i]['accuracy'], 3)}" for st in styles]
        lines.append(f"| {first['scale']} | " + " | ".join(cells) + " |")
    if r.get("extraction"):
        lines += ["", "Low-rank extraction (`tdm lora extract`, what a full-mode student goes through): the merged "
                  "student's weight delta from the teacher, truncated SVD per layer, fused back into the teacher, "
                  "4 student steps, scored against plain digits:", "",
                  "| rank | relative error | uncaptured delta | FID | class accuracy |", "|---|---|---|---|---|"]
        lines += [f"| {e['rank']} | {e['relative_error']:.4f} | {e['uncaptured_fraction']:.2e} | {_f(e['fid'])} | "
                  f"{_f(e['accuracy'], 3)} |" for e in r["extraction"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
