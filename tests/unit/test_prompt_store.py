"""The prompt-embedding store (tdm/backbones/stored_prompts.py, the stage tdm/prompt_store.py) on digits and every tiny family (tests/tiny_models.py).

Per family: the store's rows equal `encode_prompts` / `null_cond` bit for bit; one TDM iteration with the store
(the backbone loaded without text encoders: no transformers model is constructed, counted at
`PreTrainedModel.__init__`) equals the iteration without it bit for bit; a store made for other encoders is refused.
Digits also: the distill stage with the store (student folder complete and sampleable), a prompt missing, a
partial / foreign store, a dtype mismatch, changed live settings, and teacher-ft reading its captions from a store.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import tiny_models
from conftest import PARAMS
from tdm import config
from tdm.backbones import load_backbone
from tdm.backbones.stored_prompts import PromptStore, StoreMismatch, attach, digit_prompts, open_for, write_store

FAMILIES = ("digits", "sd15", "sdxl", "pixart_alpha", "pixart_sigma", "sd3", "cogvideox", "wan", "flux")
PROMPTS = ["a photo of a cat", "a red car in the rain", "an astronaut riding a horse"]


class ConstructionCounter:
    """Counts every transformers model constructed (all text encoders are `PreTrainedModel`s; the denoisers and
    VAEs are diffusers models), by wrapping the real `PreTrainedModel.__init__`."""

    def __init__(self, monkeypatch):
        from transformers import PreTrainedModel

        self.built: list[str] = []
        original = PreTrainedModel.__init__

        def counting(module, *args, **kwargs):
            self.built.append(type(module).__name__)
            return original(module, *args, **kwargs)

        monkeypatch.setattr(PreTrainedModel, "__init__", counting)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_digits):
    """family -> (model folder, its store of PROMPTS / the digits prompts)."""
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for family in FAMILIES:
        if family == "digits":
            folder = root / "digits"
            tiny_digits.save(folder)
            prompts = digit_prompts()
        else:
            folder = tiny_models.save_pipeline(tiny_models.build(family), root / family)
            prompts = PROMPTS
        backbone = load_backbone(folder)
        write_store(backbone, folder, prompts, root / f"{family}-store", batch_size=2)
        out[family] = (folder, root / f"{family}-store")
    return out


def _cfg(tmp_path, folder, *extra):
    return config.load(PARAMS, [f"distill.teacher={folder}", f"eval.weights_dir={tmp_path / 'w'}",
                                "distill.batch_size=2", "distill.iterations=1", "distill.eval_samples=0",
                                "distill.lr=1e-3", "distill.fake_lr=1e-3", "distill.k=2", "distill.total_steps=900",
                                "distill.lora_rank=4", *extra])


def _iteration(cfg, backbone, prompts):
    from accelerate import Accelerator

    from tdm.distill import TDMTrainer

    torch.manual_seed(0)  # peft draws the LoRA A init from the global generator (distill.train seeds it too)
    trainer = TDMTrainer(cfg, backbone, Accelerator(cpu=True))
    if prompts is not None:
        trainer.prompts = prompts
    metrics = trainer.iteration(0)
    return metrics, trainer.roles.state_dict("student"), trainer.roles.state_dict("fake")


@pytest.mark.parametrize("family", FAMILIES)
def test_store_iteration_equals_encoder_iteration(family, models, tmp_path, monkeypatch):
    folder, store_path = models[family]
    prompts = None if family == "digits" else PROMPTS
    mode = "full" if family == "digits" else "lora"
    cfg = _cfg(tmp_path, folder, f"distill.mode={mode}")
    with_encoders = load_backbone(folder)
    batch = (prompts or digit_prompts())[:2]
    reference_cond, reference_null = with_encoders.encode_prompts(batch), with_encoders.null_cond(2)
    reference = _iteration(cfg, with_encoders, prompts)
    counter = ConstructionCounter(monkeypatch)
    backbone = load_backbone(folder, prompt_store=store_path)
    got = _iteration(cfg, backbone, prompts)
    assert counter.built == [], counter.built  # no text encoder was ever constructed
    assert backbone.skipped_components and all(not k.startswith("text_encoder") for k in backbone.modules())
    cond, null = backbone.encode_prompts(batch), backbone.null_cond(2)
    for want, have in ((reference_cond, cond), (reference_null, null)):
        assert want.keys() == have.keys()
        for k in want:
            assert want[k].dtype == have[k].dtype and torch.equal(want[k], have[k]), k
    for name, value in reference[0].items():
        assert torch.equal(value, got[0][name]) or (value.isnan() and got[0][name].isnan()), name
    for want, have in zip(reference[1:], got[1:]):
        assert all(torch.equal(want[n], have[n]) for n in want)
    # A store of another family's (or another model's) encoders is refused, naming the difference.
    other = models["sd15" if family != "sd15" else "sdxl"][1]
    with pytest.raises(StoreMismatch, match="family|text_encoders"):
        attach(load_backbone(folder, prompt_store=store_path), other)


def test_distill_stage_with_the_store_saves_a_complete_student(models, tmp_path, monkeypatch, weights_dir):
    from tdm import distill
    from tdm.config import StagePaths
    from tdm.student import load_student

    folder, store_path = models["digits"]
    cfg = _cfg(tmp_path, folder, f"distill.prompt_store={store_path}", "distill.student_weights=raw",
               "distill.eval_samples=20", "sample.batch_size=20", f"eval.weights_dir={weights_dir}")
    distill.check_inputs(cfg)
    counter = ConstructionCounter(monkeypatch)
    paths = StagePaths.of("distill", tmp_path)
    metrics = distill.run(cfg, paths, progress=False)
    assert counter.built == [] and metrics["prompt_store"] and metrics["student_weights"] == "raw"
    assert any(k.startswith("eval_k2_") for k in metrics), metrics  # the saved student sampled from the store too
    student_dir = paths.out_dir / "student"
    # The saved folder carries the teacher's text encoder (linked), so the store still matches it.
    assert (student_dir / "text_encoder" / "model.safetensors").read_bytes() == \
        (folder / "text_encoder" / "model.safetensors").read_bytes()
    assert json.loads((student_dir / "model_index.json").read_text())["text_encoder"] == ["transformers",
                                                                                       "CLIPTextModel"]
    open_for(store_path, student_dir, None, digit_prompts())
    student = load_student(student_dir)
    assert counter.built == ["CLIPTextModel"]  # loading it the usual way builds its encoder again
    attach(student.backbone, store_path)


def test_bad_stores_are_refused_before_compute(models, tmp_path):
    folder, store_path = models["digits"]
    with pytest.raises(KeyError, match="distill.prompt_store: .*1 of the prompts are not in it .*'a zebra'") as err:
        open_for(store_path, folder, None, ["a handwritten digit one", "a zebra"], key="distill.prompt_store")
    # also bad input (ValueError): the CLI prints it as one `tdm: error:` line, unquoted, exit 2
    assert isinstance(err.value, ValueError) and str(err.value).startswith("distill.prompt_store: prompt store ")
    with pytest.raises(StoreMismatch, match="load_dtype: store 'model', model 'bfloat16'"):
        open_for(store_path, folder, torch.bfloat16)
    # Partial copies: the index missing, a shard missing, a shard truncated, a shard of another store.
    partial = tmp_path / "partial"
    shutil.copytree(store_path, partial)
    (partial / "index.json").unlink()
    with pytest.raises(ValueError, match="not a complete prompt store .*index.json missing"):
        PromptStore.open(partial)
    shutil.rmtree(partial)
    shutil.copytree(store_path, partial)
    shard = partial / "shards" / "00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="00000.safetensors: truncated"):
        PromptStore.open(partial)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="00000.safetensors: missing"):
        PromptStore.open(partial)
    shutil.copy(models["sd15"][1] / "shards" / "00000.safetensors", shard)
    with pytest.raises(ValueError, match="belongs to another prompt store"):
        PromptStore.open(partial)
    # A store folder that does not exist fails when the stage starts, naming the key.
    from tdm import distill

    with pytest.raises(FileNotFoundError, match="distill.prompt_store: prompt store not found"):
        distill.check_inputs(_cfg(tmp_path, folder, f"distill.prompt_store={tmp_path / 'nope'}"))
    # Without encoders and without a store: a clear error, not a crash inside the pipeline.
    from tdm.backbones import FAMILIES as ADAPTERS

    bare = ADAPTERS["sd15"].load(models["sd15"][0], text_encoders=False)
    with pytest.raises(RuntimeError, match="without its text encoders .*no prompt store is attached"):
        bare.encode_prompts(["a cat"])


def test_live_settings_change_is_refused(models):
    folder, store_path = models["flux"]
    backbone = load_backbone(folder, prompt_store=store_path)
    backbone.encode_prompts(PROMPTS[:1])
    backbone.embedded_guidance = 5.0
    with pytest.raises(StoreMismatch, match="settings.embedded_guidance: store 3.5, model 5.0"):
        backbone.encode_prompts(PROMPTS[:1])


def test_stage_writes_the_store_and_teacher_ft_reads_its_captions(models, tmp_path, monkeypatch):
    from tdm import prompt_store, teacher_ft
    from tdm.config import StagePaths

    folder, _ = models["digits"]
    cfg = config.load(PARAMS, [f"prompt_store.model={folder}", "prompt_store.batch_size=16"])
    paths = StagePaths.of("prompt_store", tmp_path)
    metrics = prompt_store.run(cfg, paths, progress=False)
    assert metrics["prompts"] == 41 and metrics["load_dtype"] == "model"
    assert json.loads(paths.metrics.read_text())["fingerprint"] == metrics["fingerprint"]
    store = paths.out_dir / "store"
    ft = config.load(PARAMS, [f"model.pretrained={folder}", f"teacher_ft.prompt_store={store}", "teacher_ft.steps=1",
                              "teacher_ft.batch_size=4", "teacher_ft.eval_samples=0", "teacher_ft.checkpoint_every=1"])
    teacher_ft.check_inputs(ft)
    counter = ConstructionCounter(monkeypatch)
    backbone, _, result = teacher_ft.train(ft, StagePaths.of("teacher_ft", tmp_path), progress=False)
    assert counter.built == [] and result.steps == 1 and backbone.prompt_store is not None
