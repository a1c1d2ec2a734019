"""Tiny, randomly initialised instances of the real model classes, built offline.

The `tiny` preset and the test-suite use these: the same diffusers/transformers classes
that Wan and Qwen-Image checkpoints load into, shrunk to a few thousand parameters, so
every code path (tokenisation, text encoding, VAE, anchored denoising, LoRA loading)
runs for real on a CPU with no model hub. Their output is noise by construction.
"""

from __future__ import annotations

import string

import torch

# Seeded so that two builds of the `tiny` preset give the same weights.
TINY_SEED = 0

# Text models need a vocabulary; one of single characters plus common words covers any
# lower-case prompt without a tokenizer file from the hub.
_WORDS = (
    "a an the and of in on at to with while is are from into turns becomes moves move left right up down "
    "small large red green blue orange purple cyan black white circle square triangle grows shrinks "
    "pushes stays still above below background two three four frame scene video cat dog car"
).split()


def tiny_t5_tokenizer():
    """A UMT5-style SentencePiece-free tokenizer (transformers' `T5Tokenizer` built from a vocab list)."""
    from transformers import T5Tokenizer

    pieces = ["▁" + w for w in _WORDS] + list(string.ascii_letters + string.digits + ".,!?'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(p, -5.0 - i * 1e-3) for i, p in enumerate(dict.fromkeys(pieces))]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_wan_components(seed: int = TINY_SEED, text_dim: int = 32) -> dict:
    """Components for `WanPipeline` / `AnchoredWanPipeline` (diffusers' own tiny test config)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}


def tiny_qwen2_tokenizer():
    """A byte-level Qwen2 tokenizer (256 byte symbols, no merges) with Qwen's chat tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def tiny_qwen_image_pipeline(seed: int = TINY_SEED):
    """A `QwenImagePipeline` (the paper's anchor model class) with tiny random components."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen2_tokenizer()
    special = dict(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                   pad_token_id=tokenizer.pad_token_id)
    text_config = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tokenizer), rope_theta=1e6,
                       rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, **special)
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, vocab_size=len(tokenizer), **special)
    ).eval()
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)


def tiny_cogvideox_components(seed: int = TINY_SEED, text_dim: int = 32) -> dict:
    """Components for `CogVideoXPipeline` / `AnchoredCogVideoXPipeline`, shaped like CogVideoX1.5.

    As in CogVideoX1.5-5B: temporal patch 2 (`patch_size_t=2`), rotary positions, a T5 encoder,
    v-prediction DDIM with zero terminal SNR; the VAE compresses 4x in time and 8x in space.
    The text length is 16 tokens (`max_text_seq_length`; 226 in the real model).
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
    ).eval()
    torch.manual_seed(seed + 2)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=text_dim, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
    ).eval()
    # CogVideoX1.5-5B's scheduler settings (scheduler/scheduler_config.json)
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0,
        steps_offset=0, timestep_spacing="trailing",
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}
