"""What the unfused anchor LoRA costs on `mini`: seconds per video, factorized@15 unfused (as fvg runs it)
and fused into the video transformer (diffusers' `fuse_lora`), against t2v@50 (LoRA disabled).

    python benchmarks/bench_lora_fuse.py --threads 1

Each figure is the median of `--videos` warm videos (seeds 0..N-1, the README's prompt), all stages. Fusing
is measured, not adopted: after it, t2v mode in the same process runs on weights from which PEFT subtracts
the LoRA again (not bit for bit the base model), which the bitwise-equality tests forbid.
"""

import argparse
import statistics
import time

import torch

from fvg import FactorizedPipeline

PROMPT = "a red circle moves right while a blue square moves up"


def seconds_per_video(pipe, mode: str, steps: int, videos: int) -> float:
    pipe(PROMPT, seed=0, mode=mode, steps=steps)  # warm: the first video builds and caches
    times = []
    for seed in range(videos):
        start = time.perf_counter()
        pipe(PROMPT, seed=seed, mode=mode, steps=steps)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--videos", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = FactorizedPipeline.from_preset("mini")
    unfused = seconds_per_video(pipe, "factorized", 15, args.videos)
    t2v = seconds_per_video(pipe, "t2v", 50, args.videos)
    pipe.video_pipe.fuse_lora(components=["transformer"])
    fused = seconds_per_video(pipe, "factorized", 15, args.videos)
    print(f"factorized@15 unfused {unfused:.3f} s, fused {fused:.3f} s ({fused / unfused - 1:+.0%}); t2v@50 {t2v:.3f} s")
    print(f"t2v@50 / factorized@15: unfused {t2v / unfused:.2f}, fused {t2v / fused:.2f}")


if __name__ == "__main__":
    main()
