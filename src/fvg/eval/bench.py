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
    OUT/scores.jsonl every video's score row, configurations and ladder rungs (mode: their label; video:
                     its MP4, relative to OUT), for `fvg eval report`, `fvg bench compare` (two benches,
                     paired) and `fvg miniworld diagnose --what lost`

Beside the configurations, the quality ladder (OUT/ladder/, resumable): the suite's scenes rendered
exactly (the evaluator itself), the same clips through the VAE and back (the latent space's
ceiling), the factorized run's anchors as stills scored on the frame-0 checks (the text-to-image
stage), the true first frame animated with the method's steps (the video stage alone, the paper's
"I2V+text"); then the method and the baseline. Each rung is compared with the one above (paired
bootstrap in report.md), with pass rates per kind of check, and the variability: score variance
across video seeds with the anchor fixed against across anchors with the seed fixed.

All configurations share one loaded pipeline, so per-video times are warm: end to end, all
stages (planning, the anchor and decoding included for factorized), from the run records.
The cold start (building the pipeline and loading every model) is measured once beside them.
Seeds are shared, so configurations differ only in mode and steps (paired comparisons).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fvg.console import set_torch_threads
from fvg.io import FvgError, SuitePrompt, atomic_path, write_json, write_text
from fvg.presets import validate_mode

METRIC = "minicompbench"
FRAME0_METRIC = "minicompbench_frame0"  # the frame-0 checks alone (the ladder's anchor rung)
DEFAULT_CONFIGS = "t2v@50,upsampled@50,factorized@50,factorized@15,t2v@15"
# Targets (benchmarks, reported met or not, never asserted in tests).
MIN_CATEGORY_WINS = 5
MAX_STEP_GAP = 0.02
MIN_SPEEDUP = 2.5
MAX_SECONDS_PER_VIDEO = 2.0
MIN_GAIN = 0.10  # factorized@15 - t2v@50, with its 95% paired bootstrap interval above 0


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
    ladder: list = field(default_factory=list)  # RungResult, top to bottom
    variability: object | None = None  # Variability, when a factorized configuration and 2+ seeds ran

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


def compute_targets(results: dict[str, ConfigResult], categories: list[str], comparisons: list | None = None
                    ) -> list[Target]:
    """The MiniWorld targets (docs/miniworld.md) that the configurations measure. `comparisons`: the report's paired
    comparisons (for the bootstrap interval of factorized@15 - t2v@50)."""
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
        gain = f15.mean - t50.mean
        pooled = [c for c in comparisons or [] if (c.metric, c.treatment, c.baseline, c.category) ==
                  (METRIC, "factorized@15", "t2v@50", "all")]
        ci = f" (95% CI [{pooled[0].ci_low:.3f}, {pooled[0].ci_high:.3f}])" if pooled else ""
        targets.append(Target(f"factorized@15 - t2v@50, mean score{ci}", gain,
                              f">= {MIN_GAIN}, interval above 0",
                              gain >= MIN_GAIN and (not pooled or pooled[0].ci_low > 0)))
        wins = sum(f15.scores.get(c, 0) > t50.scores.get(c, 0) for c in categories)
        targets.append(Target("categories where factorized@15 beats t2v@50", wins,
                              f">= {MIN_CATEGORY_WINS} of {len(categories)}", wins >= MIN_CATEGORY_WINS))
        ratio = t50.seconds_per_video / f15.seconds_per_video
        targets.append(Target("seconds per video, t2v@50 / factorized@15", ratio, f">= {MIN_SPEEDUP}",
                              ratio >= MIN_SPEEDUP))
    if f15:
        targets.append(Target("seconds per factorized@15 video, all stages, warm", f15.seconds_per_video,
                              f"< {MAX_SECONDS_PER_VIDEO}", f15.seconds_per_video < MAX_SECONDS_PER_VIDEO))
    return targets


# -- the quality ladder ------------------------------------------------------------------------------
#
# Where a MiniWorld video loses its score, rung by rung: the evaluator on exact renders, the VAE's
# round trip, the text-to-image stage alone, the video stage alone (the true first frame as anchor,
# the paper's "I2V+text"), then the method and the baseline. Every rung's videos are MP4s under
# OUT/ladder/<rung>/seed<S>/<category>/<index>.mp4, scored from the files like every other video;
# a valid MP4 is not made again (resumable).

RENDERED, VAE_ROUND_TRIP, ANCHOR_STILLS = "rendered", "vae", "anchor-stills"
SCORES = "scores.jsonl"  # every per-video score row of a bench
LADDER_DIR = "ladder"
LADDER_RECORD = "ladder.json"  # what the ladder's videos were made from (`check_ladder`)


@dataclass(frozen=True)
class Rung:
    label: str
    measures: str
    target: float | None  # the goal for its mean score (None: reported only)
    frame0: bool = False  # scored on the frame-0 checks only (an image, not a video)


def first_frame_label(steps: int) -> str:
    return f"first-frame@{steps}"


def ladder_rungs(configs: list[BenchConfig], steps: int) -> list[Rung]:
    """The ladder, top to bottom; the configuration rungs only where those configurations are run."""
    rungs = [Rung(RENDERED, "rendered clips: the evaluator itself", 1.0),
             Rung(VAE_ROUND_TRIP, "rendered clip -> VAE -> decoded: the latent space's ceiling", 0.95),
             Rung(ANCHOR_STILLS, "the learned anchors as stills, frame-0 checks: the text-to-image stage", 0.75,
                  frame0=True),
             Rung(first_frame_label(steps), "animate the true first frame (I2V+text): the video stage alone", 0.85)]
    labels = {c.label for c in configs}
    for label, measures, target in ((_first_label(configs, "factorized"), "learned anchor: the method", 0.65),
                                    ("factorized@50", "the method at 50 steps", None),
                                    ("t2v@50", "the baseline", None)):
        if label in labels and all(r.label != label for r in rungs):
            rungs.append(Rung(label, measures, target))
    return rungs


def check_ladder(out: Path, fingerprint: dict) -> None:
    """Record what the ladder's videos are made from (OUT/ladder/ladder.json), or refuse a ladder made from
    other prompts or models: its videos resume by path alone, so a second prompt set would be scored against
    the first one's videos. Folders from before this record hold the committed suite's ladder."""
    from fvg.io import read_json_object

    from .generate import refuse_other_settings
    from .suites import MINICOMPBENCH_SOURCE

    path = out / LADDER_DIR / LADDER_RECORD
    if path.is_file():
        old = read_json_object(path, "bench ladder record")
    elif (out / LADDER_DIR).is_dir():
        old = {**fingerprint, "source": MINICOMPBENCH_SOURCE}
    else:
        old = fingerprint
    refuse_other_settings(out / LADDER_DIR, old, fingerprint)
    if not path.is_file():
        write_json(path, fingerprint)


def _rung_video(out: Path, rung: str, item, seed: int) -> Path:
    return out / LADDER_DIR / rung / f"seed{seed}" / item.category / f"{item.index:04d}.mp4"


def rendered_clip(item, seed: int) -> np.ndarray:
    """The exact frames [17, 64, 64, 3] of one scene that realises the prompt, drawn from (seed, prompt)."""
    from fvg.miniworld.render import reference_clip

    return reference_clip(item.prompt, seed)


def vae_round_trip(vae, frames: np.ndarray) -> np.ndarray:
    """frames [T, H, W, 3] uint8 -> the VAE's encode (posterior mode) + decode, uint8 (the quality ladder's VAE
    rung)."""
    import torch

    from fvg.io import to_uint8

    x = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        x = x.to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return to_uint8(((y[0].permute(1, 2, 3, 0).float().cpu().numpy() + 1) / 2))


def learned_anchor(pipe, out: Path, factorized: str | None, item, seed: int):
    """The anchor factorized mode made for (prompt, seed): read back from its run's records when that
    configuration ran (the very image its videos started from), else made the same way."""
    from PIL import Image

    from .suites import record_relpath

    if factorized is not None:
        mode = factorized.split("@")[0]
        png = out / factorized / record_relpath(f"{mode}/seed{seed}/{item.category}/{item.index:04d}.mp4") / "anchor.png"
        if png.is_file():
            with Image.open(png) as img:
                return img.convert("RGB")
    return pipe.make_anchor(pipe.plan(item.prompt).first_frame_caption, seed).image


@dataclass
class LadderVideo:
    rung: str
    item: SuitePrompt
    seed: int
    path: Path


def make_ladder_videos(pipe, out: Path, suite, seeds: list[int], steps: int, factorized: str | None,
                       on_rung: Callable | None = None, on_video: Callable[[str], None] | None = None
                       ) -> list[LadderVideo]:
    """The reference rungs' videos (rendered, VAE round trip, anchor stills, first frame animated)."""
    from PIL import Image

    from fvg.io import mp4_is_valid, write_mp4

    fps, frames_n = pipe.preset.fps, pipe.preset.num_frames
    made = []
    for rung in (RENDERED, VAE_ROUND_TRIP, ANCHOR_STILLS, first_frame_label(steps)):
        if on_rung:
            on_rung(Rung(rung, "", None), len(suite.prompts) * len(seeds))
        for item in suite.prompts:
            for seed in seeds:
                path = _rung_video(out, rung, item, seed)
                if not mp4_is_valid(path, frames_n):
                    if rung == RENDERED:
                        frames = rendered_clip(item, seed)
                    elif rung == VAE_ROUND_TRIP:
                        frames = vae_round_trip(pipe.video_pipe.vae, rendered_clip(item, seed))
                    elif rung == ANCHOR_STILLS:
                        anchor = np.asarray(learned_anchor(pipe, out, factorized, item, seed))
                        frames = np.repeat(anchor[None], frames_n, axis=0)
                    else:
                        first = Image.fromarray(rendered_clip(item, seed)[0])
                        frames = pipe(item.prompt, mode="factorized", seed=seed, steps=steps, anchor_image=first).frames
                    write_mp4(path, frames, fps=fps)
                made.append(LadderVideo(rung, item, seed, path))
                if on_video:
                    on_video(rung)
    return made


def ladder_rows(videos: list[LadderVideo], frame0_rungs: set[str]) -> list[dict]:
    """Score rows (eval.report's format) for ladder videos: `minicompbench` (all checks; for the
    frame-0 rungs only their frame-0 checks), `minicompbench_frame0`, and pass rates per check kind."""
    from fvg.miniworld.score import check_kind, score_first_frame, score_video

    rows = []
    for v in videos:
        full, first = score_video(v.item.prompt, v.path), score_first_frame(v.item.prompt, v.path)
        kinds: dict[str, list[bool]] = {}
        for c in (first if v.rung in frame0_rungs else full).checks:
            kinds.setdefault(check_kind(c.name), []).append(c.passed)
        rows.append({"source": "fvg", "suite": "minicompbench", "category": v.item.category, "index": v.item.index,
                     "sample": 0, "prompt": v.item.prompt, "mode": v.rung, "seed": v.seed,
                     "video": str(v.path), "kinds": {k: [sum(p), len(p)] for k, p in kinds.items()},
                     "metrics": {METRIC: first.score if v.rung in frame0_rungs else full.score,
                                 FRAME0_METRIC: first.score}})
    return rows


def config_ladder_videos(out: Path, config: BenchConfig, suite, seeds: list[int]) -> list[LadderVideo]:
    """A configuration's videos, as ladder videos (its MP4s in the layout `fvg eval generate` writes)."""
    from .suites import video_relpath

    return [LadderVideo(config.label, item, seed, out / config.label / video_relpath(suite, item, config.mode, seed, 0))
            for item in suite.prompts for seed in seeds]


# -- variability: the seed's share against the anchor's ---------------------------------------------

FIXED_ANCHOR, FIXED_SEED = "anchor-fixed", "seed-fixed"


def make_variability_videos(pipe, out: Path, suite, seeds: list[int], steps: int, factorized: str,
                            on_video: Callable[[str], None] | None = None) -> dict[str, list[LadderVideo]]:
    """Factorized videos with the anchor of seeds[0] and every video seed (`anchor-fixed`), and with
    video seed seeds[0] and the anchor of every seed (`seed-fixed`; LadderVideo.seed is the anchor's).
    Both share the (seeds[0], seeds[0]) video with the configuration itself."""
    from fvg.io import mp4_is_valid, write_mp4

    from .suites import video_relpath

    mode, s0 = factorized.split("@")[0], seeds[0]
    groups: dict[str, list[LadderVideo]] = {FIXED_ANCHOR: [], FIXED_SEED: []}
    for item in suite.prompts:
        base = out / factorized / video_relpath(suite, item, mode, s0, 0)
        for kind in (FIXED_ANCHOR, FIXED_SEED):
            groups[kind].append(LadderVideo(kind, item, s0, base))
            for s in seeds[1:]:
                path = _rung_video(out, kind, item, s)
                if not mp4_is_valid(path, pipe.preset.num_frames):
                    anchor_seed, video_seed = (s0, s) if kind == FIXED_ANCHOR else (s, s0)
                    anchor = learned_anchor(pipe, out, factorized, item, anchor_seed)
                    result = pipe(item.prompt, mode="factorized", seed=video_seed, steps=steps, anchor_image=anchor)
                    write_mp4(path, result.frames, fps=pipe.preset.fps)
                groups[kind].append(LadderVideo(kind, item, s, path))
                if on_video:
                    on_video(kind)
    return groups


def mean_variance(rows: list[dict]) -> float | None:
    """Score variance across a prompt's videos (population variance), averaged over prompts."""
    by_prompt: dict[tuple, list[float]] = {}
    for r in rows:
        by_prompt.setdefault((r["category"], r["index"]), []).append(r["metrics"][METRIC])
    values = [float(np.var(v)) for v in by_prompt.values() if len(v) > 1]
    return float(np.mean(values)) if values else None


@dataclass
class Variability:
    """Mean per-prompt score variance: what moves a video's score, the seed or the anchor."""

    videos_per_prompt: int
    variance: dict[str, float | None]  # "t2v@50 across seeds", "factorized across seeds, anchor fixed", ...
    t2v_over_fixed_anchor: float | None  # the paper's claim: T2V is ~9x more seed-variable


def variability(rows_by: dict[str, list[dict]], t2v: str | None, factorized: str | None) -> Variability:
    variance = {}
    if t2v and rows_by.get(t2v):
        variance[f"{t2v} across seeds"] = mean_variance(rows_by[t2v])
    if factorized and rows_by.get(factorized):
        variance[f"{factorized} across seeds (the anchor follows the seed)"] = mean_variance(rows_by[factorized])
    fixed = mean_variance(rows_by.get(FIXED_ANCHOR, []))
    variance["factorized across video seeds, anchor fixed"] = fixed
    variance["factorized across anchors, video seed fixed"] = mean_variance(rows_by.get(FIXED_SEED, []))
    t2v_var = variance.get(f"{t2v} across seeds")
    ratio = t2v_var / fixed if t2v_var is not None and fixed else None
    n = len(rows_by.get(FIXED_ANCHOR, [])) // max(1, len({(r["category"], r["index"]) for r in rows_by.get(FIXED_ANCHOR, [])}))
    return Variability(n, variance, ratio)


# -- the ladder's summary ----------------------------------------------------------------------------

@dataclass
class RungResult:
    label: str
    measures: str
    scores: dict[str, float]  # category -> mean
    mean: float  # categories weighted equally
    above: str | None  # the rung it is compared with
    diff_vs_above: float | None  # mean difference on the checks both are scored on
    diff_metric: str | None
    target: float | None
    met: bool | None
    kinds: dict[str, float]  # check kind -> pass rate
    videos: int


def _category_means(rows: list[dict], categories: list[str], metric: str) -> tuple[dict[str, float], float]:
    cells = {c: [r["metrics"][metric] for r in rows if r["category"] == c] for c in categories}
    scores = {c: float(np.mean(v)) for c, v in cells.items() if v}
    return scores, float(np.mean(list(scores.values()))) if scores else float("nan")


def summarise_ladder(rungs: list[Rung], rows_by: dict[str, list[dict]], categories: list[str]) -> list[RungResult]:
    results, prev = [], None
    for rung in rungs:
        rows = rows_by.get(rung.label, [])
        scores, mean = _category_means(rows, categories, METRIC)
        diff = metric = None
        if prev is not None and rows and rows_by.get(prev.label):
            metric = FRAME0_METRIC if (rung.frame0 or prev.frame0) else METRIC
            diff = _category_means(rows, categories, metric)[1] - _category_means(rows_by[prev.label], categories,
                                                                                   metric)[1]
        kinds: dict[str, list[int]] = {}
        for r in rows:
            for k, (passed, total) in r["kinds"].items():
                kinds.setdefault(k, [0, 0])
                kinds[k][0] += passed
                kinds[k][1] += total
        results.append(RungResult(rung.label, rung.measures, scores, mean, prev.label if prev else None, diff, metric,
                                  rung.target, None if rung.target is None or not rows else mean >= rung.target,
                                  {k: p / t for k, (p, t) in sorted(kinds.items()) if t}, len(rows)))
        prev = rung
    return results


SHEET_FRAMES = (0, 4, 8, 12, 16)


def contact_sheet(out: Path, suite, labels: list[str], configs: list[BenchConfig], path: Path, seed: int = 0) -> Path:
    """A PNG with one row per category (its first prompt, `seed`) and, per rung in `labels`, frames
    0, 4, 8, 12 and 16 side by side (a grey bar between rungs): what the ladder's numbers look like."""
    from PIL import Image

    from fvg.io import read_mp4

    from .suites import video_relpath

    by_label = {c.label: c for c in configs}
    rows = []
    for category in suite.categories:
        item = next(p for p in suite.prompts if p.category == category)
        tiles = []
        for label in labels:
            c = by_label.get(label)
            video = (out / label / video_relpath(suite, item, c.mode, seed, 0)) if c else _rung_video(out, label, item, seed)
            frames = read_mp4(video)
            tiles += [np.concatenate([frames[min(t, len(frames) - 1)] for t in SHEET_FRAMES], 1),
                      np.full((frames.shape[1], 6, 3), 128, np.uint8)]
        rows.append(np.concatenate(tiles[:-1], 1))
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(rows, 0)).save(tmp, format="PNG")
    return path


def _setup(preset: str, seeds: list[int], limit: int | None, threads: int, overrides: dict, prompts: str) -> dict:
    from fvg.provenance import package_versions, utc_timestamp

    return {"preset": preset, "preset_overrides": overrides, "suite": "minicompbench", "prompts": prompts,
            "seeds": seeds, "limit_per_category": limit,
            "torch_threads": threads, "cpu_cores": os.cpu_count(), "load_average_1min_start": os.getloadavg()[0],
            **package_versions(), "started": utc_timestamp()}


def run_bench(out: str | Path, preset: str = "mini", configs: list[BenchConfig] | None = None,
              seeds: list[int] | None = None, limit: int | None = None, threads: int | None = None,
              overrides: dict | None = None,
              on_video: Callable[[str], None] | None = None,
              on_config: Callable[[BenchConfig, int], None] | None = None, ladder: bool = True,
              prompt_dir: str | Path | None = None) -> BenchResult:
    """Generate, score and summarise every configuration; writes OUT/bench.{md,json,png} and OUT/report.*.
    `overrides`: preset fields (e.g. height/width/num_frames for a preset not made for MiniWorld).
    `prompt_dir`: a MiniCompBench prompt folder instead of the committed suite (`fvg miniworld suite`).
    `ladder`: also the quality ladder's reference rungs and the variability measurement (OUT/ladder/).
    `on_config` is called with each configuration and ladder rung (both have `.label`) and its video count."""
    import torch

    from fvg.pipeline import FactorizedPipeline

    from .generate import GenerateSettings, check_config
    from .report import build_report, write_report
    from .suites import load_suite

    out = Path(out)
    configs = configs or parse_configs(DEFAULT_CONFIGS)
    seeds = seeds or [0, 1, 2]
    set_torch_threads(threads)
    suite = load_suite("minicompbench", prompt_dir, None).select(None, limit)
    settings = {c.label: GenerateSettings(suite, [c.mode], seeds, out / c.label, preset, c.steps, dict(overrides or {}))
                for c in configs}
    for s in settings.values():
        check_config(s)  # a folder of other settings is refused before any model loads
    if ladder:
        check_ladder(out, {"source": suite.source, "preset": preset, "overrides": dict(overrides or {})})
    setup = _setup(preset, seeds, limit, torch.get_num_threads(), dict(overrides or {}), suite.source)

    start = time.perf_counter()
    pipe = FactorizedPipeline.from_preset(preset, **(overrides or {}))
    pipe.load("factorized")
    cold_start = time.perf_counter() - start
    # One unsaved video first: torch's first call pays one-off costs (allocator, kernels) that
    # would otherwise land on whichever configuration runs first.
    pipe(suite.prompts[0].prompt, mode="factorized", seed=0, steps=2)

    rows, runs = _run_configs(pipe, configs, settings, len(suite.prompts) * len(seeds), on_config, on_video)
    method = _first_label(configs, "factorized")  # the first-frame rung animates with the method's steps
    steps = next(c.steps for c in configs if c.label == method) if method else pipe.preset.steps_for("factorized")
    rungs, lad_rows, var_rows = [], {}, {}
    if ladder:
        rungs = ladder_rungs(configs, steps)
        lad_rows, var_rows = _ladder_scores(pipe, out, suite, seeds, steps, configs, on_config, on_video)
        rows += [r for rung in rungs if rung.label not in settings for r in lad_rows.get(rung.label, [])]

    # The report's tables are the per-category means: one computation for bench.md and report.md.
    pairs = [(a, b) for a, b in (("factorized@50", "t2v@50"), ("factorized@50", "upsampled@50"),
                                 ("factorized@15", "t2v@50"), ("factorized@15", "factorized@50"))
             if a in settings and b in settings]
    pairs += [(lower.label, upper.label) for upper, lower in zip(rungs, rungs[1:])
              if (lower.label, upper.label) not in pairs]
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
    factorized, t2v = _first_label(configs, "factorized"), ("t2v@50" if "t2v@50" in settings else None)
    result = BenchResult(list(results.values()), suite.categories,
                         compute_targets(results, suite.categories, report.comparisons), cold_start, setup,
                         summarise_ladder(rungs, lad_rows, suite.categories),
                         variability({**lad_rows, **var_rows}, t2v, factorized) if var_rows else None)
    write_report(report, out, plots=True)
    write_text(out / SCORES, "".join(json.dumps({**r, "video": os.path.relpath(r["video"], out)}) + "\n"
                                     for r in rows))
    if rungs:
        sheet = [r.label for r in rungs if r.label not in (VAE_ROUND_TRIP, ANCHOR_STILLS)]
        contact_sheet(out, suite, sheet, configs, out / "ladder.png", seeds[0])
    write_text(out / "bench.md", to_markdown(result))
    write_json(out / "bench.json", to_json(result))
    plot(result, out / "bench.png")
    return result


def _run_configs(pipe, configs: list[BenchConfig], settings: dict, videos: int, on_config, on_video
                 ) -> tuple[list[dict], list[tuple]]:
    """Generate (resuming) and score each configuration: score rows (mode = the configuration's label)
    and, per configuration, (config, videos, seconds per video, stage seconds, wall, generated)."""
    from .generate import MANIFEST, distributed_state, read_jsonl, run_generation
    from .metrics import score_run

    state = distributed_state("cpu")
    rows, runs = [], []
    for config in configs:
        s = settings[config.label]
        if on_config:
            on_config(config, videos)
        tick = time.perf_counter()
        summary = run_generation(s, on_video=(lambda job, status: on_video(config.label)) if on_video else None,
                                 state=state, pipe=pipe)
        wall = time.perf_counter() - tick
        if summary.failed:
            raise FvgError(f"{config.label}: {summary.failed} video(s) failed, e.g. {summary.errors[0]}")
        score_run(s.out, s.out / "scores.jsonl", [METRIC])
        scored = [r for r in read_jsonl(s.out / "scores.jsonl") if r.get("mode") == config.mode]
        rows += [{**r, "mode": config.label, "video": str(s.out / r["video"])} for r in scored]
        entries = [e for e in read_jsonl(s.out / MANIFEST) if e.get("mode") == config.mode]
        runs.append((config, len(scored), *_mean_timings(entries), wall, summary.generated))
    return rows, runs


def _first_label(configs: list[BenchConfig], mode: str) -> str | None:
    """The configuration of `mode` with the fewest steps (the ladder's method rung), if any."""
    picks = sorted((c.steps, c.label) for c in configs if c.mode == mode)
    return picks[0][1] if picks else None


def _ladder_scores(pipe, out: Path, suite, seeds: list[int], steps: int, configs: list[BenchConfig],
                   on_config, on_video) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Make the reference rungs' and the variability's videos; score them and the configurations'
    (rows by rung label, with check-kind counts), from the MP4s."""
    factorized = _first_label(configs, "factorized")
    videos = make_ladder_videos(pipe, out, suite, seeds, steps, factorized, on_config, on_video)
    videos += [v for c in configs for v in config_ladder_videos(out, c, suite, seeds)]
    rows = ladder_rows(videos, {ANCHOR_STILLS})
    by_rung: dict[str, list[dict]] = {}
    for r in rows:
        by_rung.setdefault(r["mode"], []).append(r)
    var: dict[str, list[dict]] = {}
    if factorized and len(seeds) > 1:
        if on_config:
            for kind in (FIXED_ANCHOR, FIXED_SEED):
                on_config(Rung(kind, "", None), len(suite.prompts) * (len(seeds) - 1))
        groups = make_variability_videos(pipe, out, suite, seeds, steps, factorized, on_video)
        var = {kind: ladder_rows(vs, set()) for kind, vs in groups.items()}
    return by_rung, var


def to_json(result: BenchResult) -> dict:
    return {"setup": result.setup, "categories": result.categories, "cold_start_s": round(result.cold_start_s, 3),
            "configs": [asdict(c) for c in result.configs], "targets": [asdict(t) for t in result.targets],
            "ladder": [asdict(r) for r in result.ladder],
            "variability": asdict(result.variability) if result.variability else None}


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
    return "\n".join(lines + ladder_markdown(result)) + "\n"


def ladder_markdown(result: BenchResult) -> list[str]:
    """The ladder (scores per category, each rung against the one above), pass rates per check kind,
    and the variability measurement."""
    if not result.ladder:
        return []
    cats = result.categories
    lines = ["", "Quality ladder (mean score; each rung against the one above, on the checks both are scored on):", "",
             "| rung | measures | " + " | ".join(c.replace("_", " ") for c in cats) +
             " | mean | vs above | target | met |", "|---" * (len(cats) + 6) + "|"]
    for r in result.ladder:
        diff = "-" if r.diff_vs_above is None else f"{r.diff_vs_above:+.3f}" + (
            " (frame 0)" if r.diff_metric == FRAME0_METRIC else "")
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.label} | {r.measures} | " + " | ".join(f"{r.scores.get(k, float('nan')):.3f}" for k in cats)
                     + f" | **{r.mean:.3f}** | {diff} | {_fmt_value(r.target)} | {met} |")
    kinds = sorted({k for r in result.ladder for k in r.kinds})
    lines += ["", "Pass rate per kind of check:", "", "| rung | " + " | ".join(kinds) + " |",
              "|---" * (len(kinds) + 1) + "|"]
    for r in result.ladder:
        lines.append(f"| {r.label} | " + " | ".join(f"{r.kinds[k]:.2f}" if k in r.kinds else "-" for k in kinds) + " |")
    v = result.variability
    if v is not None:
        lines += ["", f"Variability (mean per-prompt variance of the score over {v.videos_per_prompt} videos):", "",
                  "| what varies | variance |", "|---|---|"]
        lines += [f"| {k} | {'-' if x is None else f'{x:.4f}'} |" for k, x in v.variance.items()]
        lines.append(f"| t2v across seeds / factorized across seeds with the anchor fixed | "
                     f"{_fmt_value(v.t2v_over_fixed_anchor)} |")
    return lines


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
