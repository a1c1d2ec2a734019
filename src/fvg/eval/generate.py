"""`fvg eval generate`: every (prompt, mode, seed) video of a suite, sharded over processes.

Work is split by prompt: prompt k goes to process k mod N, so a prompt's plan is made once
and shared by its `upsampled` and `factorized` videos (a paired comparison should differ in
the mode only), and every video has exactly one writer. Each process writes its plan,
anchor and run record under `records/` first and the MP4 last, atomically: a valid MP4 marks
a finished video, and resume skips it. Each process then writes its manifest part; after
`wait_for_everyone` the main process merges them into `manifest.jsonl`.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from fvg.io import (FvgError, mp4_is_valid, parse_json, read_json_object, read_jsonl, read_text_file, save_image,
                    write_json, write_text)
from fvg.presets import DEFAULT_PRESET, MODES, get_preset, validate_mode
from fvg.provenance import utc_timestamp

from .suites import Suite, SuitePrompt, record_relpath, video_relpath

MANIFEST = "manifest.jsonl"
CONFIG = "eval.json"
PART_GLOB = "manifest.part-*.jsonl"


@dataclass(frozen=True)
class VideoJob:
    order: int  # position in the whole run: fixes the manifest order
    group: int  # position of the prompt: the unit of sharding
    item: SuitePrompt
    mode: str
    seed: int
    sample: int  # VBench: index in `<prompt>-<i>.mp4`; compbench layouts: 0
    video: str  # relative to the output folder
    record: str  # folder for plan.json, anchor.png, run.json, relative to the output folder


@dataclass
class GenerateSettings:
    suite: Suite
    modes: list[str]
    seeds: list[int]
    out: Path
    preset: str = DEFAULT_PRESET
    steps: int | None = None  # None: the preset's (15 factorized, 50 baselines)
    overrides: dict = field(default_factory=dict)  # preset fields (video_model, lora, num_frames, ...)
    device: str | None = None
    dtype: str | None = None
    cpu_offload: bool = False
    vae_tiling: bool = False
    planner_options: dict = field(default_factory=dict)
    attention_backend: str | None = None  # speed options (fvg.speed)
    compile: bool = False
    cache: str = "none"
    context_parallel: int = 1  # torchrun processes that split each video (fvg.parallel); 1: shard the suite instead
    context_parallel_mode: str = "ulysses"


@dataclass
class GenerateSummary:
    generated: int
    skipped: int
    failed: int
    seconds: float
    manifest: Path | None  # None on processes other than the main one
    errors: list[str] = field(default_factory=list)


def sample_seed(seeds: list[int], sample: int) -> int:
    """VBench: the i-th video of a prompt uses seeds[i]; past the list, seeds continue by one."""
    return seeds[sample] if sample < len(seeds) else seeds[-1] + sample - len(seeds) + 1


def plan_jobs(suite: Suite, modes: list[str], seeds: list[int]) -> list[VideoJob]:
    """All videos of the run, grouped by prompt; within a prompt, by seed, then mode (paired)."""
    for mode in modes:
        validate_mode(mode)
    if not modes or not seeds:
        raise FvgError("give at least one mode and one seed")
    if len(set(modes)) != len(modes) or len(set(seeds)) != len(seeds):
        raise FvgError("modes and seeds must not repeat")
    jobs: list[VideoJob] = []
    for group, item in enumerate(suite.prompts):
        if suite.layout == "vbench":
            draws = [(sample_seed(seeds, i), i) for i in range(item.samples)]
        else:
            draws = [(seed, 0) for seed in seeds]
        for seed, sample in draws:
            for mode in modes:
                video = video_relpath(suite, item, mode, seed, sample)
                jobs.append(VideoJob(len(jobs), group, item, mode, seed, sample, video, record_relpath(video)))
    return jobs


def shard(jobs: list[VideoJob], rank: int, world: int) -> list[VideoJob]:
    """This process's jobs: whole prompts, round robin, so the union over ranks is every job once."""
    return [j for j in jobs if j.group % world == rank]


def job_share(state, context_parallel: int) -> tuple[int, int]:
    """(rank, world) for `shard`: each process its share of the suite, or, when the processes split every
    video (`context_parallel` > 1), all of them the whole suite."""
    return (0, 1) if context_parallel > 1 else (state.process_index, state.num_processes)


def _fingerprint(settings: GenerateSettings) -> dict:
    # What makes two runs' videos comparable: mixing presets or step counts in one folder would not be, nor
    # prompt sets (the source: a held-out MiniCompBench folder and the committed one share names and layout).
    overrides = {k: v for k, v in sorted(settings.overrides.items()) if v is not None}
    return {"suite": settings.suite.name, "layout": settings.suite.layout, "source": settings.suite.source,
            "preset": settings.preset, "steps": settings.steps, "overrides": overrides,
            "cache": settings.cache}  # a cache changes videos


def check_config(settings: GenerateSettings) -> dict:
    """The run config to write; FvgError if the output folder holds videos made with other settings."""
    path = settings.out / CONFIG
    fingerprint = _fingerprint(settings)
    config = {"fvg_eval": 1, **fingerprint, "modes": settings.modes, "seeds": settings.seeds}
    if path.exists():
        old = _read_config(path)
        old.setdefault("cache", "none")  # folders written before the cache option
        refuse_other_settings(settings.out, old, fingerprint)
        config["modes"] = list(dict.fromkeys([*old.get("modes", []), *settings.modes]))
        config["seeds"] = list(dict.fromkeys([*old.get("seeds", []), *settings.seeds]))
    if (settings.out / MANIFEST).exists():  # merged into at the end: refuse a damaged one now, not after the work
        read_manifest(settings.out)
    return config


def refuse_other_settings(folder: Path, old: dict, fingerprint: dict) -> None:
    """FvgError naming each fingerprint field whose recorded value in `old` differs: a folder's videos
    resume by path, so videos made with other settings must never be mixed in."""
    differ = [k for k in fingerprint if old.get(k) != fingerprint[k]]
    if differ:
        raise FvgError(f"{folder} holds videos made with other settings ({', '.join(differ)}: "
                       f"{', '.join(str(old.get(k)) for k in differ)}): use another --out")


def _read_config(path: Path) -> dict:
    """An existing eval.json, checked field by field: a damaged one is refused, never half-trusted."""
    hint = "delete it (the videos stay) or use another --out"
    try:
        old = read_json_object(path, "fvg eval config")
    except FvgError as exc:
        raise FvgError(f"{exc}: {hint}") from None
    modes, seeds = old.get("modes", []), old.get("seeds", [])
    if not (isinstance(modes, list) and all(isinstance(m, str) for m in modes)
            and isinstance(seeds, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise FvgError(f"{path} is corrupt (its 'modes' or 'seeds' are not lists of names and integers): {hint}")
    return old


def read_record(path: Path) -> dict | None:
    """A record written by an earlier run, or None when it is missing or damaged in any way (binary,
    truncated, not an object): a damaged record is redone, never trusted."""
    try:
        return read_json_object(path)
    except FvgError:
        return None


def _entry(job: VideoJob, out: Path, status: str, rank: int, error: str | None = None) -> dict:
    """A manifest line, filled from the job's records (present for generated and resumed videos)."""
    rec = out / job.record
    run = _job_record(job, out)
    plan = _job_plan(job, out) if job.mode != "t2v" else None
    timings = run.get("timings_s")
    video_prompt = run.get("video_prompt")
    return {
        "suite": None,  # set for every line when the parts are merged
        "category": job.item.category, "index": job.item.index, "sample": job.sample,
        "prompt": job.item.prompt, "video_prompt": video_prompt if isinstance(video_prompt, str) else None,
        "mode": job.mode, "seed": job.seed, "video": job.video, "record": job.record,
        "plan": plan.to_dict() if plan is not None else None,
        "anchor": f"{job.record}/anchor.png" if (rec / "anchor.png").is_file() else None,
        "timings": timings if isinstance(timings, dict) else {}, "status": status, "error": error, "rank": rank,
    }


def _job_record(job: VideoJob, out: Path) -> dict:
    """The job's run.json, or {} when it is missing, damaged or records another video (prompt, mode or
    seed differ: left over from another run in this folder)."""
    run = read_record(out / job.record / "run.json") or {}
    same = (run.get("prompt") == job.item.prompt.strip() and run.get("mode") == job.mode
            and run.get("seed") == job.seed)
    return run if same else {}


def _job_plan(job: VideoJob, out: Path):
    """The job's saved plan, or None when it is missing, damaged or was made for another prompt."""
    from fvg.plan import Plan

    saved = read_record(out / job.record / "plan.json")
    if saved is None:
        return None
    try:
        plan = Plan.from_dict(saved)
    except (FvgError, TypeError, ValueError):
        return None
    return plan if plan.prompt == job.item.prompt.strip() else None


class _PlanStore:
    """One plan per prompt, shared by its modes and seeds; reloaded from records on resume."""

    def __init__(self, pipe, out: Path):
        self.pipe, self.out = pipe, out

    def get(self, jobs: list[VideoJob]) -> tuple[object, float | None]:
        for job in jobs:
            plan = _job_plan(job, self.out) if job.mode != "t2v" else None
            if plan is not None:  # a damaged or foreign record is not reused: plan again
                return plan, None
        start = time.perf_counter()
        plan = self.pipe.plan(jobs[0].item.prompt)
        return plan, time.perf_counter() - start


def _save(result, job: VideoJob, out: Path, suite: Suite, plan_seconds: float | None) -> None:
    from fvg.io import write_mp4

    rec = out / job.record
    if result.anchor is not None:
        save_image(rec / "anchor.png", result.anchor.image)
    if result.plan is not None:
        write_json(rec / "plan.json", result.plan.to_dict())
    record = result.run_record()
    if plan_seconds is not None:  # planning ran once for the prompt; its time goes on this video
        record["timings_s"] = {"plan": round(plan_seconds, 4), **record["timings_s"]}
        record["timings_s"]["total"] = round(sum(v for k, v in record["timings_s"].items() if k != "total"), 4)
    record["eval"] = {"suite": suite.name, "category": job.item.category, "index": job.item.index,
                      "sample": job.sample, "video": job.video}
    write_json(rec / "run.json", record)
    write_mp4(out / job.video, result.frames, fps=result.fps)  # last: a valid MP4 means a finished video


def _grouped(jobs: list[VideoJob]) -> Iterable[list[VideoJob]]:
    groups: dict[int, list[VideoJob]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return groups.values()


def _set_cpu_threads(num_processes: int) -> None:
    # N processes on one CPU would each start one thread per core and fight over them.
    if num_processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes))


def distributed_state(device: str | None = None):
    """accelerate's `PartialState`. Without a GPU it must be told `cpu=True`, or processes started by
    `accelerate launch`/`torchrun` on a CPU machine would each run alone as rank 0 of 1."""
    import torch
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=launched and (device == "cpu" or not torch.cuda.is_available()))


def run_generation(settings: GenerateSettings, on_video: Callable[[VideoJob, str], None] | None = None,
                   state=None, pipe=None) -> GenerateSummary:
    """Generate this process's share of the suite; `state` is an accelerate `PartialState`. `pipe`: an
    already loaded `FactorizedPipeline` of `settings.preset` (e.g. shared by several runs in one process).

    Processes shard the suite, one video each at a time; with `context_parallel` N (= the processes)
    they split every video instead: all run every job, rank 0 decides which are done and alone writes."""
    from fvg.parallel import broadcast_from_main, validate_context_parallel
    from fvg.pipeline import FactorizedPipeline

    state = state or distributed_state(settings.device)
    split_videos = settings.context_parallel > 1
    validate_context_parallel(settings.context_parallel, settings.context_parallel_mode)
    rank, world = job_share(state, settings.context_parallel)
    main = state.is_main_process
    writes = main or not split_videos  # a split video has one writer
    preset = get_preset(settings.preset, **settings.overrides)  # fail on a bad preset before any work
    config = check_config(settings)
    jobs = plan_jobs(settings.suite, settings.modes, settings.seeds)
    mine = shard(jobs, rank, world)
    if main:
        write_json(settings.out / CONFIG, {**config, "updated": utc_timestamp()})
    # One process, or one split video: the pipeline's own device choice (context parallelism takes
    # cuda:<local rank>). Several sharding processes: each its own (cuda:<local rank>).
    device = settings.device or (str(state.device) if world > 1 else None)
    if (device or str(state.device)) == "cpu":
        _set_cpu_threads(state.num_processes)
    planner_options = dict(settings.planner_options)
    if world > 1:  # a local planner LLM would otherwise load on the default GPU in every process
        planner_options.setdefault("device", device)
    pipe = pipe or FactorizedPipeline.from_preset(
        settings.preset, device=device, dtype=settings.dtype, cpu_offload=settings.cpu_offload,
        vae_tiling=settings.vae_tiling, planner_options=planner_options, attention_backend=settings.attention_backend,
        compile=settings.compile, cache=settings.cache, context_parallel=settings.context_parallel,
        context_parallel_mode=settings.context_parallel_mode, **settings.overrides)
    plans = _PlanStore(pipe, settings.out)
    start = time.perf_counter()
    entries: list[tuple[int, dict]] = []
    counts = {"generated": 0, "skipped": 0, "failed": 0}
    errors: list[str] = []
    fatal: FvgError | None = None
    for group in _grouped(mine):
        plan = None
        for job in group:
            done = mp4_is_valid(settings.out / job.video, preset.num_frames) if writes else None
            if split_videos:  # every rank must take the same branch: the writer's view of the folder decides
                done = broadcast_from_main(done)
            if fatal is not None:
                status, error = "failed", f"not run: {fatal}"
            elif done:
                status, error = "skipped", None
            else:
                status, error = "generated", None
                try:
                    plan_seconds = None
                    if job.mode != "t2v" and plan is None:
                        plan, plan_seconds = plans.get(group)
                    result = pipe(job.item.prompt, mode=job.mode, seed=job.seed, steps=settings.steps,
                                  plan=plan if job.mode != "t2v" else None)
                    if writes:
                        _save(result, job, settings.out, settings.suite, plan_seconds)
                except FvgError as exc:  # a user mistake (missing model, bad option) fails every job alike
                    fatal, status, error = exc, "failed", str(exc)
                except Exception as exc:  # e.g. out of memory on one prompt: record it, go on with the rest
                    status, error = "failed", f"{type(exc).__name__}: {exc}"
            counts[status] += 1
            if error:
                errors.append(f"{job.video}: {error}")
            entries.append((job.order, _entry(job, settings.out, status, rank, error)))
            if on_video:
                on_video(job, status)
    if writes:
        _write_part(settings.out, rank, entries)
    state.wait_for_everyone()  # every part is on disk before the main process merges them
    manifest = merge_manifest(settings.out, world, settings.suite.name) if main else None
    state.wait_for_everyone()
    if fatal is not None:
        raise fatal
    return GenerateSummary(counts["generated"], counts["skipped"], counts["failed"],
                           time.perf_counter() - start, manifest, errors)


def _write_part(out: Path, rank: int, entries: list[tuple[int, dict]]) -> None:
    lines = "".join(json.dumps({"order": order, **entry}, ensure_ascii=False) + "\n" for order, entry in entries)
    write_text(out / f"manifest.part-{rank:03d}.jsonl", lines)


def read_manifest(out: Path) -> list[dict]:
    """OUT/manifest.jsonl, every line checked for the fields the eval commands use."""
    path = out / MANIFEST
    hint = f"delete it and rerun `fvg eval generate --out {out}` (finished videos are kept, the manifest is rebuilt)"
    try:
        entries = read_jsonl(path)
    except FvgError as exc:
        raise FvgError(f"{exc}: {hint}") from None
    for number, entry in enumerate(entries, start=1):
        problem = _manifest_problem(entry)
        if problem:
            raise FvgError(f"{path}: entry {number} {problem}: {hint}")
    return entries


def _inside(relpath) -> bool:
    """A path relative to the output folder that stays inside it."""
    return isinstance(relpath, str) and bool(relpath) and not Path(relpath).is_absolute() \
        and ".." not in Path(relpath).parts


def _manifest_problem(entry: dict) -> str | None:
    if not _inside(entry.get("video")) or not entry["video"].endswith(".mp4"):
        return "has no valid 'video' path"
    if entry.get("anchor") is not None and not _inside(entry["anchor"]):
        return "has an invalid 'anchor' path"
    for key in ("prompt", "mode", "category"):
        if not isinstance(entry.get(key), str):
            return f"has no '{key}' text"
    for key in ("index", "seed", "sample"):
        if entry.get(key) is not None and (isinstance(entry[key], bool) or not isinstance(entry[key], int)):
            return f"has a '{key}' that is not an integer"
    return None


def merge_manifest(out: Path, world: int, suite_name: str) -> Path:
    """Merge this run's parts (in job order) into manifest.jsonl, keeping earlier runs' other videos."""
    parts: list[dict] = []
    for rank in range(world):
        part = out / f"manifest.part-{rank:03d}.jsonl"
        if not part.is_file():
            raise FvgError(f"manifest part {part} is missing: process {rank} did not finish")
        parts += read_jsonl(part)
    parts.sort(key=lambda e: e.pop("order"))
    for entry in parts:
        entry["suite"] = suite_name
    path = out / MANIFEST
    new = {e["video"] for e in parts}
    kept = [e for e in read_manifest(out) if e["video"] not in new] if path.is_file() else []
    write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept + parts))
    for part in out.glob(PART_GLOB):  # including stale ones from an interrupted run with more processes
        part.unlink()
    return path


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for mode in modes:
        validate_mode(mode)
    if not modes:
        raise FvgError(f"--modes is empty (choose from: {', '.join(MODES)})")
    return modes


MAX_SEEDS = 10_000  # a run of more videos per prompt is a typo ("0-999999999"), not a plan


def parse_seeds(text: str) -> list[int]:
    """'0,1,2', an inclusive range '0-4', or a mix: '0-2,7'. Sizes are checked before any list is built."""
    from fvg.pipeline import MAX_SEED

    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"([0-9]{1,20})(?:-([0-9]{1,20}))?", part)
        if match is None:
            raise FvgError(f"bad seed list '{text}': use integers from 0 to {MAX_SEED}, e.g. 0,1,2 or 0-4")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi > MAX_SEED:
            raise FvgError(f"seed {hi} in --seeds is out of range: seeds go from 0 to {MAX_SEED}")
        if len(seeds) + hi - lo + 1 > MAX_SEEDS:
            raise FvgError(f"--seeds '{text}' names more than {MAX_SEEDS} seeds")
        seeds += list(range(lo, hi + 1))
    if not seeds:
        raise FvgError("--seeds is empty")
    return seeds
