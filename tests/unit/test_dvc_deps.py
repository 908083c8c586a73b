"""scripts/dvc_deps.py: dvc.yaml's code deps and params are what the code imports and reads (the first test),
and the deriver notices an added import, an added param read, an aliased section, a runtime-only file (the
others, on a temporary copy of tdm/). Static analysis only: no DVC runs, well under a second each."""
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("dvc_deps", REPO / "scripts" / "dvc_deps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dvc_deps"] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


dvc_deps = _load_script()


def test_committed_dvc_yaml_lists_what_the_code_imports_and_reads(capsys):
    """Fails when a stage's code imports or reads something its dvc.yaml entry does not list (or the reverse)."""
    code = dvc_deps.main(["--check"])
    assert code == 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A copy of the project's package, dvc.yaml and params.yaml (taken once: the tests compare with it), its
    dvc.yaml rewritten to match its code, so that the tests below see only their own changes."""
    root = tmp_path_factory.mktemp("pristine")
    shutil.copytree(REPO / "tdm", root / "tdm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, root / name)
    assert dvc_deps.main(["--write", "--root", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def baseline(pristine):
    return dvc_deps.derive(pristine)


@pytest.fixture
def project(pristine, tmp_path):
    """A copy of the pristine copy, for one test to change."""
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + "\n\n" + text + "\n")


def _distill(root: Path):
    return dvc_deps.derive(root)["distill"]


def test_an_added_import_adds_its_file(project, baseline):
    before = baseline["distill"]
    assert "tdm/ema.py" in before.deps and "tdm/report.py" not in before.deps
    _append(project / "tdm" / "ema.py", "import tdm.report")
    assert "tdm/report.py" in _distill(project).deps  # (with whatever report.py imports in turn)


def test_a_lazy_relative_import_counts(project):
    _append(project / "tdm" / "ema.py", "def _later():\n    from . import report\n    return report")
    assert "tdm/report.py" in _distill(project).deps


def test_check_names_the_stage_and_the_missing_entries(project, capsys):
    _append(project / "tdm" / "ema.py", "import tdm.report\n\ndef _probe(cfg):\n    return cfg.evaluate.n")
    assert dvc_deps.main(["--check", "--root", str(project)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"stage distill: deps: missing [^\n]*tdm/report\.py", err), err
    assert "stage distill: params: missing evaluate.n" in err


def test_a_param_read_adds_the_key(project, baseline):
    before = baseline["distill"]
    assert "evaluate.n" not in before.params and "evaluate" not in before.params
    _append(project / "tdm" / "ema.py", "def _probe(cfg):\n    return cfg.evaluate.n")
    assert set(_distill(project).params) - set(before.params) == {"evaluate.n"}


def test_an_aliased_section_adds_the_whole_section_which_absorbs_its_keys(project):
    _append(project / "tdm" / "ema.py", "def _probe(self):\n    n = self.cfg.evaluate.n\n    e = self.cfg.evaluate\n"
                                        "    return n, e")
    params = _distill(project).params
    assert "evaluate" in params and not any(p.startswith("evaluate.") for p in params)


def test_a_dumped_section_is_read_but_a_whole_dump_is_provenance(project, baseline):
    before = baseline["distill"]
    _append(project / "tdm" / "ema.py", 'from tdm.config import dump\n\nSECTION = "evaluate"\n\n'
                                        "def _probe(cfg):\n    print(dump(cfg))\n    return dump(cfg)[SECTION]")
    assert set(_distill(project).params) - set(before.params) == {"evaluate"}


def test_unrelated_attributes_named_like_sections_do_not_count(project, baseline):
    before = baseline["distill"]
    _append(project / "tdm" / "ema.py", "def _probe(backbone, scheduler):\n"
                                        "    return backbone.model.family, scheduler.config.sample, backbone.eval()")
    assert _distill(project).params == before.params


def test_a_key_params_yaml_does_not_hold_becomes_its_section(project):
    params = project / "params.yaml"
    params.write_text(re.sub(r"^  fid_reference:.*\n", "", params.read_text(), flags=re.M))
    _append(project / "tdm" / "ema.py", "def _probe(cfg):\n    return cfg.evaluate.fid_reference")
    assert "evaluate" in _distill(project).params


def test_a_file_run_without_import_is_a_dep(project):
    (project / "tdm" / "_probe_driver.py").write_text("print('run as a subprocess')\n")
    _append(project / "tdm" / "ema.py", 'DRIVER = "_probe_driver.py"')
    assert "tdm/_probe_driver.py" in _distill(project).deps


def test_a_folder_is_listed_only_when_every_module_in_it_runs(project, baseline):
    assert "tdm/backbones" in baseline["distill"].deps
    (project / "tdm" / "backbones" / "unused.py").write_text("X = 1\n")
    deps = _distill(project).deps
    assert "tdm/backbones" not in deps and "tdm/backbones/__init__.py" in deps and deps == sorted(deps)


def test_write_rewrites_code_deps_and_params_only(project, baseline):
    dvc_yaml = project / "dvc.yaml"
    original = dvc_yaml.read_text()
    dvc_yaml.write_text(original.replace("      - tdm/ema.py\n", "", 1).replace("      - distill\n", "", 1))
    assert dvc_deps.main(["--check", "--root", str(project)]) == 1
    assert dvc_deps.main(["--write", "--root", str(project)]) == 0
    assert dvc_yaml.read_text() == original  # comments, upstream deps, outs, metrics, plots as they were
    users_of_ema = [stage for stage, d in baseline.items() if "tdm/ema.py" in d.deps]
    _append(project / "tdm" / "ema.py", "import tdm.report")
    assert dvc_deps.main(["--write", "--root", str(project)]) == 0
    assert dvc_deps.main(["--check", "--root", str(project)]) == 0
    written = dvc_yaml.read_text()
    assert written.count("- tdm/report.py") == original.count("- tdm/report.py") + len(users_of_ema)
    assert written.startswith(original.split("stages:")[0]) and "- outputs/teacher_ft/model" in written
