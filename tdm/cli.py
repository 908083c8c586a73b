"""`tdm <stage> ...`: the command line. Each stage command validates params.yaml (+ `-S section.key=value`
overrides, DVC's syntax) before any compute, then calls the stage's `run`.

Before any model loads, a stage command also checks every model folder it reads (configs parse, weights
present), every prompt / sample file, and that every path it writes can be written (tdm/outputs.py); then it
takes its output folder's one-writer lock (a second run on the same folder fails at once, naming the first).

Exit codes: 0 done (the result as JSON on stdout; status lines go to stderr), 2 bad input, an output that cannot
be written (`cannot write <path>: <reason>`: read-only, full disk, a file in the way) or a folder another run
holds (one `tdm: error:` line naming the key, flag or path; credentials redacted), 3 training diverged (one
line; the last good checkpoint is kept). `-q` after the command (`tdm distill -q`) silences tdm's and the
libraries' (transformers, diffusers, huggingface_hub) progress bars."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `tdm: error:` line (exit 2) like every other bad input."""

    def error(self, message: str):
        sub = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"tdm: error: {sub}{message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    from tdm.config import SEED_MAX

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _set_threads(threads: int | None) -> None:
    """torch's CPU threads: --threads, else $TDM_NUM_THREADS, else 1 on CPU-only machines. ValueError naming
    TDM_NUM_THREADS when it is not an integer >= 1."""
    env = os.environ.get("TDM_NUM_THREADS", "").strip()
    if threads is None and env:
        try:
            threads = int(env)
        except ValueError:
            raise ValueError(f"TDM_NUM_THREADS: expected an integer >= 1, got {env!r}") from None
        if threads < 1:
            raise ValueError(f"TDM_NUM_THREADS: must be >= 1, got {threads}")
    import torch

    # One thread per process unless told otherwise: on small shared CPUs two threads thrash (10-100x slower).
    n = threads or (None if torch.cuda.is_available() else 1)
    if n:
        torch.set_num_threads(n)


def _quiet_libraries() -> None:
    """`-q`: also silence the loading bars of transformers, diffusers and huggingface_hub (their own switches)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def _load_config(args):
    from tdm import config

    return config.load(args.params, args.set or [])


_writing: Path | None = None  # the output the running command writes (named by a write error without a path)


def _check_model(path: str | Path, flag: str) -> Path:
    """A model folder given on the command line, checked without loading it (errors name the flag)."""
    from tdm.backbones import check_model

    try:
        return check_model(path)[0]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{flag}: {err}") from None
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


# The folders a stage makes inside its output folder (a file in the way of one fails before any model loads).
STAGE_FOLDERS = {"teacher_ft": ("checkpoints", "model"), "prompt_store": ("store",),
                 "distill": ("checkpoints", "student", "student_lora"),
                 "lora_transfer": ("custom", "samples", "references")}


def _stage_outputs(stage: str, weights_dir: str | None) -> tuple[list[Path], list[Path]]:
    """(files, folders) a stage writes: its metrics file and lock, its output folder, and the metric-weights
    cache when it does not exist yet (an existing one may be a read-only shared cache holding every weight)."""
    from tdm.config import StagePaths
    from tdm.outputs import lock_path

    paths = StagePaths.of(stage)
    files = [paths.metrics, lock_path(paths.out_dir)]
    folders = [paths.out_dir, *(paths.out_dir / sub for sub in STAGE_FOLDERS.get(stage, ()))]
    if weights_dir is not None and not Path(weights_dir).expanduser().is_dir():
        folders.append(Path(weights_dir).expanduser())
    return files, folders


def _run_stage(stage: str, args, cfg, run_fn, check=None, weights_dir: str | None = None) -> dict:
    """A stage command: its inputs (`check`) and every path it writes checked before any model loads, then the
    stage run under its output folder's one-writer lock (`tdm.outputs.stage_lock`) and its MLflow run."""
    global _writing
    from tdm.config import StagePaths
    from tdm.outputs import check_writable, stage_lock

    if check is not None:
        check(cfg)
    files, folders = _stage_outputs(stage, weights_dir)
    check_writable(files, folders)
    from tdm import tracking

    if tracking.enabled():  # an unreachable server fails before anything is created
        tracking.check_server(tracking.tracking_uri())
    if getattr(args, "quiet", False):
        _quiet_libraries()
    out_dir = StagePaths.of(stage).out_dir
    # One writer per folder; under `accelerate launch` / torchrun the main process holds it for all ranks.
    main_process = int(os.environ.get("RANK", "0")) == 0
    with stage_lock(out_dir, stage.replace("_", "-")) if main_process else contextlib.nullcontext():
        _writing = out_dir
        return _tracked(stage, cfg, run_fn)


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
                text = tracking.redact(str(err).splitlines()[0] if str(err) else "")
                print(f"tdm: warning: {stage}: MLflow logging of the results failed ({type(err).__name__}: "
                      f"{text}); the stage's outputs are written", file=sys.stderr)
    return result


def cmd_teacher_ft(args) -> dict:
    from tdm import teacher_ft

    cfg = _load_config(args)
    return _run_stage("teacher_ft", args, cfg, lambda: teacher_ft.run(cfg, progress=not args.quiet),
                      teacher_ft.check_inputs, cfg.eval.weights_dir)


def cmd_prompt_store(args) -> dict:
    from tdm import prompt_store

    cfg = _load_config(args)
    return _run_stage("prompt_store", args, cfg, lambda: prompt_store.run(cfg, progress=not args.quiet),
                      prompt_store.check_inputs)


def cmd_distill(args) -> dict:
    from tdm import distill

    if args.dry_run:  # the memory plan: configs on the meta device, no weights, no outputs (tdm/memory_plan.py)
        from tdm import memory_plan

        if args.device_memory is not None and not args.device_memory > 0:
            raise ValueError(f"--device-memory must be > 0 GiB, got {args.device_memory}")
        cfg = memory_plan.load_config(args.params, args.set or [])
        processes = args.num_processes or int(os.environ.get("WORLD_SIZE", "1"))
        return memory_plan.run_dry(cfg, None if args.device_memory is None else args.device_memory * 2**30, processes)
    cfg = _load_config(args)
    return _run_stage("distill", args, cfg, lambda: distill.run(cfg, progress=not args.quiet), distill.check_inputs,
                      cfg.eval.weights_dir)


def cmd_evaluate(args) -> dict:
    from tdm import evaluate
    from tdm.evaluation.table import markdown_table

    cfg = _load_config(args)
    e = cfg.evaluate
    opts = dict(prompt_store=e.prompt_store, lora_scheduler=e.lora_scheduler, lora_flow_shift=e.lora_flow_shift)
    result = _run_stage("evaluate", args, cfg, lambda: evaluate.run(cfg, progress=not args.quiet, **opts),
                        lambda c: evaluate.check_inputs(c, **opts), cfg.eval.weights_dir)
    if not args.quiet:
        print(markdown_table(result["rows"], result["metrics_skipped"]), file=sys.stderr)
    for name, why in (result.get("metrics_skipped") or {}).items():  # shown even with -q: the rows lack it
        print(f"tdm: evaluate: metric {name} skipped (evaluate.skip_missing): {why}", file=sys.stderr)
    return result


def cmd_score(args) -> dict:
    from tdm import config
    from tdm.evaluation import METRICS, is_metric

    cfg = config.load(args.params, args.set or [])
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if not is_metric(m)]
    if unknown or not metrics:
        raise ValueError(f"--metrics: unknown metric(s) {unknown} (known: {', '.join(METRICS)}, vbench_<dimension>)"
                         if unknown else "--metrics: need at least one metric")
    from tdm.data import check_sample_set

    for path in args.samples:
        check_sample_set(path)
    if args.reference and not Path(args.reference).exists():
        raise FileNotFoundError(f"--reference: not found: {args.reference}")
    if args.reference and Path(args.reference).is_file():
        check_sample_set(args.reference)
    weights = Path(cfg.eval.weights_dir).expanduser()
    if not weights.is_dir():
        from tdm.outputs import check_writable

        check_writable(folders=[weights])
    from tdm.evaluation.runner import Evaluator, MetricSettings, score_sets
    from tdm.evaluation.table import markdown_table

    evaluator = Evaluator(metrics, MetricSettings.from_config(cfg, args.reference), skip_missing=args.skip_missing)
    rows = score_sets([{"samples": p} for p in args.samples], evaluator)
    print(markdown_table(rows, evaluator.skipped), file=sys.stderr)
    return {"rows": [r.to_dict() for r in rows], "metrics_skipped": evaluator.skipped}


def cmd_report(args) -> dict:
    from tdm import report

    cfg = _load_config(args)
    return _run_stage("report", args, cfg, lambda: report.run(cfg))


def _student_record(model: Path, steps: int, total_steps: int | None):
    """The record `tdm sample --student` samples by, checked before loading: the folder's own (with
    `--total-steps` in place of its grid length) or, for a plain model folder, one made of --steps and
    --total-steps (required then). Raises ValueError naming the flag."""
    from tdm.backbones import family_of
    from tdm.student import RECORD_FILE, StudentRecord

    record = StudentRecord.find(model)
    if record is None:
        if total_steps is None:
            raise ValueError(f"--student: {model} has no {RECORD_FILE}; give --total-steps (the distillation's "
                             "trajectory length, e.g. 900)")
        record = StudentRecord(family=family_of(model), k=steps, total_steps=total_steps)
    elif total_steps is not None:
        record = record.replace(total_steps=total_steps)
    try:
        record.check_k(steps)
    except ValueError as err:
        raise ValueError(f"--steps: {err}") from None
    return record


def _open_student(model: Path, record):
    """The student in `model`, sampled by `record` (`_student_record`)."""
    from tdm.backbones import load_backbone
    from tdm.student import Student, StudentRecord, load_student

    if StudentRecord.find(model) is not None:
        student = load_student(model)
        student.record = record
        return student
    backbone = load_backbone(model)
    return Student(backbone, backbone.net, record)


def _check_out(out: Path, flag: str = "--out", folder: bool = False) -> None:
    global _writing
    from tdm.outputs import check_writable

    check_writable(folders=[out]) if folder else check_writable(files=[out])
    _writing = out


def _check_external(args, model: Path):
    """`tdm sample --lora / --scheduler / --flow-shift`: the LoRA, its scale and the scheduler checked from files
    (tdm.external.check_external), errors naming the flag."""
    from tdm.external import check_external

    scale = 1.0 if args.lora_scale is None else args.lora_scale
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"--lora-scale: must be a finite number >= 0, got {scale}")
    if args.lora is not None and not Path(args.lora).exists():
        raise FileNotFoundError(f"--lora: not found: {args.lora}")
    flags = {"lora": "--lora", "lora_scale": "--lora-scale", "scheduler": "--scheduler", "flow_shift": "--flow-shift",
             "model": "--model"}
    try:
        return check_external(model, args.lora, scale, args.scheduler, args.flow_shift)
    except (FileNotFoundError, ValueError) as err:
        text = str(err)
        for key, flag in flags.items():
            if text.startswith(key + ":"):
                raise type(err)(flag + text[len(key):]) from None
        raise type(err)(f"--scheduler: {text}" if args.scheduler is not None else text) from None


def cmd_sample(args) -> dict:
    from tdm.backbones import train_timesteps
    from tdm.data import prompt_set

    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"--model: not a model folder (no model_index.json): {model}")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.student and args.guidance != 1.0:
        raise ValueError("--guidance applies to the teacher; the student has CFG baked in (leave it at 1)")
    if args.solver_order is not None and not args.student:
        raise ValueError("--solver-order applies to --student (the teacher samples with DDIM over --steps)")
    if args.steps < 1 or args.guidance < 1:
        raise ValueError("--steps must be >= 1 and --guidance >= 1")
    external = args.lora is not None or args.scheduler is not None or args.flow_shift is not None
    if args.lora is None and args.lora_scale is not None:
        raise ValueError("--lora-scale applies to --lora (the strength of the LoRA on the teacher)")
    if external and args.student:
        flag = "--lora" if args.lora is not None else "--scheduler" if args.scheduler is not None else "--flow-shift"
        raise ValueError(f"{flag} samples a teacher (+ LoRA) with a diffusers scheduler; --student samples a "
                         f"tdm student on its own grid: give one of them")
    if args.total_steps is not None and args.total_steps < 2:
        raise ValueError(f"--total-steps must be >= 2, got {args.total_steps}")
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ValueError(f"--out must end in .npz, got {out}")
    _check_model(model, "--model")
    external_parts = _check_external(args, model) if external else None
    schedule_len = train_timesteps(model)
    record = _student_record(model, args.steps, args.total_steps) if args.student else None
    if record is not None and record.total_steps > schedule_len:
        raise ValueError(f"--total-steps: {record.total_steps} exceeds the model's {schedule_len} training timesteps")
    if record is None and args.steps > schedule_len:
        raise ValueError(f"--steps: {args.steps} exceeds the model's {schedule_len} training timesteps")
    if args.prompt is not None:
        prompts = [args.prompt] * (args.n or 1)
    else:
        try:
            prompts = prompt_set(args.prompts or "digits", args.n, seed=args.seed)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"--prompts: {err}") from None
    if args.score:
        from tdm import config

        weights_dir = config.load(args.params).eval.weights_dir
    _check_out(out)
    _check_out(out.with_suffix(".png"))
    if args.quiet:
        _quiet_libraries()
    import torch

    from tdm.artifacts import save_samples
    from tdm.sampler import sample_student, sample_teacher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = {"seed": args.seed, "batch_size": args.batch_size, "progress": not args.quiet}
    recipe = None
    if external:
        from tdm.external import load_external, sample_external

        scale = 1.0 if args.lora_scale is None else args.lora_scale
        student = load_external(model, args.lora, scale, args.scheduler, args.flow_shift, device)
        images = sample_external(student, prompts, steps=args.steps, guidance=args.guidance, **common)
        recipe = student.recipe(args.steps, args.guidance)
    elif args.student:
        student = _open_student(model, record).to(device)
        images = sample_student(student, prompts, k=args.steps, solver_order=args.solver_order, **common)
    else:
        from tdm.backbones import load_backbone

        backbone = load_backbone(model).to(device)
        images = sample_teacher(backbone, backbone.net, prompts, steps=args.steps, guidance=args.guidance, **common)
    npz, png = save_samples(out, images, prompts, steps=args.steps, guidance=args.guidance)
    result = {"samples": str(npz), "grid": str(png), "n": len(prompts)}
    if recipe is not None:
        result.update(recipe)
    if args.score:
        from tdm.evaluation.digits import evaluate_samples

        result.update(evaluate_samples(images.numpy(), prompts, weights_dir))
    return result


def cmd_lora_transfer(args) -> dict:
    from tdm import lora_transfer

    cfg = _load_config(args)
    return _run_stage("lora_transfer", args, cfg, lambda: lora_transfer.run(cfg, progress=not args.quiet),
                      lora_transfer.check_inputs, cfg.eval.weights_dir)


def cmd_export(args) -> dict:
    """`tdm export`: the student as stock diffusers pipeline folders, one per K (tdm/export.py), with the model
    card, recipe, sample grid, evaluation table and LoRA files a Hub repo needs (tdm/publish.py)."""
    from tdm.publish import check_publish_inputs, export_for_hub
    from tdm.student import StudentRecord

    if not (Path(args.student) / "model_index.json").is_file():
        raise FileNotFoundError(f"--student: not a model folder (no model_index.json): {args.student}")
    _check_model(args.student, "--student")
    try:
        StudentRecord.load(args.student)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"--student: {err}") from None
    check_publish_inputs(args.eval, args.samples)
    _check_out(Path(args.out), folder=True)
    result = export_for_hub(args.student, args.out, args.steps, solver_order=args.solver_order, eval_path=args.eval,
                            samples=args.samples, base_model=args.base_model, license=args.license)
    return {"out": result["folders"], "folder": result["out"], "card": result["card"], "files": result["files"],
            "load": "DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=K, guidance_scale=1.0)",
            "push": f"tdm push {result['out']} --repo-id <owner/name>"}


def cmd_push(args) -> dict:
    """`tdm push`: an export folder to a Hub model repo through huggingface_hub (tdm/publish.py)."""
    from tdm.publish import push

    return push(args.folder, args.repo_id, dry_run=args.dry_run, private=args.private, revision=args.revision,
                commit_message=args.commit_message)


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

    for flag in ("base", "student", "model"):
        if getattr(args, flag, None) is not None:
            _check_model(getattr(args, flag), f"--{flag}")
    if getattr(args, "lora", None) is not None and not Path(args.lora).exists():
        raise FileNotFoundError(f"LoRA not found: {args.lora}")
    if getattr(args, "out", None) is not None:
        out = Path(args.out)
        _check_out(out, folder=not (args.lora_command != "fuse" and getattr(args, "format", None) == "kohya"))
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
    parser = _Parser(prog="tdm", description=__doc__)
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: $TDM_NUM_THREADS, else 1 on CPU-only machines)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def stage(name: str, func, help: str):
        p = sub.add_parser(name, help=help)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("-S", "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a param")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    stage("teacher-ft", cmd_teacher_ft, "fine-tune (digits: train) the teacher -> outputs/teacher_ft/model")
    stage("prompt-store", cmd_prompt_store, "encode the prompt set once with the teacher's text encoders -> "
                                            "outputs/prompt_store/store (distill.prompt_store reads it)")
    p = stage("distill", cmd_distill, "TDM-distil the teacher into a K-step student -> outputs/distill/student")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory plan per process (weights, gradients, optimiser, activations vs the device; "
                        "configs only, nothing loaded or written: docs/memory.md) and exit")
    p.add_argument("--device-memory", type=_finite, default=None, metavar="GIB",
                   help="--dry-run: the device's memory in GiB (default: CUDA device 0's)")
    p.add_argument("--num-processes", type=_positive_int, default=None,
                   help="--dry-run: processes (GPUs) the batch is split over (default: $WORLD_SIZE, else 1)")
    stage("report", cmd_report, "tables, sample grids and plots of every stage -> outputs/report/index.html")
    stage("evaluate", cmd_evaluate, "sample + score teacher, student (and LoRA-transfer rows) -> metrics/evaluate.json")

    p = sub.add_parser("score", help="score sample sets (tdm sample npz files or image folders): a row per set")
    p.add_argument("samples", nargs="+", help="npz files from `tdm sample`, or image folders (+ metadata.jsonl)")
    p.add_argument("--metrics", default="digits_fid,class_accuracy,digits_view2",
                   help="comma-separated: digits_fid, class_accuracy, digits_view2 (the second digits view: KID + "
                        "another classifier), hps, aesthetic, clip, fid, vbench_<dim>")
    p.add_argument("--reference", default=None, help="reference images for fid (folder or npz)")
    p.add_argument("--skip-missing", action="store_true", help="skip metrics whose weights are missing")
    p.add_argument("--params", default="params.yaml", help="params file (eval section: weights_dir, models)")
    p.add_argument("-S", "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a param")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("sample", help="sample a model to an npz (+ PNG grid)")
    p.add_argument("--model", required=True, help="a saved model folder (e.g. outputs/teacher_ft/model)")
    p.add_argument("--steps", type=_positive_int, default=50, help="teacher DDIM steps, or K with --student")
    p.add_argument("--guidance", type=_finite, default=1.0, help="classifier-free guidance scale (teacher only)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt, repeated --n times")
    src.add_argument("--prompts", help="a .txt/.jsonl/.csv prompt file (cycled to --n)")
    p.add_argument("--n", type=_positive_int, default=None, help="number of samples (default: 100, or one per listed prompt)")
    p.add_argument("--student", action="store_true", help="run the deterministic K-step student trajectory")
    p.add_argument("--total-steps", type=int, default=None,
                   help="student trajectory length (default: from the student's tdm_student.json)")
    p.add_argument("--solver-order", type=int, choices=(1, 2), default=None,
                   help="student: 1 DDIM between grid points (the trajectory it was trained on), 2 DPM-Solver++(2M) "
                        "over the same grid (default: the student's record, 1 unless exported with 2)")
    p.add_argument("--lora", default=None,
                   help="an external student: a LoRA (diffusers / kohya / peft file or folder) on the --model teacher, "
                        "sampled by the stock pipeline's loop with a diffusers scheduler (docs/publish.md)")
    p.add_argument("--lora-scale", type=_finite, default=None,
                   help="--lora: its strength, as set_adapters(..., adapter_weights=[s]) (default 1; the TDM SD3 "
                        "releases: 0.125)")
    p.add_argument("--scheduler", default=None,
                   help="sample with this diffusers scheduler instead of tdm's DDIM: a scheduler_config.json (or a "
                        "folder with one) or a class name, built from the teacher's config (e.g. "
                        "DPMSolverMultistepScheduler; on a flow teacher in its flow mode). Default with --lora: the "
                        "teacher's own scheduler")
    p.add_argument("--flow-shift", type=_finite, default=None,
                   help="the scheduler's flow shift (flow_shift / shift), e.g. 3 for the SD3 releases' DPM-Solver")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=250)
    p.add_argument("--out", required=True, help="output .npz (a .png grid is written beside it)")
    p.add_argument("--score", action="store_true", help="also score with the digits toy metrics")
    p.add_argument("--params", default="params.yaml", help="params file (for eval.weights_dir)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="the student as stock diffusers pipeline folders, one per K (K embedding "
                                      "folded in, the TDM scheduler of its grid)")
    p.add_argument("--student", required=True, help="a distilled student folder (outputs/distill/student)")
    p.add_argument("--out", required=True, help="output folder: one pipeline folder k<K>/ per K")
    p.add_argument("--steps", type=_positive_int, nargs="+", default=None,
                   help="the Ks to export (default: the Ks the student was trained for)")
    p.add_argument("--solver-order", type=int, choices=(1, 2), default=None,
                   help="how the exported scheduler (and record) step the grid: 1 DDIM, 2 DPM-Solver++(2M) "
                        "(default: the student's record; benchmarks/results/student_multistep.md)")
    p.add_argument("--eval", default=None, help="an evaluation file (the evaluate stage's eval.json / "
                   "metrics/evaluate.json) for the card's table, with its protocol columns")
    p.add_argument("--samples", default=None, help="a `tdm sample` .npz (or its .png) for the card's sample grid "
                   "(default: 4 samples of the first K rendered at export)")
    p.add_argument("--base-model", default=None, help="the card's base_model (default: the student's teacher when "
                   "it is a hub id, else the teacher card's base_model)")
    p.add_argument("--license", default=None, help="the card's license (default: the teacher card's, else unknown)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload an export folder to a Hugging Face Hub model repo (huggingface_hub)")
    p.add_argument("folder", help="a folder written by `tdm export`")
    p.add_argument("--repo-id", required=True, help="the Hub model repo, owner/name (created if missing)")
    p.add_argument("--dry-run", action="store_true", help="list the files and sizes it would upload; no network")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="the branch to push to (default: main)")
    p.add_argument("--commit-message", default=None)
    p.set_defaults(func=cmd_push)

    stage("lora-transfer", cmd_lora_transfer,
          "the TDM LoRA on custom models: many-step custom vs custom + LoRA at K steps -> outputs/lora_transfer")
    p = sub.add_parser("lora", help="export / inspect / fuse / extract the student's LoRA (docs/lora.md)")
    lsub = p.add_subparsers(dest="lora_command", required=True, parser_class=_Parser)
    for name, help in (("export", "write a LoRA as diffusers (pipe.load_lora_weights), kohya (webui) or peft"),
                       ("info", "which modules a LoRA touches, its ranks and size"),
                       ("fuse", "a merged checkpoint: a model folder with the LoRA fused in")):
        q = lsub.add_parser(name, help=help)
        q.add_argument("lora", help="a LoRA: peft/diffusers folder or .safetensors file")
        q.add_argument("--component", default=None, choices=("unet", "transformer"),
                       help="the denoiser's key prefix in diffusers files (default: from the LoRA's module paths)")
        if name == "info":
            q.add_argument("-v", "--verbose", action="store_true", help="list every module")
        else:
            q.add_argument("--out", required=True, help="output folder (kohya: a .safetensors file)")
            q.add_argument("--scale", type=_finite, default=1.0, help="LoRA strength baked into the output")
            q.add_argument("--model", required=name == "fuse", help="model folder or hub id (fuse: the base; "
                           "export: resolves kohya module names)")
        if name == "export":
            q.add_argument("--format", required=True, choices=("diffusers", "kohya", "peft"))
    q = lsub.add_parser("extract", help="a full-mode student as a LoRA: truncated SVD of its weight delta")
    q.add_argument("--base", required=True, help="the teacher model folder the student was distilled from")
    q.add_argument("--student", required=True, help="the full-mode student model folder")
    q.add_argument("--rank", type=_positive_int, default=16)
    q.add_argument("--format", default="peft", choices=("diffusers", "kohya", "peft"))
    q.add_argument("--component", default=None, choices=("unet", "transformer"),
                   help="the denoiser's key prefix in diffusers files (default: from the module paths)")
    q.add_argument("--out", required=True, help="output folder (kohya: a .safetensors file)")
    p.set_defaults(func=cmd_lora)
    return parser


def _error(message: object) -> None:
    """One `tdm: error:` line (later lines of a multi-key message follow it), secrets redacted."""
    from tdm.tracking import redact

    print(f"tdm: error: {redact(str(message))}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (0 done, 2 bad input or an output that cannot be written or is
    held by another run, 3 diverged). Every failure a user can cause or fix is one `tdm: error:` line."""
    global _writing
    for var, value in (("HF_HUB_OFFLINE", "1"), ("DO_NOT_TRACK", "true"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("DVC_NO_ANALYTICS", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
        os.environ.setdefault(var, value)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error, already printed in one line (2)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    from tdm.config import ConfigError
    from tdm.outputs import OutputError, OutputLocked, write_error
    from tdm.tracking import TrackingUnavailable
    from tdm.training import TrainingDiverged

    _writing = None
    try:
        _set_threads(args.threads)
        result = args.func(args)
    except (OutputError, OutputLocked) as err:
        _error(err)
        return 2
    except (ConfigError, FileNotFoundError, ValueError, TrackingUnavailable) as err:
        _error(err)
        return 2  # bad input: the Prefect flow does not retry it
    except TrainingDiverged as err:  # the last good checkpoint is kept; an exact resume would diverge again
        _error(err)
        return 3
    except Exception as err:  # a full disk, a read-only folder, a file in the way: one line
        failed = write_error(err, _writing)
        if failed is None and isinstance(err, OSError):
            unreadable = err.filename and os.path.exists(err.filename) and not os.access(err.filename, os.R_OK)
            _error(f"{'cannot read ' if unreadable else ''}{err.filename or _writing or 'tdm'}: {err.strerror or err}")
            return 2
        if failed is None:
            raise
        _error(failed)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
