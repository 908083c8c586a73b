"""Tiny random models of every real family, built from configs and saved as diffusers pipelines.

Each builder returns a diffusers pipeline whose parts have the real classes and the real wiring of the family
(SDXL's two encoders and time ids, PixArt's learned-sigma output, SD3's three encoders and flow scheduler,
CogVideoX's video VAE and zero-terminal-SNR v-prediction schedule), only a few hundred thousand parameters.
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
    return {"sd15": _sd15, "sdxl": _sdxl, "pixart_alpha": _pixart, "sd3": _sd3, "cogvideox": _cogvideox}[family]()


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


def save_pipeline(pipe, folder: str | Path) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(folder)
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
