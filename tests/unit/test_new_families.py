"""The families of the new-families issue (#14) through the engine, with tiny random models of their real classes
(tests/tiny_models.py: SD3.5's dual-attention + QK-norm MMDiT, PixArt-Sigma, Wan2.1 T2V, FLUX.1-dev and -schnell),
saved with `save_pretrained` and read back offline.

Per family: load from a folder and by repo id from a hub cache (identical predictions); prompts encode without a
graph; VAE round trip; one teacher-ft step; TDM iterations in LoRA and full mode (full with TDM-unify's K
embedding); gradient checkpointing identical; the distill stage (checkpoint, resume, student folder, plain-peft
LoRA = merged student); a float32 student beside bf16 encoders samples; our CFG teacher sampler = the family's own
pipeline; the stock pipeline with `tdm.scheduling_tdm.from_student` = `student_sample` bit for bit, on the teacher
and on the student each profile's `tdm distill` run leaves (Wan: its UniPC flow config read as the flow schedule;
FLUX: the sigmas and mu FluxPipeline always passes accepted); FLUX's guidance decision measured.

TDMTrainer and the distill stage take the teacher from `distill.teacher`.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

import tiny_models
from tdm import checkpoint as ckpt
from tdm import config
from tdm.backbones import FAMILIES, UnsupportedModel, family_of, load_backbone
from tdm.config import StagePaths

NEW = tiny_models.NEW_FAMILIES  # sd35, pixart_sigma, wan, flux, flux_schnell
FAMILY = {"sd35": "sd3", "pixart_sigma": "pixart_sigma", "wan": "wan", "flux": "flux", "flux_schnell": "flux"}
PROMPTS = ["a photo of a cat", "a red car in the rain", "an astronaut riding a horse"]
VIDEO = ("wan",)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> a tiny model folder written by diffusers' `save_pretrained` (+ tdm_backbone.json for wan / flux)."""
    root = tmp_path_factory.mktemp("tiny_new")
    return {name: tiny_models.save_pipeline(tiny_models.build(name), root / name) for name in NEW}


def _x_t(backbone, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *backbone.sample_shape), generator=g), torch.tensor([999, 250][:n])


def _cfg(tmp_path, model_dir, *extra):
    return config.parse(config.apply_overrides({}, [
        f"distill.teacher={model_dir}", "distill.batch_size=2", "distill.iterations=2", "distill.checkpoint_every=1",
        "distill.log_every=1", "distill.eval_samples=0", "distill.lr=1e-3", "distill.fake_lr=1e-3",
        "distill.lora_rank=4", "distill.k=2", "distill.total_steps=1000", "distill.k_choices=[1, 2]",
        f"eval.weights_dir={tmp_path / 'w'}", *extra]))


# -- loading ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_loads_from_folder_and_offline_hub_cache(name, saved, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    family = FAMILY[name]
    assert family_of(saved[name]) == family
    from_folder = load_backbone(saved[name])
    assert from_folder.family == family and isinstance(from_folder, FAMILIES[family])
    tiny_models.copy_as_hub_cache(saved[name], tmp_path / "hub", f"tdm-test/tiny-{name}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_hub = load_backbone(f"tdm-test/tiny-{name}")
    assert from_hub.sample_shape == from_folder.sample_shape  # tdm_backbone.json travels with the snapshot
    x, t = _x_t(from_folder)
    with torch.no_grad():
        a = from_folder.predict(from_folder.net, x, t, from_folder.encode_prompts(PROMPTS[:2]))
        b = from_hub.predict(from_hub.net, x, t, from_hub.encode_prompts(PROMPTS[:2]))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", NEW)
def test_prompts_encode_without_a_graph_and_cfg_batches(name, saved):
    from tdm.sampler import guided_x0_eps

    backbone = load_backbone(saved[name])
    cond = backbone.encode_prompts(PROMPTS)
    assert all(v.shape[0] == 3 and not v.requires_grad and v.grad_fn is None for v in cond.values())
    assert not torch.allclose(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][1])
    null = backbone.null_cond(3)
    assert null.keys() == cond.keys() and all(null[k].shape == cond[k].shape for k in cond)
    x, t = _x_t(backbone, 3)
    t = torch.tensor([999, 500, 30])
    x0, eps = guided_x0_eps(backbone, backbone.net, x, t, cond, 3.0)  # one batched forward, cond + uncond
    with torch.no_grad():
        out_c = backbone.predict(backbone.net, x, t, cond)
        out_u = backbone.predict(backbone.net, x, t, null)
    ref_x0, _ = backbone.schedule.to_x0_eps(out_u + 3.0 * (out_c - out_u), x, t, backbone.prediction_type)
    torch.testing.assert_close(x0, ref_x0, atol=1e-4, rtol=1e-4)


def test_sd35_layout_fits_the_sd3_adapter(saved):
    """SD3.5 (Medium: dual attention in blocks 0-12, RMS QK-norm; Large: QK-norm only) is StableDiffusion3Pipeline
    + SD3Transformer2DModel: the sd3 adapter's assumptions hold (same call, flow schedule, time embedding), its LoRA
    targets reach the second attention, and the QK-norm is used (not an unused config flag)."""
    from diffusers.models.normalization import RMSNorm

    sd35 = load_backbone(saved["sd35"])
    assert sd35.family == "sd3" and sd35.prediction_type == "flow" and sd35.schedule.kind == "flow"
    block = sd35.net.transformer_blocks[0]
    assert block.use_dual_attention and block.attn2 is not None
    assert isinstance(block.attn.norm_q, RMSNorm) and isinstance(block.attn2.norm_k, RMSNorm)
    assert sd35.time_embedding(sd35.net) is sd35.net.time_text_embed.timestep_embedder
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=sd35.lora_target_modules), sd35.net)
    names = [n for n, _ in sd35.net.named_parameters() if "lora_A" in n]
    assert any("attn2.to_q" in n for n in names) and any("attn.add_q_proj" in n for n in names)
    # QK-norm changes the output: the same weights with the norms' scales doubled predict differently.
    x, t = _x_t(sd35)
    cond = sd35.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        a = sd35.predict(sd35.net, x, t, cond)
        block.attn.norm_q.weight.mul_(2.0)
        b = sd35.predict(sd35.net, x, t, cond)
    assert (a - b).abs().max() > 1e-4


def test_family_specific_views(saved):
    sigma = load_backbone(saved["pixart_sigma"])
    assert sigma.max_tokens == 300 and not sigma.net.config.use_additional_conditions
    assert sigma.added_conditions(sigma.net, torch.randn(1, 4, 8, 8)) == {"resolution": None, "aspect_ratio": None}
    wan = load_backbone(saved["wan"])
    assert wan.prediction_type == "flow" and wan.schedule.kind == "flow"  # UniPC in flow mode read as flow
    assert type(wan.scheduler).__name__ == "UniPCMultistepScheduler" and wan.scheduler.config.use_flow_sigmas
    assert wan.sample_shape == (4, 2, 4, 4) and wan.num_frames == 5  # (C, F', h, w): 5 frames -> 2 latent frames
    x0, n = torch.randn(2, *wan.sample_shape), torch.randn(2, *wan.sample_shape)
    t = torch.tensor([250, 750])
    s = (t / 1000).reshape(2, 1, 1, 1, 1)
    torch.testing.assert_close(wan.schedule.add_noise(x0, n, t), (1 - s) * x0 + s * n)
    # The same marginals as UniPC's flow mode: x0 = x_t - sigma v (convert_model_output), alpha = 1 - sigma.
    sched = wan.scheduler
    sched.set_timesteps(4)
    sched._step_index = 1
    v = n - x0
    x_t = (1 - sched.sigmas[1]) * x0 + sched.sigmas[1] * n
    torch.testing.assert_close(sched.convert_model_output(v, sample=x_t), x0, atol=1e-5, rtol=1e-5)
    flux = load_backbone(saved["flux"])
    assert flux.embedded_guidance == 3.5 and flux.sample_shape == (4, 8, 8)
    from tdm.backbones.flux import pack, unpack

    lat = torch.randn(2, 4, 8, 8)
    packed = flux.pipe._pack_latents(lat, 2, 4, 8, 8)
    assert torch.equal(pack(lat), packed) and torch.equal(unpack(packed, 8, 8), lat)
    torch.testing.assert_close(flux.pipe._unpack_latents(packed, 16, 16, flux.vae_scale_factor), lat)
    assert load_backbone(saved["flux_schnell"]).embedded_guidance is None


@pytest.mark.parametrize("name", NEW)
def test_latents_round_trip_through_the_vae(name, saved):
    backbone = load_backbone(saved[name])
    h, w = backbone.resolution
    images = torch.rand(2, 3, h, w) * 2 - 1
    latents = backbone.encode_images(images)  # video families: a still image as a static clip
    assert tuple(latents.shape[1:]) == backbone.sample_shape and not latents.requires_grad
    pixels = backbone.decode(latents)
    frames = (backbone.num_frames,) if name in VIDEO else ()
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (2, *frames, h, w, 3)
    if name == "wan":  # the normalisation WanPipeline decodes with: z = x * latents_std + latents_mean
        clip = torch.rand(1, 3, 5, h, w) * 2 - 1
        z = backbone.vae.encode(clip).latent_dist.mean
        std = torch.tensor(backbone.vae.config.latents_std).view(1, -1, 1, 1, 1)
        mean = torch.tensor(backbone.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(backbone.encode_images(clip) * std + mean, z, atol=1e-5, rtol=1e-5)


def test_unsupported_layouts_fail_before_loading(saved, tmp_path):
    import shutil

    meta = json.loads((saved["wan"] / "model_index.json").read_text())
    for i, (key, value, message) in enumerate([
            ("transformer_2", ["diffusers", "WanTransformer3DModel"], "two-expert Wan2.2"),
            ("boundary_ratio", 0.875, "two-expert Wan2.2"),
            ("expand_timesteps", True, "expand_timesteps")]):
        folder = tmp_path / f"wan{i}"  # config files only: no weights are needed to refuse it
        shutil.copytree(saved["wan"] / "scheduler", folder / "scheduler")
        (folder / "model_index.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(UnsupportedModel, match=message):
            load_backbone(folder)
    other = tmp_path / "hunyuan"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    with pytest.raises(UnsupportedModel, match=r"unsupported model.*HunyuanVideoPipeline.*wan, flux.*WanPipeline, FluxPipeline"):
        load_backbone(other)
    bad = tmp_path / "badshape"
    shutil.copytree(saved["flux"], bad)
    (bad / "tdm_backbone.json").write_text(json.dumps({"height": 18, "width": 16}))
    with pytest.raises(ValueError, match="native shape 18x16.*multiples of 4"):
        load_backbone(bad)
    (bad / "tdm_backbone.json").write_text(json.dumps({"heigth": 16}))
    with pytest.raises(ValueError, match=r"tdm_backbone.json: unknown key\(s\) \['heigth'\]"):
        load_backbone(bad)


@pytest.mark.parametrize("name", ["pixart_sigma", "wan", "flux"])
def test_config_accepts_the_new_families(name, saved):
    cfg = config.parse({"model": {"family": FAMILY[name], "pretrained": str(saved[name])}})
    assert cfg.model.family == FAMILY[name]


# -- the stages ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("name", NEW)
def test_tdm_iterations_train_student_and_fake_only(name, mode, saved, tmp_path):
    from accelerate import Accelerator

    from tdm.distill import TDMTrainer

    cfg = _cfg(tmp_path, saved[name], f"distill.mode={mode}", f"distill.unify={mode == 'full'}")
    backbone = load_backbone(saved[name])
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
        assert any(".to_q." in n for n in names)
        if name.startswith("flux"):  # the single blocks are adapted too
            assert any("single_transformer_blocks" in n and "proj_mlp" in n for n in names)
        if name == "wan":
            assert any(".ffn.net.0.proj." in n for n in names) and any(".attn2.to_k." in n for n in names)
    else:
        assert trainer.roles.k_embeddings["student"].weight.abs().sum() > 0
    for n, p in backbone.net.named_parameters():
        if "lora_" not in n:
            assert torch.equal(base[n.replace(".base_layer", "")], p), n


@pytest.mark.parametrize("name", NEW)
def test_distill_stage_checkpoints_resumes_and_saves_a_sampleable_student(name, saved, tmp_path):
    from tdm import distill
    from tdm.sampler import sample_student
    from tdm.student import load_student

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    cfg = _cfg(tmp_path, saved[name], f"distill.prompts={prompts}", "distill.mode=lora")
    paths = StagePaths.of("distill", tmp_path)
    distill.train(cfg, paths, progress=False, stop_after=1)
    assert ckpt.latest_checkpoint(paths.out_dir / "checkpoints").name == "step-0000001"
    metrics = distill.run(cfg, paths, progress=False)
    assert metrics["resumed_from"] == 1 and metrics["iterations"] == 2
    student_dir = paths.out_dir / "student"
    loaded = load_student(student_dir)
    student = loaded.backbone
    assert student.family == loaded.record.family == FAMILY[name] and loaded.record.k == 2
    teacher = load_backbone(saved[name])
    assert student.sample_shape == teacher.sample_shape  # the native shape / guidance file is saved along
    if name in ("wan", "flux"):
        assert json.loads((student_dir / "tdm_backbone.json").read_text()) == teacher.settings
    images = sample_student(loaded, PROMPTS[:2], k=2)
    h, w = student.resolution
    frames = (student.num_frames,) if name in VIDEO else ()
    assert images.dtype == torch.uint8 and tuple(images.shape) == (2, *frames, h, w, 3)
    teacher.load_lora(paths.out_dir / "student_lora")  # plain peft = the merged student
    x, t = _x_t(student)
    cond = student.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(teacher.predict(teacher.net, x, t, cond), student.predict(student.net, x, t, cond),
                                   atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("sft_new")
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    return folder


@pytest.mark.parametrize("name", NEW)
def test_teacher_ft_step_on_an_image_folder(name, saved, image_folder, tmp_path):
    """One teacher-ft step (video families: still images as static clips), saved and reloaded, weights moved, the
    native-shape file kept."""
    import numpy as np

    from tdm import teacher_ft

    cfg = _cfg(tmp_path, saved[name], f"teacher_ft.data={image_folder}", "teacher_ft.resolution=16",
               "teacher_ft.steps=1", "teacher_ft.batch_size=2", "teacher_ft.warmup_steps=0", "teacher_ft.lr=1e-2",
               "teacher_ft.eval_samples=0", "teacher_ft.ema_decay=0", "teacher_ft.snr_gamma=null")
    cfg = config.parse({**config.dump(cfg), "model": {"family": FAMILY[name], "pretrained": str(saved[name])}})
    metrics = teacher_ft.run(cfg, StagePaths.of("teacher_ft", tmp_path), progress=False)
    assert metrics["steps"] == 1 and np.isfinite(metrics["final_loss"]) and metrics["final_loss"] > 0
    before = load_backbone(saved[name])
    after = load_backbone(tmp_path / "outputs/teacher_ft/model")
    assert after.family == FAMILY[name] and after.sample_shape == before.sample_shape
    params = dict(before.net.named_parameters())
    assert any(not torch.equal(p, params[n]) for n, p in after.net.named_parameters())


@pytest.mark.parametrize("name", NEW)
def test_a_float32_student_beside_bf16_encoders_samples(name, saved):
    """What a bf16 LoRA run saves: the merged student in float32, the frozen parts in bf16; sampling (no
    autocast) runs and matches the all-float32 model closely."""
    from tdm.sampler import sample_student
    from tdm.student import Student, StudentRecord

    mixed = load_backbone(saved[name], dtype=torch.bfloat16)
    mixed.net.float()
    reference = load_backbone(saved[name])
    x, t = _x_t(reference)
    with torch.no_grad():
        a = mixed.predict(mixed.net, x, t, mixed.encode_prompts(PROMPTS[:2]))
        b = reference.predict(reference.net, x, t, reference.encode_prompts(PROMPTS[:2]))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.1)
    images = sample_student(Student(mixed, mixed.net, StudentRecord(family=FAMILY[name], k=2, total_steps=1000)),
                            PROMPTS[:1])
    assert images.dtype == torch.uint8


@pytest.mark.parametrize("name", ["sd35", "wan", "flux"])
def test_gradient_checkpointing_gives_the_same_iteration(name, saved, tmp_path):
    """The profiles turn gradient checkpointing on: with LoRA and the K embedding the iteration is the same."""
    from accelerate import Accelerator

    from tdm.distill import TDMTrainer

    states = []
    for flag in (False, True):
        cfg = _cfg(tmp_path, saved[name], "distill.mode=lora", "distill.unify=true",
                   f"distill.gradient_checkpointing={flag}")
        torch.manual_seed(0)
        trainer = TDMTrainer(cfg, load_backbone(saved[name]), Accelerator(cpu=True))
        trainer.prompts = PROMPTS
        for step in range(2):
            trainer.iteration(step)
        states.append(trainer.roles.state_dict("student"))
    assert any(n.startswith("k_embedding") for n in states[0])
    for key, tensor in states[0].items():
        torch.testing.assert_close(states[1][key], tensor, atol=1e-6, rtol=1e-5)


# -- parity with diffusers -------------------------------------------------------------------------------------
class _EulerOnSigmas:
    """A FlowMatchEuler (shift 1) whose set_timesteps(K) takes fixed sigmas: for pipelines (Wan) that pass only
    num_inference_steps, so the teacher's grid can be the one our DDIM teacher sampler uses."""

    @staticmethod
    def make(config, sigmas):
        import diffusers

        class OnSigmas(diffusers.FlowMatchEulerDiscreteScheduler):
            def set_timesteps(self, num_inference_steps=None, device=None, **kw):
                super().set_timesteps(device=device, sigmas=list(sigmas))

        return OnSigmas(num_train_timesteps=config["num_train_timesteps"], shift=1.0)


@pytest.mark.parametrize("name", NEW)
def test_teacher_sampler_matches_the_diffusers_pipeline(name, saved):
    """Our CFG teacher sampler (schedule view + adapter) reproduces the family's own pipeline on the same 2-step
    grid (999, 499; flow: plain Euler on sigmas 0.999, 0.499): conditioning, uncond branch, model call and step.
    FLUX: real CFG is the pipeline's true_cfg_scale with negative_prompt "" at the embedded guidance 3.5 (dev)."""
    import diffusers

    from tdm.sampler import make_noise, teacher_sample

    backbone = load_backbone(saved[name])
    pipe = backbone.pipe
    pipe.set_progress_bar_config(disable=True)
    noise = make_noise(2, backbone.sample_shape, seed=1)
    common = dict(prompt=PROMPTS[:2], output_type="latent", max_sequence_length=tiny_models.TEXT_LEN)
    sigmas = [0.999, 0.499]
    if name == "sd35":
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
        theirs = pipe(**common, guidance_scale=2.0, latents=noise.clone(), sigmas=sigmas).images
    elif name == "pixart_sigma":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                             set_alpha_to_one=True, clip_sample=False)
        theirs = pipe(**common, guidance_scale=2.0, latents=noise.clone(), num_inference_steps=2, height=16,
                      width=16, clean_caption=False, use_resolution_binning=False).images
    elif name == "wan":
        pipe.scheduler = _EulerOnSigmas.make(pipe.scheduler.config, sigmas)
        theirs = pipe(**common, guidance_scale=2.0, latents=noise.clone(), num_inference_steps=2, height=16,
                      width=16, num_frames=5).frames
    else:  # flux: no dynamic shift on the fixed sigmas; guidance_scale is the embedded guidance, true CFG real CFG
        from tdm.backbones.flux import pack, unpack

        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False)
        packed = pipe(**common, guidance_scale=3.5, true_cfg_scale=2.0, negative_prompt="",
                      latents=pack(noise.clone()), sigmas=sigmas, height=16, width=16).images
        theirs = unpack(packed, 8, 8)
    ours = teacher_sample(backbone, backbone.net, backbone.encode_prompts(PROMPTS[:2]), noise, steps=2, guidance=2.0)
    torch.testing.assert_close(ours, theirs.float(), atol=2e-4, rtol=2e-4)


GRIDS = {"uniform": (900, 1.0), "shifted": (1000, 3.0)}  # (total_steps, shift)


def _stock_run(name, pipe, k, noise):
    """The stock pipeline at K steps, no CFG (the student has it baked in), fixed latents; latents out in tdm's
    layout (FLUX: unpacked)."""
    common = dict(prompt=PROMPTS[:2], num_inference_steps=k, output_type="latent",
                  max_sequence_length=tiny_models.TEXT_LEN)
    if name == "sd35":
        return pipe(**common, guidance_scale=1.0, latents=noise.clone(), height=16, width=16).images
    if name == "pixart_sigma":
        return pipe(**common, guidance_scale=1.0, latents=noise.clone(), height=16, width=16, clean_caption=False,
                    use_resolution_binning=False).images
    if name == "wan":
        return pipe(**common, guidance_scale=1.0, latents=noise.clone(), height=16, width=16, num_frames=5).frames
    from tdm.backbones.flux import pack, unpack

    # The student's guidance input is the embedded guidance it was distilled at (FluxPipeline's guidance_scale).
    return unpack(pipe(**common, guidance_scale=3.5, latents=pack(noise.clone()), height=16, width=16).images, 8, 8)


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("name", [
    "sd35", "pixart_sigma",
    "wan", "flux"])
def test_stock_pipeline_with_our_scheduler_runs_the_student_exactly(name, grid, saved):
    """A fresh stock pipeline (nothing of tdm in it but the scheduler from `from_student`) on the same starting
    latents gives the latents of `student_sample` bit for bit, K = 1, 2, 4 (the student here is the teacher itself:
    the sampler and scheduler are what is compared)."""
    import diffusers

    from tdm.sampler import student_sample
    from tdm.scheduling_tdm import from_student
    from tdm.student import StudentRecord

    backbone = load_backbone(saved[name])
    pipe = getattr(diffusers, json.loads((saved[name] / "model_index.json").read_text())["_class_name"]) \
        .from_pretrained(saved[name])
    pipe.set_progress_bar_config(disable=True)
    total_steps, shift = GRIDS[grid]
    noise = torch.randn((2, *backbone.sample_shape), generator=torch.Generator().manual_seed(3))
    cond = backbone.encode_prompts(PROMPTS[:2])
    base_config = pipe.scheduler.config
    for k in (1, 2, 4):
        record = StudentRecord(family=FAMILY[name], k=k, total_steps=total_steps, shift=shift)
        pipe.scheduler = from_student(record, base_config)
        theirs = _stock_run(name, pipe, k, noise)
        ours = student_sample(backbone, backbone.net, cond, noise, record.timesteps(k))
        assert pipe.scheduler.timesteps.tolist() == record.timesteps(k).tolist()
        diff = (theirs.float() - ours).abs().max().item()
        print(f"{name:12s} {grid:8s} K={k}: max |stock - student_sample| = {diff:.3g}")
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
        assert torch.equal(theirs, ours), (name, grid, k, diff)


# -- FLUX guidance: what the decision rests on -----------------------------------------------------------------
def test_flux_guidance_decision_measured(saved, tmp_path):
    """The measurements behind docs/backbones.md "FLUX guidance" (run with -s to see them), on the tiny FLUX.1-dev:

    1. the guidance embedding is a real input: the teacher's x0 at embedded guidance 1 / 3.5 / 7 differ;
    2. a student that starts as the teacher (a copy) reproduces the teacher's target exactly only when its own
       guidance input is the teacher's (3.5): at 1.0 (what `guidance_scale=1` would pass) it starts off by the
       printed gap, so the student's input is set to the teacher's embedded guidance, for training and sampling;
    3. real CFG on top (distill.guidance 2, empty negative prompt) doubles the teacher's batch: the samples through
       the transformer per iteration are counted for both settings (and CPU seconds printed, noisy on this box).
    """
    from accelerate import Accelerator

    from tdm.distill import TDMTrainer
    from tdm.sampler import guided_x0_eps

    flux = load_backbone(saved["flux"])
    x, t = _x_t(flux)
    x0 = {}
    for g in (1.0, 3.5, 7.0):
        flux.embedded_guidance = g
        x0[g], _ = guided_x0_eps(flux, flux.net, x, t, flux.encode_prompts(PROMPTS[:2]), 1.0)
    flux.embedded_guidance = 3.5
    gap_1 = (x0[1.0] - x0[3.5]).abs().max().item()
    gap_7 = (x0[7.0] - x0[3.5]).abs().max().item()
    cfg_gap = (guided_x0_eps(flux, flux.net, x, t, flux.encode_prompts(PROMPTS[:2]), 2.0)[0] - x0[3.5]).abs().max()
    print(f"FLUX tiny: max |x0(g_embed=1) - x0(3.5)| = {gap_1:.3g}, |x0(7) - x0(3.5)| = {gap_7:.3g}, "
          f"|real CFG 2 at 3.5 - embedded 3.5 alone| = {cfg_gap:.3g} (max |x0| {x0[3.5].abs().max():.3g})")
    assert gap_1 > 1e-3 and gap_7 > 1e-3 and cfg_gap > 1e-3
    work, seconds = {}, {}
    for guidance in (1.0, 2.0):
        cfg = _cfg(tmp_path, saved["flux"], "distill.mode=lora", f"distill.guidance={guidance}")
        backbone = load_backbone(saved["flux"])
        trainer = TDMTrainer(cfg, backbone, Accelerator(cpu=True))
        trainer.prompts = PROMPTS
        counted = []  # samples through the transformer per forward (deterministic, unlike CPU seconds here)
        handle = backbone.net.register_forward_pre_hook(lambda m, args, kw: counted.append(kw["hidden_states"].shape[0]),
                                                        with_kwargs=True)
        start = time.perf_counter()
        for step in range(2):
            metrics = trainer.iteration(step)
        seconds[guidance] = (time.perf_counter() - start) / 2
        handle.remove()
        work[guidance] = sum(counted) / 2
        assert torch.isfinite(metrics["loss_gen"])
    print(f"FLUX tiny: transformer samples / iteration (batch 2): embedded guidance only {work[1.0]:.0f}, + real CFG "
          f"{work[2.0]:.0f}; CPU s / iteration (shared box, noisy) {seconds[1.0]:.3f} vs {seconds[2.0]:.3f}")
    assert work[2.0] - work[1.0] == 2  # real CFG: the teacher's forward runs on cond + uncond (B more samples)


# -- the profiles ----------------------------------------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
PROFILES = {"sd35_medium": "sd35", "pixart_sigma": "pixart_sigma", "wan": "wan", "flux": "flux"}  # -> tiny model


@pytest.fixture(scope="module")
def distilled(saved, tmp_path_factory):
    """profile -> the folder its `tdm distill` run (bf16 and all, as written) left on the tiny model. The `model`
    section is dropped for the families tdm.config cannot name yet (the distill stage reads distill.teacher)."""
    import os

    import yaml
    from accelerate.state import AcceleratorState

    from tdm import cli

    out = {}
    for profile, name in PROFILES.items():
        work = tmp_path_factory.mktemp(f"profile_{profile}")
        params = yaml.safe_load((ROOT / "profiles" / f"{profile}.yaml").read_text())
        params["model"]["pretrained"] = str(saved[name])
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        cwd = os.getcwd()
        AcceleratorState._reset_state(reset_partial_state=True)
        os.chdir(work)
        try:
            rc = cli.main(["distill", "--params", "params.yaml", "-q", "-S", f"distill.teacher={saved[name]}",
                           "-S", f"distill.prompts={ROOT / 'profiles/prompts/example.txt'}",
                           "-S", "distill.iterations=1", "-S", "distill.batch_size=2", "-S", "distill.lora_rank=4"])
        finally:
            os.chdir(cwd)
            AcceleratorState._reset_state(reset_partial_state=True)
        out[profile] = (rc, work / "outputs/distill/student")
    return out


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_runs_distill_on_the_tiny_model(profile, distilled):
    import yaml

    params = yaml.safe_load((ROOT / "profiles" / f"{profile}.yaml").read_text())
    assert params["model"]["pretrained"] == params["distill"]["teacher"]
    assert params["distill"]["k"] == 4 and params["distill"]["mixed_precision"] == "bf16"
    rc, student = distilled[profile]
    assert rc == 0 and (student / "model_index.json").is_file() and (student / "tdm_student.json").is_file()
    assert family_of(student) == FAMILY[PROFILES[profile]]


@pytest.mark.parametrize("profile", [
    "sd35_medium", "pixart_sigma",
    "wan", "flux"])
def test_profile_student_samples_identically_in_the_stock_pipeline(profile, distilled):
    """`tdm sample --student` (student_sample on the saved student, K = 4 on the profile's grid) == the stock
    pipeline loaded from the student folder with `from_student(record)` as its scheduler, same starting latents.
    The bf16 run saved its frozen parts in bf16 beside the float32 student; a stock pipeline cannot mix them (it
    casts the latents to the text encoder's dtype), so both sides load the folder in float32."""
    import diffusers

    from tdm.sampler import student_sample
    from tdm.scheduling_tdm import from_student
    from tdm.student import load_student

    _, folder = distilled[profile]
    loaded = load_student(folder, dtype=torch.float32)
    backbone, record = loaded.backbone, loaded.record
    pipe = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"]) \
        .from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = from_student(record, pipe.scheduler.config)
    noise = torch.randn((2, *backbone.sample_shape), generator=torch.Generator().manual_seed(4))
    ours = student_sample(backbone, backbone.net, backbone.encode_prompts(PROMPTS[:2]), noise, record.timesteps(4))
    theirs = _stock_run(PROFILES[profile], pipe, 4, noise)
    print(f"{profile}: grid {record.timesteps(4).tolist()}, max |stock - student_sample| = "
          f"{(theirs.float() - ours).abs().max():.3g}")
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("profile", ["sd35_medium", "wan", "flux"])
def test_profile_student_lora_loads_in_the_stock_pipeline(profile, distilled, saved, tmp_path):
    """The LoRA-mode profile run's `student_lora/` (plain peft) written in the diffusers format (`transformer.*`
    keys, what the family's `load_lora_weights` and ComfyUI read) loads into a fresh stock pipeline of the teacher
    and gives exactly what the same LoRA attached by tdm gives (2 steps of the pipeline's own sampler)."""
    import diffusers

    from tdm import lora as L

    from dataclasses import replace

    _, student = distilled[profile]
    lora = L.load_lora(student.parent / "student_lora")
    # One bf16 iteration at lr 2e-5 (EMA 0.99) can leave the up weights at exactly 0 (FLUX here: teacher and fake
    # agree to bf16 at init): the student's modules, ranks and alpha are kept and the up weights drawn, so that
    # "applied exactly" is a real check.
    g = torch.Generator().manual_seed(2)
    lora = replace(lora, modules={n: replace(m, up=torch.randn(m.up.shape, generator=g) * 0.1)
                                  for n, m in lora.modules.items()})
    path = L.save_lora(lora, tmp_path / "diffusers", "diffusers", component="transformer")
    folder = saved[PROFILES[profile]]
    cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])

    def fresh():
        pipe = cls.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(pipe):
        kw = dict(prompt=PROMPTS[0], num_inference_steps=2, output_type="latent", height=16, width=16,
                  max_sequence_length=tiny_models.TEXT_LEN, generator=torch.Generator().manual_seed(0))
        if profile == "wan":
            return pipe(**kw, guidance_scale=1.0, num_frames=5).frames
        return pipe(**kw, guidance_scale=3.5 if profile == "flux" else 1.0).images

    ours = fresh()
    L.attach(ours.transformer, lora)
    theirs = fresh()
    theirs.load_lora_weights(str(path))
    expected = run(ours)
    assert torch.equal(run(theirs), expected)
    assert not torch.equal(run(fresh()), expected)  # the LoRA is applied
