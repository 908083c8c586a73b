"""The flow's console (issue 18 case 8) and its override writers (case 5), without a Prefect server.

- `_run_streaming` (how the flow's stage runner runs a stage) hands each line to the log as it arrives: the
  child below prints a progress line and then waits until the line has reached the log, so a runner that
  delivered output only at the end would hang, not pass.
- Overrides into sections (or whole files) the params file lacks are written by both writers the flows use:
  `_prepare` (full-pipeline) and `dvc_set_params` + DVC's own `-S` writer (ablation), with the values tdm reads.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tdm import config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "flows"))
pipeline = pytest.importorskip("pipeline")

_CHILD = r"""
import os, sys, time
seen = sys.argv[1]
for n in (1, 2, 3):
    print(f"toy: {n}/3 step ({100 * n // 3}%) loss=0.5 | {n} s elapsed, ETA {3 - n} s", file=sys.stderr, flush=True)
    while not os.path.exists(f"{seen}.{n}"):  # until the runner has logged this line
        time.sleep(0.01)
print('{"done": true}')
"""


def test_stage_lines_reach_the_log_while_the_stage_runs(tmp_path):
    seen, progress = tmp_path / "seen", []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("toy: "):
            (tmp_path / f"seen.{line.split()[1].split('/')[0]}").touch()  # lets the child go on

    lines: list[str] = []
    code, tail = pipeline._run_streaming([sys.executable, "-c", _CHILD, str(seen)], tmp_path, dict(os.environ),
                                         on_progress=progress.append, log=log)
    assert code == 0
    assert [ln.split()[1] for ln in lines if ln.startswith("toy: ")] == ["1/3", "2/3", "3/3"]
    assert lines[-1] == '{"done": true}' and tail.endswith('{"done": true}')
    assert progress == pytest.approx([1 / 3, 2 / 3, 1.0])  # the Prefect progress artifact's fractions


def test_progress_bars_feed_the_artifact_not_the_log(tmp_path):
    child = ("import sys\nfor i in range(3): sys.stderr.write(f'\\rbar: {i}/2 [00:0{i}<00:00]')\n"
             "sys.stderr.write('\\n')\nprint('after the bar')")  # a bar ends with a newline when closed
    lines, progress = [], []
    code, _ = pipeline._run_streaming([sys.executable, "-c", child], tmp_path, dict(os.environ), progress.append,
                                      lines.append)
    assert code == 0 and lines == ["after the bar"] and progress[:1] == [0.0]


def test_stages_get_progress_lines_unless_the_user_chose_otherwise(monkeypatch):
    monkeypatch.delenv("TDM_PROGRESS_EVERY", raising=False)
    assert pipeline._env(None)["TDM_PROGRESS_EVERY"] == pipeline.PROGRESS_EVERY
    monkeypatch.setenv("TDM_PROGRESS_EVERY", "60")
    assert pipeline._env(None)["TDM_PROGRESS_EVERY"] == "60"


# -- overrides into what the params file lacks (issue 18 case 5) ------------------------------------------------
def _missing_sections() -> list[str]:
    """Every section one of the shipped profiles lacks (lora_transfer and evaluate today)."""
    missing = set()
    for profile in sorted((REPO / "profiles").glob("*.yaml")):
        missing |= set(config.Config.model_fields) - set(yaml.safe_load(profile.read_text()))
    assert missing, "every profile has every section: the case is gone, choose another sibling"
    return sorted(missing)


def _digits_params_without(tmp_path: Path, sections) -> Path:
    """The embedded default (loadable offline) less `sections`, as a profile lacks them."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k not in sections}, sort_keys=False))
    return path


def _every_key(section: str) -> list[str]:
    """An override for every key of `section`, a valid value different from its default where one is easy."""
    defaults = config.dump(config.Config())[section]
    changed = {"scale": 1.5, "n": 20, "seed": 7, "batch_size": 10, "custom_models": ["digits:thick"],
               "custom_steps": 3, "finetune_steps": 4}
    out = []
    for key, value in defaults.items():
        value = changed.get(key, value)
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        out.append(f"{section}.{key}={text}")
    return out


def _dvc_writes(path: Path, overrides: list[str]) -> None:
    """What `dvc exp run` does with the flow's `-S` arguments: group them by params file, write them."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    grouped = to_path_overrides(pipeline.dvc_set_params(overrides)[1::2])
    assert list(grouped) == ["params.yaml"]  # no value is mistaken for a `file:` prefix
    apply_overrides(path, grouped["params.yaml"])


@pytest.mark.parametrize("section", _missing_sections())
def test_an_override_into_a_section_the_params_file_lacks_is_written(tmp_path, section):
    overrides = _every_key(section)
    want = config.dump(config.load(_digits_params_without(tmp_path, [section]), overrides))
    # full-pipeline: _prepare writes the section (the handed input was a bare KeyError from the YAML writer)
    params = pipeline._prepare(tmp_path, overrides)
    assert params == want and section in yaml.safe_load((tmp_path / "params.yaml").read_text())
    # ablation: `dvc exp run -S` with the flow's arguments, through DVC's own writer
    path = _digits_params_without(tmp_path, [section])
    _dvc_writes(path, overrides)
    assert config.dump(config.load(path)) == want


@pytest.mark.parametrize("text", ["", "# comments only\n"])
def test_an_override_into_an_empty_params_file_is_written(tmp_path, text):
    (tmp_path / "params.yaml").write_text(text)
    params = pipeline._prepare(tmp_path, ["distill.k=2", "evaluate.n=20"])
    assert params["distill"]["k"] == 2 and params["evaluate"]["n"] == 20
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == {"distill": {"k": 2}, "evaluate": {"n": 20}}
    assert not [p.name for p in tmp_path.iterdir() if p.name != "params.yaml"]  # no temp left beside it


def test_a_key_the_section_lacks_and_odd_values_write_as_tdm_reads_them(tmp_path):
    overrides = ["distill.huber_c=0.002", "distill.lr=1e-05", "teacher_ft.mixed_precision=no",
                 "distill.k_choices=[1, 2]", "model.pretrained=null", "eval.weights_dir=a dir/it's \\x=${y}'",
                 "lora_transfer.custom_models=[digits:thick]"]
    path = _digits_params_without(tmp_path, [])
    raw = yaml.safe_load(path.read_text())
    raw["distill"].pop("huber_c", None)  # a key the file's section lacks
    path.write_text(yaml.safe_dump(raw))
    want = config.dump(config.load(path, overrides))
    original = path.read_text()
    _dvc_writes(path, overrides)
    assert config.dump(config.load(path)) == want
    path.write_text(original)
    assert pipeline._prepare(tmp_path, overrides) == want


def test_a_malformed_override_is_one_line_before_anything_is_written(tmp_path):
    path = _digits_params_without(tmp_path, ["evaluate"])
    before = path.read_text()
    for bad, named in (("evaluate.n.deep=3", "evaluate.n.deep"), ("evaluate=3", "evaluate"),
                       ("nosection.k=1", "nosection"), ("evaluate.n=0", "evaluate.n"),
                       ("evaluate.nope=1", "evaluate.nope")):
        with pytest.raises(config.ConfigError) as err:
            pipeline._prepare(tmp_path, [bad])
        assert "\n" not in str(err.value) and named in str(err.value), str(err.value)
    assert path.read_text() == before
    with pytest.raises(config.ConfigError, match="nosection"):  # the ablation's writer refuses the same way
        pipeline.dvc_set_params(["nosection.k=1"])
