"""`mini`'s two CPU speed options: classifier-free guidance in one batched call, and the VAE's CPU kernels.
Both must give the stock output to float rounding, and must actually take the faster path."""

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from PIL import Image

from fvg.animate.wan import AnchoredWanPipeline
from fvg.families import get_family
from fvg.families.cpu_vae import CpuVaeKernels
from fvg.presets import PRESETS
from fvg.tiny import tiny_wan_components

CALL = dict(prompt="a red circle moves right", negative_prompt="", num_frames=9, height=32, width=32,
            num_inference_steps=3, guidance_scale=5.0, output_type="latent")


@pytest.fixture(scope="module")
def components():
    return tiny_wan_components()


class CallCounter:
    """The batch size of every call of `model`."""

    def __init__(self, model):
        self.batches = []
        self.handle = model.register_forward_pre_hook(
            lambda _m, _args, kwargs: self.batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)


@pytest.mark.parametrize("anchored", [False, True])
def test_batched_guidance_is_two_calls_in_one(components, anchored):
    pipe = AnchoredWanPipeline(**components)
    anchor = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)) if anchored else None
    counter = CallCounter(pipe.transformer)
    apart = pipe(**CALL, anchor=anchor, generator=torch.Generator().manual_seed(0)).frames
    assert counter.batches == [1] * 6
    counter.batches.clear()
    batched = pipe(**CALL, anchor=anchor, generator=torch.Generator().manual_seed(0), batch_guidance=True).frames
    counter.handle.remove()
    assert counter.batches == [2] * 3
    assert not torch.equal(batched, torch.zeros_like(batched))
    torch.testing.assert_close(batched, apart, atol=1e-5, rtol=1e-5)


def test_batched_guidance_without_guidance_is_one_plain_call(components):
    pipe = AnchoredWanPipeline(**components)
    counter = CallCounter(pipe.transformer)
    call = {**CALL, "guidance_scale": 1.0}
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    batched = pipe(**call, generator=torch.Generator().manual_seed(0), batch_guidance=True).frames
    counter.handle.remove()
    assert counter.batches == [1] * 6
    assert torch.equal(batched, plain)


def test_batched_guidance_refuses_embeddings_it_cannot_stack(components):
    pipe = AnchoredWanPipeline(**components)
    embeds = torch.randn(1, 16, 32)
    with pytest.raises(ValueError, match=r"batch_guidance stacks .* \(1, 16, 32\) and \(1, 8, 32\) differ"):
        pipe(**{**CALL, "prompt": None, "negative_prompt": None}, prompt_embeds=embeds,
             negative_prompt_embeds=embeds[:, :8], batch_guidance=True)


def test_a_plain_wan_pipeline_is_rebuilt_over_the_same_components(components):
    stock = WanPipeline(**components)
    pipe, kwargs = get_family("wan").guidance_batching(stock)
    assert type(pipe) is AnchoredWanPipeline and kwargs == {"batch_guidance": True}
    assert pipe.transformer is stock.transformer and pipe.vae is stock.vae and pipe.text_encoder is stock.text_encoder
    assert get_family("wan").guidance_batching(pipe)[0] is pipe  # already anchored: kept as it is


def test_a_family_whose_pipelines_batch_already_is_left_alone():
    from fvg.animate.cogvideox import AnchoredCogVideoXPipeline
    from fvg.tiny import tiny_cogvideox_components

    pipe = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())
    assert get_family("cogvideox").guidance_batching(pipe) == (pipe, {})


def test_only_mini_takes_the_cpu_speed_options():
    assert [name for name, preset in PRESETS.items() if preset.batch_guidance] == ["mini"]
    assert [name for name, preset in PRESETS.items() if preset.cpu_vae_kernels] == ["mini"]


class OneDnnCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = torch.mkldnn_convolution

        def counted(*args):
            self.calls += 1
            return original(*args)

        monkeypatch.setattr(torch, "mkldnn_convolution", counted)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_cpu_vae_kernels_match_the_stock_vae_and_take_onednn(components, monkeypatch):
    vae = components["vae"]
    torch.manual_seed(0)
    latents = torch.randn(1, vae.config.z_dim, 3, 8, 8)
    pixels = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(latents).sample
        encoded = vae.encode(pixels).latent_dist.mode()
        counter = OneDnnCounter(monkeypatch)
        kernels = CpuVaeKernels(vae)
        fast_decoded = vae.decode(latents).sample
        fast_encoded = vae.encode(pixels).latent_dist.mode()
        taken = counter.calls
        kernels.remove()
        again = vae.decode(latents).sample
    assert len(kernels.convs) > 10 and len(kernels.norms) > 5
    assert taken >= len(kernels.convs)  # every convolution, chunk after chunk
    torch.testing.assert_close(fast_decoded, decoded, atol=1e-4, rtol=1e-4)  # an 8-bit level is 7.8e-3
    torch.testing.assert_close(fast_encoded, encoded, atol=1e-5, rtol=1e-4)
    assert counter.calls == taken and torch.equal(again, decoded)  # removed: the stock kernels, bit for bit


def test_cpu_vae_kernels_leave_other_dtypes_to_the_stock_code(monkeypatch):
    vae = tiny_wan_components()["vae"].to(torch.bfloat16)  # its own copy: the module's stays float32
    latents = torch.randn(1, vae.config.z_dim, 2, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        want = vae.decode(latents).sample
        counter = OneDnnCounter(monkeypatch)
        kernels = CpuVaeKernels(vae)
        got = vae.decode(latents).sample
        kernels.remove()
    assert counter.calls == 0
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)  # bf16 norm computed in fp32 both ways


def test_a_text_to_image_anchor_keeps_its_own_guidance_when_the_video_model_batches():
    from diffusers import QwenImagePipeline

    from fvg.pipeline import FactorizedPipeline

    pipe = FactorizedPipeline.from_preset("tiny", batch_guidance=True, cpu_vae_kernels=True)
    counter = CallCounter(pipe.video_pipe.transformer)
    out = pipe("a red circle moves right", seed=0, steps=2)
    counter.handle.remove()
    assert isinstance(pipe.anchor_source.pipe, QwenImagePipeline) and pipe.anchor_source.call_kwargs == {}
    assert counter.batches == [2, 2]  # the video model's guidance in one call per step
    assert out.frames.shape == (9, 32, 32, 3) and out.settings["batch_guidance"] is True
