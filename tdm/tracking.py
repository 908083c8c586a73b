"""Run tracking: a local JSONL log that works alone, and MLflow conventions in one place.

Per-step training values are written by `MetricsLog` (the training loop, tdm/training.py, hands it rows every
`log_every` steps), which also forwards them to the active MLflow stage run in one batched call.

MLflow layout: one experiment (`tdm`); a parent run per pipeline run (made by the Prefect flow, passed to the
stage processes as TDM_MLFLOW_PARENT_RUN_ID) and a child run per stage, with params, per-step losses, eval
metrics per (model, NFE), sample grids, system metrics and tags (git commit, dvc.lock hash, backbone, K).
Under a bare `dvc repro` the first stage makes the pipeline run (tag `trigger=dvc`) and the others join it;
a stage run alone (`tdm distill`) is a top-level run tagged `standalone`.
The store is a sqlite file under the project unless MLFLOW_TRACKING_URI says otherwise; TDM_MLFLOW=0 turns
tracking off.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

EXPERIMENT = "tdm"
PARENT_ENV = "TDM_MLFLOW_PARENT_RUN_ID"


class MetricsLog:
    """The per-step log of a training stage, `metrics.jsonl`: one JSON row {"step": n, name: value, ...} per
    step; a resumed run first drops the rows past its checkpoint (they are recomputed, identically). Rows
    written are forwarded to the active MLflow stage run in one batched call (one MLflow call costs ~50 ms:
    never one per metric)."""

    def __init__(self, path: str | Path, resume_from_step: int | None = None):
        from tdm.artifacts import atomic_write_file

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_from_step is not None and self.path.is_file():
            for i, line in enumerate(self.path.read_text(errors="replace").splitlines()):
                try:
                    row = json.loads(line)
                    step = int(row["step"])
                except (ValueError, KeyError, TypeError):  # a torn write (disk full, kill mid-flush)
                    if line.strip():
                        print(f"{self.path}: line {i + 1} is not a log row; dropped (rows past the checkpoint are "
                              f"recomputed)", file=sys.stderr)
                    continue
                if step <= resume_from_step:
                    kept.append(line)
        text = "".join(ln + "\n" for ln in kept)
        try:
            atomic_write_file(self.path, lambda tmp: Path(tmp).write_text(text))
        except OSError as err:
            raise _cannot_write(self.path, err) from None

    def write(self, rows: list[dict]) -> None:
        """Append `rows`; OutputError (`cannot write <file>: <reason>`) when the disk refuses (full, read-only)."""
        try:
            with self.path.open("a") as f:
                for row in rows:
                    f.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                        for k, v in row.items()}) + "\n")
        except OSError as err:
            raise _cannot_write(self.path, err) from None
        if _active is not None and rows:
            _active.log_steps(rows)


def _cannot_write(path: Path, err: OSError) -> OSError:
    """`cannot write <the log>: <reason>` (tdm.outputs.OutputError) for a write the OS refused."""
    from tdm.outputs import OutputError

    return OutputError(path, err.strerror or str(err))


class TrackingUnavailable(RuntimeError):
    """The configured MLflow server cannot be reached (reported before any compute)."""


def enabled() -> bool:
    return os.environ.get("TDM_MLFLOW", "1").lower() not in ("0", "false", "off", "no")


def tracking_uri(root: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI, else a sqlite store in the project (absolute: sqlite needs four slashes)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


# Environment variables whose values are credentials (MLflow's own names): never printed.
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
              "DATABRICKS_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:[a-z0-9_.-]*(?:token|password|passwd|pwd|secret|key|auth|signature|"
                           r"credential|sig)[a-z0-9_.-]*)=)[^&#;\s'\")]*")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s'\"]*@")


def redact(text: str) -> str:
    """`text` with every credential tdm could print removed: the userinfo of any URL (`http://user:token@host`
    -> `http://***@host`), secret-looking query values (`?token=...`, `&password=...`) and the literal values
    of SECRET_ENV variables. Everything tdm prints or logs about a tracking store passes through it."""
    text = _USERINFO.sub(r"\1***@", str(text))
    text = _SECRET_QUERY.sub(r"\1***", text)
    for var in SECRET_ENV:
        value = os.environ.get(var, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _auth_request(uri: str):
    """An HTTP request for `uri` with its credentials as MLflow sends them: the URL's userinfo or
    MLFLOW_TRACKING_USERNAME / PASSWORD as HTTP Basic, else MLFLOW_TRACKING_TOKEN as a Bearer token (urllib
    would otherwise take `user:token@host` for a host and port)."""
    import base64
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    user, password = parts.username, parts.password
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    user = urllib.parse.unquote(user) if user else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = urllib.parse.unquote(password) if password else os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user or password:
        basic = base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    return request


def check_server(uri: str, timeout: float = 3.0) -> None:
    """Fail in one clear line (TrackingUnavailable, credentials redacted) when an http(s) tracking server does not
    answer its health check, authenticated as MLflow would be (sqlite/file stores need none)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.parse
    import urllib.request

    try:
        base = uri.split("?", 1)[0].split("#", 1)[0].rstrip("/")
        with urllib.request.urlopen(_auth_request(base + "/health"), timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        reason = f"HTTP {err.code} {err.reason}" + (
            "; check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
            if err.code in (401, 403) else "")
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = str(getattr(err, "reason", err))
    raise TrackingUnavailable(redact(f"MLflow server {uri} is unreachable ({reason}); start it (bash "
                                     f"scripts/servers.sh start), point MLFLOW_TRACKING_URI elsewhere, or set "
                                     f"TDM_MLFLOW=0 to run untracked"))


def metric_key(*parts: object) -> str:
    """An MLflow-legal, stable metric name from `parts` joined by "/": characters outside letters, digits,
    _ - . and space become "_", an empty / "." / ".." part becomes "_" (MLflow rejects "//" and ".." segments),
    and a name over MLflow's 250 characters keeps its head and a digest of the whole (distinct inputs stay
    distinct)."""
    clean = []
    for part in parts:
        text = re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(part)).strip()
        text = re.sub(r"\.{2,}", ".", text)
        clean.append("_" if text in ("", ".") else text)
    key = "/".join(clean)
    if len(key) > 250:
        key = f"{key[:233]}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return key


def flatten(tree: dict, sep: str = ".", prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf}; lists and other values are leaves."""
    out: dict = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, sep, name + sep))
        else:
            out[name] = value
    return out


def flat_params(tree: dict) -> dict[str, str]:
    """MLflow params: every leaf as a string (lists as JSON)."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for k, v in flatten(tree).items()}


def _numeric_leaves(tree: dict) -> dict[str, float]:
    """MLflow metrics: the finite numeric leaves, under legal metric keys ("a/b/c")."""
    return {metric_key(k): float(v) for k, v in flatten(tree, "/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def run_tags(root: str | Path = ".") -> dict[str, str]:
    """Provenance: git commit (+ dirty flag) and the dvc.lock hash."""
    root = Path(root)
    tags = {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10)
            tags["git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass
    lock = root / "dvc.lock"
    if lock.is_file():
        tags["dvc_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    return tags


def experiment_id(client, root: str | Path = ".") -> str:
    name = os.environ.get("TDM_MLFLOW_EXPERIMENT", EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = client.tracking_uri
    # A local store keeps artifacts beside the database; a server decides for itself.
    location = None if uri.startswith(("http://", "https://")) else (Path(root).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # created concurrently by another stage process
        return client.get_experiment_by_name(name).experiment_id


class StageRun:
    """The MLflow run of one stage (a child of the pipeline run when there is one)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.step_keys: set[str] = set()  # per-step series; the stage's final summary must not append to them

    def log_steps(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(row["step"])) for row in rows for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)]
        self.step_keys.update(m.key for m in metrics)
        for i in range(0, len(metrics), 1000):  # the REST API's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_result(self, result: dict, metrics_file: Path | None, out_dir: Path | None) -> None:
        """A stage's outcome: its numeric results, per-(model, NFE) eval rows, metrics file and sample grids."""
        values = _numeric_leaves({k: v for k, v in result.items() if k != "rows" and k not in self.step_keys})
        for row in result.get("rows", []) or []:
            for name, value in (row.get("metrics") or {}).items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    # a protocol's per-group rows (HPSv2 styles) share model and NFE: the group keeps them apart
                    group = f"-{row['group']}" if row.get("group") else ""
                    values[metric_key(name, row.get("model"), f"nfe{row.get('nfe')}{group}")] = float(value)
        if values:
            self.log_metrics(values)
        if result.get("rows"):
            self.client.log_dict(self.run_id, {"rows": result["rows"]}, "eval_rows.json")
        if metrics_file is not None and metrics_file.is_file():
            self.client.log_artifact(self.run_id, str(metrics_file), "metrics")
        if out_dir is not None and out_dir.is_dir():
            for png in sorted(out_dir.glob("*.png")) + sorted(out_dir.glob("*/*.png")):
                if png.stat().st_size < 5_000_000:
                    self.client.log_artifact(self.run_id, str(png), "images" + (
                        "" if png.parent == out_dir else f"/{png.parent.name}"))


_active: StageRun | None = None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def stage_run(stage: str, params: dict, root: str | Path = ".", extra_tags: dict | None = None,
              ) -> Iterator[StageRun | None]:
    """Record one stage as an MLflow run (None when tracking is off or on a non-main process).
    The run ends FAILED when the stage raises; MetricsLog flushes inside it are forwarded to it."""
    global _active
    if not enabled() or not _is_main_process():
        yield None
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    check_server(uri)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:  # a store that refuses us fails here, before compute, in one line and without its credentials
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        exp = experiment_id(client, root)
        parent = os.environ.get(PARENT_ENV) or _dvc_repro_parent(client, exp, root)
        tags = {"stage": stage, **run_tags(root), **(extra_tags or {}),
                **({} if parent else {"standalone": "true"})}
        if os.environ.get("PREFECT__FLOW_RUN_ID"):
            tags["prefect_flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]
        run = mlflow.start_run(experiment_id=exp, run_name=stage, tags=tags, log_system_metrics=True,
                               parent_run_id=parent)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise TrackingUnavailable(redact(f"MLflow store {uri} refused the stage run ({type(err).__name__}: "
                                         f"{first}); fix it or set TDM_MLFLOW=0 to run untracked")) from None
    stage_run_ = StageRun(client, run.info.run_id)
    params_flat = flat_params(params)
    try:
        mlflow.log_params(params_flat)
    except Exception as err:
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        first = str(err).splitlines()[0] if str(err) else ""
        raise TrackingUnavailable(redact(f"MLflow store {uri} refused the stage's params ({type(err).__name__}: "
                                         f"{first}); fix it or set TDM_MLFLOW=0 to run untracked")) from None
    _active = stage_run_
    status = "FAILED"
    try:
        yield stage_run_
        status = "FINISHED"
    finally:
        _active = None
        mlflow.end_run(status)
        if parent and not os.environ.get(PARENT_ENV):  # a `dvc repro` parent: it ends when its last stage does
            client.set_terminated(parent, status)


def _dvc_invocation() -> str | None:
    """`<pid>-<start time>` of the `dvc repro` / `dvc exp run` process this stage runs under, if any."""
    try:
        import psutil

        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            if any(Path(c).name == "dvc" for c in cmd[:2]) and ("repro" in cmd or "exp" in cmd):
                return f"{proc.pid}-{int(proc.create_time())}"
            proc = proc.parent()
    except Exception:  # no psutil / no access to the process table: the stage is tracked standalone
        return None
    return None


def _dvc_repro_parent(client, experiment: str, root: str | Path) -> str | None:
    """Stages that one `dvc repro` runs become children of one pipeline run (made by the first of them)."""
    key = _dvc_invocation()
    if key is None:
        return None
    found = client.search_runs([experiment], f"tags.dvc_invocation = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name="dvc repro",
                            tags={"stage": "pipeline", "trigger": "dvc", "dvc_invocation": key, **run_tags(root)})
    return run.info.run_id


def start_pipeline_run(name: str, params: dict | None = None, root: str | Path = ".",
                       tags: dict | None = None) -> str:
    """The parent run of one pipeline run (the Prefect flow's); returns its id for TDM_MLFLOW_PARENT_RUN_ID."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    check_server(uri)
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, root), run_name=name,
                            tags={"stage": "pipeline", **run_tags(root), **(tags or {})})
    if params:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flat_params(params).items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def end_pipeline_run(run_id: str, status: str = "FINISHED", root: str | Path = ".") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri(root)).set_terminated(run_id, status)


def run_url(run_id: str, root: str | Path = ".") -> str | None:
    """The MLflow UI address of a run (servers only)."""
    uri = tracking_uri(root)
    if not uri.startswith(("http://", "https://")):
        return None
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    return redact(f"{uri.split('?', 1)[0].rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}")
