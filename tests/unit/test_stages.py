"""Multi-stage distillation (`distill.stages`, tdm/stages.py): stages in one loop, the student carried across a
boundary, the fake score re-initialised when asked, exact resume across a boundary, and a stage trained below the
native resolution on real families (SDXL's size time ids follow)."""
import json

import pytest
import torch

import tiny_models
from conftest import PARAMS
from tdm import checkpoint as ckpt
from tdm import config
from tdm.backbones import load_backbone
from tdm.config import StagePaths
from tdm.distill import run, train
from tdm.stages import stage_configs, stage_starts

TINY = ["distill.batch_size=8", "distill.log_every=1", "distill.checkpoint_every=2", "distill.eval_samples=0",
        "distill.fake_lr=1e-3", "distill.lr=2e-4", "distill.mode=lora", "distill.student_weights=raw"]
TWO_STAGES = ["distill.iterations=6",
              "distill.stages=[{iterations: 3, lr: 1.0e-4}, {iterations: 3, reinit_fake: true, guidance: 3.0}]"]


def _cfg(teacher_dir, tmp_path, *extra):
    return config.load(PARAMS, [f"distill.teacher={teacher_dir}", f"eval.weights_dir={tmp_path / 'w'}", *TINY,
                                *extra])


def test_stage_configs_apply_each_stages_keys(teacher_dir, tmp_path):
    cfg = _cfg(teacher_dir, tmp_path, *TWO_STAGES)
    first, second = stage_configs(cfg)
    assert (first.distill.iterations, first.distill.lr, first.distill.guidance) == (3, 1e-4, 2.0)
    assert (second.distill.iterations, second.distill.lr, second.distill.guidance) == (3, 2e-4, 3.0)
    assert first.distill.stages == second.distill.stages == ()
    assert stage_starts(cfg) == [0, 3]
    assert stage_configs(_cfg(teacher_dir, tmp_path)) == [_cfg(teacher_dir, tmp_path)]


@pytest.mark.parametrize("bad, key", [
    (["distill.iterations=7"], "distill: iterations: 7, but the stages sum to 6"),
    (["distill.stages=[{iterations: 3}, {iterations: 3, resolution: 16}]"], r"distill: stages\[1\].resolution"),
    (["distill.stages=[{iterations: 3}, {iterations: 3, lrr: 1}]"], "lrr"),
])
def test_bad_stages_are_refused_by_key(teacher_dir, tmp_path, bad, key):
    with pytest.raises(config.ConfigError, match=key):
        _cfg(teacher_dir, tmp_path, *TWO_STAGES, *bad)


def test_the_first_stage_is_the_single_stage_run_and_the_second_carries_the_student(teacher_dir, tmp_path):
    """Stage 1 of a staged run is bit for bit the run of its own config; stage 2 starts from that student (and
    its trained fake score only when not re-initialised: here it is, so the fake adapter restarts at the teacher)."""
    staged_cfg = _cfg(teacher_dir, tmp_path, *TWO_STAGES)
    staged, _ = train(staged_cfg, StagePaths.of("distill", tmp_path / "staged"), progress=False, stop_after=3)
    single_cfg = _cfg(teacher_dir, tmp_path, "distill.iterations=3", "distill.lr=1e-4")
    single, _ = train(single_cfg, StagePaths.of("distill", tmp_path / "single"), progress=False)
    for role in ("student", "fake"):
        a, b = staged.roles.state_dict(role), single.roles.state_dict(role)
        assert all(torch.equal(a[n], b[n]) for n in a), role

    from tdm.stages import StagedTrainer

    holder = StagedTrainer.__new__(StagedTrainer)  # enter stage 2 from the finished stage 1, as the loop does
    built = []

    def build(c, resolution):
        from accelerate import Accelerator

        from tdm.distill import TDMTrainer

        built.append((c.distill.guidance, resolution))
        return TDMTrainer(c, load_backbone(teacher_dir), Accelerator(cpu=True))

    holder.cfg, holder.build, holder.main_process = staged_cfg, build, False
    holder.configs, holder.starts, holder.specs = stage_configs(staged_cfg), stage_starts(staged_cfg), \
        staged_cfg.distill.stages
    holder.current, holder.index = staged, 0
    holder._enter(1, holder._carry())
    assert built == [(3.0, None)] and holder.stage_of(2) == 0 and holder.stage_of(3) == 1
    student = holder.current.roles.state_dict("student")
    assert all(torch.equal(student[n], w) for n, w in single.roles.state_dict("student").items())
    fake = holder.current.roles.state_dict("fake")
    trained_fake = single.roles.state_dict("fake")
    lora_b = [n for n in fake if "lora_B" in n]
    assert lora_b and all(not fake[n].any() for n in lora_b)  # a fresh adapter: the fake score = the teacher
    assert any(trained_fake[n].any() for n in lora_b)


def test_a_staged_run_resumes_exactly_across_the_boundary(teacher_dir, tmp_path, capsys):
    cfg = _cfg(teacher_dir, tmp_path, *TWO_STAGES)
    whole = StagePaths.of("distill", tmp_path / "whole")
    metrics = run(cfg, whole, progress=False)
    assert metrics["iterations"] == 6 and metrics["stages"] == 2
    assert "distill: stage 2/2 from iteration 3: 3 iterations at native size, fake score re-initialised" in \
        capsys.readouterr().err
    rows = [json.loads(line) for line in (whole.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [0, 0, 0, 1, 1, 1] and [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]

    parts = StagePaths.of("distill", tmp_path / "parts")
    train(cfg, parts, progress=False, stop_after=2)  # killed in stage 1 ...
    _, summary = train(cfg, parts, progress=False, stop_after=4)  # ... resumed across the boundary, killed in 2
    assert summary["resumed_from"] == 2
    assert ckpt.load_latest(parts.out_dir / "checkpoints")[1]["trainer"]["stage_index"] == 1
    run(cfg, parts, progress=False)  # resumed inside stage 2
    saved = [json.loads(line) for line in (parts.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_gen"] for r in saved] == [r["loss_gen"] for r in rows]
    from safetensors.torch import load_file

    a = load_file(whole.out_dir / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(parts.out_dir / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((whole.out_dir / "student" / "tdm_student.json").read_text())
    assert record["guidance"] == 3.0  # the last stage's
    params = json.loads((whole.out_dir / "student" / "tdm_params.json").read_text())
    assert len(params["distill"]["stages"]) == 2  # the whole recipe beside the student


# -- a lower-resolution stage on real families -----------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: tiny_models.save_pipeline(tiny_models.build(f), root / f) for f in ("sdxl", "pixart_alpha", "flux")}


@pytest.mark.parametrize("family", ["sdxl", "pixart_alpha", "flux"])
def test_set_resolution_trains_below_the_native_size(family, saved):
    backbone = load_backbone(saved[family])
    native_shape, (h, w) = backbone.sample_shape, backbone.resolution
    multiple = backbone.vae_scale_factor * backbone.latent_multiple
    half = h // 2 - (h // 2) % multiple
    backbone.set_resolution(half, where="distill.stages: resolution")
    assert backbone.resolution == (half, half) and backbone.sample_shape[-2:] == (half // backbone.vae_scale_factor,) * 2
    cond = backbone.encode_prompts(["a photo of a cat", ""])
    if family == "sdxl":  # the size micro-conditioning follows, on prompts and the null condition
        assert cond["time_ids"][0].tolist() == [half, half, 0, 0, half, half]
        assert backbone.null_cond(1)["time_ids"][0].tolist() == [half, half, 0, 0, half, half]
    x = torch.randn(2, *backbone.sample_shape)
    with torch.no_grad():
        out = backbone.predict(backbone.net, x, torch.tensor([500, 500]), cond)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match=r"distill.stages: resolution: .* not a multiple of"):
        backbone.set_resolution(half + 1, where="distill.stages: resolution")
    with pytest.raises(ValueError, match="exceeds the model's native"):
        backbone.set_resolution(2 * h, where="distill.stages: resolution")
    backbone.set_resolution(h)
    assert backbone.sample_shape == native_shape and backbone.latent_override is None


def test_digits_has_one_size(teacher_dir):
    with pytest.raises(ValueError, match="distill.stages: resolution: the digits model has one native size"):
        load_backbone(teacher_dir).set_resolution(16, where="distill.stages: resolution")


def test_sdxl_two_stage_distill_at_half_then_native_resolution(saved, tmp_path):
    """The paper's SDXL recipe in miniature: stage 1 below the native size, stage 2 at it with the fake score
    re-initialised; the saved student is a native-size student."""
    from tdm.student import load_student

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car in the rain\n")
    folder = saved["sdxl"]
    h = load_backbone(folder).resolution[0]
    cfg = config.parse(config.apply_overrides({}, [
        "model.family=sdxl", f"model.pretrained={folder}", f"distill.teacher={folder}", f"distill.prompts={prompts}",
        "distill.batch_size=2", "distill.checkpoint_every=2", "distill.log_every=1", "distill.eval_samples=0",
        "distill.lora_rank=4", "distill.k=2", "distill.total_steps=1000", "distill.iterations=4",
        f"distill.stages=[{{iterations: 2, resolution: {h // 2}}}, {{iterations: 2, reinit_fake: true}}]",
        f"eval.weights_dir={tmp_path / 'w'}"]))
    from tdm import prompt_store

    store = StagePaths.of("prompt_store", tmp_path / "ps")
    prompt_store.run(cfg, store, progress=False)  # made (and fingerprinted) at the native size
    cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(
        update={"prompt_store": str(store.out_dir / "store")})})
    paths = StagePaths.of("distill", tmp_path)
    metrics = run(cfg, paths, progress=False)
    assert metrics["iterations"] == 4 and metrics["prompt_store"] and all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss_gen",
                                                                                                  "loss_fake"))
    student = load_student(paths.out_dir / "student").backbone
    assert student.resolution == (h, h)


def test_a_bad_later_stage_resolution_fails_before_any_iteration(saved, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    folder = saved["sdxl"]
    cfg = config.parse(config.apply_overrides({}, [
        "model.family=sdxl", f"model.pretrained={folder}", f"distill.teacher={folder}", f"distill.prompts={prompts}",
        "distill.batch_size=2", "distill.eval_samples=0", "distill.lora_rank=4", "distill.k=2",
        "distill.total_steps=1000", "distill.iterations=4",
        "distill.stages=[{iterations: 2}, {iterations: 1, resolution: 9}, {iterations: 1}]",
        f"eval.weights_dir={tmp_path / 'w'}"]))
    paths = StagePaths.of("distill", tmp_path)
    with pytest.raises(ValueError, match=r"distill.stages\[1\].resolution: 9 px is not a multiple"):
        train(cfg, paths, progress=False)
    assert not (paths.out_dir / "metrics.jsonl").exists() or not (paths.out_dir / "metrics.jsonl").read_text()
