"""What merging the anchor LoRA saves on `mini`: seconds per video, factorized@15 with the LoRA merged while
it samples (the preset's `fuse_lora`, as fvg runs it) and unmerged (PEFT's three matmuls per adapted layer),
against t2v@50 and t2v@15.

    python benchmarks/bench_lora_fuse.py --threads 2 --videos 6

Two pipelines in one process, the same modes interleaved video by video (so each factorized video merges
and each baseline restores the base weights, as a mixed batch does); each figure is the median over seeds
1..N-1 (seed 0 warms up), all stages, with the stage times from the run record.
"""

import argparse
import statistics
import time

import torch

from fvg import FactorizedPipeline

PROMPT = "a red circle moves right while a blue square moves up"
RUNS = (("factorized", 15), ("t2v", 50), ("t2v", 15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--videos", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipes = {"merged": FactorizedPipeline.from_preset("mini"),
             "unmerged": FactorizedPipeline.from_preset("mini", fuse_lora=False)}
    seconds: dict[tuple, list] = {}
    for seed in range(args.videos):
        for name, pipe in pipes.items():
            for mode, steps in RUNS:
                start = time.perf_counter()
                out = pipe(PROMPT, seed=seed, mode=mode, steps=steps)
                if seed:
                    seconds.setdefault((name, mode, steps), []).append((time.perf_counter() - start, out.timings))
    for (name, mode, steps), runs in seconds.items():
        stages = ", ".join(f"{stage} {statistics.median(t[1][stage] for t in runs):.3f}"
                           for stage in runs[0][1] if stage not in ("plan", "total"))
        print(f"{name:9s} {mode}@{steps}: {statistics.median(t[0] for t in runs):.3f} s ({stages})")
    for name in pipes:
        ratio = statistics.median(t[0] for t in seconds[(name, "t2v", 50)]) / statistics.median(
            t[0] for t in seconds[(name, "factorized", 15)])
        print(f"t2v@50 / factorized@15, {name}: {ratio:.2f}")


if __name__ == "__main__":
    main()
