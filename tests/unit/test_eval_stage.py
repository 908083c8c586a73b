"""The evaluate stage end to end on digits, with a tiny teacher and a tiny TDM-unify student."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from conftest import PARAMS

from tdm import config
from tdm.artifacts import save_samples
from tdm.cli import main
from tdm.config import StagePaths

N = 20
DISTILL_TINY = ["distill.batch_size=8", "distill.iterations=2", "distill.log_every=1", "distill.checkpoint_every=2",
                "distill.eval_samples=0", "distill.mode=lora"]


@pytest.fixture(scope="module")
def models(tiny_digits, tmp_path_factory, weights_dir):
    """A saved tiny teacher, a TDM-unify student and a fixed-K (K=2) student distilled from it (2 iterations)."""
    from tdm.distill import run

    root = tmp_path_factory.mktemp("eval_models")
    teacher = root / "teacher"
    tiny_digits.save(teacher)
    students = {}
    for name, extra in (("unify", ["distill.unify=true"]), ("fixed", ["distill.k=2"])):
        cfg = config.load(PARAMS, [f"distill.teacher={teacher}", f"eval.weights_dir={weights_dir}",
                                   *DISTILL_TINY, *extra])
        paths = StagePaths.of("distill", root / name)
        run(cfg, paths, progress=False)
        students[name] = paths.out_dir / "student"
    return {"teacher": teacher, **students}


@pytest.fixture
def project(tmp_path, monkeypatch, models, weights_dir):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _args(models, weights_dir, *extra):
    sets = [f"evaluate.teacher={models['teacher']}", f"evaluate.student={models['unify']}", f"evaluate.n={N}",
            "evaluate.teacher_steps=3", f"eval.weights_dir={weights_dir}", "sample.batch_size=8", *extra]
    return ["evaluate", "-q"] + [a for s in sets for a in ("-S", s)]


def test_stage_writes_rows_table_and_samples(project, models, weights_dir):
    assert main(_args(models, weights_dir)) == 0
    result = json.loads((project / "metrics/evaluate.json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["steps"], r["nfe"]) for r in rows] == [
        ("teacher", 3, 6), ("student", 1, 1), ("student", 2, 2), ("student", 4, 4)]
    assert rows[0]["guidance"] == 1.5 and rows[1]["guidance"] == 2.0  # teacher CFG; the student's baked-in CFG
    assert result["metrics_skipped"] == {}
    for r in rows:
        assert r["n"] == N
        assert set(r["metrics"]) == {"fid_digits", "fid_digits_floor", "class_accuracy", "kid_digits", "fid_digits_mlp",
                                 "fid_digits_mlp_floor", "kid_digits_mlp", "class_accuracy_mlp"}
        assert all(np.isfinite(v) for v in r["metrics"].values())
        with np.load(project / r["samples"]) as z:
            assert z["images"].shape == (N, 8, 8, 1)
        assert (project / r["grid"]).is_file()
    # Different samplers, different samples and scores.
    assert len({r["metrics"]["fid_digits"] for r in rows}) == 4
    table = (project / "outputs/evaluate/table.md").read_text()
    assert "| teacher | 3 | 6 | 1.5 | 20 |" in table and table.count("| student |") == 3
    assert "FID (digits)" in table and "class acc." in table


def test_teacher_row_equals_tdm_sample_score(project, models, weights_dir, capsys):
    """Contract: the evaluate teacher row = `tdm sample --steps S --guidance G --n N --score`, same seed."""
    assert main(_args(models, weights_dir, "evaluate.student=null", "sample.seed=3")) == 0
    row = json.loads((project / "metrics/evaluate.json").read_text())["rows"][0]
    capsys.readouterr()
    (project / "p.yaml").write_text(f"eval:\n  weights_dir: {weights_dir}\n")
    assert main(["sample", "-q", "--model", str(models["teacher"]), "--steps", "3", "--guidance", "1.5",
                 "--n", str(N), "--seed", "3", "--batch-size", "8", "--out", "by_hand.npz", "--score",
                 "--params", "p.yaml"]) == 0
    by_hand = json.loads(capsys.readouterr().out)
    assert row["metrics"]["fid_digits"] == by_hand["fid"]
    assert row["metrics"]["class_accuracy"] == by_hand["accuracy"]
    assert row["metrics"]["fid_digits_floor"] == by_hand["fid_floor"]
    with np.load(project / row["samples"]) as a, np.load(project / "by_hand.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["prompts"], b["prompts"])


def test_fixed_k_student_and_lora_transfer_rows(project, models, weights_dir):
    from tdm.evaluation.digits import _features, frechet_distance, images_to_tensor, load_classifier

    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    ours = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    prompts = ["a handwritten digit three"] * 12
    save_samples(project / "lt/custom.npz", target, prompts)
    save_samples(project / "lt/custom_tdm.npz", ours, prompts)
    manifest = {"rows": [
        {"model": "custom", "steps": 25, "nfe": 50, "guidance": 1.5, "samples": "lt/custom.npz", "reference": None},
        {"model": "custom+tdm_lora", "steps": 4, "nfe": 4, "guidance": 2.0, "samples": "lt/custom_tdm.npz",
         "reference": "lt/custom.npz"}]}
    (project / "lt/manifest.json").write_text(json.dumps(manifest))
    assert main(_args(models, weights_dir, "evaluate.teacher=null", f"evaluate.student={models['fixed']}",
                      "evaluate.lora_manifest=lt/manifest.json")) == 0
    rows = json.loads((project / "metrics/evaluate.json").read_text())["rows"]
    assert [(r["model"], r["steps"], r["nfe"], r["n"]) for r in rows] == [
        ("student", 2, 2, N), ("custom", 25, 50, 12), ("custom+tdm_lora", 4, 4, 12)]
    assert rows[1]["samples"] == "lt/custom.npz"
    # The transfer row with a reference: FID in the classifier's space against that reference's images.
    clf = load_classifier(weights_dir)
    expected = frechet_distance(_features(images_to_tensor(ours), clf), _features(images_to_tensor(target), clf))
    assert rows[2]["metrics"]["fid_digits"] == pytest.approx(expected)
    assert "fid_digits_floor" in rows[1]["metrics"]  # no reference: the held-out split, as for the teacher
    # fixed_k_steps=all: the fixed-K student at every configured K.
    assert main(_args(models, weights_dir, "evaluate.teacher=null", f"evaluate.student={models['fixed']}",
                      "evaluate.fixed_k_steps=all", "evaluate.lora_manifest=null")) == 0
    rows = json.loads((project / "metrics/evaluate.json").read_text())["rows"]
    assert [r["steps"] for r in rows] == [1, 2, 4]


def test_missing_weights_fail_before_sampling_or_are_skipped(project, models, weights_dir, capsys, tmp_path):
    start = time.perf_counter()
    assert main(_args(models, weights_dir, "evaluate.metrics=[digits_fid, hps]")) == 2
    assert time.perf_counter() - start < 5  # no sampling happened (and no 47 s hub retries)
    err = capsys.readouterr().err
    assert "HPS_v2.1_compressed.pt" in err and "huggingface.co/xswu/HPSv2" in err
    assert not (project / "outputs/evaluate").exists() and not (project / "metrics").exists()

    assert main(_args(models, weights_dir, "evaluate.metrics=[digits_fid, hps]", "evaluate.skip_missing=true",
                      "evaluate.student=null")) == 0
    assert "tdm: evaluate: metric hps skipped" in capsys.readouterr().err  # on the console, not only in table.md
    result = json.loads((project / "metrics/evaluate.json").read_text())
    assert "HPS_v2.1_compressed.pt" in result["metrics_skipped"]["hps"]
    assert set(result["rows"][0]["metrics"]) == {"fid_digits", "fid_digits_floor"}
    assert "Skipped `hps`" in (project / "outputs/evaluate/table.md").read_text()


@pytest.mark.parametrize("override,names", [
    ("evaluate.teacher=nowhere", "evaluate.teacher"),
    ("evaluate.metrics=[fid_digits]", "evaluate.metrics"),
    ("evaluate.fid_reference=nowhere", "evaluate.fid_reference"),
    ("evaluate.prompts=nowhere.txt", "evaluate.prompts"),
])
def test_bad_inputs_fail_naming_the_key(project, models, weights_dir, capsys, override, names):
    assert main(_args(models, weights_dir, override)) == 2
    assert names in capsys.readouterr().err
    assert not (project / "metrics").exists()


def test_bad_manifest_row_names_the_key(project, models, weights_dir, capsys):
    (project / "m.json").write_text(json.dumps({"rows": [{"model": "x", "steps": 4, "nfe": 4, "guidance": 1.0}]}))
    assert main(_args(models, weights_dir, "evaluate.lora_manifest=m.json")) == 2
    assert "rows[0].samples" in capsys.readouterr().err


def test_score_command_on_an_npz_and_an_image_folder(project, models, weights_dir, capsys):
    from PIL import Image

    assert main(_args(models, weights_dir, "evaluate.student=null")) == 0
    row = json.loads((project / "metrics/evaluate.json").read_text())["rows"][0]
    folder = project / "as_pngs"
    folder.mkdir()
    with np.load(project / row["samples"]) as z:
        images, prompts = z["images"], [str(p) for p in z["prompts"]]
    lines = []
    for i, (im, prompt) in enumerate(zip(images, prompts)):
        Image.fromarray(im[..., 0]).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": prompt}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["score", row["samples"], str(folder), "--metrics", "digits_fid,class_accuracy,digits_view2",
                 "-S", f"eval.weights_dir={weights_dir}"]) == 0
    captured = capsys.readouterr()
    npz_row, folder_row = json.loads(captured.out)["rows"]
    assert (npz_row["steps"], npz_row["nfe"], npz_row["guidance"]) == (3, 6, 1.5)  # read from the npz
    assert npz_row["metrics"] == row["metrics"] == folder_row["metrics"]  # same images, same numbers
    assert "| samples_teacher_s3 | 3 | 6 | 1.5 | 20 |" in captured.err


def test_stage_on_a_tiny_sd15_teacher_with_the_image_metrics(tmp_path, monkeypatch):
    """A real-family teacher through the stage with aesthetic, CLIP score and Inception FID, each loading a
    tiny random checkpoint written in its real format (HPS is ViT-H-14 only: tests/test_eval_clip_metrics.py)."""
    import tiny_models
    from eval_tiny_weights import (
        TINY_ARCH,
        photos,
        register_tiny_clip,
        write_aesthetic_mlp,
        write_inception,
        write_open_clip,
    )
    from PIL import Image

    weights = tmp_path / "w"
    weights.mkdir()
    register_tiny_clip(tmp_path)
    write_open_clip(weights, "openai")
    write_open_clip(weights, "laion")
    write_aesthetic_mlp(weights)
    write_inception(weights)
    (tmp_path / "ref").mkdir()
    for i, im in enumerate(photos(3)):
        Image.fromarray(im).save(tmp_path / "ref" / f"{i}.png")
    folder = tiny_models.save_pipeline(tiny_models.build("sd15"), tmp_path / "sd15")
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na red car in the rain\nan astronaut riding a horse\n")
    monkeypatch.chdir(tmp_path)
    sets = ["model.family=sd15", f"model.pretrained={folder}", f"evaluate.teacher={folder}", "evaluate.student=null",
            "evaluate.n=3", "evaluate.teacher_steps=2", "evaluate.prompts=prompts.txt", "evaluate.fid_reference=ref",
            "evaluate.metrics=[aesthetic, clip, fid]", "eval.weights_dir=w",
            f"eval.clip_model={TINY_ARCH}:laion", f"eval.aesthetic_clip_model={TINY_ARCH}:openai"]
    assert main(["evaluate", "-q"] + [a for s in sets for a in ("-S", s)]) == 0
    (row,) = json.loads((tmp_path / "metrics/evaluate.json").read_text())["rows"]
    assert (row["model"], row["steps"], row["nfe"], row["guidance"]) == ("teacher", 2, 4, 1.5)
    assert set(row["metrics"]) == {"aesthetic", "clip_score", "fid"}
    assert all(np.isfinite(v) for v in row["metrics"].values()) and row["metrics"]["fid"] > 0
    with np.load(tmp_path / row["samples"]) as z:
        assert z["images"].ndim == 4 and z["images"].shape[-1] == 3
    assert "| AeS | CLIP | FID |" in (tmp_path / "outputs/evaluate/table.md").read_text()


def test_the_teacher_curve_keeps_the_reference_teacher_row(project, models):
    """evaluate.teacher_curve adds step counts; the teacher_steps row every table compares against stays in."""
    from tdm import config, evaluate

    sets = [f"evaluate.teacher={models['teacher']}", "evaluate.student=null", "evaluate.teacher_steps=3",
            "evaluate.teacher_curve=[1, 2, 4]"]
    rows = evaluate.plan(config.load(project / "params.yaml", sets))
    assert [r["steps"] for r in rows if not r["student"]] == [1, 2, 3, 4]
    curve_only = evaluate.plan(config.load(project / "params.yaml", sets[:2] + ["evaluate.teacher_curve=[2]"]))
    assert [r["steps"] for r in curve_only] == [2, 50]  # sample.steps (50) when teacher_steps is null
