"""The report stage on stage outputs written here: tables, embedded grids and plots, offline-safe HTML."""
import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from tdm import report
from tdm.cli import main

REPO = Path(__file__).resolve().parents[2]


def _stage_outputs(root: Path) -> None:
    (root / "metrics").mkdir()
    (root / "outputs" / "evaluate").mkdir(parents=True)
    (root / "outputs" / "teacher_ft").mkdir()
    (root / "outputs" / "distill").mkdir()
    rows = []
    for i, (model, steps, nfe, fid) in enumerate([("teacher", 50, 100, 8.07), ("student", 4, 4, 5.53),
                                                  ("student", 2, 2, 12.7)]):
        grid = root / "outputs" / "evaluate" / f"{model}_{steps}.png"
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(grid)
        rows.append({"model": model, "steps": steps, "nfe": nfe, "guidance": 2.0, "n": 1000,
                     "grid": str(grid.relative_to(root)), "metrics": {"fid_digits": fid, "class_accuracy": 0.99}})
    (root / "metrics" / "evaluate.json").write_text(json.dumps({"rows": rows}))
    (root / "metrics" / "teacher_ft.json").write_text(json.dumps({"train_time_s": 533.0, "steps": 1800}))
    (root / "metrics" / "distill.json").write_text(json.dumps({"train_time_s": 285.0, "iterations": 400}))
    (root / "outputs" / "teacher_ft" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": v, "lr": 1e-4}) + "\n" for i, v in ((1, 0.9), (2, 0.5), (3, 0.3))))
    (root / "outputs" / "distill" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss_fake": 0.1 / s, "loss_gen": 0.5}) + "\n" for s in (1, 2, 3)))


def test_report_has_tables_grids_and_plots_and_renders_offline(tmp_path):
    _stage_outputs(tmp_path)
    result = report.run(root=tmp_path)
    page = Path(result["report"]).read_text()
    body = page.split("<body>")[1]
    assert "http" not in body and "src='data:image/png;base64," in body  # everything embedded
    assert "<td>teacher</td><td>50</td><td>100</td>" in page and "<td>5.53</td>" in page
    assert page.count("class='grid'") == 3
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert len(images) == 3 + 1 + 1  # grids, FID vs NFE, losses
    md = Path(result["markdown"]).read_text()
    assert "| student | 4 | 4 | 2 | 1000 | 5.53 | 0.990 |" in md  # the evaluate stage's table (tdm.evaluation.table)
    assert (tmp_path / "outputs" / "report" / "fid_digits_vs_nfe.png").is_file()
    assert report.read_losses(tmp_path)["distill loss_fake"][1] == [0.1, 0.05, 0.1 / 3]


def test_report_without_stage_outputs_fails_clearly(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["report", "-q"]) == 2
    assert "run the stages first" in capsys.readouterr().err
    assert not (tmp_path / "outputs" / "report").exists()


def test_report_plots_the_teacher_curve_with_student_points_and_states_the_protocol(tmp_path):
    (tmp_path / "metrics").mkdir()
    proto = {"protocol": "coco2014", "protocol_version": "val2014", "resolution": "256x256", "seed": 0,
             "metric_model": "Inception-v3 pool3 (torch-fidelity 2015-12-05); CLIP ViT-g-14:laion2b_s12b_b42k"}
    rows = [{"model": "teacher", "steps": s, "nfe": 2 * s, "guidance": 7.5, "n": 30000, **proto,
             "metrics": {"fid": 30.0 / s ** 0.5 + 10}} for s in (1, 2, 4, 8, 16, 25, 50)]
    rows += [{"model": "student", "steps": k, "nfe": k, "guidance": 7.5, "n": 30000, **proto,
              "metrics": {"fid": 12.0 + k}} for k in (1, 2, 4)]
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({"rows": rows}))
    page, md, images = report.build(tmp_path)
    assert "| coco2014 | val2014 | 30000 | 256x256 | Inception-v3 pool3" in md and "| 0 |" in md
    assert "<td>coco2014 (val2014)</td>" in page  # the protocol column of the rows table
    png = Image.open(__import__("io").BytesIO(images["fid_vs_nfe.png"]))
    assert png.size[0] > 500
    # The plot's data: the teacher's seven points on one line, the student's three.
    assert [len(v) for v in _series(rows, "fid").values()] == [7, 3]


def _series(rows, metric):
    out = {}
    for r in report.curve_rows(rows):
        out.setdefault(r["model"], []).append((r["nfe"], r["metrics"][metric]))
    return out
