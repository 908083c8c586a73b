"""Malformed inputs a user can give (issue 18, "done means"): params files, overrides, CLI arguments, prompt /
sample / model files, unwritable outputs. Each must end in exit code 2 with exactly one `tdm: error:` line that
names the key, flag or path, no traceback, nothing written or touched in the project, and no model loaded.

Everything runs in-process through `tdm.cli.main`; a tripwire on every model / metric loader proves that no
case gets that far."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tdm.cli import main

REPO = Path(__file__).resolve().parents[2]


# -- files the cases point at ------------------------------------------------------------------------------------
def _teacher_copy(base: Path, teacher: Path, name: str) -> Path:
    folder = base / name
    if not folder.exists():
        shutil.copytree(teacher, folder)
    return folder


def _bad_models(base: Path, teacher: Path) -> dict[str, Path]:
    """Model folders broken in the ways copies and downloads break."""
    out = {}
    f = _teacher_copy(base, teacher, "no_weights")
    for w in f.rglob("*.safetensors"):
        w.unlink()
    out["no_weights"] = f
    f = _teacher_copy(base, teacher, "index_not_json")
    (f / "model_index.json").write_text('{"_class_name": "DigitsPipeline",')
    out["index_not_json"] = f
    f = _teacher_copy(base, teacher, "index_list")
    (f / "model_index.json").write_text("[1, 2, 3]")
    out["index_list"] = f
    f = _teacher_copy(base, teacher, "index_binary")
    (f / "model_index.json").write_bytes(b"\xff\xfe\x00garbage\x80")
    out["index_binary"] = f
    f = _teacher_copy(base, teacher, "truncated")
    w = f / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    out["truncated"] = f
    f = _teacher_copy(base, teacher, "sched_not_json")
    (f / "scheduler" / "scheduler_config.json").write_text("num_train_timesteps: 1000")
    out["sched_not_json"] = f
    f = _teacher_copy(base, teacher, "unet_config_not_json")
    (f / "unet" / "config.json").write_text("{")
    out["unet_config_not_json"] = f
    f = _teacher_copy(base, teacher, "no_unet")
    shutil.rmtree(f / "unet")
    out["no_unet"] = f
    f = base / "empty_dir"
    f.mkdir(exist_ok=True)
    out["empty_dir"] = f
    return out


def _inputs(base: Path) -> dict[str, Path]:
    """Prompt, sample and data files, malformed."""
    files = {
        "empty.txt": b"",
        "blank.txt": b"  \n\t\n\n",
        "binary.txt": bytes(range(256)) * 4,
        "latin1.txt": "caf\xe9 digit one\n".encode("latin-1"),
        "bad.jsonl": b'{"prompt": "a digit one"}\n{"prompt": \n',
        "list.jsonl": b'["a digit one"]\n',
        "nofield.csv": b"caption_text,seed\nhello,1\n",
        "empty.csv": b"prompt\n",
        "prompts.yaml": b"- a digit one\n",
        "list.yaml": b"- model\n- distill\n",
        "scalar.yaml": b"42\n",
        "binary.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",
        "unclosed.yaml": b"distill: [1, 2\n",
        "dupe.yaml": b"distill:\n  k: 4\n  iterations: 400\n  k: 1\n",
        "tag.yaml": b"distill: !!python/object/apply:os.system [echo hi]\n",
        "unhashable.yaml": b"distill:\n  ? [1, 2]\n  : 3\n",
        "section_scalar.yaml": b"distill: 5\n",
        "unknown_section.yaml": b"distil:\n  k: 4\n",
        "utf16.yaml": "distill:\n  k: 4\n".encode("utf-16"),
        "deep.yaml": b"distill: " + b"[" * 20000 + b"]" * 20000 + b"\n",
        "aliases.yaml": b"a0: &a0 [x]\n" + b"".join(f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}]\n".encode()
                                                    for i in range(1, 40)),
        "not_npz.npz": b"this is not a zip archive\n",
        "plain.npy": b"",
        "bad.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
        "manifest_missing.json": json.dumps({"rows": [{"model": "x", "steps": 1, "nfe": 1, "guidance": 1.0,
                                                        "samples": "nowhere/s.npz"}]}).encode(),
    }
    out = {}
    for name, data in files.items():
        (base / name).write_bytes(data)
        out[name] = base / name
    np.save(base / "plain.npy", np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(base / "pickled.npz", images=np.zeros((2, 8, 8, 1), np.uint8),
             prompts=np.array([{"x": 1}, None], dtype=object))
    out["pickled.npz"] = base / "pickled.npz"
    np.savez(base / "float_images.npz", images=np.zeros((2, 8, 8, 1), np.float32), prompts=np.array(["a", "b"]))
    out["float_images.npz"] = base / "float_images.npz"
    np.savez(base / "good.npz", images=np.zeros((2, 8, 8, 1), np.uint8), prompts=np.array(["a", "b"]))
    out["good.npz"] = base / "good.npz"
    np.savez(base / "no_prompts.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    out["no_prompts.npz"] = base / "no_prompts.npz"
    data = base / "data_binary"
    data.mkdir(exist_ok=True)
    (data / "metadata.jsonl").write_bytes(b"\xff\xfe\x00\x01")
    out["data_binary"] = data
    data = base / "data_missing_image"
    data.mkdir(exist_ok=True)
    (data / "metadata.jsonl").write_text('{"file_name": "nope.png", "text": "a digit one"}\n')
    out["data_missing_image"] = data
    folder = base / "torn_meta_images"
    folder.mkdir(exist_ok=True)
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n{"file_name": \n')
    out["torn_meta_images"] = folder
    (base / "a_file").write_text("x")
    out["a_file"] = base / "a_file"
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory, request):
    teacher = request.getfixturevalue("teacher_dir")
    base = tmp_path_factory.mktemp("fuzz_assets")
    return {"teacher": teacher, **_bad_models(base, teacher), **_inputs(base)}


# -- the cases -------------------------------------------------------------------------------------------------------
# (id, argv with {placeholders} from the assets, what the error line must name, setup of the project or None)
T = "distill.teacher={teacher}"
CASES = [
    # params files
    ("params-list", ["distill", "--params", "{list.yaml}"], "{list.yaml}", None),
    ("params-scalar", ["teacher-ft", "--params", "{scalar.yaml}"], "{scalar.yaml}", None),
    ("params-binary", ["distill", "--params", "{binary.yaml}"], "{binary.yaml}", None),
    ("params-utf16", ["distill", "--params", "{utf16.yaml}"], "{utf16.yaml}", None),
    ("params-unclosed", ["distill", "--params", "{unclosed.yaml}"], "{unclosed.yaml}", None),
    ("params-duplicate", ["distill", "--params", "{dupe.yaml}"], "distill.k", None),
    ("params-python-tag", ["distill", "--params", "{tag.yaml}"], "{tag.yaml}", None),
    ("params-unhashable-key", ["distill", "--params", "{unhashable.yaml}"], "{unhashable.yaml}", None),
    ("params-section-scalar", ["distill", "--params", "{section_scalar.yaml}"], "distill", None),
    ("params-unknown-section", ["report", "--params", "{unknown_section.yaml}"], "distil", None),
    ("params-deep-nesting", ["distill", "--params", "{deep.yaml}"], "{deep.yaml}", None),
    ("params-billion-laughs", ["distill", "--params", "{aliases.yaml}"], "a0", None),
    ("params-folder", ["distill", "--params", "{empty_dir}"], "{empty_dir}", None),
    ("params-missing", ["evaluate", "--params", "nope.yaml"], "nope.yaml", None),
    # overrides: values
    ("lr-inf", ["distill", "-S", "distill.lr=inf"], "distill.lr", None),
    ("fake-lr-nan", ["distill", "-S", "distill.fake_lr=.nan"], "distill.fake_lr", None),
    ("distill-seed-negative", ["distill", "-S", "distill.seed=-1"], "distill.seed", None),
    ("distill-seed-2-70", ["distill", "-S", f"distill.seed={2**70}"], "distill.seed", None),
    ("teacher-seed-negative", ["teacher-ft", "-S", "teacher_ft.seed=-5"], "teacher_ft.seed", None),
    ("sample-seed-text", ["evaluate", "-S", "sample.seed=abc"], "sample.seed", None),
    ("lt-seed-float", ["lora-transfer", "-S", "lora_transfer.seed=1e30"], "lora_transfer.seed", None),
    ("k-zero", ["distill", "-S", "distill.k=0"], "distill.k", None),
    ("override-bad-yaml", ["distill", "-S", "distill.k=[1, 2"], "distill.k", None),
    ("override-no-key", ["distill", "-S", "distill=5"], "distill=5", None),
    ("override-unknown-section", ["distill", "-S", "nosuch.key=1"], "nosuch", None),
    ("override-unknown-key", ["distill", "-S", "distill.nosuch=1"], "distill.nosuch", None),
    ("override-yaml-tag", ["distill", "-S", "distill.k=!!python/name:os.system"], "distill.k", None),
    ("clip-model-no-tag", ["evaluate", "-S", "eval.clip_model=ViT-L-14"], "eval.clip_model", None),
    ("unknown-metric", ["evaluate", "-S", "evaluate.metrics=[nope]"], "evaluate.metrics", None),
    ("timesteps-not-descending", ["distill", "-S", "distill.k=2", "-S", "distill.timesteps=[5, 10]"],
     "distill", None),
    # prompt files, every kind
    ("prompts-empty-txt", ["distill", "-S", "distill.prompts={empty.txt}"], "distill.prompts", None),
    ("prompts-blank-txt", ["evaluate", "-S", "evaluate.prompts={blank.txt}"], "evaluate.prompts", None),
    ("prompts-binary-txt", ["distill", "-S", "distill.prompts={binary.txt}"], "{binary.txt}", None),
    ("prompts-latin1-txt", ["lora-transfer", "-S", "lora_transfer.prompts={latin1.txt}"], "{latin1.txt}", None),
    ("prompts-torn-jsonl", ["distill", "-S", "distill.prompts={bad.jsonl}"], "{bad.jsonl}", None),
    ("prompts-list-jsonl", ["evaluate", "-S", "evaluate.prompts={list.jsonl}"], "{list.jsonl}", None),
    ("prompts-nofield-csv", ["distill", "-S", "distill.prompts={nofield.csv}"], "{nofield.csv}", None),
    ("prompts-header-only-csv", ["distill", "-S", "distill.prompts={empty.csv}"], "{empty.csv}", None),
    ("prompts-wrong-suffix", ["distill", "-S", "distill.prompts={prompts.yaml}"], "{prompts.yaml}", None),
    # model folders, every path input
    ("teacher-missing", ["distill", "-S", "distill.teacher=no/such/model"], "distill.teacher", None),
    ("teacher-no-weights", ["distill", "-S", "distill.teacher={no_weights}"], "distill.teacher", None),
    ("teacher-index-not-json", ["distill", "-S", "distill.teacher={index_not_json}"],
     "{index_not_json}/model_index.json", None),
    ("teacher-index-list", ["distill", "-S", "distill.teacher={index_list}"], "{index_list}/model_index.json",
     None),
    ("teacher-index-binary", ["distill", "-S", "distill.teacher={index_binary}"],
     "{index_binary}/model_index.json", None),
    ("teacher-truncated-weights", ["distill", "-S", "distill.teacher={truncated}"],
     "{truncated}/unet/diffusion_pytorch_model.safetensors", None),
    ("teacher-scheduler-not-json", ["distill", "-S", "distill.teacher={sched_not_json}"],
     "{sched_not_json}/scheduler/scheduler_config.json", None),
    ("teacher-unet-config-not-json", ["distill", "-S", "distill.teacher={unet_config_not_json}"],
     "{unet_config_not_json}/unet/config.json", None),
    ("teacher-no-unet", ["distill", "-S", "distill.teacher={no_unet}"], "{no_unet}/unet", None),
    ("teacher-empty-folder", ["distill", "-S", "distill.teacher={empty_dir}"], "distill.teacher", None),
    ("total-steps-beyond-schedule", ["distill", "-S", T, "-S", "distill.total_steps=5000"], "distill.total_steps",
     None),
    ("pretrained-no-weights", ["teacher-ft", "-S", "model.pretrained={no_weights}"], "model.pretrained", None),
    ("pretrained-index-not-json", ["teacher-ft", "-S", "model.pretrained={index_not_json}"],
     "{index_not_json}/model_index.json", None),
    ("evaluate-teacher-no-weights", ["evaluate", "-S", "evaluate.teacher={no_weights}", "-S", "evaluate.student=null"],
     "evaluate.teacher", None),
    ("evaluate-student-not-student", ["evaluate", "-S", "evaluate.teacher=null", "-S", "evaluate.student={teacher}"],
     "evaluate.student", None),
    ("lt-lora-missing", ["lora-transfer", "-S", "lora_transfer.lora=no/such/lora"], "lora_transfer.lora", None),
    ("lt-lora-corrupt-safetensors", ["lora-transfer", "-S", "lora_transfer.lora={bad.safetensors}"],
     "lora_transfer.lora", None),
    ("evaluate-reference-pickled", ["evaluate", "-S", "evaluate.teacher=null", "-S", "evaluate.student=null", "-S",
                                    "evaluate.fid_reference={pickled.npz}"], "evaluate.fid_reference", None),
    ("evaluate-manifest-binary", ["evaluate", "-S", "evaluate.teacher=null", "-S", "evaluate.student=null", "-S",
                                  "evaluate.lora_manifest={binary.txt}"], "{binary.txt}", None),
    ("evaluate-manifest-samples-missing", ["evaluate", "-S", "evaluate.teacher=null", "-S", "evaluate.student=null",
                                           "-S", "evaluate.lora_manifest={manifest_missing.json}"],
     "nowhere/s.npz", None),
    ("teacher-data-binary-meta", ["teacher-ft", "-S", "teacher_ft.data={data_binary}"], "{data_binary}", None),
    ("teacher-data-missing-image", ["teacher-ft", "-S", "teacher_ft.data={data_missing_image}", "-S",
                                    "teacher_ft.resolution=8"], "teacher_ft.data", None),
    # command-line arguments
    ("threads-negative", ["--threads", "-1", "distill"], "--threads", None),
    ("threads-text", ["--threads", "two", "report"], "--threads", None),
    ("threads-env", ["report"], "TDM_NUM_THREADS", "env:TDM_NUM_THREADS=lots"),
    ("unknown-command", ["distil"], "distil", None),
    ("override-missing-value", ["distill", "-S"], "-S", None),
    ("sample-batch-size-zero", ["sample", "--model", "{teacher}", "--out", "s.npz", "--batch-size", "0"],
     "--batch-size", None),
    ("sample-seed-negative", ["sample", "--model", "{teacher}", "--out", "s.npz", "--seed", "-1"], "--seed", None),
    ("sample-seed-2-70", ["sample", "--model", "{teacher}", "--out", "s.npz", "--seed", str(2**70)], "--seed", None),
    ("sample-guidance-nan", ["sample", "--model", "{teacher}", "--out", "s.npz", "--guidance", "nan"], "--guidance",
     None),
    ("sample-n-zero", ["sample", "--model", "{teacher}", "--out", "s.npz", "--n", "0"], "--n", None),
    ("sample-steps-beyond-schedule", ["sample", "--model", "{teacher}", "--out", "s.npz", "--steps", "5000"],
     "--steps", None),
    ("sample-total-steps-beyond", ["sample", "--model", "{teacher}", "--out", "s.npz", "--student", "--steps", "2",
                                   "--total-steps", "5000"], "--total-steps", None),
    ("sample-student-without-record", ["sample", "--model", "{teacher}", "--out", "s.npz", "--student",
                                       "--steps", "2"], "--student", None),
    ("sample-out-not-npz", ["sample", "--model", "{teacher}", "--out", "s.png"], "--out", None),
    ("sample-model-no-weights", ["sample", "--model", "{no_weights}", "--out", "s.npz"], "--model", None),
    ("sample-model-index-not-json", ["sample", "--model", "{index_not_json}", "--out", "s.npz"],
     "{index_not_json}/model_index.json", None),
    ("sample-prompts-empty", ["sample", "--model", "{teacher}", "--out", "s.npz", "--prompts", "{empty.txt}"],
     "{empty.txt}", None),
    ("sample-prompts-binary", ["sample", "--model", "{teacher}", "--out", "s.npz", "--prompts", "{binary.txt}"],
     "{binary.txt}", None),
    ("sample-out-under-a-file", ["sample", "--model", "{teacher}", "--out", "{a_file}/s.npz"], "{a_file}/s.npz",
     None),
    ("sample-lora-missing", ["sample", "--model", "{teacher}", "--out", "s.npz", "--lora", "no/such"], "--lora",
     None),
    ("sample-lora-not-a-lora", ["sample", "--model", "{teacher}", "--out", "s.npz", "--lora", "{a_file}"], "--lora",
     None),
    ("sample-lora-scale-alone", ["sample", "--model", "{teacher}", "--out", "s.npz", "--lora-scale", "0.5"],
     "--lora-scale", None),
    ("sample-scheduler-unknown", ["sample", "--model", "{teacher}", "--out", "s.npz", "--scheduler", "NoSuch"],
     "--scheduler", None),
    ("sample-flow-shift-nan", ["sample", "--model", "{teacher}", "--out", "s.npz", "--flow-shift", "nan"],
     "--flow-shift", None),
    ("sample-flow-shift-on-ddpm", ["sample", "--model", "{teacher}", "--out", "s.npz", "--flow-shift", "3"],
     "--flow-shift", None),
    ("push-no-card", ["push", "{empty_dir}", "--repo-id", "a/b", "--dry-run"], "README.md", None),
    ("push-bad-repo-id", ["push", "{empty_dir}", "--repo-id", "not a repo", "--dry-run"], "--repo-id", None),
    ("score-not-npz", ["score", "{not_npz.npz}"], "{not_npz.npz}", None),
    ("score-npy", ["score", "{plain.npy}"], "{plain.npy}", None),
    ("score-pickled", ["score", "{pickled.npz}"], "{pickled.npz}", None),
    ("score-float-images", ["score", "{float_images.npz}"], "{float_images.npz}", None),
    ("score-no-prompts", ["score", "{no_prompts.npz}"], "{no_prompts.npz}", None),
    ("score-missing", ["score", "missing.npz"], "missing.npz", None),
    ("score-empty-folder", ["score", "{empty_dir}"], "{empty_dir}", None),
    ("score-folder-torn-metadata", ["score", "{torn_meta_images}"], "{torn_meta_images}/metadata.jsonl", None),
    ("score-reference-pickled", ["score", "--metrics", "fid", "--reference", "{pickled.npz}", "{good.npz}"],
     "{pickled.npz}", None),
    ("score-unknown-metric", ["score", "--metrics", "nope", "{pickled.npz}"], "--metrics", None),
    ("export-no-weights", ["export", "--student", "{no_weights}", "--out", "exp"], "--student", None),
    ("export-not-a-student", ["export", "--student", "{teacher}", "--out", "exp"], "--student", None),
    ("export-steps-zero", ["export", "--student", "{teacher}", "--out", "exp", "--steps", "0"], "--steps", None),
    ("lora-fuse-scale-nan", ["lora", "fuse", "{a_file}", "--model", "{teacher}", "--out", "f", "--scale", "nan"],
     "--scale", None),
    ("lora-fuse-model-no-weights", ["lora", "fuse", "{a_file}", "--model", "{no_weights}", "--out", "f"], "--model",
     None),
    ("lora-extract-rank-zero", ["lora", "extract", "--base", "{teacher}", "--student", "{teacher}", "--out", "x",
                                "--rank", "0"], "--rank", None),
    ("lora-extract-base-truncated", ["lora", "extract", "--base", "{truncated}", "--student", "{teacher}", "--out",
                                     "x"], "--base", None),
    ("lora-info-missing", ["lora", "info", "no/such.safetensors"], "no/such.safetensors", None),
    # unwritable outputs (as root too: a file where a folder goes)
    ("outputs-is-a-file", ["distill", "-S", T], "cannot write outputs/distill: outputs is a file", "file:outputs"),
    ("metrics-is-a-file", ["distill", "-S", T], "metrics/distill.json", "file:metrics"),
    ("checkpoints-is-a-file", ["distill", "-S", T], "outputs/distill", "file:outputs/distill/checkpoints"),
    ("stage-folder-is-a-file", ["report"], "outputs/report", "file:outputs/report"),
    ("weights-dir-under-a-file", ["distill", "-S", T, "-S", "eval.weights_dir={a_file}/w"], "{a_file}/w", None),
    ("metrics-file-is-a-folder", ["teacher-ft"], "metrics/teacher_ft.json", "dir:metrics/teacher_ft.json"),
]


def _fill(text: str, assets: dict) -> str:
    for name, path in assets.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


@pytest.fixture
def tripwire(monkeypatch):
    """Any model or metric load fails the test: these cases must end before one."""
    from tdm.backbones.digits import DigitsBackbone
    from tdm.backbones.pipeline import PipelineBackbone
    from tdm.evaluation import runner

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded for a malformed input")

    monkeypatch.setattr(DigitsBackbone, "load", classmethod(boom))
    monkeypatch.setattr(PipelineBackbone, "load", classmethod(boom))
    monkeypatch.setattr(runner, "load_metric", boom)


def test_at_least_fifty_cases():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_named_error_line(case, assets, tmp_path, monkeypatch, capsys, tripwire):
    name, argv, named, setup = case
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    monkeypatch.chdir(project)
    monkeypatch.delenv("TDM_NUM_THREADS", raising=False)
    if setup is not None:
        kind, _, what = setup.partition(":")
        if kind == "env":
            monkeypatch.setenv(*what.split("=", 1))
        elif kind == "file":
            (project / what).parent.mkdir(parents=True, exist_ok=True)
            (project / what).write_text("in the way\n")
        elif kind == "dir":
            (project / what).mkdir(parents=True)
    before = _snapshot(project)
    code = main([_fill(a, assets) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("tdm: error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert _fill(named, assets) in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert _snapshot(project) == before, "the project tree changed"
