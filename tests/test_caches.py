"""diffusers' cache hooks on both anchored pipelines (tiny random Wan and CogVideoX1.5-shaped models).

Each cache must attach (`transformer.enable_cache`), really skip work (fewer attention calls
than steps), leave the anchored frames exactly the anchor latent, and come off cleanly
(`disable_cache` gives the uncached result bit for bit).
"""

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks import LayerSkipConfig, apply_layer_skip
from PIL import Image

from fvg.animate.cogvideox import AnchoredCogVideoXPipeline
from fvg.animate.wan import AnchoredWanPipeline
from fvg.tiny import tiny_cogvideox_components, tiny_wan_components

STEPS = 6
CALL = dict(prompt="a red circle moves right", num_frames=9, height=32, width=32, num_inference_steps=STEPS,
            guidance_scale=5.0, output_type="latent")


@pytest.fixture(scope="module")
def anchor_image():
    return Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module", params=["wan", "cogvideox"])
def pipe(request):
    if request.param == "wan":
        return AnchoredWanPipeline(**tiny_wan_components())
    return AnchoredCogVideoXPipeline(**tiny_cogvideox_components())


def blocks(pipe):
    t = pipe.transformer
    return t.blocks if hasattr(t, "blocks") else t.transformer_blocks


def run(pipe, anchor=None):
    extra = {"max_sequence_length": 16} if isinstance(pipe, AnchoredCogVideoXPipeline) else {}
    return pipe(**CALL, **extra, anchor=anchor, generator=torch.Generator().manual_seed(3)).frames


def pinned_frames(pipe, latents):
    """The anchored latent frames of `run`'s output, as [B, F, C, h, w]."""
    if isinstance(pipe, AnchoredWanPipeline):
        return latents[:, :, :1].transpose(1, 2)
    return latents[:, :2]  # CogVideoX1.5: the padding frame and frame 0 (one temporal patch)


def anchor_latent(pipe, anchor_image):
    latent = pipe.encode_anchor(anchor_image, 32, 32)
    return latent.transpose(1, 2) if isinstance(pipe, AnchoredWanPipeline) else latent


def count_attention_calls(pipe, index):
    """A counter of real forward passes of block `index`'s self-attention: its query projection runs only
    when the attention computes (a skipped block, or an attention output predicted by TaylorSeer, does not)."""
    calls = []
    handle = blocks(pipe)[index].attn1.to_q.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def cached_run(pipe, config, anchor):
    """(latents, real calls of the last block's attention) with `config` enabled; the cache is off afterwards."""
    pipe.transformer.enable_cache(config)
    calls, handle = count_attention_calls(pipe, -1)
    try:
        latents = run(pipe, anchor)
    finally:
        handle.remove()
        pipe.transformer.disable_cache()
    return latents, len(calls)


def uncached_calls(pipe):
    """Attention calls per sampling run without a cache: one per step and CFG branch."""
    return STEPS * (2 if isinstance(pipe, AnchoredWanPipeline) else 1)  # CogVideoX batches cond and uncond


CONFIGS = {
    # a threshold no residual change reaches: every step after the first reuses the cached tail
    "fbc": lambda: FirstBlockCacheConfig(threshold=1e9),
    # diffusers' default patterns ("^blocks.*attn", full match) name no module of Wan or CogVideoX
    # (their attentions are attn1/attn2): the self-attentions are named explicitly
    "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2,
                                                taylor_factors_dtype=torch.float32,
                                                cache_identifiers=[r"(transformer_)?blocks\.\d+\.attn1"]),
    # ratios of 1: no accumulated error, so MagCache skips as often as max_skip_steps allows
    "magcache": lambda: MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, threshold=0.5,
                                       retention_ratio=0.2, max_skip_steps=2),
}


@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored"])
@pytest.mark.parametrize("cache", list(CONFIGS))
def test_cache_skips_work_and_keeps_the_anchor(pipe, anchor_image, cache, anchored):
    anchor = anchor_image if anchored else None
    reference = run(pipe, anchor)
    latents, calls = cached_run(pipe, CONFIGS[cache](), anchor)
    assert latents.shape == reference.shape and torch.isfinite(latents).all()
    assert 0 < calls < uncached_calls(pipe)
    assert not torch.equal(latents, reference)  # the skipped work shows in the result
    if anchored:
        assert torch.equal(pinned_frames(pipe, latents), anchor_latent(pipe, anchor_image).expand_as(
            pinned_frames(pipe, latents)))
    assert torch.equal(run(pipe, anchor), reference)  # disable_cache removed every hook


@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored"])
def test_magcache_calibration_runs_every_block(pipe, anchor_image, anchored):
    anchor = anchor_image if anchored else None
    latents, calls = cached_run(pipe, MagCacheConfig(calibrate=True, num_inference_steps=STEPS), anchor)
    assert calls == uncached_calls(pipe)  # calibration measures, it never skips
    assert torch.equal(latents, run(pipe, anchor))


def test_layer_skip_accepts_the_anchored_cogvideox_blocks(anchor_image):
    pipe = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())
    apply_layer_skip(pipe.transformer, LayerSkipConfig(indices=[1], fqn="transformer_blocks"))
    calls, handle = count_attention_calls(pipe, 1)
    latents = run(pipe, anchor_image)
    handle.remove()
    assert calls == [] and torch.isfinite(latents).all()
    assert torch.equal(latents[:, :2], pipe.encode_anchor(anchor_image, 32, 32).expand(-1, 2, -1, -1, -1))
