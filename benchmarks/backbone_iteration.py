"""One TDM iteration per real family and variant: wall time and peak memory beside the dry run's estimate (#15).

GPU (what the issue asks for; needs no downloads): every family at its real architecture and shape with
random weights, in LoRA mode under bf16 (frozen base bf16, adapters float32, profiles/<family>.yaml otherwise:
K, unify, rank), at a per-device batch of --batch-size, in four variants (--variants):

    base        text encoders resident, conditioning encoded every iteration, no gradient checkpointing
    ckpt        as base, distill.gradient_checkpointing on
    store       distill.prompt_store: the text encoders are not resident and the conditioning is read from a
                store (tdm.prompt_store.write_store of the distill prompts, by the model's own encoders, in a
                temp dir before the build ends; then the encoders are dropped and the store attached, as
                load_backbone(prompt_store=...) leaves a backbone: the timed iterations run distill's store path)
    store_ckpt  both

    .venv/bin/python benchmarks/backbone_iteration.py                  # results/backbone_iteration_<card>.*
    .venv/bin/python benchmarks/backbone_iteration.py --family sdxl --variants base,store --batch-size 4

Budget (one command within 8 minutes on one H200): the runs go in rounds, every family's first variant, then
every family's second, ...; a run is skipped (and recorded as skipped) when the time spent so far plus that
family's previous wall time would pass --budget-s (default 450 s, leaving the plans' tail and the writes), so
the cheap families get all four variants and the expensive ones what fits. The dry-run plan of each row
(`tdm.memory_plan.plan` of the same config, store switch and process count; CPU, meta device,
CUDA_VISIBLE_DEVICES="") runs in parallel subprocesses beside the GPU runs; its total is recorded beside the
measured peak with measured / plan. FSDP: on one GPU "n/a (1 device)"; with >= 2 GPUs the ckpt variant is also
run under `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2` (rank 0's peak,
planned with fsdp=True over 2 processes). Results are named after the card (torch.cuda.get_device_name).

Real shapes: SD1.5 512 px (4x64x64 latents), SDXL / PixArt-alpha / SD3-medium 1024 px (4 or 16 x128x128),
CogVideoX-2B 49 frames at 480x720 (13x16x60x90 latents), Z-Image 1024 px (16x128x128, Qwen3-4B prompts as a
chat-templated byte-level BPE tokenises them); text encoders at full size (CLIP-L, OpenCLIP-bigG,
T5-XXL). Random weights change nothing about time or memory. The store written from an in-memory model is
fingerprinted against a folder of its configs only (`encoder_config_folder`): it serves that process alone.

CPU, `--tiny` (what this machine can run, and what proves the script works): the tiny models of
tests/tiny_models.py saved and reloaded, fp32, results to results/backbone_iteration_tiny_cpu.* and labelled:

    .venv/bin/python benchmarks/backbone_iteration.py --tiny

Each variant runs in a fresh subprocess (this script with --measure FAMILY --variant V) so peaks never mix: on
CUDA the peak is torch.cuda.max_memory_allocated over the timed iterations (the model is built, the store
written and the encoders freed first, then the peak counter reset), on CPU the process's peak RSS (VmHWM, which
includes Python and torch, so the CPU ratio checks nothing). One warm-up iteration (it creates the optimiser
state), then --iterations timed ones; the rollout depth varies with the drawn step, so mean and max are reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# Profiles (profiles/<name>.yaml) measured: the five families the paper distils (hand-written builders below), then
# the newer ones, built from the public configs recorded in tdm/arch/ (the memory plan's records).
FIRST_FIVE = ("sd15", "sdxl", "pixart_alpha", "sd3", "cogvideox")
FAMILIES = FIRST_FIVE + ("sd35_medium", "pixart_sigma", "wan", "flux", "zimage")
TINY_NAMES = {"sd35_medium": "sd35"}  # the tiny model of a profile whose name is not its family's
sys.path.insert(0, str(REPO / "tests"))  # tiny_models: the tiny builders and the offline T5 tokenizer


# -- real architectures (the published configs of the models the paper distils) ------------------------------
def _clip_l(tokenizer, with_projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _clip_bigg(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def _t5_xxl():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32))


def _sd_vae(latent_channels=4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=latent_channels, sample_size=1024, **kw)


def _tokenizers():
    from transformers import CLIPTokenizer, T5Tokenizer

    from tdm.backbones.clip_tokenizer import write_clip_tokenizer
    from tiny_models import _t5_pieces

    with tempfile.TemporaryDirectory() as tmp:
        clip = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp))  # the full CLIP BPE, 77 tokens
    # Any T5 vocabulary gives the real shapes: prompts are padded to the pipeline's max_sequence_length.
    t5 = T5Tokenizer(vocab=list(_t5_pieces()), extra_ids=0, model_max_length=512)
    return clip, t5


def arch_pipeline(profile: str, frozen_dtype, device):
    """A profile's teacher at its real architecture from its tdm/arch record (public component configs), random
    weights, on `device`; tokenizers of the right vocabulary size, the family's hub scheduler."""
    import diffusers
    import torch
    import transformers
    import yaml

    from tdm.memory_plan import known_architectures

    hub_id = yaml.safe_load((REPO / "profiles" / f"{profile}.yaml").read_text())["model"]["pretrained"]
    spec = json.loads(known_architectures()[hub_id].read_text())
    clip, t5 = _tokenizers()
    schedulers = {  # the hub checkpoints' schedulers (the student's grid is its own; these set the schedule)
        "sd3": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        "pixart_sigma": lambda: diffusers.DPMSolverMultistepScheduler(beta_schedule="linear"),
        "wan": lambda: diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=3.0),
        "flux": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                                  base_shift=0.5, max_shift=1.15),
        "zimage": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
    }
    parts = {"scheduler": schedulers[spec["family"]]()}
    torch.set_default_dtype(frozen_dtype)
    with torch.device(device):
        for name, entry in spec["components"].items():
            cfg = {k: v for k, v in entry["config"].items() if not k.startswith("_")}
            if entry["library"] == "diffusers":
                parts[name] = getattr(diffusers, entry["class"]).from_config(cfg)
            else:
                cfg.pop("architectures", None)
                config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
                parts[name] = getattr(transformers, entry["class"])(config)
    torch.set_default_dtype(torch.float32)
    pipeline = getattr(diffusers, spec["pipeline"])
    import inspect

    for name in inspect.signature(pipeline.__init__).parameters:
        if name.startswith("tokenizer"):  # CLIP tokenizers for CLIP encoders, the T5 one for T5 / UMT5
            encoder = parts.get(name.replace("tokenizer", "text_encoder"))
            parts[name] = clip if encoder is not None and "CLIP" in type(encoder).__name__ else t5
            if encoder is not None and type(encoder).__name__.startswith("Qwen"):
                # Z-Image's Qwen3: a chat-templated byte-level BPE; a small vocabulary tokenises the example
                # prompts into more tokens than Qwen's own (the caption tokens are at most 512 either way).
                from tiny_zimage import qwen_style_tokenizer

                parts[name] = qwen_style_tokenizer(512)
    return pipeline(**parts)


def real_pipeline(family: str, net_dtype, frozen_dtype, device):
    """`family` (a profile name) at its real architecture with random weights, built on `device`."""
    import diffusers
    import torch

    if family not in FIRST_FIVE:
        from tdm.memory_plan import _keep_in_fp32

        pipe = arch_pipeline(family, frozen_dtype, device)
        pipe.transformer.to(net_dtype)
        _keep_in_fp32(pipe.transformer, "diffusers", net_dtype)  # as from_pretrained(torch_dtype=...) keeps them
        return pipe

    clip, t5 = _tokenizers()
    schedulers = {  # built in float32, outside the low-precision default below
        "sd": lambda: diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                              clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        "sdxl": lambda: diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                         beta_schedule="scaled_linear", steps_offset=1),
        "pixart": lambda: diffusers.DPMSolverMultistepScheduler(beta_schedule="linear"),
        "sd3": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        "cogvideox": lambda: diffusers.CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
            rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing", clip_sample=False,
            set_alpha_to_one=True),
    }
    scheduler = schedulers[{"sd15": "sd", "pixart_alpha": "pixart"}.get(family, family)]()
    torch.set_default_dtype(frozen_dtype)
    with torch.device(device):
        if family == "sd15":
            pipe = diffusers.StableDiffusionPipeline(
                vae=_sd_vae(scaling_factor=0.18215), text_encoder=_clip_l(clip), tokenizer=clip,
                unet=diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768),
                scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        elif family == "sdxl":
            unet = diffusers.UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, use_linear_projection=True)
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=_sd_vae(scaling_factor=0.13025), text_encoder=_clip_l(clip), text_encoder_2=_clip_bigg(clip),
                tokenizer=clip, tokenizer_2=clip, unet=unet, scheduler=scheduler)
        elif family == "pixart_alpha":
            transformer = diffusers.PixArtTransformer2DModel(
                sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4,
                out_channels=8, cross_attention_dim=1152, caption_channels=4096, patch_size=2,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000)
            pipe = diffusers.PixArtAlphaPipeline(
                tokenizer=t5, text_encoder=_t5_xxl(), vae=_sd_vae(scaling_factor=0.18215), transformer=transformer,
                scheduler=scheduler)
        elif family == "sd3":
            transformer = diffusers.SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=192)
            pipe = diffusers.StableDiffusion3Pipeline(
                transformer=transformer, scheduler=scheduler,
                vae=_sd_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False),
                text_encoder=_clip_l(clip, with_projection=True), tokenizer=clip,
                text_encoder_2=_clip_bigg(clip), tokenizer_2=clip, text_encoder_3=_t5_xxl(), tokenizer_3=t5)
        elif family == "cogvideox":
            transformer = diffusers.CogVideoXTransformer3DModel(
                num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49,
                patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226)
            pipe = diffusers.CogVideoXPipeline(
                tokenizer=t5, text_encoder=_t5_xxl(),
                vae=diffusers.AutoencoderKLCogVideoX(latent_channels=16, scaling_factor=1.15258426),
                transformer=transformer, scheduler=scheduler)
        else:
            raise ValueError(f"unknown family {family!r}")
    torch.set_default_dtype(torch.float32)
    net = getattr(pipe, "unet", None) or pipe.transformer
    net.to(net_dtype)
    return pipe


def architectures(families) -> dict:
    """Parameter counts of the real-size builds (meta device: no memory, no compute), per component."""
    import torch

    counts = {}
    for family in families:
        pipe = real_pipeline(family, torch.bfloat16, torch.bfloat16, "meta")
        counts[family] = {name: sum(p.numel() for p in part.parameters())
                          for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    return counts


# -- one measurement (a subprocess) ---------------------------------------------------------------------------
def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# The variants issue #15 asks for, all in LoRA mode (bf16 on the GPU, fp32 with --tiny): {prompt store off, on} x
# {gradient checkpointing off, on}. name -> (distill.prompt_store set, distill.gradient_checkpointing).
VARIANTS = {"base": (False, False), "ckpt": (False, True), "store": (True, False), "store_ckpt": (True, True)}
FSDP_VARIANT = "ckpt"  # the one launched under FSDP on >= 2 GPUs (sharding is for what does not fit: checkpointing on)


def variant_config(family: str, tiny: bool, batch_size: int, variant: str, teacher: Path | None = None):
    """The profile's config for one variant: LoRA mode, bf16 (fp32 tiny), the variant's checkpointing; the store
    path itself is set by `measure` (a store written on the fly). `teacher`: a local folder (the tiny model) the
    memory plan reads instead of the profile's tdm/arch record."""
    from tdm.memory_plan import load_config

    _, checkpointing = VARIANTS[variant]
    # The profile's hub id stands for its recorded architecture (tdm/arch; nothing is downloaded): the trainer
    # takes the backbone built here, never the path.
    overrides = [f"distill.batch_size={batch_size}", f"distill.prompts={REPO / 'profiles/prompts/example.txt'}",
                 "distill.mode=lora", f"distill.gradient_checkpointing={str(checkpointing).lower()}",
                 'distill.mixed_precision="no"' if tiny else "distill.mixed_precision=bf16"]
    if tiny:
        overrides += ["distill.lora_rank=4"]
    if teacher is not None:
        overrides += [f"distill.teacher={teacher}", f"model.pretrained={teacher}"]
    return load_config(REPO / "profiles" / f"{family}.yaml", overrides)


def tiny_folder(family: str) -> Path:
    """The family's tiny model (tests/tiny_models.py, tests/tiny_zimage.py) saved to a temp folder: Wan / FLUX
    folders carry their native shape (tdm_backbone.json)."""
    import tiny_models

    where = Path(tempfile.mkdtemp(prefix="tdm-tiny-")) / family
    if family == "zimage":
        import tiny_zimage

        return Path(tiny_zimage.save(tiny_zimage.tiny_zimage(), where))
    return Path(tiny_models.save_pipeline(tiny_models.build(TINY_NAMES.get(family, family)), where))


def encoder_config_folder(backbone, out: Path) -> Path:
    """For a pipeline built in memory (the real-shape random models: no folder): model_index.json and each text
    encoder's config.json written to `out`, no weights, so `write_store` / `attach` can fingerprint it (the
    weights digest is then that of no files: this store serves this process's model only)."""
    backbone.pipe.save_config(out)
    for name in backbone.text_encoders:
        encoder = getattr(backbone.pipe, name, None)
        if encoder is not None:
            encoder.config.save_pretrained(out / name)
    return out


def use_store(backbone, cfg, tmp: Path) -> dict:
    """What `distill.prompt_store` does, on the backbone already built: the distill prompt set encoded once by its
    own text encoders into a store (`tdm.prompt_store.write_store`, in the dtype distill loads the base in), the
    encoders dropped (as `load_backbone(prompt_store=...)` never constructs them) and the store attached
    (`attach`: fingerprint checked), so every iteration reads its conditioning from the store."""
    import gc

    import torch

    from tdm.distill import base_dtype, distill_prompts
    from tdm.prompt_store import attach, write_store

    dtype = base_dtype(cfg)
    folder = backbone.source_folder or encoder_config_folder(backbone, tmp / "model")
    summary = write_store(backbone, folder, distill_prompts(cfg), tmp / "store", dtype=dtype)
    dropped = tuple(n for n in backbone.text_encoders if getattr(backbone.pipe, n, None) is not None)
    backbone.pipe.register_modules(**{n: None for n in dropped})
    backbone.source_folder, backbone.skipped_components = Path(folder), dropped
    attach(backbone, tmp / "store", dtype=dtype)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"prompts": summary["prompts"], "bytes": summary["bytes"], "encoders_dropped": list(dropped)}


def plan_totals(family: str, tiny: bool, batch_size: int, variants: list[str], device_memory: int | None,
                num_processes: int = 1, fsdp: bool = False) -> dict:
    """{variant: the dry run's per-process total in MiB (`tdm.memory_plan.plan`, the variant's config and store
    switch), or "error: ..."}. Tiny: the plan of the saved tiny model (its own configs)."""
    from tdm.memory_plan import plan

    teacher = tiny_folder(family) if tiny else None
    out = {}
    for variant in variants:
        try:
            cfg = variant_config(family, tiny, batch_size * num_processes, variant, teacher)
            p = plan(cfg, device_memory_bytes=device_memory, num_processes=num_processes,
                     embedding_store=VARIANTS[variant][0], fsdp=fsdp, suggestions=False)
            out[variant] = round(p.total_bytes / 2**20, 1)
        except Exception as err:  # a plan that cannot be made is recorded, never hides the measured row
            out[variant] = f"error: {type(err).__name__}: {err}"
    return out


def measure(family: str, tiny: bool, batch_size: int, iterations: int, variant: str = "base") -> dict:
    """One variant of one family in this process (see the module docstring); under `accelerate launch` (FSDP)
    `batch_size` is per process and rank 0's peak is reported."""
    import torch
    from accelerate import Accelerator, PartialState

    from tdm.backbones import FAMILIES as ADAPTERS
    from tdm.backbones.zimage import ZImageBackbone
    from tdm.distill import TDMTrainer

    ADAPTERS = {"zimage": ZImageBackbone, **ADAPTERS}  # Z-Image runs here before it is registered too

    cuda = torch.cuda.is_available() and not tiny
    if not cuda:
        torch.set_num_threads(1)
    import yaml

    raw = yaml.safe_load((REPO / "profiles" / f"{family}.yaml").read_text())
    store, _ = VARIANTS[variant]
    state = PartialState(cpu=not cuda)  # the process group accelerate launch set up (1 process otherwise)
    processes, device = state.num_processes, state.device
    cfg = variant_config(family, tiny, batch_size * processes, variant)
    if cuda:
        torch.cuda.set_device(device)
    tmp = Path(tempfile.mkdtemp(prefix="tdm-bench-"))
    t_build = time.perf_counter()
    if tiny:  # saved and reloaded: the store's fingerprint reads the folder
        from tdm.backbones import load_backbone

        backbone = load_backbone(tiny_folder(family))
    else:
        torch.manual_seed(0)
        pipe = real_pipeline(family, torch.bfloat16, torch.bfloat16, device)
        backbone = ADAPTERS[raw["model"]["family"]](pipe)
    backbone.to(device)
    store_info = use_store(backbone, cfg, tmp) if store else None
    accelerator = Accelerator(mixed_precision=cfg.distill.mixed_precision, cpu=not cuda)
    trainer = TDMTrainer(cfg, backbone, accelerator)
    build_s = time.perf_counter() - t_build
    net_params = sum(p.numel() for n, p in backbone.net.named_parameters() if "lora_" not in n)
    trainable = sum(p.numel() for p in trainer.roles.parameters("student"))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    trainer.iteration(0)  # warm-up: optimiser state, kernels, caches
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(1, iterations + 1):
        t0 = time.perf_counter()
        metrics = trainer.iteration(step)
        sync()
        times.append(time.perf_counter() - t0)
    finite = all(bool(torch.isfinite(v)) for v in metrics.values())
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    return {"family": family, "variant": variant, "scale": "tiny" if tiny else "real",
            "device": str(device), "processes": processes,
            "fsdp": "on" if trainer.plugin is not None else "off", "mode": cfg.distill.mode,
            "mixed_precision": cfg.distill.mixed_precision, "batch_size": batch_size, "k": cfg.distill.k,
            "unify": cfg.distill.unify, "gradient_checkpointing": cfg.distill.gradient_checkpointing,
            "prompt_store": store_info,
            "sample_shape": list(backbone.sample_shape), "resolution": list(backbone.resolution),
            "denoiser_parameters": net_params, "student_trainable_parameters": trainable,
            "build_s": round(build_s, 2), "iteration_s_mean": round(statistics.mean(times), 4),
            "iteration_s_max": round(max(times), 4), "iterations_timed": iterations,
            "peak_memory_mib": round(peak, 1),
            "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (VmHWM)",
            "losses_finite": finite}


# -- the driver -----------------------------------------------------------------------------------------------
def _run(cmd: list[str], env: dict | None = None) -> tuple[dict | str, float]:
    """(the subprocess's last `RESULT ` / `PLAN ` JSON line, or its last error line; wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    lines = [ln.split(" ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith(("RESULT ", "PLAN "))]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return "error: " + " | ".join(tail), time.perf_counter() - t0
    return json.loads(lines[-1]), time.perf_counter() - t0


def card_slug(name: str) -> str:
    """"NVIDIA H200" -> "nvidia_h200": the card's name in the results file name."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def main() -> None:
    import os
    from concurrent.futures import ThreadPoolExecutor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (proves the script; not a benchmark)")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="a profile name (default: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all, within --budget-s)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of the measurements (default: 450 on a GPU, none with --tiny); "
                             "a run that would pass it is skipped and recorded as skipped")
    parser.add_argument("--batch-size", type=int, default=None, help="per device (default: 1 real, 2 tiny)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up")
    parser.add_argument("--out", type=Path, default=None,
                        help="results stem (default: results/backbone_iteration_<card> or _tiny_cpu)")
    parser.add_argument("--architectures", action="store_true",
                        help="build the real-size models on the meta device and print their parameter counts")
    parser.add_argument("--measure", choices=FAMILIES, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="base", help=argparse.SUPPRESS)
    parser.add_argument("--plan", choices=FAMILIES, help=argparse.SUPPRESS)
    parser.add_argument("--plan-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--device-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch = args.batch_size or (2 if args.tiny else 1)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: {', '.join(unknown) or '(none)'}: choose from {', '.join(VARIANTS)}")
    if args.architectures:
        print(json.dumps(architectures(args.family or FAMILIES), indent=2))
        return
    if args.measure:
        import os

        row = measure(args.measure, args.tiny, batch, args.iterations, args.variant)
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch: rank 0's peak, one line
            print("RESULT " + json.dumps(row))
        return
    if args.plan:
        print("PLAN " + json.dumps(plan_totals(args.plan, args.tiny, batch, variants, args.device_memory,
                                               args.plan_processes, fsdp=args.plan_processes > 1)))
        return

    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    if not args.tiny and not cuda:
        sys.exit("backbone_iteration: no CUDA device; run with --tiny for the CPU check of the script")
    from machine import machine_info

    families = args.family or FAMILIES
    budget = args.budget_s if args.budget_s is not None else (None if args.tiny else 450.0)
    gpus = torch.cuda.device_count() if cuda else 0
    memory = torch.cuda.get_device_properties(0).total_memory if cuda else None
    me = [sys.executable, __file__, "--batch-size", str(batch)] + (["--tiny"] if args.tiny else [])

    # The dry-run plans (CPU, meta device) run beside the GPU measurements, never on the GPU.
    plan_env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    plan_cmd = lambda fam, n: me + ["--plan", fam, "--variants", ",".join(variants if n == 1 else [FSDP_VARIANT]),  # noqa: E731
                                    "--plan-processes", str(n)] + ([] if memory is None else ["--device-memory", str(memory)])
    pool = ThreadPoolExecutor(max_workers=1 if args.tiny else 4)
    plans = {fam: pool.submit(_run, plan_cmd(fam, 1), plan_env) for fam in families}
    fsdp_plans = {fam: pool.submit(_run, plan_cmd(fam, 2), plan_env) for fam in families} if gpus >= 2 else {}

    # Every family's first variant, then the next variant of every family, ...: a budget cut drops whole rounds
    # from the end, never a family. A run is skipped when its family's last wall time would pass the budget.
    t_start = time.perf_counter()
    last_wall: dict[str, float] = {}
    rows = []

    def launch(family, variant, cmd):
        elapsed = time.perf_counter() - t_start
        if budget is not None and family in last_wall and elapsed + last_wall[family] > budget:
            row = {"family": family, "variant": variant, "skipped": f"time budget ({budget:.0f} s)"}
        else:
            result, wall = _run(cmd)
            last_wall[family] = wall
            row = result if isinstance(result, dict) else {"family": family, "variant": variant, "error": result}
            row["wall_s"] = round(wall, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for variant in variants:
        for family in families:
            launch(family, variant, me + ["--measure", family, "--variant", variant,
                                          "--iterations", str(args.iterations)])
    if gpus >= 2:  # FSDP2 over 2 GPUs, per-process batch as above (configs/accelerate/fsdp.yaml)
        accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(REPO / "configs/accelerate/fsdp.yaml"), "--num_processes", "2"]
        for family in families:
            launch(family, FSDP_VARIANT, accelerate + [__file__, "--batch-size", str(batch), "--measure", family,
                                                       "--variant", FSDP_VARIANT, "--iterations", str(args.iterations)])
    for row in rows:  # the dry run's estimate beside the measured peak
        source = (fsdp_plans if row.get("fsdp") == "on" else plans).get(row["family"])
        if source is None or "peak_memory_mib" not in row:
            continue
        result, _ = source.result()
        estimate = result.get(row["variant"], "error: not planned") if isinstance(result, dict) else result
        row["plan_total_mib"] = estimate
        if isinstance(estimate, (int, float)) and estimate > 0:
            row["measured_over_plan"] = round(row["peak_memory_mib"] / estimate, 3)
    pool.shutdown()

    card = torch.cuda.get_device_name(0) if cuda else None
    default = "backbone_iteration_tiny_cpu" if args.tiny else f"backbone_iteration_{card_slug(card)}"
    stem = args.out or RESULTS / default
    command = "python benchmarks/backbone_iteration.py " + " ".join(sys.argv[1:])
    label = ("CPU, TINY random models (tests/tiny_models.py): proves the script runs every family and variant end "
             "to end; the times and memory say nothing about real models" if args.tiny
             else f"{card}, real architectures and shapes, random weights, LoRA bf16")
    fsdp = (f"FSDP2 over 2 of {gpus} GPUs: the {FSDP_VARIANT} variant" if gpus >= 2
            else f"n/a ({max(gpus, 1)} device)")
    result = {"label": label, "card": card, "command": command, "machine": machine_info(), "variants": VARIANTS,
              "budget_s": budget, "fsdp": fsdp, "rows": rows}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# One TDM iteration per family and variant — {label}", "", f"Command: `{command}`", "",
          f"Machine: {card or result['machine']['cpu']}, torch {result['machine']['torch']}, "
          f"commit {result['machine']['git_commit']}. FSDP: {fsdp}.", "",
          "| family | variant | store | checkpointing | FSDP | precision | batch | sample shape | denoiser params | "
          "student trainable | iteration (s, mean / max) | peak memory (MiB) | dry-run plan (MiB) | measured / plan |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            md.append(f"| {r['family']} | {r['variant']} | {r.get('error') or 'skipped: ' + r['skipped']} "
                      f"|||||||||||| ")
            continue
        md.append(f"| {r['family']} | {r['variant']} | {'on' if r['prompt_store'] else 'off'} | "
                  f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['fsdp']} | "
                  f"{r['mode']}{' + unify' if r['unify'] else ''} {r['mixed_precision']} | "
                  f"{r['batch_size']} | {'x'.join(map(str, r['sample_shape']))} | {r['denoiser_parameters']:,} | "
                  f"{r['student_trainable_parameters']:,} | {r['iteration_s_mean']} / {r['iteration_s_max']} | "
                  f"{r['peak_memory_mib']} | {r.get('plan_total_mib', '')} | {r.get('measured_over_plan', '')} |")
    peak_kind = next((r["peak_memory_kind"] for r in rows if "peak_memory_kind" in r), "")
    md += ["", f"Peak memory: {peak_kind}. One warm-up iteration, then {args.iterations} timed; the rollout depth "
           "depends on the drawn step, hence mean and max. Plan: `tdm.memory_plan.plan` of the same config "
           "(its per-process device total, CUDA context included)."
           + (" On CPU the peak is the whole process's RSS (Python, torch), so the ratio is no check of the plan."
              if args.tiny else "")]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
