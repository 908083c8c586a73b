"""MLflow tracking through the real client on a local sqlite store: a stage run alone, a stage as the child of
a pipeline run, batched per-step losses, eval rows per (model, NFE), grids, tags; an unreachable server fails
before compute."""
import json
import os
import shutil
from pathlib import Path

import pytest

from tdm import tracking
from tdm.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["-S", "model.channels=[32, 32]", "-S", "teacher_ft.steps=4", "-S", "teacher_ft.batch_size=8",
        "-S", "teacher_ft.checkpoint_every=2", "-S", "teacher_ft.eval_samples=10", "-S", "sample.steps=2"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TDM_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TDM_MLFLOW_EXPERIMENT", "tdm-test")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _runs(client, where=""):
    exp = client.get_experiment_by_name("tdm-test")
    return client.search_runs([exp.experiment_id], filter_string=where)


def test_stage_alone_is_a_tagged_run_with_params_losses_and_grids(store, monkeypatch):
    assert main(["teacher-ft", "-q", *TINY]) == 0
    (run,) = _runs(store)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "teacher_ft" and run.data.tags["standalone"] == "true"
    assert run.data.tags["backbone"] == "digits"
    assert run.data.params["teacher_ft.steps"] == "4" and run.data.params["model.channels"] == "[32, 32]"
    history = store.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]  # every step, logged in batches at checkpoints
    assert all(m.value > 0 for m in history)
    assert 0 <= run.data.metrics["eval_accuracy"] <= 1 and run.data.metrics["eval_fid"] > 0
    artifacts = {a.path for a in store.list_artifacts(run.info.run_id, "images")}
    assert any(p.endswith(".png") for p in artifacts)
    assert {a.path for a in store.list_artifacts(run.info.run_id, "metrics")} == {"metrics/teacher_ft.json"}


def test_stage_under_a_pipeline_run_is_its_child_and_eval_rows_become_metrics(store, monkeypatch, tmp_path):
    parent = tracking.start_pipeline_run("pipeline-test", {"distill": {"k": 4}}, root=tmp_path)
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    result = {"rows": [{"model": "teacher", "nfe": 100, "metrics": {"fid_digits": 5.1}},
                       {"model": "digits:thick+tdm_lora", "nfe": 4, "metrics": {"fid_digits": 6.2}},
                       # HPSv2 per-style rows share model and NFE: each keeps its own key
                       {"model": "student", "nfe": 4, "group": "anime", "metrics": {"hps": 0.25}},
                       {"model": "student", "nfe": 4, "group": "photo", "metrics": {"hps": 0.27}}],
              "wall_time_s": 3.5}
    with tracking.stage_run("evaluate", {"distill": {"k": 4}}, root=tmp_path) as run:
        run.log_result(result, None, None)
    tracking.end_pipeline_run(parent, root=tmp_path)
    (child,) = _runs(store, "tags.stage = 'evaluate'")
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.metrics["fid_digits/teacher/nfe100"] == 5.1
    assert child.data.metrics["fid_digits/digits_thick_tdm_lora/nfe4"] == 6.2
    assert child.data.metrics["wall_time_s"] == 3.5
    assert child.data.metrics["hps/student/nfe4-anime"] == 0.25
    assert child.data.metrics["hps/student/nfe4-photo"] == 0.27
    rows = json.loads(Path(store.download_artifacts(child.info.run_id, "eval_rows.json", str(tmp_path))).read_text())
    assert rows["rows"][1]["model"] == "digits:thick+tdm_lora"
    (pipeline,) = _runs(store, "tags.stage = 'pipeline'")
    assert pipeline.info.status == "FINISHED" and pipeline.data.params["distill.k"] == "4"


def test_failed_stage_ends_its_run_failed(store, tmp_path):
    with pytest.raises(RuntimeError):
        with tracking.stage_run("distill", {}, root=tmp_path):
            raise RuntimeError("boom")
    (run,) = _runs(store)
    assert run.info.status == "FAILED"


def test_unreachable_server_fails_in_one_line_before_compute(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TDM_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    assert main(["teacher-ft", "-q", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "MLflow server http://127.0.0.1:9 is unreachable" in err
    assert not (tmp_path / "outputs").exists()


def test_stages_of_one_dvc_repro_are_children_of_one_pipeline_run(store, tmp_path):
    import subprocess
    import sys

    (tmp_path / "stage.py").write_text(
        "import sys\nfrom tdm import tracking\n"
        "with tracking.stage_run(sys.argv[1], {'distill': {'k': 4}}) as run:\n"
        "    run.log_metrics({'done': 1.0})\n"
        "open(sys.argv[1] + '.txt', 'w').write('ok')\n")
    py = sys.executable
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  a:\n    cmd: {py} stage.py a\n    deps: [stage.py]\n    outs: [a.txt]\n"
        f"  b:\n    cmd: {py} stage.py b\n    deps: [a.txt]\n    outs: [b.txt]\n")
    env = {**os.environ, "DVC_SITE_CACHE_DIR": str(tmp_path / ".dvc-site"),
           "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / ".dvc-global")}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True,
                       executable=None if cmd[0] == "git" else str(Path(py).parent / "dvc"))
    (parent,) = _runs(store, "tags.stage = 'pipeline'")
    assert parent.data.tags["trigger"] == "dvc" and parent.info.status == "FINISHED"
    children = _runs(store, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["a", "b"]
    assert not _runs(store, "tags.standalone = 'true'")


@pytest.mark.parametrize("model", ["digits:thick+tdm_lora", "", ".", "..", "a..b", "/data/" + "m" * 240])
def test_metric_keys_are_always_mlflow_legal(model):
    from mlflow.utils.validation import _validate_metric_name

    from tdm.tracking import metric_key

    key = metric_key("fid_digits", model, "nfe4")
    _validate_metric_name(key)  # raises MlflowException when MLflow would reject it
    assert "//" not in key and ".." not in key and len(key) <= 250
    assert key == metric_key("fid_digits", model, "nfe4")  # stable


# -- credentials (issue 18 case 18): never printed, and the health check authenticates as MLflow does ----------------
SECRET = "s3cr3t-T0KEN-42"


@pytest.mark.parametrize("uri", [
    f"http://alice:{SECRET}@127.0.0.1:9",          # user and token: the reported input
    f"http://:{SECRET}@127.0.0.1:9",               # password only
    f"http://{SECRET}@127.0.0.1:9",                # a token as the user name
    f"https://alice:{SECRET}@127.0.0.1:9/mlflow",  # https, a path
    f"http://127.0.0.1:9/?token={SECRET}",         # a token in the query string
    f"http://127.0.0.1:9/?user=alice&access_token={SECRET}",
])
def test_credentials_in_the_tracking_uri_are_never_printed(uri, tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TDM_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["report"]) == 2
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("tdm: error:")]
    assert "127.0.0.1:9" in line and "is unreachable" in line and "***" in line
    assert not (tmp_path / "outputs").exists()


def test_secret_environment_values_are_never_printed(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-" + SECRET)
    text = tracking.redact(f"auth failed for {SECRET} (token tok-{SECRET}); http://u:{SECRET}@h/x?sig={SECRET}")
    assert SECRET not in text and "http://***@h/x?sig=***" in text
    assert tracking.redact("http://127.0.0.1:5000/#/experiments/1") == "http://127.0.0.1:5000/#/experiments/1"
    assert tracking.redact("sqlite:////tmp/a@b/mlflow.db") == "sqlite:////tmp/a@b/mlflow.db"  # no userinfo there


@pytest.fixture
def auth_server():
    """A local HTTP server whose /health answers 200 only to alice's Basic credentials or her Bearer token."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    good = {"Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode(), f"Bearer {SECRET}"}

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health" and self.headers.get("Authorization") in good
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"unauthorized")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_health_check_authenticates_like_mlflow(auth_server, monkeypatch):
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    port = auth_server
    tracking.check_server(f"http://alice:{SECRET}@127.0.0.1:{port}")  # userinfo as HTTP Basic
    with pytest.raises(tracking.TrackingUnavailable) as refused:
        tracking.check_server(f"http://alice:wrong-{SECRET}@127.0.0.1:{port}")
    assert "HTTP 401" in str(refused.value) and SECRET not in str(refused.value)
    assert "MLFLOW_TRACKING_USERNAME" in str(refused.value)
    with pytest.raises(tracking.TrackingUnavailable):
        tracking.check_server(f"http://127.0.0.1:{port}")  # no credentials at all
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    tracking.check_server(f"http://127.0.0.1:{port}")  # MLflow's own variables, as Basic
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    tracking.check_server(f"http://127.0.0.1:{port}/")  # a token, as Bearer


def test_a_full_disk_under_the_step_log_is_one_named_line(tmp_path):
    """metrics.jsonl on a full disk (the kernel's /dev/full: every write ENOSPC): `cannot write <log>: ...`."""
    from tdm.outputs import OutputError

    log = tracking.MetricsLog(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(OutputError) as err:
        log.write([{"step": 1, "loss": 0.5}])
    assert str(err.value) == f"cannot write {tmp_path / 'metrics.jsonl'}: No space left on device"
