"""External students in the evaluate stage (issue #16): `evaluate.lora` on `evaluate.teacher` is one more row,
sampled as `tdm.external.sample_external` samples it (the stock pipeline's loop), from the same prompts and noise,
scored like the other rows, with its recipe recorded; and the evaluate side of a prompt-embedding store."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import PARAMS

from tdm import config
from tdm.cli import main
from tdm.config import StagePaths

N = 8
SEED = 3


@pytest.fixture(scope="module")
def lora(teacher_dir, tmp_path_factory):
    """A LoRA in the diffusers layout of the TDM releases (`save_lora_weights`: `unet.<module>.lora_A.weight`,
    the peft config in the header) on the tiny digits teacher, strong enough to show at scale 0.125."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")
    cfg = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                     init_lora_weights=False)
    torch.manual_seed(1)
    unet.add_adapter(cfg)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.mul_(30.0)
    folder = tmp_path_factory.mktemp("external") / "lora"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=cfg.to_dict())
    return folder


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _sets(teacher_dir, lora, weights_dir, *extra):
    return [f"evaluate.teacher={teacher_dir}", "evaluate.student=null", "evaluate.lora_manifest=null",
            f"evaluate.lora={lora}", f"evaluate.n={N}", "evaluate.teacher_steps=3", f"sample.seed={SEED}",
            f"eval.weights_dir={weights_dir}", "sample.batch_size=4", *extra]


def _evaluate(*sets):
    return main(["evaluate", "-q"] + [a for s in sets for a in ("-S", s)])


def test_lora_row_equals_sample_external_and_is_recorded(project, teacher_dir, lora, weights_dir):
    from tdm import report
    from tdm.evaluate import prompt_list
    from tdm.external import sample_external

    sets = _sets(teacher_dir, lora, weights_dir, "evaluate.lora_scale=0.125", "evaluate.lora_steps=2",
                 "evaluate.lora_guidance=2.0")
    assert _evaluate(*sets) == 0
    result = json.loads((project / "metrics/evaluate.json").read_text())
    teacher, ext = result["rows"]
    # CFG counts: 2 steps x (uncond + cond).
    assert (ext["model"], ext["steps"], ext["nfe"], ext["guidance"], ext["lora_scale"]) == (
        "teacher+lora@0.125", 2, 4, 2.0, 0.125)
    for key in ("protocol", "protocol_version", "n", "resolution", "metric_model"):
        assert ext[key] == teacher[key], key
    assert set(ext["metrics"]) == set(teacher["metrics"]) == {"fid_digits", "fid_digits_floor", "class_accuracy", "kid_digits", "fid_digits_mlp",
                                 "fid_digits_mlp_floor", "kid_digits_mlp", "class_accuracy_mlp"}
    assert all(np.isfinite(v) for v in ext["metrics"].values())
    recipe = ext["recipe"]
    assert (recipe["teacher"], recipe["lora"], recipe["lora_scale"], recipe["steps"], recipe["guidance"]) == (
        str(teacher_dir), str(lora), 0.125, 2, 2.0)
    own = json.loads((teacher_dir / "scheduler" / "scheduler_config.json").read_text())
    assert recipe["scheduler"]["_class_name"] == own["_class_name"]  # the teacher's own (digits: DDPM)
    assert "recipe" not in teacher
    # The row's samples are `sample_external` on the same prompts and seed.
    cfg = config.load(project / "params.yaml", sets)
    prompts = prompt_list(cfg)
    by_hand = sample_external(str(teacher_dir), prompts, steps=2, guidance=2.0, lora=lora, lora_scale=0.125,
                              seed=SEED, batch_size=4).numpy()
    with np.load(project / ext["samples"]) as z:
        np.testing.assert_array_equal(z["images"], by_hand)
        assert [str(p) for p in z["prompts"]] == prompts
    without = sample_external(str(teacher_dir), prompts, steps=2, guidance=2.0, seed=SEED, batch_size=4).numpy()
    assert np.abs(without.astype(int) - by_hand.astype(int)).max() > 8  # the LoRA does something at 0.125
    assert (project / ext["grid"]).is_file() and ext["grid"] != teacher["grid"]
    table = (project / "outputs/evaluate/table.md").read_text()
    assert "| teacher+lora@0.125 | 2 | 4 | 2 | 8 |" in table
    # The report: the row in the table, its grid, and its recipe.
    report.run(root=project)
    page = (project / "outputs/report/index.html").read_text()
    assert "<td>teacher+lora@0.125</td>" in page and "External students" in page
    assert own["_class_name"] in page and page.count("class='grid'") == 2


def test_lora_at_scale_zero_is_the_teacher(project, teacher_dir, lora, weights_dir):
    """Scale 0: the adapter is off, so the row equals the teacher alone through the same stock loop, steps and
    guidance (and its NFE is the teacher's at those)."""
    from tdm.evaluate import prompt_list
    from tdm.external import sample_external

    sets = _sets(teacher_dir, lora, weights_dir, "evaluate.lora_scale=0", "evaluate.lora_steps=3",
                 "evaluate.lora_guidance=1.5")
    assert _evaluate(*sets) == 0
    teacher, ext = json.loads((project / "metrics/evaluate.json").read_text())["rows"]
    assert (ext["model"], ext["nfe"]) == ("teacher+lora@0", teacher["nfe"])
    prompts = prompt_list(config.load(project / "params.yaml", sets))
    alone = sample_external(str(teacher_dir), prompts, steps=3, guidance=1.5, seed=SEED, batch_size=4).numpy()
    with np.load(project / ext["samples"]) as z:
        np.testing.assert_array_equal(z["images"], alone)


@pytest.mark.parametrize("extra,message", [
    (["evaluate.teacher=null"], "evaluate.lora: the LoRA is sampled on top of evaluate.teacher, which is null"),
    (["evaluate.teacher=nowhere"], "evaluate.teacher"),
    (["evaluate.lora=bad.safetensors"], "evaluate.lora:"),
])
def test_bad_external_inputs_fail_before_sampling(project, teacher_dir, lora, weights_dir, capsys, extra, message):
    (project / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert _evaluate(*_sets(teacher_dir, lora, weights_dir), *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (project / "metrics").exists() and not (project / "outputs/evaluate").exists()


def test_check_lora_names_the_evaluate_keys(teacher_dir, lora):
    from tdm.evaluate import check_lora

    row = {"folder": teacher_dir, "lora": str(lora), "lora_scale": 1.0, "scheduler": None, "flow_shift": None}
    check_lora(row)
    with pytest.raises(ValueError, match="^evaluate.lora_scheduler: .*not a diffusers scheduler class"):
        check_lora(row | {"scheduler": "NoSuchScheduler"})
    with pytest.raises(ValueError, match="^evaluate.lora_flow_shift: "):
        check_lora(row | {"scheduler": "DDIMScheduler", "flow_shift": 3.0})
    with pytest.raises(ValueError, match="^evaluate.lora_scale: "):
        check_lora(row | {"lora_scale": float("nan")})


def test_prompt_store_gives_the_same_rows(project, teacher_dir, weights_dir):
    """`run(cfg, prompt_store=...)`: the teacher reads the store's rows instead of running its text encoder, and
    the row's samples and scores are those without the store; a store lacking a prompt fails naming the key."""
    from tdm.backbones import load_backbone
    from tdm.backbones.stored_prompts import write_store
    from tdm.evaluate import check_inputs, prompt_list, run

    sets = [f"evaluate.teacher={teacher_dir}", "evaluate.student=null", "evaluate.lora_manifest=null",
            f"evaluate.n={N}", "evaluate.teacher_steps=2", f"eval.weights_dir={weights_dir}", "sample.batch_size=4"]
    cfg = config.load(project / "params.yaml", sets)
    prompts = prompt_list(cfg)
    write_store(load_backbone(teacher_dir), teacher_dir, prompts, project / "store")
    write_store(load_backbone(teacher_dir), teacher_dir, prompts[:1], project / "small")
    check_inputs(cfg, prompt_store=project / "store")
    with pytest.raises(KeyError, match="evaluate.prompt_store: prompt store .* not in it"):
        check_inputs(cfg, prompt_store=project / "small")
    with pytest.raises(FileNotFoundError, match="evaluate.prompt_store: not a folder"):
        check_inputs(cfg, prompt_store=project / "nowhere")
    plain = run(cfg, StagePaths.of("evaluate", project / "plain"), progress=False)
    stored = run(cfg, StagePaths.of("evaluate", project / "stored"), progress=False, prompt_store=project / "store")
    (a,), (b,) = plain["rows"], stored["rows"]
    assert a["metrics"] == b["metrics"]
    with np.load(a["samples"]) as x, np.load(b["samples"]) as y:
        np.testing.assert_array_equal(x["images"], y["images"])
