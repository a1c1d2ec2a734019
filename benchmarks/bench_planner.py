"""Rules-planner time against prompt length, on ordinary and adversarial prompt shapes.

    python benchmarks/bench_planner.py               # 12 kB and 100 kB prompts
    python benchmarks/bench_planner.py --sizes 1000 10000 100000

Each shape is a short unit repeated to the size. The planner should be linear in the prompt's
length: the time at 100 kB is about 8 times the time at 12 kB, and well under a second.
"""

from __future__ import annotations

import argparse
import time

from fvg.plan.rules import RulesPlanner

SHAPES = {  # name -> repeated unit (the prefix, if any, is written once)
    "prose": ("", "a cat turns from red to blue while two dogs walk to the left, as a bird flies over the barn; "),
    "one word": ("", "word "),
    "articles": ("", "a "),
    "modifiers": ("", "a running "),
    "from spans": ("a dog runs ", "from x "),
    "to spans": ("a dog runs ", "to x "),
    "no spaces": ("", "x"),
    "and chain": ("", "a dog and "),
    "commas": ("a dog runs", " ,"),
    "comma-and": ("a dog runs", ", and"),
    "clauses": ("", "a dog runs, "),
    "semicolons": ("", "a dog; "),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12_000, 100_000])
    args = parser.parse_args()
    planner = RulesPlanner()
    planner.plan("warm up the pattern tables")
    print("| shape | " + " | ".join(f"{n // 1000} kB (s)" for n in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name, (prefix, unit) in SHAPES.items():
        times = []
        for size in args.sizes:
            prompt = prefix + unit * max(1, (size - len(prefix)) // len(unit))
            start = time.perf_counter()
            planner.plan(prompt)
            times.append(time.perf_counter() - start)
        print(f"| {name} | " + " | ".join(f"{t:.3f}" for t in times) + " |")


if __name__ == "__main__":
    main()
