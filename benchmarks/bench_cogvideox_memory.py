"""Peak memory of the anchored CogVideoX forward (per-row timesteps) against the plain forward, on CPU.

Each variant runs in its own subprocess, so one variant's allocations cannot hide another's peak.
The child builds a reduced-size `CogVideoXTransformer3DModel` with CogVideoX1.5's structure
(patch 2, `patch_size_t` 2, rotary positions, 4096-d T5 text input, 226 text tokens), resets the
kernel's peak-RSS counter (`/proc/self/clear_refs`), runs one forward (inference, `no_grad`) or one
forward + backward (training, a rank-16 LoRA on q/k/v/o as `fvg train` adds), and reports
peak RSS minus the RSS before the call, and the wall time. RSS peaks include the allocator's
behaviour and vary by some 10% between identical runs; for training the script also reports the
bytes autograd saves for backward (`saved_tensors_hooks`, one count per storage). The exact,
allocator-independent number is the "tensor peak": a second call under a TorchDispatchMode that
tracks the bytes of every tensor storage created by the call while it is alive (weights, inputs and
LoRA gradients' storage created before the call excluded; gradients created during it included).

    python benchmarks/bench_cogvideox_memory.py                     # defaults below, 1 thread
    python benchmarks/bench_cogvideox_memory.py --height 384 --width 640 --layers 8

Variants: `plain` (1-D timestep: the stock diffusers code path) and `anchored` (timestep
[B, 1 + T]: text and rows at t, row 0 at 0, as `AnchoredCogVideoXPipeline` and training call it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from diffusers import CogVideoXTransformer3DModel

    from fvg.animate.cogvideox import frame_timesteps, use_frame_timesteps

    torch.manual_seed(0)
    latent_h, latent_w = args.height // 8, args.width // 8
    latent_frames = (args.frames - 1) // 4 + 1
    latent_frames += latent_frames % 2  # CogVideoX1.5 pads to an even count
    model = CogVideoXTransformer3DModel(
        num_attention_heads=args.heads, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=args.layers, sample_width=latent_w, sample_height=latent_h,
        sample_frames=args.frames, patch_size=2, patch_size_t=2, max_text_seq_length=226,
        use_rotary_positional_embeddings=True).eval()
    use_frame_timesteps(model)
    if args.mode == "train":
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        model.train()
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    rows = latent_frames // 2
    rotary = get_3d_rotary_pos_embed(embed_dim=64, crops_coords=None, grid_size=(latent_h // 2, latent_w // 2),
                                     temporal_size=rows, grid_type="slice", max_size=(latent_h // 2, latent_w // 2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, latent_frames, 16, latent_h, latent_w, generator=g)
    text = torch.randn(args.batch, 226, 4096, generator=g)
    t = torch.full((args.batch,), 700, dtype=torch.long)
    timestep = frame_timesteps(t, rows, True) if args.variant == "anchored" else t

    saved: dict[tuple, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):  # activations autograd keeps for backward (not weights), counted once per storage
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    def call():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(hidden_states=x, encoder_hidden_states=text, timestep=timestep, image_rotary_emb=rotary,
                        return_dict=False)[0]
        if args.mode == "train":
            out.float().pow(2).mean().backward()
        return out

    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    if args.mode == "train":
        call()
    else:
        with torch.no_grad():
            call()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    saved_bytes = sum(saved.values())
    from fvg.memory import LiveTensorBytes

    tracker = LiveTensorBytes()  # a second call, under the tracker (it slows the ops down)
    model.zero_grad(set_to_none=True)
    gc.collect()
    with tracker:
        if args.mode == "train":
            call()
        else:
            with torch.no_grad():
                call()
    return {"variant": args.variant, "mode": args.mode, "tokens": rows * (latent_h // 2) * (latent_w // 2),
            "tensor_peak_mib": tracker.peak / 2**20,
            "saved_for_backward_mib": saved_bytes / 2**20 if args.mode == "train" else None,
            "rss_before_mib": before / 2**20, "peak_mib": peak / 2**20, "peak_over_before_mib": (peak - before) / 2**20,
            "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG pair")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["infer", "train"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="infer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results = []
    base = [sys.executable, __file__, "--child", "--height", str(args.height), "--width", str(args.width),
            "--frames", str(args.frames), "--layers", str(args.layers), "--heads", str(args.heads),
            "--batch", str(args.batch), "--threads", str(args.threads)]
    for mode in args.modes:
        for repeat in range(args.repeats):
            for variant in ("plain", "anchored"):
                out = subprocess.run(base + ["--variant", variant, "--mode", mode], env=env, capture_output=True,
                                     text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(row)
                print(f"{mode:5s} {variant:8s} tokens {row['tokens']:6d}  tensor peak {row['tensor_peak_mib']:8.1f} MiB"
                      f"  RSS peak over start {row['peak_over_before_mib']:8.1f} MiB"
                      f"  (rss before {row['rss_before_mib']:.0f} MiB)  {row['seconds']:.2f} s"
                      + (f"  saved for backward {row['saved_for_backward_mib']:.1f} MiB" if mode == "train" else ""),
                      flush=True)
    print(json.dumps({"machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                      "settings": {k: v for k, v in vars(args).items() if k not in ("child", "variant", "mode")},
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
