"""Tiny random models of every real family, built from configs and saved as diffusers pipelines.

Each builder returns a diffusers pipeline whose parts have the real classes and the real wiring of the family
(SDXL's two encoders and time ids, PixArt's learned-sigma output, SD3's three encoders and flow scheduler,
CogVideoX's video VAE and zero-terminal-SNR v-prediction schedule; and, for the new-families issue, SD3.5's dual
attention + QK-norm, PixArt-Sigma, Wan2.1's UMT5 / Wan VAE / UniPC flow scheduler, FLUX.1's packed latents and
guidance embedding), only a few hundred thousand parameters.
`save_pipeline` writes it with `save_pretrained` exactly as a hub checkpoint is laid out; `save_as_hub_cache`
puts such a folder where `HF_HUB_OFFLINE=1` finds it by repo id. Tokenizers are built offline: CLIP's real
BPE from open-clip-torch (a prefix of its merges), and a tiny sentencepiece model trained here for T5.
"""
from __future__ import annotations

import io
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

CLIP_MERGES = 2000
TEXT_LEN = 16  # tokenizer max length of the tiny models (CLIP and T5)
CLIP_DIM = 32
T5_DIM = 64  # >= the two CLIP widths together (SD3 pads CLIP features to the T5 width)
FAMILIES = ("sd15", "sdxl", "pixart_alpha", "sd3", "cogvideox")
# The families of the new-families issue (#14), built by the same `build`; kept apart from FAMILIES so the tests
# parametrised over FAMILIES are unchanged. "sd35" is a `sd3`-family model (SD3.5 layout), "flux_schnell" a
# `flux`-family model without the guidance embedding.
NEW_FAMILIES = ("sd35", "pixart_sigma", "wan", "flux", "flux_schnell")
# The native shape the new video / FLUX tiny models declare (`tdm_backbone.json`; the real checkpoints use the
# pipelines' defaults): Wan 5 frames of 16x16 pixels -> 2 latent frames of 4x4; FLUX 16x16 -> 8x8 latents.
TINY_SHAPES = {"wan": {"height": 16, "width": 16, "num_frames": 5}, "flux": {"height": 16, "width": 16},
               "flux_schnell": {"height": 16, "width": 16}}

_CORPUS = ["a photo of a cat", "a painting of a dog on the beach", "an astronaut riding a horse",
           "a red car in the rain", "a bowl of fruit on a wooden table", "a small house under the stars",
           "a portrait of an old man", "a city street at night with neon lights"] * 4


def clip_tokenizer():
    from transformers import CLIPTokenizer

    from tdm.backbones.clip_tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, CLIP_MERGES, TEXT_LEN))


@lru_cache(maxsize=1)
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS), model_writer=model, vocab_size=48,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return tuple((sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size()))


def t5_tokenizer():
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_pieces()), extra_ids=0, model_max_length=TEXT_LEN)


def clip_text_config(tokenizer, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=CLIP_DIM, intermediate_size=2 * CLIP_DIM,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TEXT_LEN,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, projection_dim=CLIP_DIM, **kw)


def t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=16, d_ff=2 * T5_DIM,
                                   num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   decoder_start_token_id=0))


def vae(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    # Two levels: 16x16 pixels <-> 8x8 latents.
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         norm_num_groups=8, latent_channels=latent_channels, sample_size=16, **kw)


def _unet(**kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                attention_head_dim=4, norm_num_groups=8, **kw)


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build(family: str, seed: int = 0):
    """A tiny random pipeline of `family` (weights fixed by `seed`)."""
    torch.manual_seed(seed)
    return {"sd15": _sd15, "sdxl": _sdxl, "pixart_alpha": _pixart, "sd3": _sd3, "cogvideox": _cogvideox,
            "sd35": _sd35, "pixart_sigma": _pixart_sigma, "wan": _wan, "flux": lambda: _flux(guidance_embeds=True),
            "flux_schnell": lambda: _flux(guidance_embeds=False)}[family]()


def _sd15():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tok = clip_tokenizer()
    return StableDiffusionPipeline(vae=vae(), text_encoder=CLIPTextModel(clip_text_config(tok)), tokenizer=tok,
                                   unet=_unet(cross_attention_dim=CLIP_DIM), scheduler=_sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl():
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer()
    unet = _unet(cross_attention_dim=2 * CLIP_DIM, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + CLIP_DIM, transformer_layers_per_block=1)
    return StableDiffusionXLPipeline(vae=vae(), text_encoder=CLIPTextModel(clip_text_config(tok)),
                                     text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tok)),
                                     tokenizer=tok, tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=_sd_scheduler(), force_zeros_for_empty_prompt=True)


def _pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    tok = t5_tokenizer()
    # Width 24: the resolution and aspect-ratio embeddings take a third of it each.
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=3, in_channels=4, out_channels=8,
        cross_attention_dim=24, caption_channels=T5_DIM, patch_size=2, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=True)
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5_encoder(tok), vae=vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler(beta_schedule="linear",
                                                                     prediction_type="epsilon"))


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tok, tok3 = clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                        caption_projection_dim=16, pooled_projection_dim=2 * CLIP_DIM,
                                        pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(tok, hidden_act="gelu")), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tok, hidden_act="gelu")),
        tokenizer_2=clip_tokenizer(), text_encoder_3=t5_encoder(tok3), tokenizer_3=tok3)


def _cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    tok = t5_tokenizer()
    # 9 frames of 16x16 pixels <-> 3 latent frames of 2x2 (4x temporal, 8x spatial compression).
    video_vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                       up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                       latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                       temporal_compression_ratio=4, sample_height=16, sample_width=16)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=T5_DIM, num_layers=1,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN)
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       snr_shift_scale=3.0, timestep_spacing="trailing", clip_sample=False,
                                       set_alpha_to_one=True)
    return CogVideoXPipeline(tokenizer=tok, text_encoder=t5_encoder(tok), vae=video_vae, transformer=transformer,
                             scheduler=scheduler)


def _sd35():
    """SD3.5 Medium's layout (MMDiT-X): SD3's pipeline and encoders, a transformer with dual attention in its first
    layer(s) (`dual_attention_layers`, Medium: 0-12 of 24) and RMS QK-norm (`qk_norm="rms_norm"`, Medium and
    Large). Same flow scheduler (shift 3.0) as the hub configs."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = _sd3()
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    config.update(dual_attention_layers=(0,), qk_norm="rms_norm")
    transformer = SD3Transformer2DModel(**config)
    return StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer})


def _pixart_sigma():
    """PixArt-Sigma: the PixArt transformer without micro-conditions (the Sigma checkpoints have
    use_additional_conditions false; its pipeline never passes them), T5 (300 tokens on the real model; TEXT_LEN
    here), the SDXL VAE's scaling factor 0.13025, DPM-Solver on the linear VP schedule (epsilon, learned sigma)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tok = t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=3, in_channels=4, out_channels=8,
        cross_attention_dim=24, caption_channels=T5_DIM, patch_size=2, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=t5_encoder(tok), vae=vae(scaling_factor=0.13025),
                               transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type="epsilon"))


def wan_scheduler(flow_shift: float = 3.0):
    """Wan2.1's hub scheduler (Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json): UniPC in its
    flow mode (use_flow_sigmas, prediction_type flow_prediction, flow_shift 3.0 at 480p; 5.0 for 720p)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                                   num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
                                   lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace")


def _wan():
    """Wan2.1 T2V: WanTransformer3DModel (patch (1, 2, 2), RoPE, RMS QK-norm across heads, cross-attention on UMT5),
    UMT5 encoder, AutoencoderKLWan (latents (B, C, F, H, W), per-channel latents_mean / latents_std), UniPC flow.
    The VAE here: 2x spatial, 4x temporal (5 frames -> 2 latent frames), z_dim 4."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = t5_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=T5_DIM, d_kv=16, d_ff=2 * T5_DIM,
                                          num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                          decoder_start_token_id=0))
    video_vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.8, 2.0, 1.2], scale_factor_temporal=4, scale_factor_spatial=4)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=T5_DIM, freq_dim=16, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    return WanPipeline(tokenizer=tok, text_encoder=encoder, vae=video_vae, transformer=transformer,
                       scheduler=wan_scheduler())


def flux_scheduler():
    """FLUX.1's hub scheduler (black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json): flow Euler with
    resolution-dependent shift (use_dynamic_shifting, mu from the image sequence length)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def _flux(guidance_embeds: bool):
    """FLUX.1-dev (guidance_embeds=True) / FLUX.1-schnell (False): FluxTransformer2DModel on packed 2x2 latents
    (in_channels = 4 x latent channels), RoPE over (text, row, column) ids (axes_dims_rope sums to the head dim),
    CLIP pooled (`pooled_projections`) + T5 (`encoder_hidden_states`), a VAE with FLUX's scaling / shift factors
    (0.3611, 0.1159) and no quant convs, the dynamic-shift flow scheduler."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                         pooled_projection_dim=CLIP_DIM, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    return FluxPipeline(scheduler=flux_scheduler(),
                        vae=vae(latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                use_post_quant_conv=False),
                        text_encoder=CLIPTextModel(clip_text_config(tok, hidden_act="quick_gelu")), tokenizer=tok,
                        text_encoder_2=t5_encoder(tok2), tokenizer_2=tok2, transformer=transformer)


def save_pipeline(pipe, folder: str | Path) -> Path:
    """`save_pretrained`; the new video / FLUX tiny models also write the small native shape they are run at
    (`tdm_backbone.json`, read by tdm's wan / flux adapters instead of the pipelines' 480x832x81 / 1024 px)."""
    import json

    folder = Path(folder)
    pipe.save_pretrained(folder)
    name = type(pipe).__name__
    shape = {"WanPipeline": TINY_SHAPES["wan"], "FluxPipeline": TINY_SHAPES["flux"]}.get(name)
    if shape is not None:
        (folder / "tdm_backbone.json").write_text(json.dumps(shape))
    return folder


def save_as_hub_cache(pipe, hub_cache: str | Path, repo_id: str) -> Path:
    """Lay `pipe` out as the HF cache entry of `repo_id` (snapshot + refs/main), as a download leaves it."""
    org, name = repo_id.split("/")
    entry = Path(hub_cache) / f"models--{org}--{name}"
    save_pipeline(pipe, entry / "snapshots" / ("0" * 40))
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text("0" * 40)
    return entry


def copy_as_hub_cache(folder: str | Path, hub_cache: str | Path, repo_id: str) -> Path:
    """The same layout from an already saved pipeline folder."""
    import shutil

    org, name = repo_id.split("/")
    entry = Path(hub_cache) / f"models--{org}--{name}"
    shutil.copytree(folder, entry / "snapshots" / ("0" * 40))
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text("0" * 40)
    return entry


def parameter_count(pipe) -> dict[str, int]:
    return {name: sum(p.numel() for p in part.parameters()) for name, part in pipe.components.items()
            if isinstance(part, torch.nn.Module)}
