"""`tdm export`: a distilled student as stock diffusers pipeline folders, one per K. Loaded with plain
`DiffusionPipeline.from_pretrained` they give the latents `tdm sample --student` computes, a TDM-unify student
included (its K embedding folded in), and the LoRA route that would drop K is refused."""
import json

import pytest
import torch
import tiny_models
from diffusers import DiffusionPipeline

from tdm.backbones import load_backbone
from tdm.cli import main
from tdm.export import export_student
from tdm.roles import Roles
from tdm.sampler import make_noise, student_sample
from tdm.student import StudentRecord, load_student

PROMPT = "a photo of a cat"


def _student(tmp_path, family, record_kw):
    """A student folder of `family`: the tiny model with a random K embedding when TDM-unify."""
    backbone = load_backbone(tiny_models.save_pipeline(tiny_models.build(family), tmp_path / "base"))
    record = StudentRecord(family=family, **record_kw)
    embedding = None
    if record.unify:
        roles = Roles(backbone, "full", k_max=max(record.k_choices))
        with torch.no_grad():
            roles.k_embeddings["student"].weight.normal_(0, 0.5)
        embedding = roles.k_embedding("student")
    folder = tmp_path / "student"
    backbone.save(folder, extra_files=record.files(embedding))
    return folder


def _stock_latents(folder, k, noise, family):
    pipe = DiffusionPipeline.from_pretrained(folder)
    kwargs = dict(prompt=[PROMPT], num_inference_steps=k, guidance_scale=1.0, latents=noise.clone(),
                  output_type="latent")
    if family == "sd3":
        kwargs["max_sequence_length"] = tiny_models.TEXT_LEN
    return pipe(**kwargs).images


@pytest.mark.parametrize("family, record_kw", [
    ("sd15", dict(k=4, total_steps=900, unify=True, k_choices=(1, 2, 4))),
    ("sdxl", dict(k=2, total_steps=900, shift=2.0)),
    ("sd3", dict(k=4, total_steps=1000, shift=3.0, unify=True, k_choices=(2, 4))),
    ("sd15", dict(k=4, total_steps=900, solver_order=2)),
    ("sd3", dict(k=4, total_steps=1000, shift=3.0, unify=True, k_choices=(2, 4), solver_order=2)),
])
def test_exported_pipelines_reproduce_the_student(tmp_path, family, record_kw):
    order = record_kw.pop("solver_order", 1)  # an export choice: the record and the scheduler both carry it
    folder = _student(tmp_path, family, record_kw)
    student = load_student(folder)
    exported = export_student(folder, tmp_path / "exported", solver_order=order if order != 1 else None)
    student.record = student.record.replace(solver_order=order)
    assert [p.name for p in exported] == [f"k{k}" for k in student.record.sampling_ks]
    for k, out in zip(student.record.sampling_ks, exported):
        noise = make_noise(1, student.backbone.sample_shape, seed=k)
        cond = student.backbone.encode_prompts([PROMPT])
        ours = student.sample(cond, noise, k)
        theirs = _stock_latents(out, k, noise, family)
        assert (theirs - ours).abs().max().item() < 1e-5, (family, k, (theirs - ours).abs().max().item())
        index = json.loads((out / "model_index.json").read_text())
        assert index["scheduler"][0] == "tdm.scheduling_tdm"
        again = load_student(out)  # `tdm sample --student` reads the same folder
        assert (again.record.k, again.record.unify, again.record.solver_order) == (k, False, order)
        assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["solver_order"] == order
        assert again.record.timesteps(k).tolist() == student.record.timesteps(k).tolist()
        assert (again.sample(cond, noise, k) - ours).abs().max().item() < 1e-5
        if student.record.unify:  # without the fold the stock pipeline would sample another model
            plain = student_sample(student.backbone, student.net, cond, noise, student.record.timesteps(k))
            assert (plain - ours).abs().max() > 1e-3


def test_export_refuses_what_it_cannot_honour_and_the_unify_lora_route(tmp_path, capsys):
    folder = _student(tmp_path, "sd15", dict(k=2, total_steps=900, unify=True, k_choices=(1, 2)))
    with pytest.raises(ValueError, match="K up to 2"):
        export_student(folder, tmp_path / "out", [4])
    assert not (tmp_path / "out").exists()  # nothing half-written
    (tmp_path / "student_lora").mkdir()
    code = main(["lora", "export", str(tmp_path / "student_lora"), "--format", "diffusers", "--out", str(tmp_path / "x")])
    assert code == 2 and "cannot carry its K embedding" in capsys.readouterr().err


def test_solver_order_through_the_cli(tiny_digits, tmp_path, capsys):
    """`tdm export --solver-order 2` writes it into the exported record and scheduler, so `tdm sample --student` on
    the export samples DPM-Solver++(2M) by default, exactly as `--solver-order 2` on the original student; the
    teacher refuses the flag."""
    import numpy as np

    folder = tmp_path / "student"
    tiny_digits.save(folder, extra_files=StudentRecord(family="digits", k=4, total_steps=900).files())
    assert main(["export", "--student", str(folder), "--out", str(tmp_path / "exported"), "--solver-order", "2"]) == 0
    exported = tmp_path / "exported" / "k4"
    assert StudentRecord.load(exported).solver_order == 2
    common = ["--steps", "4", "--n", "3", "-q", "--student"]
    runs = {"export": ["--model", str(exported)], "order2": ["--model", str(folder), "--solver-order", "2"],
            "order1": ["--model", str(folder)]}
    images = {}
    for name, args in runs.items():
        assert main(["sample", *args, *common, "--out", str(tmp_path / f"{name}.npz")]) == 0
        images[name] = np.load(tmp_path / f"{name}.npz")["images"]
    assert np.array_equal(images["export"], images["order2"])
    assert not np.array_equal(images["order1"], images["order2"])
    capsys.readouterr()
    assert main(["sample", "--model", str(folder), "--solver-order", "2", "--n", "1",
                 "--out", str(tmp_path / "t.npz")]) == 2
    assert "--solver-order applies to --student" in capsys.readouterr().err
