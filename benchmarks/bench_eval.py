"""End-to-end throughput of `fvg eval generate`: videos per minute with 1 and with 2 processes.

    python benchmarks/bench_eval.py                      # MiniCompBench, 2 prompts/category, 3 modes
    python benchmarks/bench_eval.py --limit 1 --steps 4  # quicker

Each run starts from an empty output folder and is timed from process start to the merged
manifest, so model building, planning, anchors, encoding and the manifest merge all count.
Steady-state throughput (from the per-video timings in the manifest, start-up excluded) is
reported too. Uses the `mini` preset when its weights exist, else `tiny` (random weights: the numbers
measure the harness and the models' CPU cost, not video quality). 2 processes are started
with `accelerate launch --multi_gpu` (torchrun; on a CPU-only machine fvg runs it on gloo
with one thread per process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def default_preset() -> str:
    """`mini` once its trained weights are on disk, else `tiny`."""
    from fvg.presets import PRESETS

    mini = PRESETS.get("mini")
    return "mini" if mini is not None and Path(mini.video_model).exists() else "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, out: Path, args: argparse.Namespace) -> dict:
    gen = ["generate", "--suite", args.suite, "--out", str(out), "--preset", args.preset, "--modes", args.modes,
           "--seeds", args.seeds, "--limit", str(args.limit)]
    if args.steps:
        gen += ["--steps", str(args.steps)]
    if processes == 1:
        cmd = [sys.executable, "-m", "fvg.eval.cli", *gen]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "fvg.eval.cli", *gen]
    start = time.perf_counter()
    env = dict(os.environ)
    if args.threads:  # torchrun gives each of several processes 1 thread unless this is set
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run with {processes} process(es) failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    busy: dict[int, float] = {}
    for r in rows:  # per-process sum of per-video times: the slowest process bounds steady throughput
        busy[r["rank"]] = busy.get(r["rank"], 0.0) + r["timings"].get("total", 0.0)
    return {"processes": processes, "videos": len(rows), "wall_s": round(wall, 1),
            "videos_per_min": round(60 * len(rows) / wall, 1),
            "steady_videos_per_min": round(60 * len(rows) / max(busy.values()), 1),
            "command": " ".join(cmd[1:]).replace(str(out), "OUT")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="minicompbench")
    parser.add_argument("--preset", default=None, help="default: mini if it exists, else tiny")
    parser.add_argument("--modes", default="t2v,upsampled,factorized")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--limit", type=int, default=2, help="prompts per category")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every process (default: torch's choice for 1 process, 1 each "
                             "for several)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.preset = args.preset or default_preset()
    load_before = os.getloadavg()[0]
    results = []
    for n in (int(p) for p in args.processes.split(",")):
        out = Path(tempfile.mkdtemp(prefix=f"bench-eval-{n}p-"))
        try:
            results.append(run(n, out, args))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(results[-1]), flush=True)
    header = (f"preset {args.preset}, suite {args.suite} (--limit {args.limit}), modes {args.modes}, seeds "
              f"{args.seeds}, steps {args.steps or 'preset default'}, threads per process {args.threads or 'default'}; "
              f"{os.cpu_count()} CPU cores, "
              f"Python {platform.python_version()}; load average before/after "
              f"{load_before:.1f}/{os.getloadavg()[0]:.1f} (other work on the machine slows both runs)")
    print(f"\n{header}\n\n| processes | videos | wall s | videos/min (end to end) | videos/min (steady) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['processes']} | {r['videos']} | {r['wall_s']} | {r['videos_per_min']} | "
              f"{r['steady_videos_per_min']} |")
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
