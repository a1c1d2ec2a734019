"""`fvg bench mini`: the paper's comparisons, measured on MiniWorld.

    fvg bench mini --out runs/bench-mini --seeds 0,1,2

Generates the MiniCompBench suite (56 prompts, 7 categories) once per configuration - t2v@50,
upsampled@50, factorized@50, factorized@15 and t2v@15 by default - with `fvg eval generate`'s
machinery (one folder per configuration, `OUT/<mode>@<steps>/`, resumable), scores every video
with the exact MiniCompBench evaluator, and writes

    OUT/bench.md     scores per configuration x category, wall times, the targets met or not
    OUT/bench.json   the same numbers, plus the setup (versions, threads, seeds, load average)
    OUT/bench.png    per-category bars per configuration, and seconds per video
    OUT/report.*     `fvg eval report`'s tables and paired comparisons (bootstrap CIs)

All configurations share one loaded pipeline, so per-video times are warm: end to end, all
stages (planning, the anchor and decoding included for factorized), from the run records.
The cold start (building the pipeline and loading every model) is measured once beside them.
Seeds are shared, so configurations differ only in mode and steps (paired comparisons).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fvg.io import FvgError, atomic_path, write_json, write_text
from fvg.presets import validate_mode

METRIC = "minicompbench"
DEFAULT_CONFIGS = "t2v@50,upsampled@50,factorized@50,factorized@15,t2v@15"
# The targets (benchmarks, reported met or not, never asserted in tests).
MIN_CATEGORY_WINS = 5
MAX_STEP_GAP = 0.02
MIN_SPEEDUP = 2.5
MAX_SECONDS_PER_VIDEO = 2.0


@dataclass(frozen=True)
class BenchConfig:
    mode: str
    steps: int

    @property
    def label(self) -> str:
        return f"{self.mode}@{self.steps}"


def parse_configs(text: str) -> list[BenchConfig]:
    """'t2v@50,factorized@15' -> configurations (mode@steps)."""
    configs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = re.fullmatch(r"([a-z0-9_-]+)@(\d+)", part)
        if match is None:
            raise FvgError(f"bad configuration '{part}': write MODE@STEPS, e.g. factorized@15")
        validate_mode(match.group(1))
        if int(match.group(2)) < 1:
            raise FvgError(f"bad configuration '{part}': steps must be at least 1")
        configs.append(BenchConfig(match.group(1), int(match.group(2))))
    if not configs:
        raise FvgError("no configurations given")
    if len({c.label for c in configs}) != len(configs):
        raise FvgError(f"configurations repeat: {text}")
    return configs


@dataclass
class ConfigResult:
    label: str
    mode: str
    steps: int
    videos: int
    scores: dict[str, float]  # category -> mean score over its prompts and seeds
    mean: float  # categories weighted equally
    seconds_per_video: float  # warm, all stages, from the run records
    stage_seconds: dict[str, float]  # plan / anchor / animate, mean per video
    wall_s: float  # this run's wall clock for the configuration (generation only)
    generated: int  # videos made in this run (the rest were already on disk)


@dataclass
class Target:
    name: str
    value: float | None
    goal: str
    met: bool | None  # None: the configurations it needs were not run


@dataclass
class BenchResult:
    configs: list[ConfigResult]
    categories: list[str]
    targets: list[Target]
    cold_start_s: float
    setup: dict = field(default_factory=dict)

    def by_label(self) -> dict[str, ConfigResult]:
        return {c.label: c for c in self.configs}


def _mean_timings(entries: list[dict]) -> tuple[float, dict[str, float]]:
    totals = [e["timings"]["total"] for e in entries if e.get("timings")]
    stages: dict[str, list[float]] = {}
    for e in entries:
        for k, v in (e.get("timings") or {}).items():
            if k != "total":
                stages.setdefault(k, []).append(v)
    # Planning runs once per prompt (shared by its seeds): spread over all of the prompt's videos.
    per_video = {k: float(np.sum(v)) / max(1, len(totals)) for k, v in stages.items()}
    return (float(np.mean(totals)) if totals else float("nan")), per_video


def compute_targets(results: dict[str, ConfigResult], categories: list[str]) -> list[Target]:
    targets = []
    f50, t50, f15 = results.get("factorized@50"), results.get("t2v@50"), results.get("factorized@15")
    if f50 and t50:
        targets.append(Target("factorized@50 - t2v@50, mean score", f50.mean - t50.mean, "> 0",
                              f50.mean > t50.mean))
        wins = sum(f50.scores.get(c, 0) > t50.scores.get(c, 0) for c in categories)
        targets.append(Target("categories where factorized@50 beats t2v@50", wins,
                              f">= {MIN_CATEGORY_WINS} of {len(categories)}", wins >= MIN_CATEGORY_WINS))
    else:
        targets.append(Target("factorized@50 - t2v@50, mean score", None, "> 0", None))
    if f50 and f15:
        gap = f50.mean - f15.mean
        targets.append(Target("factorized@50 - factorized@15, mean score", gap, f"<= {MAX_STEP_GAP}",
                              gap <= MAX_STEP_GAP))
    if t50 and f15:
        ratio = t50.seconds_per_video / f15.seconds_per_video
        targets.append(Target("seconds per video, t2v@50 / factorized@15", ratio, f">= {MIN_SPEEDUP}",
                              ratio >= MIN_SPEEDUP))
    if f15:
        targets.append(Target("seconds per factorized@15 video, all stages, warm", f15.seconds_per_video,
                              f"< {MAX_SECONDS_PER_VIDEO}", f15.seconds_per_video < MAX_SECONDS_PER_VIDEO))
    return targets


def _setup(preset: str, seeds: list[int], limit: int | None, threads: int) -> dict:
    from fvg.provenance import package_versions

    return {"preset": preset, "suite": "minicompbench", "seeds": seeds, "limit_per_category": limit,
            "torch_threads": threads, "cpu_cores": os.cpu_count(), "load_average_1min_start": os.getloadavg()[0],
            **package_versions(), "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def run_bench(out: str | Path, preset: str = "mini", configs: list[BenchConfig] | None = None,
              seeds: list[int] | None = None, limit: int | None = None, threads: int | None = None,
              overrides: dict | None = None,
              on_video: Callable[[str], None] | None = None,
              on_config: Callable[[BenchConfig, int], None] | None = None) -> BenchResult:
    """Generate, score and summarise every configuration; writes OUT/bench.{md,json,png} and OUT/report.*.
    `overrides`: preset fields (e.g. height/width/num_frames for a preset not made for MiniWorld)."""
    import torch

    from fvg.pipeline import FactorizedPipeline

    from .generate import MANIFEST, GenerateSettings, check_config, distributed_state, read_jsonl, run_generation
    from .metrics import score_run
    from .report import build_report, write_report
    from .suites import load_suite

    out = Path(out)
    configs = configs or parse_configs(DEFAULT_CONFIGS)
    seeds = seeds or [0, 1, 2]
    if threads is not None:
        if threads < 1:
            raise FvgError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    suite = load_suite("minicompbench", None, None).select(None, limit)
    settings = {c.label: GenerateSettings(suite, [c.mode], seeds, out / c.label, preset, c.steps, dict(overrides or {}))
                for c in configs}
    for s in settings.values():
        check_config(s)  # a folder of other settings is refused before any model loads
    setup = _setup(preset, seeds, limit, torch.get_num_threads())

    start = time.perf_counter()
    pipe = FactorizedPipeline.from_preset(preset, **(overrides or {}))
    pipe.load("factorized")
    cold_start = time.perf_counter() - start
    # One unsaved video first: torch's first call pays one-off costs (allocator, kernels) that
    # would otherwise land on whichever configuration runs first.
    pipe(suite.prompts[0].prompt, mode="factorized", seed=0, steps=2)

    state = distributed_state("cpu")
    rows, runs = [], []  # score rows (mode = the configuration's label); per configuration: timings, counts
    for config in configs:
        s = settings[config.label]
        if on_config:
            on_config(config, len(suite.prompts) * len(seeds))
        tick = time.perf_counter()
        summary = run_generation(s, on_video=(lambda job, status: on_video(config.label)) if on_video else None,
                                 state=state, pipe=pipe)
        wall = time.perf_counter() - tick
        if summary.failed:
            raise FvgError(f"{config.label}: {summary.failed} video(s) failed, e.g. {summary.errors[0]}")
        score_run(s.out, s.out / "scores.jsonl", [METRIC])
        scored = [r for r in read_jsonl(s.out / "scores.jsonl") if r.get("mode") == config.mode]
        rows += [{**r, "mode": config.label} for r in scored]
        entries = [e for e in read_jsonl(s.out / MANIFEST) if e.get("mode") == config.mode]
        runs.append((config, len(scored), *_mean_timings(entries), wall, summary.generated))

    # The report's tables are the per-category means: one computation for bench.md and report.md.
    pairs = [(a, b) for a, b in (("factorized@50", "t2v@50"), ("factorized@50", "upsampled@50"),
                                 ("factorized@15", "t2v@50"), ("factorized@15", "factorized@50"))
             if a in settings and b in settings]
    report = build_report(rows, pairs)
    table = report.tables.get(METRIC, {})
    results = {}
    for config, videos, per_video, stages, wall, generated in runs:
        cells = table.get(config.label, {})
        scores = {c: cells[c].mean for c in suite.categories if c in cells}
        results[config.label] = ConfigResult(
            config.label, config.mode, config.steps, videos, scores,
            float(np.mean(list(scores.values()))) if scores else float("nan"), per_video, stages, wall, generated)

    setup["load_average_1min_end"] = os.getloadavg()[0]
    result = BenchResult(list(results.values()), suite.categories, compute_targets(results, suite.categories),
                         cold_start, setup)
    write_report(report, out, plots=True)
    write_text(out / "bench.md", to_markdown(result))
    write_json(out / "bench.json", to_json(result))
    plot(result, out / "bench.png")
    return result


def to_json(result: BenchResult) -> dict:
    return {"setup": result.setup, "categories": result.categories, "cold_start_s": round(result.cold_start_s, 3),
            "configs": [asdict(c) for c in result.configs], "targets": [asdict(t) for t in result.targets]}


def _fmt_value(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def to_markdown(result: BenchResult) -> str:
    cats = result.categories
    lines = ["| configuration | " + " | ".join(c.replace("_", " ") for c in cats) + " | mean | s/video | videos |",
             "|---" * (len(cats) + 4) + "|"]
    for c in result.configs:
        lines.append(f"| {c.label} | " + " | ".join(f"{c.scores.get(k, float('nan')):.3f}" for k in cats) +
                     f" | **{c.mean:.3f}** | {c.seconds_per_video:.2f} | {c.videos} |")
    lines += ["", "Seconds per video by stage (warm, mean): " + "; ".join(
        f"{c.label} " + ", ".join(f"{k} {v:.3f}" for k, v in c.stage_seconds.items()) for c in result.configs) + ".",
        f"Cold start (build the pipeline, load every model): {result.cold_start_s:.2f} s.", "",
        "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in result.targets:
        met = "-" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.name} | {_fmt_value(t.value)} | {t.goal} | {met} |")
    return "\n".join(lines) + "\n"


def plot(result: BenchResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = result.categories
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(result.configs))
    x = np.arange(len(cats) + 1)
    for i, c in enumerate(result.configs):
        ax.bar(x + i * width, [c.scores.get(k, np.nan) for k in cats] + [c.mean], width, label=c.label)
    ax.set_xticks(x + width * (len(result.configs) - 1) / 2, [k.replace("_", " ") for k in cats] + ["mean"],
                  rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("MiniCompBench score")
    ax.legend(fontsize=8, ncol=len(result.configs))
    ax.grid(axis="y", alpha=0.3)
    ax_t.bar([c.label for c in result.configs], [c.seconds_per_video for c in result.configs],
             color=[f"C{i}" for i in range(len(result.configs))])
    ax_t.set_ylabel("seconds per video (warm, all stages)")
    ax_t.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
