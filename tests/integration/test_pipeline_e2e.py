"""End to end, against real servers: scripts/servers.sh starts a Prefect server, an MLflow server and the
deployments in a copy of the project; `prefect deployment run tdm/full-pipeline` runs all five stages on a
tiny profile; the MLflow runs (a pipeline parent, a child per stage with metrics and images) are checked
through the MLflow API; a following `dvc repro` is a no-op; the servers are stopped."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = ["teacher_ft", "prompt_store", "distill", "lora_transfer", "evaluate", "report"]  # flows/pipeline.py
TINY = ["model.channels=[32, 32]", "teacher_ft.steps=20", "teacher_ft.batch_size=16", "teacher_ft.eval_samples=20",
        "teacher_ft.checkpoint_every=10", "sample.steps=4", "sample.batch_size=50",
        "distill.iterations=4", "distill.batch_size=8", "distill.eval_samples=20", "distill.checkpoint_every=2",
        "lora_transfer.n=20", "lora_transfer.finetune_steps=4", "lora_transfer.finetune_batch_size=16",
        "lora_transfer.custom_steps=4", "lora_transfer.batch_size=50", "evaluate.n=20"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_project(dest: Path) -> None:
    """The project's files as git sees them (tracked + new, not ignored), as a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not name.startswith("benchmarks/results/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    _copy_project(project)
    state = tmp_path_factory.mktemp("servers")
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {**os.environ, "TDM_PREFECT_PORT": str(prefect_port), "TDM_MLFLOW_PORT": str(mlflow_port),
           "TDM_SERVERS_DIR": str(state), "PREFECT_HOME": str(state / "prefect"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
           "DVC_SITE_CACHE_DIR": str(state / "dvc-site"), "DVC_GLOBAL_CONFIG_DIR": str(state / "dvc-global"),
           "TDM_MLFLOW": "1", "TDM_NUM_THREADS": "1"}
    env.pop("TDM_MLFLOW_PARENT_RUN_ID", None)
    start = subprocess.run(["bash", "scripts/servers.sh", "start"], cwd=project, env=env, capture_output=True,
                           text=True, timeout=400)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield project, env
    finally:
        subprocess.run(["bash", "scripts/servers.sh", "stop"], cwd=project, env=env, timeout=120)


def test_full_pipeline_deployment_tracks_every_stage_and_leaves_dvc_up_to_date(served):
    project, env = served
    run = subprocess.run(["prefect", "deployment", "run", "tdm/full-pipeline", "--params",
                          json.dumps({"overrides": TINY}), "--watch", "--watch-timeout", "1200"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=1300)
    serve_log = Path(env["TDM_SERVERS_DIR"]) / "serve.log"
    assert run.returncode == 0, serve_log.read_text()[-6000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("tdm")
    (parent,) = client.search_runs([exp.experiment_id], "tags.stage = 'pipeline'")
    assert parent.info.status == "FINISHED" and parent.data.params["distill.iterations"] == "4"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert sorted(by_stage) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    assert len(client.get_metric_history(by_stage["teacher_ft"].info.run_id, "loss")) == 20
    assert len(client.get_metric_history(by_stage["distill"].info.run_id, "loss_gen")) == 4
    evaluated = by_stage["evaluate"].data.metrics
    assert any(k.startswith("fid_digits/teacher/") for k in evaluated)
    assert any(k.startswith("fid_digits/student/nfe4") for k in evaluated)
    for stage in ("teacher_ft", "distill", "evaluate"):
        images = client.list_artifacts(by_stage[stage].info.run_id, "images")
        assert images, f"{stage}: no sample grids logged"
    assert by_stage["distill"].data.tags["git_commit"]
    assert "dvc_lock_sha256" in by_stage["report"].data.tags  # dvc.lock exists once the first stage ran

    report = project / "outputs" / "report" / "index.html"
    assert report.is_file() and "data:image/png;base64," in report.read_text()
    assert "http" not in report.read_text().split("<body>")[1]  # self-contained: nothing fetched

    status = subprocess.run(["dvc", "status"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout, status.stdout
    repro = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert repro.returncode == 0 and "Running stage" not in repro.stdout, repro.stdout


def test_ablation_deployment_runs_variants_as_dvc_experiments(served):
    project, env = served
    params_before = (project / "params.yaml").read_text()
    run = subprocess.run(["prefect", "deployment", "run", "tdm/ablation", "--params",
                          json.dumps({"variants": {"k2": ["distill.k=2"]}}), "--watch", "--watch-timeout", "900"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=1000)
    serve_log = Path(env["TDM_SERVERS_DIR"]) / "serve.log"
    assert run.returncode == 0, serve_log.read_text()[-6000:]
    assert (project / "params.yaml").read_text() == params_before  # --temp: the workspace is left alone

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("tdm")
    (variant,) = client.search_runs([exp.experiment_id], "tags.variant = 'k2'")
    (evaluate,) = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{variant.info.run_id}' "
                                                          "and tags.stage = 'evaluate'")
    assert "fid_digits/student/nfe2" in evaluate.data.metrics
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=project, env=env, capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0 and '"k2"' in shown.stdout


def test_bad_override_fails_the_flow_before_any_stage_runs(served):
    project, env = served
    run = subprocess.run(["prefect", "deployment", "run", "tdm/full-pipeline", "--params",
                          json.dumps({"overrides": ["distill.k=0"]}), "--watch", "--watch-timeout", "300"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode != 0
    log = (Path(env["TDM_SERVERS_DIR"]) / "serve.log").read_text()
    assert "distill.k" in log
