"""Training throughput of `fvg train` (samples/s), with and without the latent cache.

    python benchmarks/bench_train.py                 # tiny and MiniWorld-sized models, 30 steps each
    python benchmarks/bench_train.py --steps 10 --models tiny

Two models, both real diffusers classes with random weights, on CPU:
  * tiny: `builtin:tiny-wan` (diffusers' test config) on 9x32x32 clips;
  * miniworld: WanTransformer3DModel dim 128 (4 heads x 32), 4 layers, patch (1, 2, 2) and
    AutoencoderKLWan base_dim 16, on 17x64x64 MiniWorld clips (fvg.miniworld when present,
    otherwise fvg.train.synthetic squares of the same shape).

For each model: a cold run (builds the latent cache, then trains from it), a warm run (cache
hit), and the cost of encoding one clip (decode + resize, VAE encode, text encode). "Cached"
throughput is the training loop in steady state (run.json excludes the first step's warm-up),
the better of the two runs; "uncached" is what a loop encoding every batch would reach:
batch / (step time + batch x encode time), since the VAE and the transformer share the device.
The cache build time is the cold run's; the warm run's wall time shows what reusing it saves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def miniworld_pipeline():
    """The MiniWorld-sized Wan: real classes, random weights, tiny UMT5 text encoder."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from fvg.animate.wan import AnchoredWanPipeline
    from fvg.tiny import tiny_wan_components

    components = tiny_wan_components()
    torch.manual_seed(11)
    components["vae"] = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                         temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(12)
    components["transformer"] = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=512, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64).eval()
    return AnchoredWanPipeline(**components)


def tiny_pipeline():
    from fvg.families.wan import load_wan_pipeline

    return load_wan_pipeline("builtin:tiny-wan", torch.float32)


def make_data(kind: str, out: Path, clips: int) -> Path:
    from fvg.train.synthetic import write_synthetic_dataset

    if kind == "miniworld":
        try:
            from fvg.miniworld.dataset import write_dataset
        except ImportError:
            write_synthetic_dataset(out, clips, num_frames=17, size=64, fps=8)
        else:
            write_dataset(out, clips, seed=0)
    else:
        write_synthetic_dataset(out, clips, num_frames=9, size=32, fps=8)
    return out


SETUPS = {
    "tiny": dict(build=tiny_pipeline, model="builtin:tiny-wan", height=32, width=32, num_frames=9, rank=8),
    "miniworld": dict(build=miniworld_pipeline, model="bench:miniworld-wan", height=64, width=64, num_frames=17,
                      rank=32),
}


def encode_cost(pipe, cfg, clips) -> float:
    """Seconds per clip to decode, VAE-encode and text-encode (what the cache saves every step)."""
    from fvg.train.data import encode_captions, encode_clip, load_clip, to_pixels

    encode_clip(pipe, to_pixels(load_clip(clips[0].path, cfg.num_frames, cfg.fps, cfg.height, cfg.width)))  # warm-up
    start = time.perf_counter()
    for clip in clips:
        frames = load_clip(clip.path, cfg.num_frames, cfg.fps, cfg.height, cfg.width)
        encode_clip(pipe, to_pixels(frames))
        encode_captions(pipe, [clip.caption], cfg.max_sequence_length, "cpu")
    return (time.perf_counter() - start) / len(clips)


def bench(name: str, root: Path, steps: int, batch_size: int, clips: int) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from fvg.train.config import TrainConfig
    from fvg.train.data import find_clips
    from fvg.train.trainer import train

    setup = SETUPS[name]
    data = make_data(name, root / f"{name}-data", clips)
    cfg = TrainConfig(model=setup["model"], data=str(data), cache_dir=str(root / f"{name}-cache"),
                      height=setup["height"], width=setup["width"], num_frames=setup["num_frames"], fps=8,
                      max_sequence_length=64, num_workers=0, rank=setup["rank"], alpha=float(setup["rank"]),
                      learning_rate=1e-3, lr_warmup_steps=0, max_steps=steps, batch_size=batch_size,
                      mixed_precision="no", gradient_checkpointing=False, checkpoint_every=0, validation_every=0,
                      log_with="none")
    runs = {}
    for label in ("cold", "warm"):
        out = root / f"{name}-{label}"
        start = time.perf_counter()
        result = train(cfg.replace(output_dir=str(out)), pipe=setup["build"]())
        wall = time.perf_counter() - start
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        record = result.record
        runs[label] = {"wall_s": wall, "cache_hit": record["data"]["cache"]["hit"],
                       "data_cache_s": record["timings_s"]["data_cache"],
                       "samples_per_s": record["throughput"]["samples_per_s"],
                       "steps_per_s": record["throughput"]["steps_per_s"]}
    found, _ = find_clips(data)
    per_clip = encode_cost(setup["build"](), cfg, found[:8])
    best = max(runs.values(), key=lambda r: r["steps_per_s"])  # both loops read the cache; the faster saw less
    step_s = 1.0 / best["steps_per_s"]                           # contention from other jobs on the machine
    return {"model": name, "clip": f"{cfg.num_frames}x{cfg.height}x{cfg.width}", "batch_size": batch_size,
            "steps": steps, "rank": cfg.rank, "clips": clips, "runs": runs, "encode_s_per_clip": per_clip,
            "samples_per_s_cached": best["samples_per_s"],
            "samples_per_s_uncached": batch_size / (step_s + batch_size * per_clip)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    import logging

    logging.getLogger("fvg.train").setLevel(logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results.append(bench(name, Path(tmp), args.steps, args.batch_size, args.clips))
    env = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
           "python": platform.python_version(), "torch": torch.__version__}
    print("| model | clip | batch | cached samples/s | uncached samples/s | encode s/clip | cache build s "
          "| run wall s (cold / warm) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cold, warm = r["runs"]["cold"], r["runs"]["warm"]
        print(f"| {r['model']} | {r['clip']} | {r['batch_size']} | {r['samples_per_s_cached']:.1f} | "
              f"{r['samples_per_s_uncached']:.2f} | {r['encode_s_per_clip']:.3f} | {cold['data_cache_s']:.1f} "
              f"| {cold['wall_s']:.1f} / {warm['wall_s']:.1f} |")
    print(json.dumps({"env": env, "results": results}, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
