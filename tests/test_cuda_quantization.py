"""Quantized weights under every memory mode, on a CUDA device (skipped elsewhere: CI has no GPU).

bitsandbytes quantizes only on CUDA, and group offloading with streams pins and moves tensor
subclasses in ways a CPU never exercises (torchao's text encoder failed there, BENCHMARKS.md). So on a
GPU machine: a tiny Wan pipeline (real classes) is saved, loaded back with each quantizer, and sampled
once placed whole and once in each offload mode; the offloaded run must give the same latents, except
where the hooks raised when measured, which must still fail (strict xfail). A stage evicted to the host
and placed again (what `StageResidency` does between videos) must too.

    python -m pytest tests/test_cuda_quantization.py      # on a machine with a CUDA GPU
"""

import numpy as np
import pytest
import torch
from PIL import Image

from fvg.animate.wan import AnchoredWanPipeline
from fvg.families.wan import load_wan_pipeline
from fvg.residency import apply_mode
from fvg.tiny import tiny_wan_components
from fvg.weight_storage import QUANTIZERS, WeightStorage, package_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ANCHOR = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan")
    AnchoredWanPipeline(**tiny_wan_components()).save_pretrained(path)
    return path


def load(wan_dir, quantize):
    if not package_available(QUANTIZERS[quantize].package):
        pytest.skip(f"{QUANTIZERS[quantize].package} is not installed: pip install 'fvg[quant]'")
    storage = WeightStorage(quantize=quantize).validate("cuda")
    return load_wan_pipeline(str(wan_dir), torch.bfloat16, storage=storage)


def sample(pipe):
    return pipe(prompt="a red circle moves right", num_frames=9, height=32, width=32, num_inference_steps=2,
                output_type="latent", anchor=ANCHOR, generator=torch.Generator().manual_seed(0)).frames.float().cpu()


@pytest.fixture(scope="module")
def placed_whole(wan_dir):
    """quantizer -> latents with the quantized pipeline placed whole on the GPU (one load per quantizer)."""
    cache = {}

    def get(quantize):
        if quantize not in cache:
            cache[quantize] = sample(load(wan_dir, quantize).to("cuda"))
        return cache[quantize]
    return get


# What raised on an H100 (BENCHMARKS.md), expected to keep failing, strictly: once a release of diffusers,
# accelerate or bitsandbytes makes one work, this test says so and fvg's refusal can be reconsidered. fvg also
# refuses LLM.int8 under model and sequential offload, which sample correctly here but keep the int8 matrices
# on the device (`fvg.weight_storage`); this test calls the hooks directly, so it still checks their output.
RAISES = {("bnb-8bit", "group-offload"), ("bnb-4bit", "group-offload"), ("bnb-4bit", "sequential")}
CASES = [pytest.param(q, mode, marks=pytest.mark.xfail(strict=True, reason="fails upstream; fvg refuses it"))
         if (q, mode) in RAISES else (q, mode)
         for q in QUANTIZERS for mode in ("model-offload", "group-offload", "sequential")]


@pytest.mark.parametrize(("quantize", "mode"), CASES)
def test_every_memory_mode_samples_what_the_placed_pipeline_samples(wan_dir, placed_whole, quantize, mode):
    reference = placed_whole(quantize)
    pipe = load(wan_dir, quantize)
    apply_mode(pipe, mode, "cuda")
    latents = sample(pipe)
    assert torch.isfinite(latents).all()
    torch.testing.assert_close(latents, reference, rtol=0, atol=1e-2)
    del pipe
    torch.cuda.empty_cache()


@pytest.mark.parametrize("quantize", list(QUANTIZERS))
def test_an_evicted_stage_comes_back_unchanged(wan_dir, placed_whole, quantize):
    pipe = load(wan_dir, quantize).to("cuda")
    pipe.to("cpu")
    torch.cuda.empty_cache()
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())
    torch.testing.assert_close(sample(pipe.to("cuda")), placed_whole(quantize), rtol=0, atol=1e-2)
