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
