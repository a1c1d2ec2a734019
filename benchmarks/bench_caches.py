"""Step caches on `mini`: seconds per video and MiniCompBench score, per cache and configuration.

    python benchmarks/bench_caches.py --per-category 2 --threads 1 --out runs/bench-caches

For each cache (none, fbc, taylorseer, magcache) one `FactorizedPipeline` of the `mini` preset is
built with `cache=...`, and every configuration (t2v@50, factorized@15, factorized@8 by default)
generates the first `--per-category` MiniCompBench prompts of each category for every seed, each
video with every cache in turn (load from other processes falls on all caches alike). Each video
is scored in memory with MiniWorld's exact evaluator (`fvg.miniworld.score_video`) and timed end
to end (planning, the anchor, the video and its decode; warm), in wall-clock seconds and in this
process's CPU seconds (with one thread, the wall time a quiet machine would show).

Before the timed videos, every configuration runs one unsaved video: it pays torch's one-off
costs and, for MagCache, measures the ratios of that (mode, steps) key (that video runs uncached;
`FVG_MAGCACHE_DIR` points at a fresh folder so the ratios are this run's own). Ends with the
moonshot line: factorized@8 with a cache against t2v@50 without one (>= 5x faster, score within 0.02).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SPEEDUP_GOAL, SCORE_GAP = 5.0, 0.02


@dataclass
class Row:
    cache: str
    config: str
    videos: int
    score: float  # mean over the prompts and seeds (equal prompts per category: categories weigh equally)
    seconds_per_video: float  # wall clock, end to end (all stages, warm)
    cpu_seconds_per_video: float  # this process's CPU time: with one thread, what a quiet machine's wall would be


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", default="none,fbc,taylorseer,magcache")
    parser.add_argument("--configs", default="t2v@50,factorized@15,factorized@8")
    parser.add_argument("--per-category", type=int, default=2, help="prompts per category (8 in the suite)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json (optional)")
    parser.add_argument("--profile", action="store_true", help="only split one uncached video's CPU time per "
                                                                 "configuration: video transformer vs the rest")
    return parser.parse_args(argv)


def run_all(caches: list[str], configs: list[tuple[str, int]], prompts, seeds: list[int]) -> list[Row]:
    """Every video with every cache in turn (one pipeline per cache), so load from other processes on a
    shared machine falls on all caches alike."""
    from fvg.miniworld import score_video
    from fvg.pipeline import FactorizedPipeline

    pipes = {cache: FactorizedPipeline.from_preset("mini", device="cpu", cache=cache).load("factorized")
             for cache in caches}
    rows = []
    for mode, steps in configs:
        for pipe in pipes.values():  # warm-up (and MagCache's measurement for this mode and step count)
            pipe(prompts[0].prompt, mode=mode, seed=seeds[0], steps=steps)
        scores = {c: [] for c in caches}
        wall = {c: 0.0 for c in caches}
        cpu = {c: 0.0 for c in caches}
        for item in prompts:
            for seed in seeds:
                for cache, pipe in pipes.items():
                    tick, cpu_tick = time.perf_counter(), time.process_time()
                    out = pipe(item.prompt, mode=mode, seed=seed, steps=steps)
                    wall[cache] += time.perf_counter() - tick
                    cpu[cache] += time.process_time() - cpu_tick
                    scores[cache].append(score_video(item.prompt, out.frames).score)
        n = len(prompts) * len(seeds)
        for cache in caches:
            rows.append(Row(cache, f"{mode}@{steps}", n, sum(scores[cache]) / n, wall[cache] / n, cpu[cache] / n))
            print(f"{cache:>10} {mode}@{steps:<3} score {rows[-1].score:.3f}  {rows[-1].seconds_per_video:.3f} s/video "
                  f"({rows[-1].cpu_seconds_per_video:.3f} CPU s)", flush=True)
    return rows


def profile(prompt: str, configs: list[tuple[str, int]]) -> None:
    """Per configuration, one uncached video's CPU seconds: in all, and inside the video transformer's forward
    (what a step cache can save at most); the rest is planning, the anchor, text encoding and the decode."""
    from fvg.pipeline import FactorizedPipeline

    pipe = FactorizedPipeline.from_preset("mini", device="cpu").load("factorized")
    marks: list[float] = []
    transformer = pipe.video_pipe.transformer
    transformer.register_forward_pre_hook(lambda *_: marks.append(-time.process_time()))
    transformer.register_forward_hook(lambda *_: marks.append(time.process_time()))
    pipe(prompt, mode="factorized", seed=0, steps=2)  # warm-up
    for mode, steps in configs:
        marks.clear()
        start = time.process_time()
        pipe(prompt, mode=mode, seed=0, steps=steps)
        total, video = time.process_time() - start, sum(marks)
        print(f"profile {mode}@{steps}: {total:.3f} CPU s, video transformer {video:.3f}, rest {total - video:.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from fvg.miniworld import load_suite

    torch.set_num_threads(args.threads)
    os.environ["FVG_MAGCACHE_DIR"] = tempfile.mkdtemp(prefix="fvg-magcache-")
    configs = [(c.split("@")[0], int(c.split("@")[1])) for c in args.configs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    suite = load_suite()
    prompts = [p for p in suite if p.index <= args.per_category]
    if args.profile:
        profile(prompts[0].prompt, configs)
        return 0
    start = time.perf_counter()
    rows = run_all(args.caches.split(","), configs, prompts, seeds)
    wall = time.perf_counter() - start

    base = {r.config: r for r in rows if r.cache == "none"}
    print(f"\n{len(prompts)} prompts x {len(seeds)} seed(s), {args.threads} thread(s), {wall:.0f} s in all\n")
    print("| cache | configuration | mean score | vs no cache | s/video | CPU s/video | speed-up vs no cache (CPU) "
          "| speed-up vs t2v@50 no cache (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    reference = base.get("t2v@50")
    for r in rows:
        same = base.get(r.config)
        change = f"{r.score - same.score:+.3f}" if same else "n/a"
        speedup = f"{same.cpu_seconds_per_video / r.cpu_seconds_per_video:.2f}x" if same else "n/a"
        vs_t2v = f"{reference.cpu_seconds_per_video / r.cpu_seconds_per_video:.2f}x" if reference else "n/a"
        print(f"| {r.cache} | {r.config} | {r.score:.3f} | {change} | {r.seconds_per_video:.3f} "
              f"| {r.cpu_seconds_per_video:.3f} | {speedup} | {vs_t2v} |")
    if reference:
        for r in (r for r in rows if r.config == "factorized@8" and r.cache != "none"):
            speedup = reference.cpu_seconds_per_video / r.cpu_seconds_per_video
            wall_speedup = reference.seconds_per_video / r.seconds_per_video
            gap = r.score - reference.score
            met = speedup >= SPEEDUP_GOAL and gap >= -SCORE_GAP
            print(f"moonshot factorized@8+{r.cache} vs t2v@50: {speedup:.2f}x faster in CPU time ({wall_speedup:.2f}x "
                  f"wall; goal >= {SPEEDUP_GOAL}x), score {gap:+.3f} (goal >= -{SCORE_GAP}): {'met' if met else 'not met'}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            {"rows": [asdict(r) for r in rows], "prompts": len(prompts), "seeds": seeds, "threads": args.threads,
             "wall_s": wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
