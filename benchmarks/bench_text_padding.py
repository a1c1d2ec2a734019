"""`mini` with and without text compaction (fvg.families.text_padding): seconds per video, score, frame drift.

    python benchmarks/bench_text_padding.py --per-category 1 --threads 1

Two `mini` pipelines, one with `compact_text` off (the 512 zero rows attended in full) and one with it
on (one kept row plus a log bias: the same function to float rounding). Every configuration generates
the first `--per-category` MiniCompBench prompts of each category, each video with both pipelines in
turn (load from other processes falls on both alike), after one untimed warm-up video each. Times are
end to end (plan, anchor, video, decode) in wall and in this process's CPU seconds (with one thread,
a quiet machine's wall); scores are MiniWorld's exact evaluator; drift is the largest frame difference
between the two pipelines' videos, in 8-bit levels.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="factorized@15,t2v@50")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from fvg.miniworld import load_suite, score_video
    from fvg.pipeline import FactorizedPipeline

    torch.set_num_threads(args.threads)
    prompts = [p.prompt for p in load_suite() if p.index <= args.per_category]
    pipes = {name: FactorizedPipeline.from_preset("mini", device="cpu", compact_text=on).load("factorized")
             for name, on in (("512 rows", False), ("compacted", True))}
    print("| configuration | text | mean score | s/video (wall) | CPU s/video | speed-up (CPU) | max frame drift |")
    print("|---|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        mode, steps = config.split("@")[0], int(config.split("@")[1])
        for pipe in pipes.values():
            pipe(prompts[0], mode=mode, seed=0, steps=steps)  # warm-up
        wall, cpu, scores = ({name: 0.0 for name in pipes} for _ in range(3))
        drift = 0
        for prompt in prompts:
            frames = {}
            for name, pipe in pipes.items():
                tick, cpu_tick = time.perf_counter(), time.process_time()
                frames[name] = pipe(prompt, mode=mode, seed=0, steps=steps).frames
                wall[name] += time.perf_counter() - tick
                cpu[name] += time.process_time() - cpu_tick
                scores[name] += score_video(prompt, frames[name]).score
            a, b = (np.asarray(f, dtype=np.int16) for f in frames.values())
            drift = max(drift, int(np.abs(a - b).max()))
        n = len(prompts)
        for name in pipes:
            print(f"| {config} | {name} | {scores[name] / n:.4f} | {wall[name] / n:.3f} | {cpu[name] / n:.3f} "
                  f"| {cpu['512 rows'] / cpu[name]:.2f}x | {drift if name == 'compacted' else '-'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
