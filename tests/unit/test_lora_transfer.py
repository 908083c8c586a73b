"""The lora_transfer stage end to end on a tiny digits teacher and LoRA: the digits custom model is fine-tuned
(and cached), every row is sampled and written to the manifest `tdm evaluate` reads, digits rows are scored
against the style's held-out set, and a folder custom model takes the same path."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tdm import lora as L
from tdm.artifacts import load_samples
from tdm.backbones.base import to_uint8
from tdm.config import StagePaths, parse
from tdm.data import digits_split, digits_style
from tdm.roles import Roles


@pytest.fixture(scope="module")
def run_dir(tiny_digits, tmp_path_factory):
    """A saved tiny teacher, a LoRA student of it (random adapter) saved as `tdm distill` saves it."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("transfer")
    tiny_digits.save(root / "teacher")
    backbone = copy.copy(tiny_digits)
    backbone.net = copy.deepcopy(tiny_digits.net)
    roles = Roles(backbone, "lora", lora_rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in roles.parameters("student"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    (root / "distill" / "student_lora").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in roles.adapter_state_dict("student").items()},
              root / "distill" / "student_lora" / L.PEFT_WEIGHTS)
    (root / "distill" / "student_lora" / L.PEFT_CONFIG).write_text(
        json.dumps(roles.lora_config.to_dict(), default=list))
    (root / "distill" / "student").mkdir()
    from tdm.student import RECORD_FILE, StudentRecord

    (root / "distill" / "student" / RECORD_FILE).write_text(StudentRecord(  # the record alone: a LoRA-only student
        family="digits", k=2, total_steps=900, guidance=2.0, mode="lora", teacher=str(root / "teacher")).to_json())
    # A second "custom model" given as a folder (another model of the same architecture).
    other = copy.copy(tiny_digits)
    other.net = copy.deepcopy(tiny_digits.net)
    with torch.no_grad():
        other.net.conv_out.bias.add_(0.05)
    other.save(root / "other_custom")
    return root


def _cfg(root, weights_dir, **overrides):
    section = {"lora": str(root / "distill" / "student_lora"), "custom_models": ["digits:thick", str(root / "other_custom")],
               "n": 20, "custom_steps": 3, "few_steps": 2, "batch_size": 10, "finetune_steps": 2,
               "finetune_batch_size": 8, **overrides}
    return parse({"lora_transfer": section, "eval": {"weights_dir": str(weights_dir)}})


def test_stage_writes_rows_manifest_and_style_metrics(run_dir, weights_dir, tmp_path):
    from tdm import lora_transfer

    paths = StagePaths(tmp_path / "out", tmp_path / "metrics.json")
    metrics = lora_transfer.run(_cfg(run_dir, weights_dir), paths, progress=False)

    manifest = json.loads((paths.out_dir / "manifest.json").read_text())
    rows = manifest["rows"]
    other = str(run_dir / "other_custom")
    assert [(r["model"], r["steps"], r["nfe"], r["guidance"]) for r in rows] == [
        ("digits:thick", 3, 6, 1.5), ("digits:thick", 2, 4, 1.5), ("digits:thick+tdm_lora", 2, 2, 1.0),
        (other, 3, 6, 1.5), (other, 2, 4, 1.5), (other + "+tdm_lora", 2, 2, 1.0)]
    for row in rows:
        images, prompts = load_samples(row["samples"])
        assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8 and len(prompts) == 20
    # The style's held-out set is the reference of digits rows; a folder model has none.
    ref, _ = load_samples(rows[0]["reference"])
    test_images = digits_split("test")[0]
    assert ref.shape == (len(test_images), 8, 8, 1)
    assert np.array_equal(ref, to_uint8(digits_style(test_images, "thick")).numpy())
    assert "reference" not in rows[3]  # an unset field is left out (tdm.evaluation.rows.EvalRow)

    saved = json.loads(paths.metrics.read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert [(r["model"], r["steps"], r["samples"]) for r in saved["rows"]] == [
        (r["model"], r["steps"], r["samples"]) for r in rows]
    for row in saved["rows"][:3]:
        assert row["metrics"]["fid"] > 0 and 0 <= row["metrics"]["accuracy"] <= 1 and row["metrics"]["n"] == 20
    assert all(row["metrics"] == {} for row in saved["rows"][3:])  # no reference set: left to `tdm evaluate`
    assert 0 < saved["references"]["digits:thick"]["fid_floor"] < saved["rows"][0]["metrics"]["fid"]
    assert saved["references"]["digits:thick"]["real_accuracy"] > 0.9  # the style's own classifier reads it
    # Scored by the digits metric of the style (its classifier, its held-out split), as `evaluate_samples` scores.
    from tdm.evaluation.digits import DigitsScorer, classifier_paths

    scorer = DigitsScorer(weights_dir, "thick")
    assert classifier_paths(weights_dir, "thick")[0].is_file()
    images, prompts = load_samples(rows[0]["samples"])
    assert saved["rows"][0]["metrics"] == {k: v for k, v in scorer.score(images, prompts).items()
                                           if k in ("fid", "accuracy", "n")}
    assert saved["references"]["digits:thick"] == {"real_accuracy": scorer.classifier.held_out_accuracy,
                                                   "fid_floor": scorer.floor(20)}

    # The fine-tuned custom model is cached: a second run reuses it.
    model = paths.out_dir / "custom" / "thick" / "model"
    stamp = (model / "tdm_custom.json").stat().st_mtime_ns
    lora_transfer.run(_cfg(run_dir, weights_dir, custom_models=["digits:thick"], n=4, batch_size=4), paths,
                      progress=False)
    assert (model / "tdm_custom.json").stat().st_mtime_ns == stamp


def test_scale_zero_row_is_the_custom_model_alone(run_dir, weights_dir, tmp_path):
    from tdm import lora_transfer
    from tdm.backbones import load_backbone
    from tdm.sampler import sample_student
    from tdm.student import Student, StudentRecord

    other = str(run_dir / "other_custom")
    paths = StagePaths(tmp_path / "out", tmp_path / "metrics.json")
    lora_transfer.run(_cfg(run_dir, weights_dir, custom_models=[other], scale=0.0, n=6, batch_size=6), paths,
                      progress=False)
    row = json.loads((paths.out_dir / "manifest.json").read_text())["rows"][-1]
    images, prompts = load_samples(row["samples"])
    backbone = load_backbone(other)
    alone = sample_student(Student(backbone, backbone.net, StudentRecord(family="digits", k=2, total_steps=900)),
                           prompts, seed=0)
    assert row["lora_scale"] == 0.0 and np.array_equal(images, alone.numpy())


def test_bad_inputs_fail_before_compute(run_dir, weights_dir, tmp_path):
    from tdm import lora_transfer

    paths = StagePaths(tmp_path / "out", tmp_path / "metrics.json")
    with pytest.raises(FileNotFoundError, match="lora_transfer.lora"):
        lora_transfer.run(_cfg(run_dir, weights_dir, lora=str(tmp_path / "none")), paths, progress=False)
    with pytest.raises(FileNotFoundError, match="lora_transfer.custom_models"):
        lora_transfer.run(_cfg(run_dir, weights_dir, custom_models=[str(tmp_path / "missing")]), paths, progress=False)
    with pytest.raises(ValueError, match="lora_transfer.total_steps"):
        lora_transfer.run(_cfg(run_dir, weights_dir, student=str(tmp_path)), paths, progress=False)
    assert not paths.out_dir.exists()
