"""The evaluation row: one NFE rule, and the JSON layout the stages write and tracking, the report and the flow
read."""
import json

import pytest

from tdm.evaluation.rows import EvalRow, as_rows, nfe


@pytest.mark.parametrize("steps,guidance,student,expected", [
    (50, 1.0, False, 50),   # teacher without CFG: one pass per step
    (50, 1.5, False, 100),  # teacher with CFG: cond + uncond
    (25, 0.5, False, 50),   # guidance below 1 is still CFG (two passes)
    (4, 2.0, True, 4),      # student: CFG baked in
    (4, 1.0, True, 4),
])
def test_nfe_rule(steps, guidance, student, expected):
    assert nfe(steps, guidance, student) == expected


# Rows as metrics/evaluate.json, the lora_transfer manifest and metrics/lora_transfer.json hold them.
EVALUATE_ROW = {"model": "teacher", "steps": 50, "nfe": 100, "guidance": 1.5, "n": 1000,
                "samples": "outputs/evaluate/samples_teacher_s50.npz",
                "grid": "outputs/evaluate/samples_teacher_s50.png",
                "metrics": {"fid_digits": 5.12, "fid_digits_floor": 3.21, "class_accuracy": 0.999}}
MANIFEST_ROW = {"model": "digits:thick+tdm_lora", "steps": 4, "nfe": 4, "guidance": 1.0, "lora_scale": 1.0,
                "samples": "outputs/lora_transfer/samples/digits_thick+tdm_lora_k4.npz",
                "reference": "outputs/lora_transfer/references/digits_thick_test.npz", "sample_time_s": 1.5}
TRANSFER_ROW = {**MANIFEST_ROW, "metrics": {"fid": 6.96, "accuracy": 0.953, "n": 1000}}
# A published protocol's row: what it follows, recorded beside the scores (tdm.evaluation.protocols).
PROTOCOL_ROW = {"model": "student", "steps": 4, "nfe": 4, "guidance": 4.5, "n": 800,
                "samples": "outputs/evaluate/samples_student_s4.npz", "protocol": "hpsv2", "protocol_version": "v2.1",
                "group": "anime", "resolution": "512x512", "metric_model": "HPS v2.1 (open_clip ViT-H-14)",
                "metrics": {"hps": 31.2}}


@pytest.mark.parametrize("row", [EVALUATE_ROW, MANIFEST_ROW, TRANSFER_ROW, PROTOCOL_ROW])
def test_round_trip_keeps_the_layout(row):
    r = EvalRow.from_dict(json.loads(json.dumps(row)))
    assert r.to_dict() == row and list(r.to_dict()) == list(row)  # same keys, same order
    assert EvalRow.from_dict(r.to_dict()) == r


def test_unset_fields_are_left_out_and_unscored_is_not_empty():
    r = EvalRow(model="student", steps=2, nfe=2, guidance=2.0)
    assert r.to_dict() == {"model": "student", "steps": 2, "nfe": 2, "guidance": 2.0}
    assert r.replace(metrics={}).to_dict()["metrics"] == {}  # scored, nothing to report: kept
    assert r.replace(lora_scale=0.0).to_dict()["lora_scale"] == 0.0  # zero is a value


def test_bad_rows_fail_naming_the_key():
    with pytest.raises(ValueError, match="unknown key.*'nfes'"):
        EvalRow.from_dict({**EVALUATE_ROW, "nfes": 3})
    with pytest.raises(ValueError, match="missing key.*'guidance'"):
        EvalRow.from_dict({"model": "x", "steps": 1, "nfe": 1})


def test_as_rows_takes_rows_and_dicts():
    r = EvalRow.from_dict(EVALUATE_ROW)
    assert as_rows([r, EVALUATE_ROW]) == [r, r]
