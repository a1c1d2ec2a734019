"""Anchor call arguments per text-to-image family, on tiny real pipelines of each class built offline.

What each family must get (fvg.anchor's docstring): Qwen-Image true CFG (two transformer passes a
step, the second on the negative prompt " "); FLUX the distilled guidance embedding and one pass
a step; SD3 and SDXL batched CFG through `guidance_scale`; other classes `guidance_scale`.
The denoiser's inputs are recorded with forward pre-hooks while the real pipeline runs.
"""

import pytest
import torch
from diffusers import (AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fvg.anchor import DiffusersAnchorSource, anchor_call_style
from fvg.tiny import tiny_qwen_image_pipeline, tiny_t5_tokenizer

TEXT = 32  # text width of every tiny encoder
STEPS = 2
GUIDANCE = 4.0


def clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges (every byte a token), built without the hub."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def clip(cls=CLIPTextModel, seed=0):
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    return cls(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT, intermediate_size=37, num_attention_heads=4,
                              num_hidden_layers=2, max_position_embeddings=16, projection_dim=TEXT,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)).eval()


def t5():
    torch.manual_seed(3)
    return T5EncoderModel(T5Config(vocab_size=len(tiny_t5_tokenizer()), d_model=TEXT, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def vae(**kwargs):
    torch.manual_seed(4)
    return AutoencoderKL(block_out_channels=(4, 8), layers_per_block=1, latent_channels=4, norm_num_groups=2,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         **kwargs).eval()


def unet(**kwargs):
    torch.manual_seed(5)
    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                norm_num_groups=2, **kwargs).eval()


def tiny_flux():
    torch.manual_seed(5)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT,
                                         pooled_projection_dim=TEXT, guidance_embeds=True, axes_dims_rope=[4, 4, 8])
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer.eval(),
                        vae=vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0),
                        text_encoder=clip(), tokenizer=clip_tokenizer(), text_encoder_2=t5(),
                        tokenizer_2=tiny_t5_tokenizer())


def tiny_sd3():
    torch.manual_seed(5)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=TEXT,
                                        joint_attention_dim=TEXT, pooled_projection_dim=2 * TEXT)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(shift_factor=0.0, scaling_factor=1.0), text_encoder=clip(CLIPTextModelWithProjection, 0),
        tokenizer=clip_tokenizer(), text_encoder_2=clip(CLIPTextModelWithProjection, 1), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5(), tokenizer_3=tiny_t5_tokenizer())


def tiny_sdxl():
    # SDXL's added conditioning: the pooled text (TEXT) and six size numbers of 8 channels each
    denoiser = unet(cross_attention_dim=2 * TEXT, use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TEXT)
    return StableDiffusionXLPipeline(vae=vae(), text_encoder=clip(), text_encoder_2=clip(CLIPTextModelWithProjection, 1),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=denoiser,
                                     scheduler=EulerDiscreteScheduler())


def tiny_sd():
    """Stable Diffusion 1.x: a class without a family entry, so it takes the plain `guidance_scale` path."""
    return StableDiffusionPipeline(vae=vae(), text_encoder=clip(), tokenizer=clip_tokenizer(),
                                   unet=unet(cross_attention_dim=TEXT), scheduler=EulerDiscreteScheduler(steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def record_denoiser_calls(pipe):
    """(batch size, kwargs) of every denoiser forward while `pipe` runs."""
    calls = []
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet

    def hook(_module, args, kwargs):
        sample = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        calls.append((sample.shape[0], kwargs))

    return calls, denoiser.register_forward_pre_hook(hook, with_kwargs=True)


def render(pipe, guidance=GUIDANCE):
    source = DiffusersAnchorSource(pipe, steps=STEPS, guidance_scale=guidance)
    calls, handle = record_denoiser_calls(pipe)
    try:
        result = source("a red circle on a white background", 32, 32)
    finally:
        handle.remove()
    assert result.image.size == (32, 32)
    return result, calls


def test_qwen_image_runs_true_cfg_with_a_blank_negative_prompt():
    pipe = tiny_qwen_image_pipeline()
    result, calls = render(pipe)
    assert result.settings["call_style"] == "qwen-image" and result.settings["guidance_arg"] == "true_cfg_scale"
    assert [batch for batch, _ in calls] == [1] * (2 * STEPS)  # a conditional and an unconditional pass a step
    negative = pipe.encode_prompt(" ", device="cpu")[0]
    assert torch.equal(calls[1][1]["encoder_hidden_states"], negative)
    _, calls = render(pipe, guidance=1.0)  # no CFG at scale 1: one pass a step
    assert len(calls) == STEPS


def test_flux_gets_distilled_guidance_and_no_true_cfg():
    result, calls = render(tiny_flux())
    assert result.settings["call_style"] == "flux"
    assert [batch for batch, _ in calls] == [1] * STEPS  # one pass a step: true CFG would make it two
    assert all(torch.all(kwargs["guidance"] == GUIDANCE) for _, kwargs in calls)


@pytest.mark.parametrize("build, family", [(tiny_sd3, "sd3"), (tiny_sdxl, "sdxl")])
def test_sd3_and_sdxl_run_batched_cfg_through_guidance_scale(build, family):
    pipe = build()
    result, calls = render(pipe)
    assert result.settings["call_style"] == family
    assert [batch for batch, _ in calls] == [2] * STEPS  # unconditional and conditional in one batch
    assert pipe.guidance_scale == GUIDANCE
    _, calls = render(pipe, guidance=1.0)
    assert [batch for batch, _ in calls] == [1] * STEPS


def test_other_classes_take_guidance_scale():
    pipe = tiny_sd()
    result, calls = render(pipe)
    assert result.settings["call_style"] == "other:StableDiffusionPipeline"
    assert [batch for batch, _ in calls] == [2] * STEPS and pipe.guidance_scale == GUIDANCE


class NoGuidancePipeline(DiffusionPipeline):
    """A pipeline whose `__call__` takes no guidance argument (as QwenImage21Pipeline has no `guidance_scale`)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __call__(self, prompt, height, width, num_inference_steps=10, generator=None, output_type="pil"):
        self.calls.append(dict(prompt=prompt, height=height, width=width, steps=num_inference_steps))

        class Output:
            images = [Image.new("RGB", (width, height), (255, 0, 0))]
        return Output()


def test_a_class_without_guidance_arguments_runs_on_its_defaults():
    pipe = NoGuidancePipeline()
    assert anchor_call_style(pipe).guidance_arg is None
    result = DiffusersAnchorSource(pipe, steps=STEPS)("a red circle", 32, 32)
    assert pipe.calls == [dict(prompt="a red circle", height=32, width=32, steps=STEPS)]
    assert result.settings["guidance_arg"] is None
