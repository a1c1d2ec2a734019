"""One anchored Wan forward split over N processes (`--context-parallel N`) against the same forward in one.

Builds the reduced-size `WanTransformer3DModel` of `bench_wan_memory.py` (real classes, random weights,
head dim 128, A14B's FFN ratio) with fvg's per-frame modulation on every rank, runs the anchored
forward (timestep [B, F], latent frame 0 at 0) once whole on each rank, then enables diffusers' context
parallelism through fvg (`fvg.parallel.enable_context_parallel`, the Wan family's plan) and runs it
split. Rank 0 prints seconds per forward and the activation peak per rank (CUDA: `max_memory_allocated`
less what was allocated before; CPU: the live tensors, counted), both ways, against `fvg memory`'s estimate, and the largest difference between the
split and the whole output. Last line: `context-parallel N (MODE): X s vs Y s one process, max |diff| Z`.

    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py                      # CPU, gloo, small
    torchrun --nproc-per-node 4 benchmarks/bench_context_parallel.py --device cuda --heads 40 --layers 4 \\
        --height 720 --width 1280 --frames 81 --dtype bfloat16 [--mode ring --attention-backend _native_cudnn]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_wan_memory import build  # noqa: E402

from fvg.families import get_family  # noqa: E402
from fvg.memory import WanActivation  # noqa: E402
from fvg.parallel import (enable_context_parallel, init_context_parallel, leave_process_group,  # noqa: E402
                          validate_context_parallel)

GIB = 1024**3


def inputs(args, device: str, dtype: torch.dtype, degree: int):
    """Latents, text and the anchored timestep as `AnchoredWanPipeline` passes it: per frame [1, F] where the
    ranks divide F (`frames_shard_evenly`), else per token [1, seq]."""
    frames = (args.frames - 1) // 4 + 1
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, frames, args.height // 8, args.width // 8, generator=g).to(device, dtype)
    text = torch.randn(1, 512, 4096, generator=g).to(device, dtype)
    timestep = torch.full((1, frames), 700.0, device=device)
    timestep[:, 0] = 0.0  # the anchor's frame
    if frames % degree:
        timestep = timestep.repeat_interleave(latents.shape[3] * latents.shape[4] // 4, dim=1)
    return latents, text, timestep


def timed(model, latents, text, timestep, device: str, repeats: int) -> tuple[torch.Tensor, float, int]:
    """(output, seconds per forward, activation peak bytes: CUDA's allocator; on CPU the live tensors of one
    forward, counted by `fvg.memory.LiveTensorBytes`, collectives' buffers included)."""
    from fvg.memory import LiveTensorBytes

    cuda = device.startswith("cuda")
    with torch.no_grad():
        tracker = LiveTensorBytes(ignore=[*model.parameters(), *model.buffers(), latents, text, timestep])
        with tracker:  # also the warm-up
            model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(repeats):
            out = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
    return out.float(), seconds, (torch.cuda.max_memory_allocated() - before) if cuda else tracker.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--mode", default="ulysses", choices=["ulysses", "ring"])
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    degree = int(os.environ.get("WORLD_SIZE", "1"))
    validate_context_parallel(degree, args.mode)
    args.device = init_context_parallel(degree, args.device) if degree > 1 else args.device
    model = build(args)
    if args.attention_backend:
        model.set_attention_backend(args.attention_backend)
    dtype = getattr(torch, args.dtype)
    latents, text, timestep = inputs(args, args.device, dtype, degree)
    whole, whole_s, whole_peak = timed(model, latents, text, timestep, args.device, args.repeats)
    if degree > 1:
        enable_context_parallel(model, degree, args.mode, get_family("wan").context_parallel_plan(model))
    split, split_s, split_peak = timed(model, latents, text, timestep, args.device, args.repeats)
    if degree == 1 or dist.get_rank() == 0:
        tokens = latents.shape[2] * latents.shape[3] * latents.shape[4] // 4
        where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
        print(f"{where}, {args.dtype}, dim {args.heads * 128}, {args.layers} layers, "
              f"{args.height}x{args.width}x{args.frames} ({tokens} tokens), {degree} process(es), "
              f"timesteps per {'frame' if timestep.shape[1] == latents.shape[2] else 'token'}")
        estimate = WanActivation(dim=args.heads * 128, ffn_dim=round(args.heads * 128 * 13824 / 5120), vae_spatial=8)
        per_token = timestep.shape[1] != latents.shape[2]
        one, per_rank = (estimate.activation_bytes(args.height, args.width, args.frames, dtype.itemsize, n,
                                                   args.mode, per_token) for n in (1, degree))
        print(f"activation peak per rank: {whole_peak / GIB:.5f} GiB one process (estimate {one / GIB:.5f}), "
              f"{split_peak / GIB:.5f} GiB split (estimate {per_rank / GIB:.5f}, ratio {per_rank / split_peak:.3f})")
        diff = (split - whole).abs().max().item()
        print(f"context-parallel {degree} ({args.mode}): {split_s:.4f} s vs {whole_s:.4f} s one process, "
              f"max |diff| {diff:.2e} (output scale {whole.abs().max().item():.2f})")
    del model  # the split model holds the process group (see leave_process_group)
    leave_process_group()


if __name__ == "__main__":
    main()
