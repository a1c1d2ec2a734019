"""Activation peak of the anchored Wan forward (per-frame and per-token timesteps) against the plain one.

Builds a reduced-size `WanTransformer3DModel` with the structure of the real models (patch (1, 2, 2),
head dim 128, the FFN/dim ratio of Wan2.2-A14B, 4096-d UMT5 text input, 512 text tokens), random
weights, wrapped as `AnchoredWanPipeline` does (`use_frame_modulation`), and runs one inference
forward (`no_grad`, batch 1, as each CFG pass is) per variant:

- `plain`: a 1-D timestep (diffusers' per-sample modulation, the T2V path);
- `anchored-token`: timestep [B, seq] with latent frame 0 at 0 (diffusers' per-token path, what
  `WanImageToVideoPipeline(expand_timesteps=True)` runs);
- `anchored-frame`: timestep [B, F] (fvg's per-frame modulation, the default of `AnchoredWanPipeline`).

The activation peak is the peak of live tensor bytes created during the call (weights and inputs
excluded): on CPU counted exactly by a TorchDispatchMode (allocator-independent), on CUDA
`torch.cuda.max_memory_allocated()` minus the memory allocated before the call. The last line is
`anchored/plain activation peak: X` for the per-frame path (issue target: at most 1.05).

    python benchmarks/bench_wan_memory.py                           # 480x832x81 latents, 2 layers, bf16, CPU
    python benchmarks/bench_wan_memory.py --device cuda --heads 40 --layers 2 --height 720 --width 1280
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from fvg.animate.wan import use_frame_modulation
from fvg.memory import LiveTensorBytes

GIB = 1024**3


def build(args) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    dim = args.heads * 128
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=round(dim * 13824 / 5120), num_layers=args.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    model = model.to(args.device, getattr(torch, args.dtype))
    for name, param in model.named_parameters():  # as from_pretrained(dtype=...) keeps them
        if any(part in model._keep_in_fp32_modules for part in name.split(".")):
            param.data = param.data.float()
    use_frame_modulation(model)
    return model.eval()


def measure(model, inputs, timestep, device: str) -> tuple[int, float]:
    """(activation peak in bytes, seconds) of one forward."""
    with torch.no_grad():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            model(**inputs, timestep=timestep, return_dict=False)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before, time.perf_counter() - start
        mode = LiveTensorBytes()
        start = time.perf_counter()
        with mode:
            model(**inputs, timestep=timestep, return_dict=False)
        return mode.peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--heads", type=int, default=3, help="attention heads of 128 channels (A14B: 40)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args)
    dtype = getattr(torch, args.dtype)
    frames, h, w = (args.frames - 1) // 4 + 1, args.height // 16, args.width // 16  # Wan2.1 VAE: 4x, 8x8; patch 2
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, frames, h * 2, w * 2, generator=gen).to(args.device, dtype)
    text = torch.randn(1, 512, 4096, generator=gen).to(args.device, dtype)
    inputs = {"hidden_states": latents, "encoder_hidden_states": text}
    t = torch.tensor([700.0], device=args.device)
    frame_t = t.repeat(1, frames)
    frame_t[:, 0] = 0
    variants = {"plain": t, "anchored-token": frame_t.repeat_interleave(h * w, dim=1), "anchored-frame": frame_t}

    measure(model, inputs, t, args.device)  # warm-up: lazy inits and kernels outside the measurement
    results = {}
    for name, timestep in variants.items():
        peak, seconds = measure(model, inputs, timestep, args.device)
        results[name] = {"activation_peak_bytes": peak, "seconds": round(seconds, 3)}
    tokens = frames * h * w
    print(f"Wan forward, {args.layers} layers x dim {args.heads * 128}, {args.dtype}, {args.device}: "
          f"{args.height}x{args.width}x{args.frames} -> {frames} latent frames, {tokens} tokens")
    for name, r in results.items():
        print(f"  {name:15s} activation peak {r['activation_peak_bytes'] / GIB:8.3f} GiB   {r['seconds']:.2f} s")
    plain = results["plain"]["activation_peak_bytes"]
    token_ratio = results["anchored-token"]["activation_peak_bytes"] / plain
    frame_ratio = results["anchored-frame"]["activation_peak_bytes"] / plain
    print(f"per-token (diffusers) anchored/plain activation peak: {token_ratio:.3f}")
    if args.json:
        record = {"args": vars(args) | {"json": str(args.json)}, "tokens": tokens, "results": results,
                  "ratio_per_token": token_ratio, "ratio_per_frame": frame_ratio,
                  "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                  "torch": torch.__version__}
        args.json.write_text(json.dumps(record, indent=2))
    print(f"anchored/plain activation peak: {frame_ratio:.3f}")


if __name__ == "__main__":
    main()
