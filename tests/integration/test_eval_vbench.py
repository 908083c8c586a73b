"""VBench through its own virtual environment: temporal_flickering for real on small videos made here."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tdm.evaluation import VBENCH_DIMENSIONS
from tdm.evaluation.runner import Evaluator, MetricSettings
from tdm.evaluation.vbench import DIMENSION_FILES, VBenchUnavailable, check_dimensions, run_vbench
from tdm.evaluation.weights import MissingWeights

VENV = Path(os.environ.get("TDM_VBENCH_VENV", Path(__file__).resolve().parents[2] / ".venv-vbench"))
needs_venv = pytest.mark.skipif(not (VENV / "bin" / "python").is_file(),
                                reason=f"VBench venv not built at {VENV} (run scripts/vbench_env.sh)")


def _videos(seed: int = 0) -> dict[str, np.ndarray]:
    """Three kinds of 8-frame 32x32 clips: still, slowly drifting, and flickering noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    still = np.stack([np.repeat(base[None], 8, axis=0)] * 2)
    drift = np.stack([np.stack([np.roll(base, t, axis=1) for t in range(8)])] * 2)
    noise = rng.integers(0, 256, (2, 8, 32, 32, 3), dtype=np.uint8)
    return {"still": still, "drift": drift, "noise": noise}


@needs_venv
def test_temporal_flickering_runs_for_real(tmp_path):
    scores = {}
    videos = _videos()
    for name in ("still", "noise"):
        out = run_vbench(["temporal_flickering"], tmp_path / "w", VENV, videos=videos[name],
                         prompts=["a test pattern"] * 2)
        assert len(out["per_video"]["temporal_flickering"]) == 2
        scores[name] = out["scores"]["temporal_flickering"]
    assert (tmp_path / "w" / "vbench").is_dir()  # VBench made its cache dir where tdm pointed VBENCH_CACHE_DIR
    assert scores["still"] == pytest.approx(1.0, abs=1e-3)  # identical frames: no flicker
    assert 0 < scores["noise"] < 0.9  # independent noise frames flicker


@needs_venv
def test_vbench_as_a_runner_metric_and_from_a_folder(tmp_path):
    settings = MetricSettings(weights_dir=str(tmp_path / "w"), vbench_venv=str(VENV))
    ev = Evaluator(["vbench_temporal_flickering"], settings)
    drift = ev.score(_videos()["drift"], ["a drifting pattern"] * 2)["vbench_temporal_flickering"]
    assert 0.5 < drift < 1.0
    with pytest.raises(ValueError, match="scores videos"):
        ev.score(np.zeros((2, 8, 8, 3), np.uint8), ["x", "y"])
    # A folder of .mp4 files (what a video pipeline writes), encoded here with VBench's own OpenCV.
    import subprocess

    folder = tmp_path / "mp4"
    folder.mkdir()
    np.savez(tmp_path / "v.npz", videos=_videos()["still"])
    subprocess.run([str(VENV / "bin" / "python"), "-P", "-c",
                    ("import sys; sys.path.insert(0, sys.argv[1]); import _vbench_driver as d; "
                     "d.write_videos(sys.argv[2], sys.argv[3], 8)"),
                    str(Path(__file__).resolve().parents[2] / "tdm/evaluation"), str(tmp_path / "v.npz"), str(folder)],
                   check=True)
    out = run_vbench(["temporal_flickering"], tmp_path / "w", VENV, video_folder=folder)
    assert out["scores"]["temporal_flickering"] == pytest.approx(1.0, abs=1e-3)


@needs_venv  # the Evaluator finds the VBench environment before it checks the weights
def test_dimensions_need_their_weights_and_fail_fast(tmp_path):
    assert set(DIMENSION_FILES) == set(VBENCH_DIMENSIONS)
    check_dimensions(["temporal_flickering"], tmp_path)  # needs nothing
    with pytest.raises(MissingWeights, match="dino_vitbase16_pretrain.pth"):
        check_dimensions(["temporal_flickering", "subject_consistency"], tmp_path)
    with pytest.raises(MissingWeights, match=str(tmp_path / "vbench" / "amt_model" / "amt-s.pth")):
        Evaluator(["vbench_motion_smoothness"], MetricSettings(weights_dir=str(tmp_path), vbench_venv=str(VENV)))
    with pytest.raises(ValueError, match="not available in custom_input"):
        check_dimensions(["object_class"], tmp_path)
    ev = Evaluator(["vbench_dynamic_degree"], MetricSettings(weights_dir=str(tmp_path), vbench_venv=str(VENV)),
                   skip_missing=True)
    assert "raft-things.pth" in ev.skipped["vbench_dynamic_degree"]


def test_missing_venv_names_the_script(tmp_path):
    with pytest.raises(VBenchUnavailable, match="scripts/vbench_env.sh"):
        run_vbench(["temporal_flickering"], tmp_path, tmp_path / "no-venv", videos=_videos()["still"])


@needs_venv
def test_evaluate_stage_on_a_tiny_video_teacher(tmp_path, monkeypatch):
    """A video family's rows default to VBench dimensions: temporal_flickering runs for real on the teacher's
    videos, the dimensions without weights are skipped (skip_missing) and say which file they need."""
    import json
    import shutil

    import tiny_models
    from conftest import PARAMS

    from tdm.cli import main

    folder = tiny_models.save_pipeline(tiny_models.build("cogvideox"), tmp_path / "cog")
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    (tmp_path / "prompts.txt").write_text("a cat surfing\na red car in the rain\n")
    monkeypatch.chdir(tmp_path)
    sets = ["model.family=cogvideox", f"model.pretrained={folder}", f"evaluate.teacher={folder}",
            "evaluate.student=null", "evaluate.n=2", "evaluate.teacher_steps=2", "evaluate.teacher_guidance=2",
            "evaluate.prompts=prompts.txt", "evaluate.skip_missing=true", f"eval.vbench_venv={VENV}",
            "eval.weights_dir=w"]
    assert main(["evaluate", "-q"] + [a for s in sets for a in ("-S", s)]) == 0
    result = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    (row,) = result["rows"]
    assert (row["model"], row["steps"], row["nfe"], row["n"]) == ("teacher", 2, 4, 2)
    assert set(row["metrics"]) == {"vbench_temporal_flickering"}
    assert 0 < row["metrics"]["vbench_temporal_flickering"] <= 1
    assert "dino_vitbase16_pretrain.pth" in result["metrics_skipped"]["vbench_subject_consistency"]
    assert len(result["metrics_skipped"]) == 6
    with np.load(tmp_path / row["samples"]) as z:
        assert z["images"].ndim == 5  # N x F x H x W x C


def test_vbench_protocol_on_a_tiny_video_teacher(tmp_path, monkeypatch):
    """protocol vbench: prompts from VBench_full_info.json (its standard suite's layout), rows recording the
    protocol, a captioned grid of frame strips; the dimensions run when the venv (and weights) are there, are
    skipped naming what is missing otherwise, and quality / total appear only when all their dimensions ran."""
    import json
    import shutil

    import tiny_models
    from conftest import PARAMS
    from PIL import Image

    from tdm.cli import main

    folder = tiny_models.save_pipeline(tiny_models.build("cogvideox"), tmp_path / "cog")
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    suite = [{"prompt_en": "a cat surfing", "dimension": ["subject_consistency"]},
             {"prompt_en": "a red car in the rain", "dimension": ["color"]},
             {"prompt_en": "fireworks", "dimension": ["temporal_flickering"]}]
    (tmp_path / "VBench_full_info.json").write_text(json.dumps(suite))
    monkeypatch.chdir(tmp_path)
    sets = ["model.family=cogvideox", f"model.pretrained={folder}", f"evaluate.teacher={folder}",
            "evaluate.student=null", "evaluate.n=2", "evaluate.teacher_steps=1", "evaluate.teacher_guidance=2",
            "evaluate.protocol=vbench", "evaluate.protocol_path=VBench_full_info.json",
            "evaluate.skip_missing=true", f"eval.vbench_venv={VENV}", "eval.weights_dir=w"]
    assert main(["evaluate", "-q"] + [a for s in sets for a in ("-S", s)]) == 0
    result = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    (row,) = result["rows"]
    assert (row["protocol"], row["protocol_version"], row["n"]) == ("vbench", "VBench_full_info.json", 2)
    with np.load(tmp_path / row["samples"]) as z:
        assert [str(p) for p in z["prompts"]] == ["a cat surfing", "a red car in the rain"]
        assert z["images"].ndim == 5
    assert "vbench_total" not in row["metrics"]  # the semantic dimensions cannot run on custom_input
    if (VENV / "bin" / "python").is_file():
        assert 0 < row["metrics"]["vbench_temporal_flickering"] <= 1
    else:
        assert "scripts/vbench_env.sh" in result["metrics_skipped"]["vbench_temporal_flickering"]
    assert Image.open(tmp_path / row["grid"]).size[0] > 2 * 96
