"""Publish (issue #16): `tdm export` writes a folder a user pushes unchanged (a model card whose metadata
`huggingface_hub.ModelCard` parses, the recipe, the evaluation table with its protocol, a sample grid, the LoRA in
diffusers format and the family's ComfyUI layout), and `tdm push --dry-run` lists what `upload_folder` would send."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import load_file

from tdm import lora as L
from tdm.cli import main
from tdm.student import StudentRecord


def _x(net):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return net(torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 500]),
                   encoder_hidden_states=torch.randn(2, 16, 64, generator=g), return_dict=False)[0]


@pytest.fixture(scope="module")
def digits_student(tiny_digits, tmp_path_factory):
    """outputs/distill-like layout: a LoRA-mode digits student, its `student_lora/` beside it, and a teacher
    folder whose model card says `license: mit`."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("distill")
    teacher = root / "teacher"
    tiny_digits.save(teacher)
    ModelCard(f"---\n{ModelCardData(license='mit').to_yaml()}\n---\n# teacher\n").save(teacher / "README.md")
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(tiny_digits.net), LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"],
                                                                      init_lora_weights=False))
    model.save_pretrained(root / "student_lora")
    record = StudentRecord(family="digits", k=4, total_steps=900, mode="lora", teacher=str(teacher), guidance=2.0)
    tiny_digits.save(root / "student", net=L.fuse(copy.deepcopy(tiny_digits.net), L.load_lora(root / "student_lora")),
                     extra_files=record.files())
    evaluation = {"rows": [
        {"model": "teacher", "steps": 50, "nfe": 100, "guidance": 2.0, "n": 8, "protocol": "hpsv2",
         "protocol_version": "v2.1", "group": "average", "metrics": {"hps": 25.1}},
        {"model": "student", "steps": 4, "nfe": 4, "guidance": 2.0, "n": 8, "protocol": "hpsv2",
         "protocol_version": "v2.1", "group": "average", "metrics": {"hps": 24.3}}], "metrics_skipped": {}}
    (root / "eval.json").write_text(json.dumps(evaluation))
    return root


@pytest.fixture(scope="module")
def exported(digits_student, tmp_path_factory):
    out = tmp_path_factory.mktemp("pub") / "exported"
    assert main(["export", "--student", str(digits_student / "student"), "--out", str(out),
                 "--eval", str(digits_student / "eval.json")]) == 0
    return out


def test_export_writes_a_card_the_hub_parses_with_the_recipe(exported, digits_student):
    card = ModelCard.load(exported / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert data["license"] == "mit"  # inherited from the teacher's card
    assert {"tdm", "distillation", "lora"} <= set(data["tags"])
    assert "base_model" not in data  # a local teacher without a base_model: none claimed
    text = card.text
    assert "899, 674, 449, 224" in text and "guidance_scale=1.0" in text and "TDMScheduler" in text
    assert "| protocol | group |" in text and "24.30" in text and "HPSv2" in text.replace("hpsv2", "HPSv2")
    recipe = json.loads((exported / "tdm_recipe.json").read_text())
    assert recipe["ks"][0]["timesteps"] == [899, 674, 449, 224] and recipe["distilled_guidance"] == 2.0
    assert recipe["ks"][0]["scheduler"]["_class_name"] == "TDMScheduler"
    assert (exported / "samples.png").stat().st_size > 0 and (exported / "k4" / "model_index.json").is_file()
    assert json.loads((exported / "eval.json").read_text())["rows"][1]["metrics"]["hps"] == 24.3
    # the diffusers LoRA is the student's LoRA (same update), keyed unet.<module>
    keys = load_file(exported / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") for k in keys)
    from tdm.backbones import load_backbone

    teacher = load_backbone(digits_student / "teacher").net
    ours = _x(L.fuse(copy.deepcopy(teacher), L.load_lora(exported / "pytorch_lora_weights.safetensors")))
    torch.testing.assert_close(ours, _x(L.fuse(copy.deepcopy(teacher), L.load_lora(digits_student / "student_lora"))),
                               atol=1e-6, rtol=1e-5)


def test_push_dry_run_lists_the_files_and_a_real_push_needs_a_token(exported, tmp_path, capsys, monkeypatch):
    capsys.readouterr()
    assert main(["push", str(exported), "--repo-id", "someone/tdm-digits", "--dry-run"]) == 0
    result = json.loads(capsys.readouterr().out)
    paths = {f["path"]: f["bytes"] for f in result["files"]}
    assert {"README.md", "tdm_recipe.json", "samples.png", "eval.json", "pytorch_lora_weights.safetensors",
            "k4/model_index.json", "k4/tdm_student.json"} <= set(paths)
    assert paths["README.md"] == (exported / "README.md").stat().st_size
    assert result["bytes"] == sum(paths.values()) and result["dry_run"] is True
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(exported), "--repo-id", "someone/tdm-digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tdm: error: no Hugging Face token") and err.count("\n") == 1
    assert result["card_repo_id"] is True  # the card's loading code still holds the placeholder
    # What a push does to the card before uploading: the placeholder becomes the repo id; the card still parses.
    from tdm import publish

    card_copy = tmp_path / "card_copy"
    card_copy.mkdir()
    (card_copy / "README.md").write_text((exported / "README.md").read_text())
    assert publish._set_repo_id(card_copy, "someone/tdm-digits")
    text = (card_copy / "README.md").read_text()
    assert publish.REPO_ID not in text and "hf download someone/tdm-digits" in text
    assert ModelCard.load(card_copy / "README.md").data.library_name == ModelCard.load(
        exported / "README.md").data.library_name
    assert not publish._set_repo_id(card_copy, "other/x")  # nothing left to fill in


def test_bad_publish_inputs_are_one_line_errors_and_leave_nothing(digits_student, exported, tmp_path, capsys):
    student = str(digits_student / "student")
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"model": "x"}]}))
    cases = [
        (["export", "--student", student, "--out", str(tmp_path / "o"), "--eval", str(tmp_path / "bad.json")],
         "--eval:"),
        (["export", "--student", student, "--out", str(tmp_path / "o"), "--eval", str(tmp_path / "none.json")],
         "--eval:"),
        (["export", "--student", student, "--out", str(tmp_path / "o"), "--samples", str(tmp_path / "s.txt")],
         "--samples:"),
        (["push", str(exported), "--repo-id", "not a repo"], "--repo-id"),
        (["push", str(tmp_path), "--repo-id", "a/b", "--dry-run"], "README.md: missing"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("tdm: error:") and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "o").exists()


def test_unknown_license_and_a_unet_family_gets_its_comfyui_file(tmp_path, capsys):
    """An sd15 LoRA student whose teacher has no card: license unknown; the kohya file ComfyUI loads for UNets
    is written beside the diffusers one, with the same update; the grid comes from a given `tdm sample` npz."""
    import numpy as np
    import tiny_models

    from tdm.artifacts import save_samples
    from tdm.backbones import load_backbone
    from tdm.publish import export_for_hub

    teacher = tiny_models.save_pipeline(tiny_models.build("sd15"), tmp_path / "teacher")
    backbone = load_backbone(teacher)
    lora = L.LoRA(modules={n: L.LoRAModule(down=torch.randn(2, m.in_features) * 0.1,
                                           up=torch.randn(m.out_features, 2) * 0.1, alpha=1.0)
                           for n, m in backbone.net.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))})
    L.save_lora(lora, tmp_path / "student_lora", "peft")
    record = StudentRecord(family="sd15", k=2, total_steps=900, mode="lora", teacher=str(teacher))
    backbone.save(tmp_path / "student", net=L.fuse(copy.deepcopy(backbone.net), lora), extra_files=record.files())
    save_samples(tmp_path / "s.npz", np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"])
    result = export_for_hub(tmp_path / "student", tmp_path / "exported", samples=tmp_path / "s.npz")
    out = tmp_path / "exported"
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "unknown" and "stable-diffusion" in card.data.tags
    assert "lora_comfyui.safetensors" in result["files"] and "kohya layout" in card.text
    assert all(k.startswith("lora_unet_") for k in load_file(out / "lora_comfyui.safetensors"))
    a = L.load_lora(out / "lora_comfyui.safetensors").resolved(backbone.net)
    b = L.load_lora(out / "pytorch_lora_weights.safetensors")
    for name, m in lora.modules.items():
        torch.testing.assert_close(a.modules[name].delta(), m.delta(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b.modules[name].delta(), m.delta(), atol=1e-6, rtol=1e-5)
    assert (out / "samples.png").read_bytes() == (tmp_path / "s.png").read_bytes()


def test_the_card_states_a_per_step_guidance_schedule():
    from tdm.publish import _baked_guidance

    assert _baked_guidance({"distilled_guidance": 1.0, "distilled_guidance_schedule": [3.0, 1.0, 1.0, 1.0]}) == \
        "3, 1, 1, 1 (per step, largest timestep first)"
    assert _baked_guidance({"distilled_guidance": 2.0}) == "2"
    assert _baked_guidance({"distilled_guidance": None, "distilled_guidance_schedule": None}) == "not recorded"
