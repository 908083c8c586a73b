"""The flow's pieces that need no server: override handling, the metrics table, the Prefect reachability check."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "flows"))
pipeline = pytest.importorskip("pipeline")


@pytest.fixture
def project(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_overrides_are_validated_then_written_keeping_comments_and_quotes(project):
    from tdm import config

    before = (project / "params.yaml").read_text()
    with pytest.raises(config.ConfigError, match="distill.k"):
        pipeline._prepare(project, ["distill.k=0"])
    assert (project / "params.yaml").read_text() == before  # nothing written on bad input
    params = pipeline._prepare(project, ["distill.k=2", "distill.k_choices=[1, 2]", "teacher_ft.lr=1.0e-4"])
    text = (project / "params.yaml").read_text()
    assert params["distill"]["k"] == 2 and "k: 2" in text
    assert "# student steps" in text and 'mixed_precision: "no"' in text  # comments and quotes survive
    cfg = config.load(project / "params.yaml")
    assert cfg.distill.k_choices == (1, 2) and cfg.teacher_ft.lr == 1e-4


def test_metrics_markdown_is_one_row_per_model_and_nfe(project):
    (project / "metrics").mkdir()
    rows = [{"model": "teacher", "steps": 50, "nfe": 100, "guidance": 1.5, "n": 1000,
             "metrics": {"fid_digits": 5.12, "class_accuracy": 0.999}},
            {"model": "student", "steps": 4, "nfe": 4, "guidance": 2.0, "n": 1000,
             "metrics": {"fid_digits": 4.95, "class_accuracy": 0.99}}]
    (project / "metrics" / "evaluate.json").write_text(json.dumps({"rows": rows}))
    table = pipeline._metrics_markdown(project).splitlines()  # the evaluate stage's table (tdm.evaluation.table)
    assert table[0] == "| model | steps | NFE | guidance | n | FID (digits) | class acc. |"
    assert table[2] == "| teacher | 50 | 100 | 1.5 | 1000 | 5.12 | 0.999 |"
    assert table[3] == "| student | 4 | 4 | 2 | 1000 | 4.95 | 0.990 |"


def test_ablation_comparison_is_the_same_table_with_variant_columns():
    row = {"model": "student", "steps": 4, "nfe": 4, "guidance": 2.0, "n": 20, "metrics": {"fid_digits": 4.95}}
    table = pipeline._comparison_markdown({"k4": {"overrides": ["distill.k=4"], "rows": [row]},
                                           "k2": {"overrides": ["distill.k=2"], "rows": []}}).splitlines()
    assert table[0] == "| variant | overrides | model | steps | NFE | guidance | n | FID (digits) |"
    assert table[2] == "| k4 | distill.k=4 | student | 4 | 4 | 2 | 20 | 4.95 |"
    assert "Variant `k2`: no evaluation rows" in table[-1]


def test_unreachable_prefect_server_is_one_line_before_anything_runs(project):
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "TDM_MLFLOW": "0"}
    run = subprocess.run([sys.executable, str(REPO / "flows" / "serve.py")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert "Prefect server http://127.0.0.1:9/api is unreachable" in run.stderr


_CONSOLE = r"""
import sys, threading, time
sys.path.insert(0, sys.argv[1])
import pipeline
from prefect.client.orchestration import get_client

def follow():  # what `python flows/pipeline.py --deployment ...` does once the run exists
    with get_client(sync_client=True) as client:
        while not (runs := client.read_flow_runs()):
            time.sleep(0.5)
    pipeline.follow(runs[0].id, sys.stdout, poll=0.5)

threading.Thread(target=follow, daemon=True).start()
pipeline.tdm(stages=["distill"], project=sys.argv[2])
"""


@pytest.mark.slow
def test_stage_progress_reaches_the_followed_console_as_it_goes(tmp_path, teacher_dir):
    """distill run by the flow's stage runner (`dvc repro`, in a Prefect flow run against a local API) with far
    too many iterations to finish: the follower prints its `distill: n/total` lines while it runs. A console
    that got the stage's output only when it ends would show none (and the test would time out)."""
    import re
    import signal
    import threading

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    pipeline._prepare(project, ["model.channels=[32, 32]", f"distill.teacher={teacher_dir}",
                                "distill.batch_size=8", "distill.iterations=100000", "distill.log_every=1",
                                "distill.checkpoint_every=100000", "distill.eval_samples=0"])
    (project / "dvc.yaml").write_text("stages:\n  distill:\n    cmd: tdm distill -q\n    params: [distill]\n"
                                      "    outs:\n      - outputs/distill:\n          persist: true\n")
    env = {**os.environ, "TDM_MLFLOW": "0", "TDM_PROGRESS_EVERY": "0", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)  # a temporary local API (Prefect's ephemeral mode), not the project's server
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=project, env=env, check=True, timeout=120)
    proc = subprocess.Popen([sys.executable, "-c", _CONSOLE, str(REPO / "flows"), str(project)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    seen, console = [], []
    guard = threading.Timer(600, os.killpg, (proc.pid, signal.SIGKILL))  # no line ever: fail, do not hang
    guard.start()
    try:
        for line in proc.stdout:  # the follower's console, line by line as it is printed
            console.append(line.rstrip())
            match = re.search(r"\d\d:\d\d:\d\d distill: (\d+)/100000 it \(0%\) loss_fake=\S+ loss_gen=\S+ \| "
                              r".* elapsed, ETA ", line)
            if match:
                seen.append(int(match.group(1)))
            if len(seen) >= 2:
                break
    finally:
        guard.cancel()
        os.killpg(proc.pid, signal.SIGKILL)  # the flow, dvc, the stage and the temporary API server
        proc.wait()
        (tmp_path / "console.txt").write_text("\n".join(console))
    assert len(seen) >= 2, "\n".join(console[-40:])
    assert seen == sorted(seen) and seen[0] < seen[1] < 100000  # lines of a stage still running, in order
    assert any("Running" in ln for ln in console) and not (project / "outputs/distill/student").exists()
