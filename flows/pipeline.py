"""Prefect flow `tdm`: the DVC pipeline, one task per stage, tracked as one MLflow pipeline run.

Thin on purpose: every task runs `dvc repro --single-item <stage>` in the project, so DVC decides what is
already up to date and a Prefect run leaves `dvc repro` a no-op. No ML code lives here.

- `full-pipeline`: optional `section.key=value` overrides are validated, then written into params.yaml (as
  `dvc exp run -S` does), then teacher_ft -> prompt_store -> distill -> lora_transfer -> evaluate -> report run in
  order.
- Console: every line a stage prints is logged (the training stages print `distill: 120/400 it (30%) losses |
  elapsed, ETA` every TDM_PROGRESS_EVERY seconds, 10 by default, which the flow sets); `python flows/pipeline.py
  --deployment tdm/full-pipeline` (what scripts/pipeline.sh runs) starts a deployment run and prints its log
  lines as they arrive, so the console shows each stage's progress, not only the run's state.
- `ablation`: each variant (a list of overrides) runs as a named DVC experiment in a temporary copy
  (`dvc exp run --temp`, the workspace stays as it is) under its own MLflow pipeline run; a comparison table
  of the variants' evaluation rows is published as an artifact.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               update_progress_artifact)
from prefect.runtime import flow_run

from tdm import config
from tdm.evaluation.table import markdown_table

PROJECT = Path(__file__).resolve().parents[1]
# prompt_store always runs before distill (dvc.yaml: distill depends on its store; DVC skips it when unchanged),
# whether or not distill.prompt_store reads the store.
STAGES = ["teacher_ft", "prompt_store", "distill", "lora_transfer", "evaluate", "report"]
DEFAULT_VARIANTS = {"k1": ["distill.k=1"], "k2": ["distill.k=2"], "k4": ["distill.k=4"]}
_TQDM = re.compile(r"(\d+)/(\d+) \[")
_PROGRESS = re.compile(r"^\w+: (\d+)/(\d+) \S+ \(\d+%\)")  # tdm.training.progress_line
PROGRESS_EVERY = "10"  # seconds between a stage's progress lines (TDM_PROGRESS_EVERY, unless set)


class StageFailed(RuntimeError):
    """A stage exited non-zero. `transient` failures (killed, crashed) are retried: the stage resumes from its
    last checkpoint; bad input (tdm's exit code 2) and DVC errors are not."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def _retry_if_transient(task_, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:
        return False
    return False


def _tool(name: str) -> str:
    """`dvc` / `tdm` beside the running interpreter (the project's venv), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _env(parent_run_id: str | None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TDM_PROGRESS_EVERY", PROGRESS_EVERY)  # -q stages print plain progress lines
    if parent_run_id:
        env["TDM_MLFLOW_PARENT_RUN_ID"] = parent_run_id
    return env


def _logger():
    """The Prefect run logger (to the API and this process's console), or a plain one outside a run."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        logger = logging.getLogger("tdm.flow")
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        return logger


def _run_streaming(cmd: list[str], cwd: Path, env: dict, on_progress=None, log=None) -> tuple[int, str]:
    """Run `cmd`; log each line of its output as it arrives (the stage's progress lines among them, so they
    reach the console), report progress (done/total, from progress lines and tqdm bars) to `on_progress`.
    Bars are not logged (they redraw many times a second)."""
    log = log or _logger().info
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: list[str] = []
    buffer = b""
    last_report = 0.0
    while True:
        chunk = proc.stdout.read1(4096) if proc.stdout else b""
        if not chunk:
            break
        buffer += chunk
        parts = re.split(rb"[\r\n]", buffer)
        buffer = parts.pop()
        for raw in parts:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            bar, match = _TQDM.search(line), _PROGRESS.match(line)
            if (bar or match) and on_progress and (match or time.monotonic() - last_report > 2):
                found = match or bar
                on_progress(int(found.group(1)) / max(1, int(found.group(2))))
                last_report = time.monotonic()
            if bar and not match:  # progress bars update the artifact (at most every 2 s), not the log
                continue
            log(line)
            tail = (tail + [line])[-40:]
    if buffer.strip():
        line = buffer.decode(errors="replace").rstrip()
        log(line)
        tail = (tail + [line])[-40:]
    return proc.wait(), "\n".join(tail)


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_if_transient, task_run_name="{stage}")
def run_stage(stage: str, project: str, parent_run_id: str | None, progress_id=None, done: int = 0) -> str:
    """`dvc repro --single-item <stage>`: DVC skips it when its deps, params and outs are unchanged."""

    def on_progress(fraction: float) -> None:
        if progress_id is not None:
            update_progress_artifact(progress_id, 100 * (done + fraction) / len(STAGES),
                                     description=f"{stage}: {100 * fraction:.0f}%")

    code, tail = _run_streaming([_tool("dvc"), "repro", "--single-item", stage], Path(project),
                                _env(parent_run_id), on_progress)
    if code != 0:
        # One retry resumes from the stage's last checkpoint; bad input would only fail the same way again.
        raise StageFailed(f"stage {stage} failed (exit {code}):\n{tail}", transient="tdm: error:" not in tail)
    return tail


def _prepare(project: Path, overrides: list[str]) -> dict:
    """Validate params.yaml + overrides before anything runs, write the overrides in, return the params.
    A section (or the whole file) the params file lacks is created, as the validation read it: defaults."""
    params = project / "params.yaml"
    _validate(project, overrides)  # raises ConfigError naming the key
    if overrides:
        from ruamel.yaml import YAML
        from ruamel.yaml.comments import CommentedMap

        from tdm.artifacts import atomic_write_file

        yaml = YAML()
        yaml.preserve_quotes = True  # `"no"` must stay a string for YAML 1.1 readers
        tree = yaml.load(params)
        if tree is None:  # an empty file (or comments only): every section at its defaults
            tree = CommentedMap()
        for item in overrides:
            section, name, value = config.parse_override(item)
            if not isinstance(tree.get(section), dict):  # absent (the validation refuses a non-mapping one)
                tree[section] = CommentedMap()
            tree[section][name] = value

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                yaml.dump(tree, f)

        atomic_write_file(params, write)
    return config.dump(config.load(params))


def dvc_set_params(overrides: list[str]) -> list[str]:
    """`section.key=value` overrides (YAML values, as tdm reads them) as `dvc exp run -S` arguments that write
    the same values: `++` (set, adding the key or its section if the params file lacks it: DVC's plain
    `section.key=` refuses a key the file lacks) and the value as a Hydra literal of the parsed value."""
    out = []
    for item in overrides:
        section, name, value = config.parse_override(item)
        out += ["-S", f"++{section}.{name}={_hydra_literal(value)}"]
    return out


def _hydra_literal(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # Hydra's quoted strings: a backslash escapes only a quote (or a backslash before one), others stay.
        quoted = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
        quoted = quoted.replace("${", "\\${")  # OmegaConf would interpolate it
        return f"'{quoted}'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_literal(v)}" for k, v in value.items()) + "}"
    raise config.ConfigError(f"override value {value!r}: cannot be passed to dvc exp run -S")


def check_prefect_server(timeout: float = 3.0) -> None:
    """Exit with one clear line when the configured Prefect API (PREFECT_API_URL / prefect.toml) does not answer,
    instead of a retry loop and a stack trace. No URL = ephemeral mode, nothing to check."""
    import urllib.error
    import urllib.request

    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        return
    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as err:
        print(f"tdm: error: Prefect server {url} is unreachable ({getattr(err, 'reason', err)}); start it with "
              f"`bash scripts/servers.sh start` or point PREFECT_API_URL at a running one", file=sys.stderr)
        raise SystemExit(2) from None


def _check_servers(project: Path) -> None:
    from tdm import tracking

    if tracking.enabled():
        tracking.check_server(tracking.tracking_uri(project))


def _metrics_markdown(project: Path) -> str:
    """The evaluation rows (teacher vs student by NFE, LoRA transfer) as the evaluate stage's table."""
    path = project / "metrics" / "evaluate.json"
    if not path.is_file():
        return "_no metrics/evaluate.json yet_"
    result = json.loads(path.read_text())
    return markdown_table(result.get("rows", []), result.get("metrics_skipped"))


def _publish(project: Path, parent_run_id: str | None, key: str) -> None:
    from tdm import tracking

    create_markdown_artifact(_metrics_markdown(project), key=f"{key}-metrics",
                             description="teacher vs student by NFE, LoRA transfer")
    report = project / "outputs" / "report" / "index.html"
    if report.is_file():
        create_link_artifact(report.as_uri(), link_text="report", key=f"{key}-report")
    url = tracking.run_url(parent_run_id, project) if parent_run_id else None
    if url:
        create_link_artifact(url, link_text="MLflow pipeline run", key=f"{key}-mlflow")


def _pipeline_run(project: Path, name: str, params: dict, tags: dict) -> str | None:
    from tdm import tracking

    if not tracking.enabled():
        return None
    return tracking.start_pipeline_run(name, params, project, tags)


def _end_run(project: Path, run_id: str | None, ok: bool) -> None:
    if run_id:
        from tdm import tracking

        tracking.end_pipeline_run(run_id, "FINISHED" if ok else "FAILED", project)


@flow(name="tdm", log_prints=True)
def tdm(overrides: list[str] | None = None, stages: list[str] | None = None,
        variants: dict[str, list[str]] | None = None, project: str | None = None) -> dict:
    """Run the pipeline (or, given `variants`, an ablation of named variants) on the project at `project`."""
    root = Path(project or PROJECT).resolve()
    if variants:
        return _ablation(root, variants, overrides or [])
    chosen = stages or STAGES
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise ValueError(f"stages: unknown {unknown}; choose from {STAGES}")
    params = _prepare(root, overrides or [])
    _check_servers(root)
    run_id = _pipeline_run(root, f"pipeline {flow_run.get_name() or ''}".strip(), params,
                           {"trigger": "prefect", "prefect_flow_run_id": str(flow_run.get_id() or ""),
                            "backbone": params["model"]["family"], "k": str(params["distill"]["k"])})
    progress = create_progress_artifact(0.0, key="pipeline-progress", description="starting")
    ok = False
    try:
        for i, stage in enumerate(chosen):
            run_stage(stage, str(root), run_id, progress, i)
            update_progress_artifact(progress, 100 * (i + 1) / len(chosen), description=f"{stage}: done")
        ok = True
    finally:
        _end_run(root, run_id, ok)
    _publish(root, run_id, "pipeline")
    return {"mlflow_run_id": run_id, "stages": chosen}


def _ablation(root: Path, variants: dict[str, list[str]], common: list[str]) -> dict:
    logger = get_run_logger()
    for name, extra in variants.items():  # every variant validates before the first one runs
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise ValueError(f"variants: {name!r} is not a valid experiment name (letters, digits, _ and -)")
        _validate(root, common + extra)
    _check_servers(root)
    env = _env(None)
    env.setdefault("GIT_AUTHOR_NAME", "tdm")  # `dvc exp` commits experiment refs: it needs an identity
    env.setdefault("GIT_AUTHOR_EMAIL", "tdm@localhost")
    env.setdefault("GIT_COMMITTER_NAME", env["GIT_AUTHOR_NAME"])
    env.setdefault("GIT_COMMITTER_EMAIL", env["GIT_AUTHOR_EMAIL"])
    results = {}
    for name, extra in variants.items():
        sets = common + extra
        run_id = _pipeline_run(root, f"ablation {name}", {"overrides": sets},
                               {"trigger": "prefect-ablation", "variant": name})
        if run_id:
            env["TDM_MLFLOW_PARENT_RUN_ID"] = run_id
        cmd = [_tool("dvc"), "exp", "run", "--temp", "-f", "-n", name] + dvc_set_params(sets)
        logger.info("variant %s: %s", name, " ".join(cmd[1:]))
        code, tail = _run_streaming(cmd, root, env)
        _end_run(root, run_id, code == 0)
        if code != 0:
            raise StageFailed(f"variant {name} failed (exit {code}):\n{tail}", transient=False)
        results[name] = {"overrides": sets, "mlflow_run_id": run_id, "rows": _variant_rows(root, run_id)}
    create_markdown_artifact(_comparison_markdown(results), key="ablation-comparison",
                             description="evaluation rows per variant")
    return results


def _validate(root: Path, overrides: list[str]) -> None:
    config.load(root / "params.yaml", overrides)


def _variant_rows(root: Path, run_id: str | None) -> list[dict]:
    """A variant's evaluation rows, read back from its MLflow evaluate run."""
    if not run_id:
        return []
    from mlflow.tracking import MlflowClient

    from tdm import tracking

    client = MlflowClient(tracking.tracking_uri(root))
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.stage = 'evaluate'")
    if not children:
        return []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(children[0].info.run_id, "eval_rows.json", tmp)
        return json.loads(Path(path).read_text())["rows"]


def _comparison_markdown(results: dict) -> str:
    """Every variant's evaluation rows in one table, the variant and its overrides in front."""
    rows, lead = [], {"variant": [], "overrides": []}
    for name, res in results.items():
        rows += res["rows"]
        lead["variant"] += [name] * len(res["rows"])
        lead["overrides"] += [" ".join(res["overrides"]) or "defaults"] * len(res["rows"])
    empty = [name for name, res in results.items() if not res["rows"]]
    notes = "".join(f"\nVariant `{name}`: no evaluation rows (tracking off, or no evaluate run)\n" for name in empty)
    return (markdown_table(rows, lead=lead) if rows else "") + notes


def follow(flow_run_id, out=None, poll: float = 1.0) -> object:
    """Print a flow run's log lines (the stages' output and progress among them) to `out` as they arrive, and
    its state changes, until the run ends; returns its final state. What `--deployment` shows on the console."""
    import asyncio

    return asyncio.run(_follow(flow_run_id, out or sys.stdout, poll))


async def _follow(flow_run_id, out, poll: float):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort

    seen: set = set()
    after, shown_state, drain = None, None, 0

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    async with get_client() as client:
        while True:
            run = await client.read_flow_run(flow_run_id)
            state = run.state
            while True:  # every log line since the last poll, oldest first
                window = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                                   timestamp=LogFilterTimestamp(after_=after) if after else None)
                logs = await client.read_logs(log_filter=window, limit=200, sort=LogSort.TIMESTAMP_ASC)
                fresh = [log for log in logs if log.id not in seen]
                for log in fresh:
                    seen.add(log.id)
                    say(f"{log.timestamp.astimezone():%H:%M:%S} {log.message}")
                if logs:
                    after = logs[-1].timestamp  # inclusive: lines seen already are skipped by id
                if len(fresh) < 200:
                    break
            if state is not None and state.name != shown_state:
                shown_state = state.name
                say(f"{time.strftime('%H:%M:%S')} flow run {run.name}: {state.name}")
            if state is not None and state.is_final():
                drain += 1  # the run's last lines reach the API in the next batch (every ~2 s)
                if drain > 3:
                    return state
            await asyncio.sleep(poll)


def run_deployment_and_follow(name: str, parameters: dict, out=None) -> int:
    """Start a run of deployment `name` with `parameters`, print where to watch it and its log lines as they
    come, return 0 when it completed, 1 otherwise. Ctrl-C stops following; the run goes on."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_UI_URL

    out = out or sys.stdout
    run = run_deployment(name, parameters=parameters, timeout=0, as_subflow=False)
    ui = PREFECT_UI_URL.value()
    print(f"flow run {run.name} of {name}" + (f": {ui.rstrip('/')}/runs/flow-run/{run.id}" if ui else ""),
          file=out, flush=True)
    try:
        state = follow(run.id, out)
    except KeyboardInterrupt:
        print(f"stopped following; the run goes on (prefect flow-run cancel {run.id} stops it)", file=out)
        return 130
    return 0 if state.is_completed() else 1


def main(argv: list[str]) -> int:
    """python flows/pipeline.py [section.key=value ...]              run the flow here, once
    python flows/pipeline.py --deployment NAME [--params JSON]     run a served deployment, follow its logs"""
    check_prefect_server()
    if argv[:1] == ["--deployment"]:
        if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "--params"):
            print("usage: python flows/pipeline.py --deployment NAME [--params JSON]", file=sys.stderr)
            return 2
        return run_deployment_and_follow(argv[1], json.loads(argv[3]) if len(argv) == 4 else {})
    tdm(overrides=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
