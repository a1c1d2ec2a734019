"""bf16 sampling with a float32 VAE, both families and both modes (tiny presets on the CPU).

The transformer samples in bf16 while the VAE stays float32 (`fvg.animate.loading`): latents
must be cast to the VAE's dtype before every decode (and pixels before every encode).
"""

import pytest
import torch

from fvg.pipeline import FactorizedPipeline


@pytest.mark.parametrize("mode", ["t2v", "factorized"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-cogvideox"])
def test_bf16_sampling_decodes_finite_frames(preset, mode):
    pipe = FactorizedPipeline.from_preset(preset, device="cpu", dtype="bfloat16")
    video = pipe.video_pipe
    assert video.transformer.dtype == torch.bfloat16 and video.vae.dtype == torch.float32
    decoded = []
    handle = video.vae.decoder.register_forward_hook(lambda _m, _a, out: decoded.append(
        out[0] if isinstance(out, tuple) else out))  # CogVideoX's decoder also returns its conv cache
    result = pipe("a red circle moves right", mode=mode, steps=2)
    handle.remove()
    assert result.frames.shape == (9, 32, 32, 3)
    pixels = torch.cat([d.flatten() for d in decoded])
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    assert result.settings["dtype"] == "bfloat16"
