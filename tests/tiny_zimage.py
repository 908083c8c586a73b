"""A tiny random Z-Image (diffusers' ZImagePipeline) built from configs, for tests/unit/test_zimage.py and
benchmarks/backbone_iteration.py --tiny: `ZImageTransformer2DModel` (single-stream DiT, 2x2 patches, RoPE, 1 main +
1 refiner layer, ~316k parameters), transformers' `Qwen3Model` as text encoder with a byte-level BPE tokenizer
(Qwen's kind) trained here on the tiny corpus and a Qwen-style chat template, FLUX.1's VAE layout (scaling 0.3611,
shift 0.1159, no quant convs) at two levels, and Z-Image-Turbo's scheduler (FlowMatchEuler, shift 3.0, no dynamic
shift). `save` writes it with `save_pretrained` plus its 16 px native shape (`tdm_backbone.json`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import tiny_models

TEXT_LEN = 48  # the tiny tokenizer's model_max_length (chat template + prompt fit; longer prompts truncate)
SHAPE = {"height": 16, "width": 16}  # tdm_backbone.json of the tiny model: 16 px -> 8x8 latents -> 4x4 patches
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_style_tokenizer(max_length: int = TEXT_LEN):
    """A byte-level BPE (Qwen's kind) trained on the tiny corpus, its special tokens and chat format;
    `max_length` its model_max_length (the adapter caps the sequence length there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tiny_models._CORPUS + ["user assistant"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   model_max_length=max_length, chat_template=CHAT_TEMPLATE)


def tiny_zimage(seed: int = 0, **scheduler):
    """The tiny ZImagePipeline (`scheduler`: FlowMatchEuler config overrides)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tok = qwen_style_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=16, max_position_embeddings=64, tie_word_embeddings=True))
    # head dim = sum(axes_dims) = 12, dim = 2 heads x 12; axes_lens cover caption (<= 64 + 1) and 4x4 image ids.
    transformer = ZImageTransformer2DModel(in_channels=4, dim=24, n_layers=1, n_refiner_layers=1, n_heads=2,
                                           n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 4, 4], axes_lens=[128, 32, 32])
    sched = FlowMatchEulerDiscreteScheduler(**{"num_train_timesteps": 1000, "shift": 3.0,
                                               "use_dynamic_shifting": False, **scheduler})
    return ZImagePipeline(scheduler=sched, vae=tiny_models.vae(latent_channels=4, scaling_factor=0.3611,
                                                               shift_factor=0.1159, use_quant_conv=False,
                                                               use_post_quant_conv=False),
                          text_encoder=text_encoder, tokenizer=tok, transformer=transformer)


def save(pipe, folder) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(folder)
    (folder / "tdm_backbone.json").write_text(json.dumps(SHAPE))
    return folder


