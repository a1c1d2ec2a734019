"""What `mini`'s two CPU speed options save: seconds per video and per stage, factorized@15 and t2v@50, with
classifier-free guidance batched (`batch_guidance`) and the VAE's CPU kernels (`cpu_vae_kernels`) each on and
off, and how far each moves the frames from the stock path.

    python benchmarks/bench_cpu_speed.py --threads 2 --seeds 2

Four pipelines in one process, the configurations interleaved video by video over the suite's first prompt
per category; each figure is the median over those videos (a warm-up video per pipeline is not counted),
all stages, with the stage times of the run record. The VAE decode is timed inside the animate stage. Drift:
the largest per-pixel difference, in 8-bit levels, from the stock path's video of the same prompt and seed.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from fvg import FactorizedPipeline
from fvg.miniworld import load_suite

CONFIGS = {"stock": dict(batch_guidance=False, cpu_vae_kernels=False),
           "batch_guidance": dict(batch_guidance=True, cpu_vae_kernels=False),
           "cpu_vae_kernels": dict(batch_guidance=False, cpu_vae_kernels=True),
           "both (preset)": dict(batch_guidance=True, cpu_vae_kernels=True)}
RUNS = (("factorized", 15), ("t2v", 50))


class DecodeTimer:
    def __init__(self, vae):
        self.seconds = 0.0
        decode = vae.decode

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = decode(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return result

        vae.decode = timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = list({item.category: item.prompt for item in reversed(load_suite())}.values())
    pipes = {name: FactorizedPipeline.from_preset("mini", **flags).load("factorized") for name, flags in CONFIGS.items()}
    timers = {name: DecodeTimer(pipe.video_pipe.vae) for name, pipe in pipes.items()}
    for pipe in pipes.values():  # warm-up, not counted
        for mode, steps in RUNS:
            pipe(prompts[0], mode=mode, seed=0, steps=steps)
    rows: dict[tuple, list] = {}
    for prompt in prompts:
        for seed in range(args.seeds):
            stock = {}
            for name, pipe in pipes.items():
                for mode, steps in RUNS:
                    timers[name].seconds = 0.0
                    start = time.perf_counter()
                    out = pipe(prompt, mode=mode, seed=seed, steps=steps)
                    wall = time.perf_counter() - start
                    stock.setdefault(mode, out.frames)
                    drift = int(np.abs(out.frames.astype(int) - stock[mode].astype(int)).max())
                    rows.setdefault((name, mode, steps), []).append(
                        {"wall": wall, **out.timings, "decode": timers[name].seconds, "drift": drift})
    print(f"{len(prompts)} prompts x {args.seeds} seeds, {args.threads} threads; medians, seconds per video")
    print("| configuration | factorized@15 | (anchor, animate, decode) | t2v@50 | (decode) | t2v@50 / factorized@15 "
          "| max drift, 8-bit levels |")
    print("|---|---|---|---|---|---|---|")
    for name in pipes:
        f, t = rows[(name, "factorized", 15)], rows[(name, "t2v", 50)]
        med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
        print(f"| {name} | {med(f, 'wall'):.3f} | ({med(f, 'anchor'):.3f}, {med(f, 'animate'):.3f}, "
              f"{med(f, 'decode'):.3f}) | {med(t, 'wall'):.3f} | ({med(t, 'decode'):.3f}) | "
              f"{med(t, 'wall') / med(f, 'wall'):.2f} | {max(r['drift'] for r in f + t)} |")


if __name__ == "__main__":
    main()
