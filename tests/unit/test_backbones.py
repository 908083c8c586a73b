"""Every real family (SD1.5, SDXL, PixArt-alpha, SD3, CogVideoX) through the whole engine, with tiny random
models saved as diffusers pipelines and read back offline: from a folder and by repo id from a hub cache.

Per family: prompts encode without a graph; predictions are identical across save/load; one teacher-ft step on
an image-caption folder; TDM iterations in LoRA and full mode (full with TDM-unify's K embedding on the
family's time embedding); the distill stage end to end (checkpoint, resume, student folder, plain-peft LoRA);
a K-step student sample decoded to pixels (frames for video).
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models
from tdm import checkpoint as ckpt
from tdm import config
from tdm.backbones import FAMILIES, UnsupportedModel, family_of, load_backbone
from tdm.config import StagePaths

FAMILY_NAMES = tiny_models.FAMILIES
PROMPTS = ["a photo of a cat", "a red car in the rain", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> a tiny model folder written by diffusers' `save_pretrained` (built once per module)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: tiny_models.save_pipeline(tiny_models.build(f), root / f) for f in FAMILY_NAMES}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    return folder


def _net_params(backbone):
    return {n: p.detach().clone() for n, p in backbone.net.named_parameters()}


def _x_t(backbone, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *backbone.sample_shape), generator=g), torch.tensor([999, 250][:n])


# -- loading -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_loads_from_folder_and_offline_hub_cache(family, saved, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    assert family_of(saved[family]) == family
    from_folder = load_backbone(saved[family])
    assert from_folder.family == family and isinstance(from_folder, FAMILIES[family])
    tiny_models.copy_as_hub_cache(saved[family], tmp_path / "hub", f"tdm-test/tiny-{family}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_hub = load_backbone(f"tdm-test/tiny-{family}")
    x, t = _x_t(from_folder)
    with torch.no_grad():
        a = from_folder.predict(from_folder.net, x, t, from_folder.encode_prompts(PROMPTS[:2]))
        b = from_hub.predict(from_hub.net, x, t, from_hub.encode_prompts(PROMPTS[:2]))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # same seed, same weights


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prompts_encode_without_a_graph_and_cfg_batches(family, saved):
    backbone = load_backbone(saved[family])
    cond = backbone.encode_prompts(PROMPTS)
    assert all(v.shape[0] == 3 and not v.requires_grad and v.grad_fn is None for v in cond.values())
    h = cond["encoder_hidden_states"]
    assert not torch.allclose(h[0], h[1])
    null = backbone.null_cond(3)
    assert null.keys() == cond.keys() and all(null[k].shape == cond[k].shape for k in cond)
    if family == "sdxl":  # force_zeros_for_empty_prompt: the pipeline's uncond branch is zeros
        assert not null["encoder_hidden_states"].any() and not null["text_embeds"].any()
        torch.testing.assert_close(null["time_ids"][0], torch.tensor([16.0, 16, 0, 0, 16, 16]))
    from tdm.sampler import guided_x0_eps

    x, t = _x_t(backbone, 3)
    t = torch.tensor([999, 500, 30])
    with torch.no_grad():
        x0, eps = guided_x0_eps(backbone, backbone.net, x, t, cond, guidance=3.0)
        out_c = backbone.predict(backbone.net, x, t, cond)
        out_u = backbone.predict(backbone.net, x, t, null)
    # One batched CFG forward equals the two separate ones, guided.
    ref_x0, _ = backbone.schedule.to_x0_eps(out_u + 3.0 * (out_c - out_u), x, t, backbone.prediction_type)
    torch.testing.assert_close(x0, ref_x0, atol=1e-4, rtol=1e-4)
    assert x0.shape == eps.shape == x.shape


def test_family_specific_views(saved):
    sd3 = load_backbone(saved["sd3"])
    assert sd3.prediction_type == "flow" and sd3.schedule.kind == "flow"
    x0, n = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([250, 750])
    s = (t / 1000).reshape(2, 1, 1, 1)
    torch.testing.assert_close(sd3.schedule.add_noise(x0, n, t), (1 - s) * x0 + s * n)  # x_t = (1-s) x0 + s n
    torch.testing.assert_close(sd3.schedule.from_x0_eps(x0, n, t, "flow"), n - x0)  # velocity target
    cog = load_backbone(saved["cogvideox"])
    assert cog.prediction_type == "v_prediction" and cog.schedule.zero_terminal_snr
    assert cog.sample_shape == (3, 4, 2, 2)  # (F, C, H, W): 9 frames -> 3 latent frames
    assert float(cog.schedule.alpha(999)) == 0.0  # pure noise at the top: v-prediction still gives x0
    x = torch.randn(1, *cog.sample_shape)
    with torch.no_grad():
        x0, _ = cog.predict_x0_eps(cog.net, x, torch.tensor([999]), cog.encode_prompts(PROMPTS[:1]))
    assert torch.isfinite(x0).all()
    pixart = load_backbone(saved["pixart_alpha"])
    assert pixart.net.config.out_channels == 2 * pixart.net.config.in_channels  # learned sigma, split off
    assert pixart.net.use_additional_conditions
    extra = pixart.added_conditions(pixart.net, torch.randn(2, 4, 8, 8))
    assert extra["resolution"].tolist() == [[16.0, 16.0]] * 2 and extra["aspect_ratio"].tolist() == [[1.0]] * 2


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_latents_round_trip_through_the_vae(family, saved):
    backbone = load_backbone(saved[family])
    h, w = backbone.resolution
    images = torch.rand(2, 3, h, w) * 2 - 1
    latents = backbone.encode_images(images)
    assert tuple(latents.shape[1:]) == backbone.sample_shape and not latents.requires_grad
    pixels = backbone.decode(latents)
    assert pixels.dtype == torch.uint8
    frames = (backbone.num_frames,) if family == "cogvideox" else ()
    assert tuple(pixels.shape) == (2, *frames, h, w, 3)


# -- unsupported models fail before any weights are read -------------------------------------------------------
def _folder_without_weights(src, dst, scheduler_cls=None, **scheduler_changes):
    dst.mkdir()
    (dst / "model_index.json").write_text((src / "model_index.json").read_text())
    (dst / "scheduler").mkdir()
    cfg = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    if scheduler_cls:
        meta = json.loads((dst / "model_index.json").read_text())
        meta["scheduler"] = ["diffusers", scheduler_cls]
        (dst / "model_index.json").write_text(json.dumps(meta))
    cfg.update(scheduler_changes)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_models_fail_clearly_before_loading(saved, tmp_path):
    cases = [
        (_folder_without_weights(saved["sd15"], tmp_path / "sample", prediction_type="sample"),
         r"prediction type 'sample'.*not handled by the sd15 adapter"),
        (_folder_without_weights(saved["pixart_alpha"], tmp_path / "v", prediction_type="v_prediction"),
         r"'v_prediction'.*not handled by the pixart_alpha adapter"),
        (_folder_without_weights(saved["cogvideox"], tmp_path / "eps", prediction_type="epsilon"),
         r"prediction type 'epsilon'.*cogvideox"),
        (_folder_without_weights(saved["sd3"], tmp_path / "ddim", "DDIMScheduler"),
         r"prediction type 'epsilon' of DDIMScheduler is not handled by the sd3 adapter"),
        (_folder_without_weights(saved["sd15"], tmp_path / "edm", "EDMEulerScheduler"),
         r"EDMEulerScheduler is neither a VP scheduler"),
    ]
    for folder, message in cases:
        with pytest.raises(UnsupportedModel, match=message):
            load_backbone(folder)
    unet2d = tmp_path / "unet2d"
    unet2d.mkdir()
    meta = json.loads((saved["sd15"] / "model_index.json").read_text())
    (unet2d / "model_index.json").write_text(json.dumps({**meta, "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(UnsupportedModel, match="unet class 'UNet2DModel' is not handled by the sd15 adapter"):
        load_backbone(unet2d)
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    with pytest.raises(UnsupportedModel, match="unsupported model.*HunyuanVideoPipeline.*supported families"):
        load_backbone(flux)
    with pytest.raises(config.ConfigError, match="model.pretrained: required for family 'sdxl'"):
        config.parse({"model": {"family": "sdxl"}})
    with pytest.raises(config.ConfigError, match=r"model.pretrained: .* is a 'sd15' model but model.family is 'sdxl'"):
        config.parse({"model": {"family": "sdxl", "pretrained": str(saved["sd15"])}})
    with pytest.raises(config.ConfigError, match=r"model.pretrained: .*prediction type 'sample'"):
        config.parse({"model": {"family": "sd15", "pretrained": str(tmp_path / "sample")}})


# -- the stages ----------------------------------------------------------------------------------------------
def _cfg(tmp_path, family, model_dir, *extra):
    return config.parse(config.apply_overrides({}, [
        f"model.family={family}", f"model.pretrained={model_dir}", f"distill.teacher={model_dir}",
        "distill.batch_size=2", "distill.iterations=2", "distill.checkpoint_every=1", "distill.log_every=1",
        "distill.eval_samples=0", "distill.lr=1e-3", "distill.fake_lr=1e-3", "distill.lora_rank=4",
        "distill.k=2", f"distill.total_steps=1000", "distill.k_choices=[1, 2]",
        f"eval.weights_dir={tmp_path / 'w'}", *extra]))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_teacher_ft_step_on_an_image_folder(family, saved, image_folder, tmp_path):
    from tdm import teacher_ft

    cfg = _cfg(tmp_path, family, saved[family], f"teacher_ft.data={image_folder}", "teacher_ft.resolution=16",
               "teacher_ft.steps=1", "teacher_ft.batch_size=2", "teacher_ft.warmup_steps=0", "teacher_ft.lr=1e-2",
               "teacher_ft.eval_samples=0", "teacher_ft.ema_decay=0")
    metrics = teacher_ft.run(cfg, StagePaths.of("teacher_ft", tmp_path), progress=False)
    assert metrics["steps"] == 1 and np.isfinite(metrics["final_loss"]) and metrics["final_loss"] > 0
    before = load_backbone(saved[family])
    after = load_backbone(tmp_path / "outputs/teacher_ft/model")
    assert after.family == family
    moved = [n for n, p in after.net.named_parameters() if not torch.equal(p, dict(before.net.named_parameters())[n])]
    assert moved, "the fine-tuned teacher equals the original"


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_tdm_iterations_train_student_and_fake_only(family, mode, saved, tmp_path):
    from accelerate import Accelerator

    from tdm.distill import TDMTrainer

    # Full mode also runs TDM-unify: the K embedding rides the family's own time embedding (UNet or DiT).
    cfg = _cfg(tmp_path, family, saved[family], f"distill.mode={mode}", f"distill.unify={mode == 'full'}")
    backbone = load_backbone(saved[family])
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
        assert any(".to_q." in n for n in trainer.roles.named_parameters("student"))  # the family's targets match
    else:
        assert any(n.startswith("k_embedding") for n in trainer.roles.named_parameters("student"))
        assert trainer.roles.k_embeddings["student"].weight.abs().sum() > 0
    for n, p in backbone.net.named_parameters():
        if "lora_" not in n:
            assert torch.equal(base[n.replace(".base_layer", "")], p), n


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_distill_stage_checkpoints_resumes_and_saves_a_sampleable_student(family, saved, tmp_path):
    from tdm import distill
    from tdm.sampler import sample_student
    from tdm.student import load_student

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    cfg = _cfg(tmp_path, family, saved[family], f"distill.prompts={prompts}", "distill.mode=lora")
    paths = StagePaths.of("distill", tmp_path)
    _, first = distill.train(cfg, paths, progress=False, stop_after=1)
    assert ckpt.latest_checkpoint(paths.out_dir / "checkpoints").name == "step-0000001"
    metrics = distill.run(cfg, paths, progress=False)
    assert metrics["resumed_from"] == 1 and metrics["iterations"] == 2  # picked up the checkpoint
    student_dir = paths.out_dir / "student"
    loaded = load_student(student_dir)
    student = loaded.backbone
    assert student.family == loaded.record.family == family and loaded.record.k == 2
    images = sample_student(loaded, PROMPTS[:2], k=2)
    h, w = student.resolution
    frames = (student.num_frames,) if family == "cogvideox" else ()
    assert images.dtype == torch.uint8 and tuple(images.shape) == (2, *frames, h, w, 3)
    # The plain-peft adapter (the only LoRA route for PixArt) reproduces the merged student.
    teacher = load_backbone(saved[family])
    teacher.load_lora(paths.out_dir / "student_lora")
    x, t = _x_t(student)
    cond = student.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(teacher.predict(teacher.net, x, t, cond), student.predict(student.net, x, t, cond),
                                   atol=1e-4, rtol=1e-4)


# -- parity with diffusers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "cogvideox"])
def test_teacher_sampler_matches_the_diffusers_pipeline(family, saved):
    """Our CFG teacher sampler (schedule view + adapter) reproduces the family's own pipeline on the same
    2-step grid (999, 499): conditioning, uncond branch, model call, output type and step all agree."""
    import diffusers

    from tdm.sampler import make_noise, teacher_sample

    backbone = load_backbone(saved[family])
    pipe = backbone.pipe
    noise = make_noise(2, backbone.sample_shape, seed=1)
    common = dict(prompt=PROMPTS[:2], guidance_scale=2.0, latents=noise.clone(), output_type="latent")
    if family == "sd3":  # plain flow Euler on the same sigmas (shift only picks the grid)
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
        out = pipe(**common, sigmas=[0.999, 0.499], max_sequence_length=tiny_models.TEXT_LEN)
    elif family == "cogvideox":  # its DDIM already has trailing spacing and alpha_T_prev = 1
        out = pipe(**common, num_inference_steps=2, num_frames=9, height=16, width=16, use_dynamic_cfg=False,
                   max_sequence_length=tiny_models.TEXT_LEN)
    else:
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                             set_alpha_to_one=True)
        out = pipe(**common, num_inference_steps=2)
    theirs = out.frames if family == "cogvideox" else out.images
    ours = teacher_sample(backbone, backbone.net, backbone.encode_prompts(PROMPTS[:2]), noise, steps=2, guidance=2.0)
    torch.testing.assert_close(ours, theirs.float(), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_float32_student_beside_bf16_encoders_samples(family, saved):
    """What a bf16 LoRA run saves: the merged student in float32, the frozen parts in bf16; sampling (no
    autocast) must still run, and match the all-float32 model closely."""
    from tdm.sampler import sample_student
    from tdm.student import Student, StudentRecord

    mixed = load_backbone(saved[family], dtype=torch.bfloat16)
    mixed.net.float()
    reference = load_backbone(saved[family])
    x, t = _x_t(reference)
    with torch.no_grad():
        a = mixed.predict(mixed.net, x, t, mixed.encode_prompts(PROMPTS[:2]))
        b = reference.predict(reference.net, x, t, reference.encode_prompts(PROMPTS[:2]))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.1)  # bf16 text features, float32 denoiser
    record = StudentRecord(family=family, k=2, total_steps=1000)
    images = sample_student(Student(mixed, mixed.net, record), PROMPTS[:1])
    assert images.dtype == torch.uint8


@pytest.mark.parametrize("family", ["pixart_alpha", "sd3", "cogvideox"])  # the DiTs; UNets: test_distill.py
def test_gradient_checkpointing_gives_the_same_iteration(family, saved, tmp_path):
    """The profiles turn gradient checkpointing on: with LoRA and the K embedding (a forward hook on the time
    embedding, outside the checkpointed blocks) the iteration must be the same, not just close."""
    from accelerate import Accelerator

    from tdm.distill import TDMTrainer

    states = []
    for flag in (False, True):
        cfg = _cfg(tmp_path, family, saved[family], "distill.mode=lora", "distill.unify=true",
                   f"distill.gradient_checkpointing={flag}")
        torch.manual_seed(0)  # LoRA A matrices are drawn from the global generator
        trainer = TDMTrainer(cfg, load_backbone(saved[family]), Accelerator(cpu=True))
        trainer.prompts = PROMPTS
        for step in range(2):
            trainer.iteration(step)
        states.append(trainer.roles.state_dict("student"))
    assert any(n.startswith("k_embedding") for n in states[0])
    for name, tensor in states[0].items():
        torch.testing.assert_close(states[1][name], tensor, atol=1e-6, rtol=1e-5)
