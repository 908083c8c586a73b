"""`tdm <stage> ...`: the command line. Each stage command validates params.yaml (+ `-S section.key=value`
overrides, DVC's syntax) before any compute, then calls the stage's `run`."""
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
            run.log_result(result, paths.metrics, paths.out_dir)
    return result


def cmd_teacher_ft(args) -> dict:
    from tdm import finetune

    cfg = _load_config(args)
    return _tracked("teacher_ft", cfg, lambda: finetune.run(cfg, progress=not args.quiet))


def cmd_distill(args) -> dict:
    from tdm import distill

    cfg = _load_config(args)
    distill.check_inputs(cfg)
    return _tracked("distill", cfg, lambda: distill.run(cfg, progress=not args.quiet))


def cmd_evaluate(args) -> dict:
    from tdm import evaluate
    from tdm.evaluation.runner import markdown_table

    cfg = _load_config(args)
    result = evaluate.run(cfg, progress=not args.quiet)
    if not args.quiet:
        print(markdown_table(result["rows"], result["metrics_skipped"]), file=sys.stderr)
    return result


def cmd_sample(args) -> dict:
    from tdm.artifacts import save_samples
    from tdm.backbones import load_backbone
    from tdm.data import digit_prompt_set, read_prompts
    from tdm.sampler import sample_images

    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"--model: not a model folder (no model_index.json): {model}")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.student and args.guidance != 1.0:
        raise ValueError("--guidance applies to the teacher; the student has CFG baked in (leave it at 1)")
    if args.prompt is not None:
        prompts = [args.prompt] * (args.n or 1)
    elif args.prompts is not None:
        listed = read_prompts(args.prompts)
        prompts = [listed[i % len(listed)] for i in range(args.n or len(listed))]
    else:
        prompts = digit_prompt_set(args.n or 100, seed=args.seed)
    if args.student and args.total_steps is None:
        from tdm.distill import student_info

        args.total_steps = student_info(model).get("total_steps")
        if args.total_steps is None:
            raise ValueError("--student needs --total-steps (the distillation's trajectory length, e.g. 900)")
    if args.steps < 1 or args.guidance < 1:
        raise ValueError("--steps must be >= 1 and --guidance >= 1")
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ValueError(f"--out must end in .npz, got {out}")
    import torch

    backbone = load_backbone(model).to("cuda" if torch.cuda.is_available() else "cpu")
    images = sample_images(backbone, backbone.net, prompts, steps=args.steps, guidance=args.guidance,
                           student=args.student, total_steps=args.total_steps, seed=args.seed,
                           batch_size=args.batch_size, progress=not args.quiet)
    npz, png = save_samples(out, images, prompts, steps=args.steps, guidance=args.guidance)
    result = {"samples": str(npz), "grid": str(png), "n": len(prompts)}
    if args.score:
        from tdm import config
        from tdm.evaluation.digits import evaluate_samples

        result.update(evaluate_samples(images.numpy(), prompts, config.load(args.params).eval.weights_dir))
    return result


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
    stage("evaluate", cmd_evaluate, "sample + score teacher, student (and LoRA-transfer rows) -> metrics/evaluate.json")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    for var, value in (("HF_HUB_OFFLINE", "1"), ("DO_NOT_TRACK", "true"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("DVC_NO_ANALYTICS", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
        os.environ.setdefault(var, value)
    args = build_parser().parse_args(argv)
    from tdm.config import ConfigError
    from tdm.tracking import TrackingUnavailable

    try:
        _set_threads(args.threads)
        result = args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, TrackingUnavailable) as err:
        print(f"tdm: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
