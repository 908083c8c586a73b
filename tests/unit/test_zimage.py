"""Z-Image (issue #14) behind the backbone protocol, with a tiny random model of its real classes
(tests/tiny_zimage.py: diffusers' `ZImagePipeline` + `ZImageTransformer2DModel`, transformers' `Qwen3Model` with a
Qwen-style BPE tokenizer and chat template, FLUX.1's VAE layout, Z-Image-Turbo's scheduler; ~316k transformer
parameters), saved with `save_pretrained` and read back offline.

What the adapter adds over the other flow families is checked against diffusers itself: the inverted time and
negated velocity (our CFG teacher sampler = ZImagePipeline's own loop, its g = our w - 1), the list inputs
(padded + mask conditioning gives exactly the pipeline's per-prompt embeddings), the stock pipeline with our
`TDMFlowScheduler` = `student_sample` bit for bit, and the LoRA written as `transformer.*` keys loading in
`ZImagePipeline.load_lora_weights`.

The tests that go through the family registry (`load_backbone`, `tdm.config`'s model check, the distill stage,
`from_student`, the profile) skip until `tdm.backbones.FAMILIES` has "zimage" (docs/backbones.md).
"""
from __future__ import annotations

import json

import pytest
import torch

import tiny_models
from tiny_zimage import SHAPE, TEXT_LEN, save, tiny_zimage
from tdm import config
from tdm.backbones import FAMILIES
from tdm.backbones.pipeline import UnsupportedModel
from tdm.backbones.zimage import ZImageBackbone

PROMPTS = ["a photo of a cat", "a red car in the rain", "an astronaut riding a horse"]
REGISTERED = "zimage" in FAMILIES
needs_registry = pytest.mark.skipif(not REGISTERED, reason="zimage is not in tdm.backbones.FAMILIES yet (the "
                                    "integrator registers ZImageBackbone; see docs/backbones.md, Z-Image)")
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save(tiny_zimage(), tmp_path_factory.mktemp("tiny_zimage") / "model")


@pytest.fixture(scope="module")
def backbone(saved):
    return ZImageBackbone.load(saved)


def _x_t(backbone, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *backbone.sample_shape), generator=g), torch.tensor([999, 250, 30][:n])


def _cfg(tmp_path, model_dir, *extra):
    return config.parse(config.apply_overrides({}, [
        f"distill.teacher={model_dir}", "distill.batch_size=2", "distill.iterations=2", "distill.checkpoint_every=1",
        "distill.log_every=1", "distill.eval_samples=0", "distill.lr=1e-3", "distill.fake_lr=1e-3",
        "distill.lora_rank=4", "distill.k=2", "distill.total_steps=1000", "distill.k_choices=[1, 2]",
        f"eval.weights_dir={tmp_path / 'w'}", *extra]))


def _pipe(folder, **kw):
    import diffusers

    pipe = diffusers.ZImagePipeline.from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- loading, prompts, the model call ----------------------------------------------------------------------------
def test_loads_from_folder_and_offline_hub_id(saved, backbone, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from tdm.backbones import resolve_model_path

    assert backbone.family == "zimage" and backbone.prediction_type == "flow" and backbone.schedule.kind == "flow"
    assert backbone.sample_shape == (4, 8, 8) and backbone.resolution == (16, 16)
    tiny_models.copy_as_hub_cache(saved, tmp_path / "hub", "tdm-test/tiny-zimage")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if REGISTERED:
        from tdm.backbones import family_of, load_backbone

        assert family_of(saved) == "zimage"
        from_hub = load_backbone("tdm-test/tiny-zimage")
    else:
        from_hub = ZImageBackbone.load(resolve_model_path("tdm-test/tiny-zimage"))
    assert from_hub.sample_shape == backbone.sample_shape  # tdm_backbone.json travels with the snapshot
    x, t = _x_t(backbone)
    with torch.no_grad():
        a = backbone.predict(backbone.net, x, t, backbone.encode_prompts(PROMPTS[:2]))
        b = from_hub.predict(from_hub.net, x, t, from_hub.encode_prompts(PROMPTS[:2]))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_conditioning_is_the_pipelines_embeddings_and_predict_its_call(backbone):
    """encode_prompts: the pipeline's own per-prompt embeddings, zero-padded + mask, no graph; predict = the
    transformer called as ZImagePipeline calls it (list of (C, 1, h, w), (1000 - t) / 1000, unpadded embeddings)
    with the sign flipped, and CFG batches (cond + the "" uncond in one forward) = two separate forwards."""
    from tdm.sampler import guided_x0_eps

    cond = backbone.encode_prompts(PROMPTS)
    assert all(v.shape[0] == 3 and not v.requires_grad and v.grad_fn is None for v in cond.values())
    assert cond["encoder_hidden_states"].shape == (3, TEXT_LEN, 32)
    assert cond["encoder_attention_mask"].dtype == torch.int64
    theirs, _ = backbone.pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False,
                                            max_sequence_length=TEXT_LEN)
    lengths = cond["encoder_attention_mask"].sum(1).tolist()
    assert lengths == [len(e) for e in theirs] and len(set(lengths)) > 1  # variable lengths, kept per prompt
    for row, (e, n) in enumerate(zip(theirs, lengths)):
        assert torch.equal(cond["encoder_hidden_states"][row, :n], e)
        assert not cond["encoder_hidden_states"][row, n:].any()
    x, t = _x_t(backbone, 3)
    with torch.no_grad():
        ours = backbone.predict(backbone.net, x, t, cond)
        raw = backbone.net(list(x.unsqueeze(2).unbind(0)), (1000 - t.float()) / 1000, theirs, return_dict=False)[0]
    torch.testing.assert_close(ours, -torch.stack(raw).squeeze(2), atol=0, rtol=0)
    null = backbone.null_cond(3)
    assert null.keys() == cond.keys() and all(null[k].shape == cond[k].shape for k in cond)
    x0, _ = guided_x0_eps(backbone, backbone.net, x, t, cond, 3.0)
    with torch.no_grad():
        out_c = backbone.predict(backbone.net, x, t, cond)
        out_u = backbone.predict(backbone.net, x, t, null)
    ref, _ = backbone.schedule.to_x0_eps(out_u + 3.0 * (out_c - out_u), x, t, "flow")
    torch.testing.assert_close(x0, ref, atol=1e-4, rtol=1e-4)
    empty = {k: v.clone() for k, v in cond.items()}
    empty["encoder_attention_mask"][1] = 0
    with pytest.raises(ValueError, match="no tokens"):
        backbone.predict(backbone.net, x, t, empty)


def test_the_velocity_reads_as_tdms_flow_schedule(backbone):
    """The sign / time flip is the right one: on a flow-matching pair x_t = (1 - s) x0 + s n, the pipeline's own
    Euler step with -model_out moves x_t along tdm's v = n - x0 (FlowMatchEulerDiscreteScheduler.step with our
    predict output lands where FlowSchedule's DDIM step lands)."""
    sched = backbone.scheduler.__class__.from_config(backbone.scheduler.config, shift=1.0)
    sched.set_timesteps(sigmas=[0.75, 0.25])
    x, _ = _x_t(backbone, 1)
    cond = backbone.encode_prompts(PROMPTS[:1])
    t = sched.timesteps[:1]
    with torch.no_grad():
        v = backbone.predict(backbone.net, x, t, cond)
    theirs = sched.step(v, t[0], x, return_dict=False)[0]
    x0, eps = backbone.schedule.to_x0_eps(v, x, t.round().long(), "flow")
    ours = backbone.schedule.solver_step(x, x0, eps, t.round().long(), 250, None)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_latents_round_trip_through_the_vae(backbone):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = backbone.encode_images(images)
    assert tuple(latents.shape[1:]) == backbone.sample_shape and not latents.requires_grad
    z = backbone.vae.encode(images).latent_dist.mean  # the pipeline decodes z = x / scaling + shift
    torch.testing.assert_close(latents / 0.3611 + 0.1159, z, atol=1e-5, rtol=1e-5)
    pixels = backbone.decode(latents)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (2, 16, 16, 3)


def test_unsupported_folders_fail_before_loading(saved, tmp_path):
    import shutil

    bad_t = tmp_path / "t500"
    bad_t.mkdir()
    shutil.copy(saved / "model_index.json", bad_t / "model_index.json")
    (bad_t / "scheduler").mkdir()
    sched = json.loads((saved / "scheduler" / "scheduler_config.json").read_text())
    (bad_t / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "num_train_timesteps": 500}))
    with pytest.raises(UnsupportedModel, match="num_train_timesteps=500.*1000"):
        ZImageBackbone.load(bad_t)  # config files only: no weights are needed to refuse it
    (bad_t / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "invert_sigmas": True}))
    with pytest.raises(UnsupportedModel, match="invert_sigmas"):
        ZImageBackbone.load(bad_t)
    bad = tmp_path / "badshape"
    shutil.copytree(saved, bad)
    (bad / "tdm_backbone.json").write_text(json.dumps({"height": 18, "width": 16}))
    with pytest.raises(ValueError, match="native shape 18x16.*multiples of 4"):
        ZImageBackbone.load(bad)
    (bad / "tdm_backbone.json").write_text(json.dumps({"num_frames": 5}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_frames'\]"):
        ZImageBackbone.load(bad)


# -- parity with diffusers ---------------------------------------------------------------------------------------
def test_teacher_sampler_matches_the_zimage_pipeline(saved, backbone):
    """Our CFG teacher sampler (guidance w = 2) = ZImagePipeline at guidance_scale g = w - 1 = 1 (its
    pos + g (pos - neg)), negative prompt "" (its default), plain Euler on sigmas 0.999, 0.499 (= our DDIM grid
    999, 499)."""
    import diffusers

    from tdm.sampler import make_noise, teacher_sample

    pipe = _pipe(saved)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    noise = make_noise(2, backbone.sample_shape, seed=1)
    theirs = pipe(prompt=PROMPTS[:2], guidance_scale=1.0, latents=noise.clone(), sigmas=[0.999, 0.499], height=16,
                  width=16, output_type="latent", max_sequence_length=TEXT_LEN).images
    ours = teacher_sample(backbone, backbone.net, backbone.encode_prompts(PROMPTS[:2]), noise, steps=2, guidance=2.0)
    torch.testing.assert_close(ours, theirs.float(), atol=2e-4, rtol=2e-4)
    unguided = pipe(prompt=PROMPTS[:2], guidance_scale=0.0, latents=noise.clone(), sigmas=[0.999, 0.499], height=16,
                    width=16, output_type="latent", max_sequence_length=TEXT_LEN).images
    torch.testing.assert_close(teacher_sample(backbone, backbone.net, backbone.encode_prompts(PROMPTS[:2]), noise,
                                              steps=2, guidance=1.0), unguided.float(), atol=2e-4, rtol=2e-4)


GRIDS = {"uniform": (900, 1.0), "shifted": (1000, 3.0)}  # (total_steps, shift)


def _student_scheduler(record, base_config):
    if REGISTERED:
        from tdm.scheduling_tdm import from_student

        return from_student(record, base_config)
    from tdm.scheduling_tdm import TDMFlowScheduler

    return TDMFlowScheduler.from_config(base_config, total_steps=record.total_steps, grid_shift=record.shift,
                                        solver_order=record.solver_order)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_stock_pipeline_with_our_scheduler_runs_the_student_exactly(grid, saved, backbone):
    """A fresh stock ZImagePipeline with only the scheduler swapped for TDMFlowScheduler (it passes the default
    sigmas linspace(1, 1/K, K) and mu; set_begin_index(0)) at guidance_scale 0 gives `student_sample`'s latents
    bit for bit, K = 1, 2, 4 (the student here is the teacher itself: sampler and scheduler are what is
    compared)."""
    from tdm.sampler import student_sample
    from tdm.student import StudentRecord

    pipe = _pipe(saved)
    total_steps, shift = GRIDS[grid]
    noise = torch.randn((2, *backbone.sample_shape), generator=torch.Generator().manual_seed(3))
    cond = backbone.encode_prompts(PROMPTS[:2])
    base_config = pipe.scheduler.config
    for k in (1, 2, 4):
        record = StudentRecord(family="zimage", k=k, total_steps=total_steps, shift=shift)
        pipe.scheduler = _student_scheduler(record, base_config)
        theirs = pipe(prompt=PROMPTS[:2], num_inference_steps=k, guidance_scale=0.0, latents=noise.clone(),
                      height=16, width=16, output_type="latent", max_sequence_length=TEXT_LEN).images
        ours = student_sample(backbone, backbone.net, cond, noise, record.timesteps(k))
        assert pipe.scheduler.timesteps.tolist() == record.timesteps(k).tolist()
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
        assert torch.equal(theirs, ours), (grid, k, (theirs - ours).abs().max().item())


def test_student_lora_in_the_diffusers_format_loads_in_the_stock_pipeline(saved, backbone, tmp_path):
    """A LoRA on the family's targets written by `tdm.lora.save_lora(..., "diffusers", component="transformer")`
    (`transformer.<module>.lora_A/B.weight`, alpha folded into the up weights: what ZImageLoraLoaderMixin and
    ComfyUI read) loads with `ZImagePipeline.load_lora_weights` and gives exactly what tdm's own attach gives."""
    from tdm import lora as L

    g = torch.Generator().manual_seed(2)
    modules = {}
    for name, module in backbone.net.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t)
                                                       for t in backbone.lora_target_modules):
            modules[name] = L.LoRAModule(down=torch.randn(4, module.in_features, generator=g) * 0.1,
                                         up=torch.randn(module.out_features, 4, generator=g) * 0.1, alpha=2.0)
    assert any("noise_refiner" in n for n in modules) and any("context_refiner" in n for n in modules)
    assert any(n.endswith("feed_forward.w2") for n in modules)
    assert any(n.endswith("attention.to_out.0") for n in modules)
    lora = L.LoRA(modules=modules)
    path = L.save_lora(lora, tmp_path / "diffusers", "diffusers", component="transformer")

    def run(pipe):
        return pipe(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=0.0, height=16, width=16,
                    output_type="latent", max_sequence_length=TEXT_LEN,
                    generator=torch.Generator().manual_seed(0)).images

    ours = _pipe(saved)
    L.attach(ours.transformer, lora)
    theirs = _pipe(saved)
    theirs.load_lora_weights(str(path))
    expected = run(ours)
    assert torch.equal(run(theirs), expected)
    assert not torch.equal(run(_pipe(saved)), expected)  # the LoRA is applied


# -- training ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_tdm_iterations_train_student_and_fake_only(mode, saved, tmp_path):
    """LoRA mode (adapters on attention + SwiGLU of the main and refiner blocks) and full mode with TDM-unify's K
    embedding on `t_embedder`: student and fake move, the frozen base does not."""
    from accelerate import Accelerator

    from tdm.distill import TDMTrainer

    cfg = _cfg(tmp_path, saved, f"distill.mode={mode}", f"distill.unify={mode == 'full'}")
    backbone = ZImageBackbone.load(saved)
    base = {n: p.detach().clone() for n, p in backbone.net.named_parameters()}
    trainer = TDMTrainer(cfg, backbone, Accelerator(cpu=True))
    trainer.prompts = PROMPTS
    before = {r: trainer.roles.state_dict(r) for r in ("student", "fake")}
    for step in range(2):  # LoRA B starts at zero: A moves from the second step
        metrics = trainer.iteration(step)
        assert all(torch.isfinite(v) for k, v in metrics.items() if not k.startswith("dm_gap_")), metrics
    assert metrics["loss_fake"] > 0 and metrics["loss_gen"] > 0
    for role in ("student", "fake"):
        now = trainer.roles.state_dict(role)
        assert any(not torch.equal(before[role][n], now[n]) for n in now), role
    if mode == "lora":
        names = list(trainer.roles.named_parameters("student"))
        assert any("noise_refiner" in n and ".to_q." in n for n in names)
        assert any("layers.0.feed_forward.w1" in n for n in names)
    else:
        assert trainer.roles.k_embeddings["student"].weight.shape[1] == backbone.time_embed_dim(backbone.net) == 24
        assert trainer.roles.k_embeddings["student"].weight.abs().sum() > 0
    for n, p in backbone.net.named_parameters():
        if "lora_" not in n:
            assert torch.equal(base[n.replace(".base_layer", "")], p), n


def test_gradient_checkpointing_gives_the_same_iteration(saved, tmp_path):
    from accelerate import Accelerator

    from tdm.distill import TDMTrainer

    states = []
    for flag in (False, True):
        cfg = _cfg(tmp_path, saved, "distill.mode=lora", "distill.unify=true",
                   f"distill.gradient_checkpointing={flag}")
        torch.manual_seed(0)
        trainer = TDMTrainer(cfg, ZImageBackbone.load(saved), Accelerator(cpu=True))
        trainer.prompts = PROMPTS
        trainer.iteration(0)
        trainer.iteration(1)
        states.append(trainer.roles.state_dict("student"))
    assert any(n.startswith("k_embedding") for n in states[0])
    for key, tensor in states[0].items():
        torch.testing.assert_close(states[1][key], tensor, atol=1e-6, rtol=1e-5)


def test_a_float32_student_beside_bf16_encoders_samples(saved, backbone):
    from tdm.sampler import sample_student
    from tdm.student import Student, StudentRecord

    mixed = ZImageBackbone.load(saved, dtype=torch.bfloat16)
    mixed.net.float()
    x, t = _x_t(backbone)
    with torch.no_grad():
        a = mixed.predict(mixed.net, x, t, mixed.encode_prompts(PROMPTS[:2]))
        b = backbone.predict(backbone.net, x, t, backbone.encode_prompts(PROMPTS[:2]))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.1)
    images = sample_student(Student(mixed, mixed.net, StudentRecord(family="zimage", k=2, total_steps=1000)),
                            PROMPTS[:1])
    assert images.dtype == torch.uint8 and tuple(images.shape) == (1, 16, 16, 3)


# -- through the registry (on once zimage is registered) ---------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("sft_zimage")
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    return folder


@needs_registry
def test_config_accepts_zimage_and_teacher_ft_step(saved, image_folder, tmp_path):
    """`model.family: zimage` with a Z-Image folder passes the config's model check; one teacher-ft step on an
    image-caption folder is saved, reloads as zimage with its native-shape file, and moved the weights."""
    import numpy as np

    from tdm import teacher_ft
    from tdm.backbones import load_backbone
    from tdm.config import StagePaths

    cfg = _cfg(tmp_path, saved, f"teacher_ft.data={image_folder}", "teacher_ft.resolution=16",
               "teacher_ft.steps=1", "teacher_ft.batch_size=2", "teacher_ft.warmup_steps=0", "teacher_ft.lr=1e-2",
               "teacher_ft.eval_samples=0", "teacher_ft.ema_decay=0", "teacher_ft.snr_gamma=null")
    cfg = config.parse({**config.dump(cfg), "model": {"family": "zimage", "pretrained": str(saved)}})
    metrics = teacher_ft.run(cfg, StagePaths.of("teacher_ft", tmp_path), progress=False)
    assert metrics["steps"] == 1 and np.isfinite(metrics["final_loss"]) and metrics["final_loss"] > 0
    after = load_backbone(tmp_path / "outputs/teacher_ft/model")
    assert after.family == "zimage" and after.sample_shape == (4, 8, 8)
    params = dict(ZImageBackbone.load(saved).net.named_parameters())
    assert any(not torch.equal(p, params[n]) for n, p in after.net.named_parameters())


@needs_registry
def test_distill_stage_checkpoints_resumes_and_the_stock_pipeline_runs_its_student(saved, tmp_path):
    """The distill stage (LoRA mode): checkpoint, resume, student folder (its tdm_backbone.json kept), plain-peft
    student LoRA on the teacher = the merged student, and the stock pipeline loaded from the student folder with
    `from_student` = `student_sample` (what `tdm sample --student` runs) bit for bit at K = 2."""
    from tdm import checkpoint as ckpt
    from tdm import distill
    from tdm.backbones import load_backbone
    from tdm.config import StagePaths
    from tdm.sampler import sample_student, student_sample
    from tdm.scheduling_tdm import from_student
    from tdm.student import load_student

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    cfg = _cfg(tmp_path, saved, f"distill.prompts={prompts}", "distill.mode=lora", "distill.shift=3.0")
    paths = StagePaths.of("distill", tmp_path)
    distill.train(cfg, paths, progress=False, stop_after=1)
    assert ckpt.latest_checkpoint(paths.out_dir / "checkpoints").name == "step-0000001"
    metrics = distill.run(cfg, paths, progress=False)
    assert metrics["resumed_from"] == 1 and metrics["iterations"] == 2
    folder = paths.out_dir / "student"
    loaded = load_student(folder)
    student, record = loaded.backbone, loaded.record
    assert student.family == record.family == "zimage" and record.k == 2
    assert json.loads((folder / "tdm_backbone.json").read_text()) == SHAPE
    images = sample_student(loaded, PROMPTS[:2], k=2)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (2, 16, 16, 3)
    teacher = load_backbone(saved)
    teacher.load_lora(paths.out_dir / "student_lora")
    x, t = _x_t(student)
    cond = student.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(teacher.predict(teacher.net, x, t, cond), student.predict(student.net, x, t, cond),
                                   atol=1e-4, rtol=1e-4)
    pipe = _pipe(folder)
    pipe.scheduler = from_student(record, pipe.scheduler.config)
    noise = torch.randn((2, *student.sample_shape), generator=torch.Generator().manual_seed(4))
    ours = student_sample(student, student.net, cond, noise, record.timesteps(2))
    theirs = pipe(prompt=PROMPTS[:2], num_inference_steps=2, guidance_scale=0.0, latents=noise.clone(), height=16,
                  width=16, output_type="latent", max_sequence_length=TEXT_LEN).images
    assert torch.equal(theirs, ours)


@needs_registry
def test_profile_runs_distill_on_the_tiny_model(saved, tmp_path):
    """profiles/zimage.yaml as written (bf16, LoRA, its shift and guidance) runs `tdm distill` for one iteration
    on the tiny model."""
    import os
    from pathlib import Path

    import yaml
    from accelerate.state import AcceleratorState

    from tdm import cli
    from tdm.backbones import family_of

    root = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((root / "profiles" / "zimage.yaml").read_text())
    assert params["model"]["family"] == "zimage" and params["model"]["pretrained"] == params["distill"]["teacher"]
    assert params["distill"]["k"] == 4 and params["distill"]["mixed_precision"] == "bf16"
    params["model"]["pretrained"] = str(saved)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    AcceleratorState._reset_state(reset_partial_state=True)
    os.chdir(tmp_path)
    try:
        rc = cli.main(["distill", "--params", "params.yaml", "-q", "-S", f"distill.teacher={saved}",
                       "-S", f"distill.prompts={root / 'profiles/prompts/example.txt'}",
                       "-S", "distill.iterations=1", "-S", "distill.batch_size=2", "-S", "distill.lora_rank=4"])
    finally:
        os.chdir(cwd)
        AcceleratorState._reset_state(reset_partial_state=True)
    student = tmp_path / "outputs/distill/student"
    assert rc == 0 and (student / "tdm_student.json").is_file() and family_of(student) == "zimage"
    # `tdm sample --student` (K = 4 on the profile's shift-3 grid) == the stock pipeline loaded from the student
    # folder with from_student as its scheduler. The bf16 run saved its frozen parts in bf16 beside the float32
    # student; a stock pipeline cannot mix them, so both sides load the folder in float32.
    from tdm.sampler import student_sample
    from tdm.scheduling_tdm import from_student
    from tdm.student import load_student

    loaded = load_student(student, dtype=torch.float32)
    backbone, record = loaded.backbone, loaded.record
    assert record.timesteps(4).tolist() == [999, 899, 749, 499]
    pipe = _pipe(student, dtype=torch.float32)
    pipe.scheduler = from_student(record, pipe.scheduler.config)
    noise = torch.randn((2, *backbone.sample_shape), generator=torch.Generator().manual_seed(4))
    ours = student_sample(backbone, backbone.net, backbone.encode_prompts(PROMPTS[:2]), noise, record.timesteps(4))
    theirs = pipe(prompt=PROMPTS[:2], num_inference_steps=4, guidance_scale=0.0, latents=noise.clone(), height=16,
                  width=16, output_type="latent", max_sequence_length=TEXT_LEN).images
    assert torch.equal(theirs, ours)
