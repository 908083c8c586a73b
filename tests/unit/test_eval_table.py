"""The evaluation table: one (header, cells), rendered as markdown and HTML."""
import re

import pytest

from tdm.evaluation.rows import EvalRow
from tdm.evaluation.table import cells, html_table, markdown, markdown_table, protocol_lines

ROWS = [
    {"model": "teacher", "steps": 50, "nfe": 100, "guidance": 1.5, "n": 1000,
     "metrics": {"fid_digits": 5.1234, "fid_digits_floor": 3.21, "class_accuracy": 0.999}},
    EvalRow(model="student", steps=4, nfe=4, guidance=2.0, n=1000,
            metrics={"fid_digits": 4.95, "class_accuracy": 0.99}),
    # A lora_transfer row: its own metric names, n counted in its metrics.
    {"model": "digits:thick+tdm_lora", "steps": 4, "nfe": 4, "guidance": 1.0,
     "metrics": {"fid": 6.961, "accuracy": 0.95321, "n": 20}},
]


def test_cells_columns_and_formats():
    header, body = cells(ROWS)
    assert header == ["model", "steps", "NFE", "guidance", "n", "FID (digits)", "FID floor", "class acc.", "FID",
                      "accuracy"]
    assert body[0] == ["teacher", "50", "100", "1.5", "1000", "5.12", "3.21", "0.999", "-", "-"]
    assert body[1] == ["student", "4", "4", "2", "1000", "4.95", "-", "0.990", "-", "-"]  # missing metric: "-"
    assert body[2] == ["digits:thick+tdm_lora", "4", "4", "1", "20", "-", "-", "-", "6.96", "0.9532"]


def test_a_student_with_a_guidance_schedule_shows_it_in_the_guidance_column():
    row = EvalRow(model="student", steps=4, nfe=4, guidance=1.0, guidance_schedule=[3.0, 1.0, 1.0, 1.0],
                  metrics={"fid_digits": 5.0})
    assert cells([row])[1][0][3] == "3/1/1/1"
    assert EvalRow.from_dict(row.to_dict()) == row


def test_markdown_and_html_render_the_same_cells():
    header, body = cells(ROWS)
    md = markdown(header, body).splitlines()
    assert md[0] == "| " + " | ".join(header) + " |" and md[1] == "|" + "---|" * len(header)
    assert [line.strip("| ").split(" | ") for line in md[2:]] == body
    page = html_table(header, body)
    assert re.findall(r"<th>(.*?)</th>", page) == header
    assert [re.findall(r"<td>(.*?)</td>", tr) for tr in re.findall(r"<tr>(<td>.*?)</tr>", page)] == body
    assert "&lt;b&gt;" in html_table(["<b>"], [["x"]])  # escaped


def test_extra_leading_columns():
    header, body = cells(ROWS[:2], lead={"variant": ["k1", "k4"], "overrides": ["distill.k=1", "distill.k=4"]})
    assert header[:3] == ["variant", "overrides", "model"]
    assert body[1][:3] == ["k4", "distill.k=4", "student"]
    with pytest.raises(ValueError, match="variant"):
        cells(ROWS[:2], lead={"variant": ["k1"]})


def test_markdown_table_notes_skipped_metrics():
    text = markdown_table(ROWS[:1], {"hps": "weights not found"})
    assert text.endswith("| 0.999 |\n\nSkipped `hps`: weights not found\n")
    assert markdown_table([]) == "| model | steps | NFE | guidance | n |\n|---|---|---|---|---|\n"


def test_protocol_rows_get_protocol_and_group_columns_and_a_protocol_line():
    common = {"steps": 4, "nfe": 4, "guidance": 4.5, "protocol": "hpsv2", "protocol_version": "v2.1",
              "resolution": "512x512", "metric_model": "HPS v2.1 (open_clip ViT-H-14)"}
    rows = [EvalRow(model="student", group="anime", n=800, metrics={"hps": 30.123}, **common),
            EvalRow(model="student", group="average", n=3200, metrics={"hps": 29.5}, **common),
            EvalRow(model="teacher", steps=25, nfe=50, guidance=7.5, n=4, protocol="prompts", protocol_version="digits",
                    metrics={"hps": 28.0})]
    header, body = cells(rows)
    assert header == ["model", "steps", "NFE", "guidance", "n", "protocol", "group", "HPS"]
    assert body[0] == ["student", "4", "4", "4.5", "800", "hpsv2 (v2.1)", "anime", "30.12"]
    assert body[2][5:7] == ["prompts (digits)", "-"]
    assert protocol_lines(rows)[0] == "hpsv2 (v2.1): n=3200, resolution 512x512, metric model HPS v2.1 (open_clip ViT-H-14)"
    assert "\nProtocol hpsv2 (v2.1): n=3200" in markdown_table(rows)
    # Rows on the configured prompts only: no protocol columns (the table as before).
    assert "protocol" not in cells(rows[2:])[0]
