"""Through real DVC, on a copy of the project with tiny params: `dvc repro distill` runs teacher_ft, prompt_store
and distill; `dvc status` is then clean; a change to a module both stages import (tdm/ema.py) reruns both; a
change to a param distill reads that the hand-written dvc.yaml missed (sample.seed) makes DVC rerun distill.
This is what dvc.yaml's derived deps/params (scripts/dvc_deps.py) buy. Five stage runs, each mostly torch /
diffusers imports: 1.5-3 minutes on a 2-core CPU box."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "model": {"channels": [32, 32]},
    "teacher_ft": {"steps": 2, "batch_size": 8, "warmup_steps": 0, "checkpoint_every": 2, "eval_samples": 0},
    "distill": {"iterations": 2, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 2, "log_every": 1,
                "eval_samples": 0},
}

pytestmark = pytest.mark.slow


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dvc_deps", REPO / "scripts" / "dvc_deps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dvc_deps"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git repository holding tdm/, dvc.yaml, params.yaml (+ tiny overrides) and the DVC config, and an
    environment whose `tdm` command runs that copy's code."""
    import yaml

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "tdm", root / "tdm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    bin_dir = tmp_path_factory.mktemp("bin")
    wrapper = bin_dir / "tdm"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tdm.cli "$@"\n')
    wrapper.chmod(0o755)
    state = tmp_path_factory.mktemp("dvc-state")
    # No .pyc files: DVC hashes a folder dep (tdm/backbones) with its __pycache__/ unless .dvcignore lists it.
    env = {**os.environ, "PYTHONPATH": str(root), "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}"
           f"{os.pathsep}{os.environ['PATH']}", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1", "TDM_MLFLOW": "0",
           "HF_HUB_OFFLINE": "1", "TDM_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "DVC_SITE_CACHE_DIR": str(state / "site"), "DVC_GLOBAL_CONFIG_DIR": str(state / "global"),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("TDM_MLFLOW_PARENT_RUN_ID", None)
    # The copy's dvc.yaml derived from the copy's code (the unit tests check the committed one is current).
    subprocess.run([sys.executable, str(REPO / "scripts" / "dvc_deps.py"), "--write", "--root", str(root)], check=True)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    return root, env


def _run(project, *cmd: str) -> str:
    root, env = project
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return {stage for stage in ("teacher_ft", "prompt_store", "distill") if f"Running stage '{stage}'" in output}


def test_the_stage_commands_run_the_copy(project):
    root, _ = project
    wrapper = _run(project, "sh", "-c", "command -v tdm").strip()  # what DVC's `tdm <stage> -q` runs
    assert Path(wrapper).read_text().endswith('-m tdm.cli "$@"\n')
    imported = _run(project, sys.executable, "-c", "import tdm.cli; print(tdm.cli.__file__)").strip()
    assert Path(imported).resolve() == (root / "tdm" / "cli.py").resolve()


def test_repro_reruns_the_stages_whose_code_or_params_changed(project):
    root, _ = project
    derived = _load_script().derive(root)
    assert _ran(_run(project, "dvc", "repro", "distill")) == {"teacher_ft", "prompt_store", "distill"}
    assert "up to date" in _run(project, "dvc", "status", "--with-deps", "distill")
    assert (root / "outputs" / "prompt_store" / "store" / "index.json").is_file()

    assert "tdm/ema.py" in derived["teacher_ft"].deps and "tdm/ema.py" in derived["distill"].deps
    with (root / "tdm" / "ema.py").open("a") as f:
        f.write("# a comment: the file changed, so both stages that import it rerun\n")
    # prompt_store does not import tdm/ema.py: it reruns only if the retrained teacher's bytes changed.
    assert _ran(_run(project, "dvc", "repro", "distill")) - {"prompt_store"} == {"teacher_ft", "distill"}
    assert "up to date" in _run(project, "dvc", "status", "--with-deps", "distill")

    # A param the hand-written dvc.yaml missed (distill's sample-based evaluation reads it). DVC flags each
    # stage that reads it (teacher_ft too when it reads the whole section); distill, rerun alone, reruns.
    key = next(k for k in ("sample.seed", "eval.weights_dir") if _reads(derived["distill"], k))
    _set_param(root, key)
    status = _run(project, "dvc", "status", "--with-deps", "distill")
    assert key in status.split("distill:")[1]
    assert ("teacher_ft:" in status) == _reads(derived["teacher_ft"], key)
    assert _ran(_run(project, "dvc", "repro", "--single-item", "distill")) == {"distill"}
    assert "distill:" not in _run(project, "dvc", "status", "--with-deps", "distill")


def _reads(stage, key: str) -> bool:
    return key in stage.params or key.split(".")[0] in stage.params


def _set_param(root: Path, key: str) -> None:
    """Give a param of the copy's params.yaml another valid value (numbers + 1, strings a suffix)."""
    import yaml

    section, name = key.split(".")
    params = root / "params.yaml"
    values = yaml.safe_load(params.read_text())
    old = values[section][name]
    values[section][name] = old + 1 if isinstance(old, int) and not isinstance(old, bool) else f"{old}-changed"
    params.write_text(yaml.safe_dump(values, sort_keys=False))
