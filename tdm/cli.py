"""`tdm <stage> ...`: the command line. Each stage command validates params.yaml (+ `-S section.key=value`
overrides, DVC's syntax) before any compute, then calls the stage's `run`.

Exit codes: 0 done (the result as JSON on stdout; status lines go to stderr), 2 bad input (one `tdm: error:`
line naming the key or path), 3 training diverged (one line; the last good checkpoint is kept)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _set_threads(threads: int | None) -> None:
    import torch

    # One thread per process unless told otherwise: on small shared CPUs two threads thrash (10-100x slower).
    n = threads or int(os.environ.get("TDM_NUM_THREADS", "0")) or (None if torch.cuda.is_available() else 1)
    if n:
        torch.set_num_threads(n)


def _load_config(args):
    from tdm import config

    return config.load(args.params, args.set or [])


def _tracked(stage: str, cfg, run_fn) -> dict:
    """Run a stage inside its MLflow run (tdm/tracking.py); an unreachable server fails here, before compute."""
    from tdm import tracking
    from tdm.config import StagePaths, dump

    paths = StagePaths.of(stage)
    tags = {"backbone": cfg.model.family, "k": str(cfg.distill.k)}
    with tracking.stage_run(stage, dump(cfg), extra_tags=tags) as run:
        result = run_fn()
        if run is not None:
            try:  # tracking observes: a logging failure must not fail a stage whose outputs are written
                run.log_result(result, paths.metrics, paths.out_dir)
            except Exception as err:
                print(f"tdm: warning: {stage}: MLflow logging of the results failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); the stage's outputs are written",
                      file=sys.stderr)
    return result


def cmd_teacher_ft(args) -> dict:
    from tdm import teacher_ft

    cfg = _load_config(args)
    return _tracked("teacher_ft", cfg, lambda: teacher_ft.run(cfg, progress=not args.quiet))


def cmd_distill(args) -> dict:
    from tdm import distill

    cfg = _load_config(args)
    distill.check_inputs(cfg)
    return _tracked("distill", cfg, lambda: distill.run(cfg, progress=not args.quiet))


def cmd_evaluate(args) -> dict:
    from tdm import evaluate
    from tdm.evaluation.table import markdown_table

    cfg = _load_config(args)
    result = _tracked("evaluate", cfg, lambda: evaluate.run(cfg, progress=not args.quiet))
    if not args.quiet:
        print(markdown_table(result["rows"], result["metrics_skipped"]), file=sys.stderr)
    return result


def cmd_score(args) -> dict:
    from tdm import config
    from tdm.evaluation.runner import Evaluator, MetricSettings, score_sets
    from tdm.evaluation.table import markdown_table

    cfg = config.load(args.params, args.set or [])
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for path in [*args.samples, *([args.reference] if args.reference else [])]:
        if not Path(path).exists():
            raise FileNotFoundError(f"not found: {path}")
    evaluator = Evaluator(metrics, MetricSettings.from_config(cfg, args.reference), skip_missing=args.skip_missing)
    rows = score_sets([{"samples": p} for p in args.samples], evaluator)
    print(markdown_table(rows, evaluator.skipped), file=sys.stderr)
    return {"rows": [r.to_dict() for r in rows], "metrics_skipped": evaluator.skipped}


def cmd_report(args) -> dict:
    from tdm import report

    cfg = _load_config(args)
    return _tracked("report", cfg, lambda: report.run(cfg))


def _open_student(model: Path, steps: int, total_steps: int | None):
    """The student in `model` (its record; `--total-steps` overrides the record's grid length). A folder
    without a record (a plain model run as a student) needs --total-steps."""
    from tdm.backbones import family_of, load_backbone
    from tdm.student import RECORD_FILE, Student, StudentRecord, load_student

    if StudentRecord.find(model) is not None:
        student = load_student(model)
        if total_steps is not None:
            student.record = student.record.replace(total_steps=total_steps)
    elif total_steps is None:
        raise ValueError(f"--student: {model} has no {RECORD_FILE}; give --total-steps (the distillation's "
                         "trajectory length, e.g. 900)")
    else:
        backbone = load_backbone(model)
        student = Student(backbone, backbone.net, StudentRecord(family=family_of(model), k=steps,
                                                                total_steps=total_steps))
    student.record.check_k(steps)
    return student


def cmd_sample(args) -> dict:
    from tdm.artifacts import save_samples
    from tdm.data import prompt_set

    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"--model: not a model folder (no model_index.json): {model}")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.student and args.guidance != 1.0:
        raise ValueError("--guidance applies to the teacher; the student has CFG baked in (leave it at 1)")
    if args.steps < 1 or args.guidance < 1:
        raise ValueError("--steps must be >= 1 and --guidance >= 1")
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ValueError(f"--out must end in .npz, got {out}")
    if args.prompt is not None:
        prompts = [args.prompt] * (args.n or 1)
    else:
        prompts = prompt_set(args.prompts or "digits", args.n, seed=args.seed)
    import torch

    from tdm.sampler import sample_student, sample_teacher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = {"seed": args.seed, "batch_size": args.batch_size, "progress": not args.quiet}
    if args.student:
        student = _open_student(model, args.steps, args.total_steps).to(device)
        images = sample_student(student, prompts, k=args.steps, **common)
    else:
        from tdm.backbones import load_backbone

        backbone = load_backbone(model).to(device)
        images = sample_teacher(backbone, backbone.net, prompts, steps=args.steps, guidance=args.guidance, **common)
    npz, png = save_samples(out, images, prompts, steps=args.steps, guidance=args.guidance)
    result = {"samples": str(npz), "grid": str(png), "n": len(prompts)}
    if args.score:
        from tdm import config
        from tdm.evaluation.digits import evaluate_samples

        result.update(evaluate_samples(images.numpy(), prompts, config.load(args.params).eval.weights_dir))
    return result


def cmd_lora_transfer(args) -> dict:
    from tdm import lora_transfer

    cfg = _load_config(args)
    lora_transfer.check_inputs(cfg)
    return _tracked("lora_transfer", cfg, lambda: lora_transfer.run(cfg, progress=not args.quiet))


def cmd_export(args) -> dict:
    """`tdm export`: the student as stock diffusers pipeline folders, one per K (tdm/export.py)."""
    from tdm.export import export_student

    if not (Path(args.student) / "model_index.json").is_file():
        raise FileNotFoundError(f"--student: not a model folder (no model_index.json): {args.student}")
    folders = export_student(args.student, args.out, args.steps)
    return {"out": [str(f) for f in folders],
            "load": "DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=K, guidance_scale=1.0)"}


def _unify_lora_refusal(lora_path: str) -> None:
    """A TDM-unify student's LoRA leaves its K embedding behind (it lives beside the student, not in the LoRA):
    a stock loader would run a different model. Refuse, pointing at `tdm export`, which folds K in."""
    from tdm.student import StudentRecord

    record = StudentRecord.find(Path(lora_path).parent / "student")
    if record is not None and record.unify:
        raise ValueError(f"{lora_path}: the LoRA of a TDM-unify student cannot carry its K embedding into a stock "
                         f"loader (it would sample without K); export pipelines with the K folded in instead: "
                         f"`tdm export --student {Path(lora_path).parent / 'student'} --out exported/`")


def cmd_lora(args) -> dict:
    """`tdm lora export|info|fuse|extract`: the student's LoRA as files other tools load (docs/lora.md)."""
    from tdm import lora as L
    from tdm.backbones import load_backbone

    if args.lora_command == "extract":
        base, student = load_backbone(args.base), load_backbone(args.student)
        lora, report = L.extract(base.net, student.net, args.rank, targets=base.lora_target_modules)
        out = L.save_lora(lora, args.out, args.format, args.component)
        if out.is_dir():
            (out / "tdm_extraction.json").write_text(json.dumps({**report, "base": args.base,
                                                                 "student": args.student}, indent=2))
        return {"out": str(out), "format": args.format, **report}
    if args.lora_command == "export":
        _unify_lora_refusal(args.lora)
    lora = L.load_lora(args.lora, args.component)
    if args.lora_command == "info":
        rows = lora.summary()
        return {"lora": args.lora, "format": lora.meta.get("source_format"), "modules": len(rows),
                "ranks": sorted(lora.ranks), "parameters": sum(m.down.numel() + m.up.numel() for m in lora.modules.values()),
                "touches": rows if args.verbose else lora.module_patterns()}
    if args.scale < 0:
        raise ValueError(f"--scale must be >= 0, got {args.scale}")
    if args.lora_command == "fuse":
        out = L.fuse_into_model(args.model, lora, args.out, args.scale)
        return {"out": str(out), "scale": args.scale, "modules": len(lora.modules)}
    if lora.meta.get("flat_names"):  # kohya names: the model tells where each module lives
        if args.model is None:
            raise ValueError("--model is needed to export a kohya LoRA to another format (to resolve module names)")
        lora = lora.resolved(load_backbone(args.model).net)
    out = L.save_lora(lora.scaled(args.scale), args.out, args.format, args.component)
    return {"out": str(out), "format": args.format, "scale": args.scale, "modules": len(lora.modules)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdm", description=__doc__)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: $TDM_NUM_THREADS, else 1 on CPU-only machines)")
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, func, help: str):
        p = sub.add_parser(name, help=help)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("-S", "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a param")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    stage("teacher-ft", cmd_teacher_ft, "fine-tune (digits: train) the teacher -> outputs/teacher_ft/model")
    stage("distill", cmd_distill, "TDM-distil the teacher into a K-step student -> outputs/distill/student")
    stage("report", cmd_report, "tables, sample grids and plots of every stage -> outputs/report/index.html")
    stage("evaluate", cmd_evaluate, "sample + score teacher, student (and LoRA-transfer rows) -> metrics/evaluate.json")

    p = sub.add_parser("score", help="score sample sets (tdm sample npz files or image folders): a row per set")
    p.add_argument("samples", nargs="+", help="npz files from `tdm sample`, or image folders (+ metadata.jsonl)")
    p.add_argument("--metrics", default="digits_fid,class_accuracy",
                   help="comma-separated: digits_fid, class_accuracy, hps, aesthetic, clip, fid, vbench_<dim>")
    p.add_argument("--reference", default=None, help="reference images for fid (folder or npz)")
    p.add_argument("--skip-missing", action="store_true", help="skip metrics whose weights are missing")
    p.add_argument("--params", default="params.yaml", help="params file (eval section: weights_dir, models)")
    p.add_argument("-S", "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a param")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("sample", help="sample a model to an npz (+ PNG grid)")
    p.add_argument("--model", required=True, help="a saved model folder (e.g. outputs/teacher_ft/model)")
    p.add_argument("--steps", type=int, default=50, help="teacher DDIM steps, or K with --student")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (teacher only)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt, repeated --n times")
    src.add_argument("--prompts", help="a .txt/.jsonl/.csv prompt file (cycled to --n)")
    p.add_argument("--n", type=int, default=None, help="number of samples (default: 100, or one per listed prompt)")
    p.add_argument("--student", action="store_true", help="run the deterministic K-step student trajectory")
    p.add_argument("--total-steps", type=int, default=None,
                   help="student trajectory length (default: from the student's tdm_student.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", required=True, help="output .npz (a .png grid is written beside it)")
    p.add_argument("--score", action="store_true", help="also score with the digits toy metrics")
    p.add_argument("--params", default="params.yaml", help="params file (for eval.weights_dir)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="the student as stock diffusers pipeline folders, one per K (K embedding "
                                      "folded in, the TDM scheduler of its grid)")
    p.add_argument("--student", required=True, help="a distilled student folder (outputs/distill/student)")
    p.add_argument("--out", required=True, help="output folder: one pipeline folder k<K>/ per K")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="the Ks to export (default: the Ks the student was trained for)")
    p.set_defaults(func=cmd_export)

    stage("lora-transfer", cmd_lora_transfer,
          "the TDM LoRA on custom models: many-step custom vs custom + LoRA at K steps -> outputs/lora_transfer")
    p = sub.add_parser("lora", help="export / inspect / fuse / extract the student's LoRA (docs/lora.md)")
    lsub = p.add_subparsers(dest="lora_command", required=True)
    for name, help in (("export", "write a LoRA as diffusers (pipe.load_lora_weights), kohya (webui) or peft"),
                       ("info", "which modules a LoRA touches, its ranks and size"),
                       ("fuse", "a merged checkpoint: a model folder with the LoRA fused in")):
        q = lsub.add_parser(name, help=help)
        q.add_argument("lora", help="a LoRA: peft/diffusers folder or .safetensors file")
        q.add_argument("--component", default="unet", help="the denoiser's key prefix in diffusers files")
        if name == "info":
            q.add_argument("-v", "--verbose", action="store_true", help="list every module")
        else:
            q.add_argument("--out", required=True, help="output folder (kohya: a .safetensors file)")
            q.add_argument("--scale", type=float, default=1.0, help="LoRA strength baked into the output")
            q.add_argument("--model", required=name == "fuse", help="model folder or hub id (fuse: the base; "
                           "export: resolves kohya module names)")
        if name == "export":
            q.add_argument("--format", required=True, choices=("diffusers", "kohya", "peft"))
    q = lsub.add_parser("extract", help="a full-mode student as a LoRA: truncated SVD of its weight delta")
    q.add_argument("--base", required=True, help="the teacher model folder the student was distilled from")
    q.add_argument("--student", required=True, help="the full-mode student model folder")
    q.add_argument("--rank", type=int, default=16)
    q.add_argument("--format", default="peft", choices=("diffusers", "kohya", "peft"))
    q.add_argument("--component", default="unet")
    q.add_argument("--out", required=True, help="output folder (kohya: a .safetensors file)")
    p.set_defaults(func=cmd_lora)
    return parser


def main(argv: list[str] | None = None) -> int:
    for var, value in (("HF_HUB_OFFLINE", "1"), ("DO_NOT_TRACK", "true"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("DVC_NO_ANALYTICS", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
        os.environ.setdefault(var, value)
    args = build_parser().parse_args(argv)
    from tdm.config import ConfigError
    from tdm.tracking import TrackingUnavailable
    from tdm.training import TrainingDiverged

    try:
        _set_threads(args.threads)
        result = args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, TrackingUnavailable) as err:
        print(f"tdm: error: {err}", file=sys.stderr)
        return 2  # bad input: the Prefect flow does not retry it
    except TrainingDiverged as err:  # the last good checkpoint is kept; an exact resume would diverge again
        print(f"tdm: error: {err}", file=sys.stderr)
        return 3
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
