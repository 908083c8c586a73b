import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import PARAMS
from tdm.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["-S", "model.channels=[32, 32]", "-S", "teacher_ft.steps=3", "-S", "teacher_ft.batch_size=8",
        "-S", "teacher_ft.eval_samples=10", "-S", "sample.steps=2"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_teacher_ft_then_sample(project, capsys):
    assert main(["teacher-ft", "-q", *TINY]) == 0
    metrics = json.loads((project / "metrics/teacher_ft.json").read_text())
    assert metrics["steps"] == 3 and metrics["eval_n"] == 10
    assert main(["sample", "-q", "--model", "outputs/teacher_ft/model", "--steps", "3", "--guidance", "2",
                 "--n", "7", "--out", "samples/t.npz", "--score"]) == 0
    with np.load(project / "samples/t.npz") as z:
        assert z["images"].shape == (7, 8, 8, 1) and z["images"].dtype == np.uint8
        assert len(z["prompts"]) == 7
    assert (project / "samples/t.png").is_file()
    (project / "prompts.txt").write_text("a handwritten digit four\nthe number two, written by hand\n")
    assert main(["sample", "-q", "--model", "outputs/teacher_ft/model", "--steps", "2", "--student",
                 "--total-steps", "900", "--prompts", "prompts.txt", "--out", "s.npz"]) == 0
    with np.load(project / "s.npz") as z:
        assert list(z["prompts"]) == ["a handwritten digit four", "the number two, written by hand"]


def test_bad_param_fails_before_compute_and_writes_nothing(project, capsys):
    assert main(["teacher-ft", "-S", "teacher_ft.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "teacher_ft.lr" in err and "greater than 0" in err
    assert not (project / "outputs").exists() and not (project / "metrics").exists()


def test_sample_errors_name_the_path(project, capsys):
    assert main(["sample", "--model", "nowhere", "--out", "x.npz"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (project / "x.npz").exists()


def test_console_script_is_installed(project):
    exe = Path(sys.executable).parent / "tdm"
    out = subprocess.run([str(exe), "teacher-ft", "-S", "teacher_ft.nope=1"], capture_output=True, text=True)
    assert out.returncode == 2 and "teacher_ft.nope: unknown key" in out.stderr


def test_divergence_is_one_error_line_and_exit_code_3(tmp_path, capsys, monkeypatch):
    """Divergence is permanent (an exact resume diverges again): one `tdm: error:` line, no traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    code = main(["teacher-ft", "-q", "--params", str(tmp_path / "params.yaml"), "-S", "model.channels=[32, 32]",
                 "-S", "teacher_ft.steps=20", "-S", "teacher_ft.batch_size=8", "-S", "teacher_ft.lr=1e12",
                 "-S", "teacher_ft.warmup_steps=0", "-S", "teacher_ft.grad_clip=1e30", "-S", "teacher_ft.log_every=1",
                 "-S", f"eval.weights_dir={tmp_path / 'w'}", "-S", "teacher_ft.eval_samples=0"])
    out, err = capsys.readouterr()
    assert code == 3 and out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("tdm: error: teacher_ft: non-finite") and "Traceback" not in err


def test_quiet_silences_the_libraries_loading_bars(project, capsys, tiny_digits, tmp_path, monkeypatch):
    """`-q` also turns off transformers', diffusers' and huggingface_hub's own progress bars (issue 18 case 17)."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    transformers_logging.enable_progress_bar()
    diffusers_logging.enable_progress_bar()
    try:
        tiny_digits.save(tmp_path / "control")  # the bar a model save draws when nobody silences it
        assert "Writing model shards" in capsys.readouterr().err
        assert main(["teacher-ft", "-q", *TINY, "-S", "teacher_ft.eval_samples=0"]) == 0
        err = capsys.readouterr().err
        assert "Writing model shards" not in err and "it/s]" not in err
        assert not transformers_logging.is_progress_bar_enabled()
        assert not diffusers_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
    finally:
        transformers_logging.enable_progress_bar()
        diffusers_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()


def test_usage_errors_are_one_error_line_and_exit_code_2(capsys):
    assert main(["--threads", "0", "report"]) == 2
    assert main(["sample", "--model", "m", "--out", "o.npz", "--batch-size", "-3"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == ["tdm: error: argument --threads: must be >= 1, got 0 (see `tdm --help`)",
                     "tdm: error: sample: argument --batch-size: must be >= 1, got -3 (see `tdm sample --help`)"]
    assert main(["--help"]) == 0
