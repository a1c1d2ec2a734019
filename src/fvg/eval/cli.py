"""`fvg eval`: generate benchmark videos, score them locally, import official scores, report.

Also runnable as a module, which is how `accelerate launch` starts one process per GPU:

    accelerate launch -m fvg.eval.cli generate --suite t2v-compbench --suite-dir T2V-CompBench ...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from fvg.console import (ApiKeyEnvOpt, AttentionBackendOpt, CacheOpt, CompileOpt, ContextParallelModeOpt,
                         ContextParallelOpt, PlanCacheOpt, PlannerModelOpt,
                         PlannerOpt, PlannerUrlOpt, console,
                         planner_options, progress_bar, run_app, setup_logging)
from fvg.io import FvgError
from fvg.presets import DEFAULT_PRESET

eval_app = typer.Typer(help="Benchmark videos (T2V-CompBench, VBench 2.0, MiniCompBench, prompt files): "
                            "generate, score, import official scores, report.",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


bench_app = typer.Typer(help="Reproduce the paper's comparisons (scores and wall times) on a preset.",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
    app.add_typer(bench_app, name="bench")


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


@eval_app.command()
def generate(
    suite: str = typer.Option(..., "--suite", help="t2v-compbench, vbench2, minicompbench, or a .txt prompt file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: OUT/<mode>/... in the benchmark's layout."),
    suite_dir: Optional[Path] = typer.Option(None, "--suite-dir",
                                             help="T2V-CompBench checkout (or its prompts/); VBench 2.0 full-info "
                                                  "JSON or folder of <Dimension>.txt files; MiniCompBench: another "
                                                  "prompt folder (`fvg miniworld suite`)."),
    preset: str = typer.Option(DEFAULT_PRESET, "--preset", "-p", help="Preset name (see `fvg presets`)."),
    modes: str = typer.Option("t2v,upsampled,factorized", "--modes", help="Comma-separated modes."),
    seeds: str = typer.Option("0", "--seeds", help="Seeds, e.g. 0,1,2,3,4 or 0-4; shared by all modes. VBench: "
                                                   "the i-th video of a prompt uses the i-th seed."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default: the preset's per mode)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N prompts of each category."),
    categories: Optional[str] = typer.Option(None, "--categories", help="Only these categories/dimensions."),
    samples: Optional[int] = typer.Option(None, "--samples",
                                          help="VBench: videos per prompt (default 3, Diversity 20)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the videos this run would write, generate nothing."),
    lora: Optional[str] = typer.Option(None, "--lora", help="Anchor LoRA."),
    lora_2: Optional[str] = typer.Option(None, "--lora-2", help="Two-expert models: the low-noise expert's LoRA, "
                                                              "'same' or 'none' (default: anchor_lora_2* next to "
                                                              "--lora)."),
    video_model: Optional[str] = typer.Option(None, "--video-model"),
    anchor_model: Optional[str] = typer.Option(None, "--anchor-model"),
    planner: Optional[str] = PlannerOpt,
    planner_model: Optional[str] = PlannerModelOpt,
    planner_url: Optional[str] = PlannerUrlOpt,
    api_key_env: str = ApiKeyEnvOpt,
    plan_cache: Optional[Path] = PlanCacheOpt,
    height: Optional[int] = typer.Option(None, "--height"),
    width: Optional[int] = typer.Option(None, "--width"),
    frames: Optional[int] = typer.Option(None, "--frames"),
    fps: Optional[int] = typer.Option(None, "--fps"),
    device: Optional[str] = typer.Option(None, "--device", help="Default: this process's accelerate device."),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    cpu_offload: bool = typer.Option(False, "--cpu-offload"),
    vae_tiling: bool = typer.Option(False, "--vae-tiling"),
    attention_backend: Optional[str] = AttentionBackendOpt,
    compile: bool = CompileOpt,
    cache: str = CacheOpt,
    context_parallel: int = ContextParallelOpt,
    context_parallel_mode: str = ContextParallelModeOpt,
):
    """Generate every (prompt, mode, seed) video of a suite; resumable; shard with `accelerate launch`, or split
    each video over the processes with `torchrun ... --context-parallel N`."""
    from .generate import (GenerateSettings, check_config, distributed_state, job_share, parse_modes, parse_seeds,
                           plan_jobs, run_generation, shard)
    from .suites import load_suite

    if steps is not None and steps < 1:
        raise FvgError(f"--steps must be at least 1, got {steps}")
    from fvg.speed import SpeedOptions, validate_speed

    validate_speed(SpeedOptions(attention_backend, compile, cache, context_parallel,
                                context_parallel_mode))  # before any folder is written
    the_suite = load_suite(suite, suite_dir, samples).select(_split(categories), limit)
    mode_list, seed_list = parse_modes(modes), parse_seeds(seeds)
    if dry_run:
        for job in plan_jobs(the_suite, mode_list, seed_list):
            typer.echo(job.video)
        return
    overrides = dict(lora=lora, lora_2=lora_2, video_model=video_model, anchor_model=anchor_model, planner=planner,
                     planner_model=planner_model, height=height, width=width, num_frames=frames, fps=fps)
    settings = GenerateSettings(the_suite, mode_list, seed_list, out, preset, steps,
                                {k: v for k, v in overrides.items() if v is not None}, device, dtype, cpu_offload,
                                vae_tiling, planner_options(api_key_env, planner_url, plan_cache),
                                attention_backend, compile, cache, context_parallel, context_parallel_mode)
    setup_logging("fvg.animate")  # says which LoRA each expert got when one was found on disk
    check_config(settings)  # before any progress bar: a refused folder is a one-line error
    state = distributed_state(device)
    rank, world = job_share(state, context_parallel)
    sharded = world > 1
    if context_parallel > 1 and not state.is_main_process:
        console.quiet = True  # rank 0 speaks for all: the ranks run the same videos
    total = len(shard(plan_jobs(the_suite, mode_list, seed_list), rank, world))
    label = f"rank {state.process_index}/{state.num_processes} videos" if sharded else "videos"
    with progress_bar(disable=not state.is_main_process) as progress:
        task = progress.add_task(label, total=total)
        summary = run_generation(settings, on_video=lambda job, status: progress.advance(task), state=state)
    who = f"rank {state.process_index}: " if sharded else ""
    console.print(f"{who}{summary.generated} generated, {summary.skipped} already present, {summary.failed} failed "
                  f"in {summary.seconds:.1f} s")
    for error in summary.errors[:5]:
        console.print(f"[red]failed:[/] {error}", highlight=False)
    if summary.manifest is not None:
        console.print(f"manifest: {summary.manifest}")
    if summary.failed:  # an error exit, so scripts notice; the rerun retries exactly the failed videos
        raise FvgError(f"{summary.failed} video(s) failed (see the manifest's 'error' fields): run again to retry them")


@eval_app.command()
def score(
    out: Path = typer.Argument(..., help="The folder `fvg eval generate` wrote (with manifest.jsonl)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP model folder or hub id (for clip, consistency)."),
    metrics: Optional[str] = typer.Option(None, "--metrics",
                                          help="clip,consistency,motion,anchor,minicompbench (default: all that "
                                               "can run; clip and consistency need --clip)."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Output JSONL (default OUT/scores.jsonl)."),
    device: Optional[str] = typer.Option(None, "--device"),
    rescore: bool = typer.Option(False, "--rescore", help="Recompute rows an earlier run already scored."),
):
    """Local metrics for every generated video: CLIP similarity, anchor fidelity, consistency, motion."""
    from .generate import MANIFEST, read_manifest
    from .metrics import parse_metrics, score_run

    metric_list = parse_metrics(metrics, clip)
    if not (out / MANIFEST).is_file():
        raise FvgError(f"no {MANIFEST} in {out}: run `fvg eval generate --out {out}` first")
    total = len(read_manifest(out))
    with progress_bar() as progress:
        task = progress.add_task("scoring", total=total)
        summary = score_run(out, scores or out / "scores.jsonl", metric_list, clip, device, rescore,
                            on_video=lambda _entry: progress.advance(task))
    for note in summary.notes[:3]:
        console.print(f"[yellow]note:[/] left out {note}", highlight=False)
    console.print(f"{summary.scored} scored, {summary.reused} unchanged, {summary.missing} missing -> {summary.path}")


@eval_app.command()
def check(
    out: Path = typer.Argument(..., help="The folder `fvg eval generate` wrote."),
    suite: Optional[str] = typer.Option(None, "--suite", help="t2v-compbench, vbench2, minicompbench or a .txt "
                                                              "prompt file (default: the one in OUT/eval.json)."),
    suite_dir: Optional[Path] = typer.Option(None, "--suite-dir", help="As for `generate` (default: from eval.json)."),
    categories: Optional[str] = typer.Option(None, "--categories", help="Only these categories/dimensions."),
    compbench_dir: Optional[Path] = typer.Option(None, "--compbench-dir", help="T2V-CompBench checkout, for its "
                                                                              "meta_data/ (else $COMPBENCH)."),
    tools_dir: Optional[Path] = typer.Option(None, "--tools-dir", help="Folder holding LLaVA/, Depth-Anything/, "
                                                                       "Grounded-Segment-Anything/, dot/ (else "
                                                                       "$TOOLS, else the current folder)."),
    vbench_dir: Optional[Path] = typer.Option(None, "--vbench-dir", help="VBench-2.0 folder holding evaluate.py "
                                                                         "(else $VBENCH2)."),
    script: Optional[Path] = typer.Option(None, "--script", help="Write the commands to this file "
                                                                 "(default: print them)."),
):
    """Refuse a folder the official evaluators would mis-pair; print their exact commands for it."""
    from fvg.io import write_text

    from .check import check_run
    from fvg.io import read_json_object

    from .generate import CONFIG
    from .suites import MINICOMPBENCH_SOURCE, load_suite

    if suite is None:
        if not (out / CONFIG).is_file():
            raise FvgError(f"no {CONFIG} in {out}: pass --suite (and --suite-dir) as for `fvg eval generate`")
        config = read_json_object(out / CONFIG, "fvg eval config")
        suite = config.get("suite")
        if not isinstance(suite, str) or not isinstance(config.get("source"), str):
            raise FvgError(f"{out / CONFIG} names no suite: pass --suite")
        if suite == "file":
            suite = config["source"]
        elif suite_dir is None and (suite in ("t2v-compbench", "vbench2") or
                                    (suite == "minicompbench" and config["source"] != MINICOMPBENCH_SOURCE)):
            suite_dir = Path(config["source"])
    the_suite = load_suite(suite, suite_dir).select(_split(categories))
    # Absolute: the script changes folder before it uses them.
    folders = {name: str(path.resolve()) for name, path in (("compbench_dir", compbench_dir), ("tools_dir", tools_dir),
                                                            ("vbench_dir", vbench_dir)) if path is not None}
    report = check_run(out, the_suite, **folders)
    for note in report.notes[:10]:
        console.print(f"[yellow]note:[/] {note}", highlight=False, markup=True)
    if len(report.notes) > 10:
        console.print(f"[yellow]note:[/] and {len(report.notes) - 10} more", markup=True)
    text = "\n".join(report.commands) + "\n" if report.commands else ""
    if script is not None and text:
        write_text(script, text)
        script.chmod(0o755)
    elif text:
        typer.echo(text, nl=False)
    console.print(f"ok: {report.videos} videos in {report.folders} folders are laid out as the official "
                  f"evaluators pair them" + (f"; commands in {script}" if script is not None and text else ""),
                  highlight=False)


@eval_app.command("import")
def import_(
    tool: str = typer.Argument(..., help="t2v-compbench or vbench2."),
    files: List[Path] = typer.Argument(..., help="The official scripts' outputs: T2V-CompBench's final CSVs "
                                                 "(intermediate ones are skipped), VBench 2.0's "
                                                 "*_eval_results.json."),
    to: Path = typer.Option(..., "--to", help="Score JSONL to add the rows to (e.g. OUT/official.jsonl)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Mode of these results (default: from the "
                                                            "--t2v-model name or the path)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="T2V-CompBench: seed (default: from the name or "
                                                            "a seed<N> folder)."),
    category: Optional[str] = typer.Option(None, "--category", help="T2V-CompBench: category of a renamed CSV "
                                                                    "(default: from the script's file name)."),
):
    """Official evaluators' results as score rows, for `fvg eval report`."""
    from fvg.presets import validate_mode

    from .importers import import_files, merge_rows

    if mode is not None:
        validate_mode(mode)
    rows, skipped = import_files(tool, files, mode, seed, category)
    try:
        merge_rows(to, rows)
    except OSError as exc:
        raise FvgError(f"cannot write {to}: {exc.strerror or exc}") from None
    scores = sum(1 for r in rows if r.get("aggregate"))
    console.print(f"imported {scores} official score(s) and {len(rows) - scores} per-video rows from "
                  f"{len(files) - len(skipped)} file(s) into {to}"
                  + (f"; skipped {len(skipped)} intermediate file(s)" if skipped else ""), highlight=False)


@eval_app.command()
def report(
    scores: List[Path] = typer.Argument(..., help="Score JSONL files (from `score` and `import`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: report.md/.csv/.json, paired.csv, plots/."),
    compare: Optional[str] = typer.Option(None, "--compare",
                                          help="TREATMENT:BASELINE pairs (default: each mode:t2v and "
                                               "factorized:upsampled)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="PNG plots (needs matplotlib: fvg[eval])."),
):
    """Mode x category tables, plots and paired comparisons with bootstrap intervals."""
    from .report import build_report, load_rows, parse_pairs, write_report

    the_report = build_report(load_rows(scores), parse_pairs(compare) if compare else None)
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            console.print("[yellow]note:[/] matplotlib is not installed (pip install 'fvg[eval]'): no plots")
            plots = False
    try:
        written = write_report(the_report, out, plots=plots)
    except OSError as exc:
        raise FvgError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    typer.echo(Path(out / "report.md").read_text(encoding="utf-8"))
    console.print(f"wrote {len(written)} files in {out}")


@bench_app.command("mini")
def bench_mini(
    out: Path = typer.Option(Path("runs/bench-mini"), "--out", "-o", help="Output folder (resumable)."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Seeds shared by every configuration, e.g. 0-2."),
    configs: str = typer.Option("t2v@50,upsampled@50,factorized@50,factorized@15,t2v@15", "--configs",
                                help="MODE@STEPS configurations to compare."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N prompts of each category."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A MiniCompBench prompt folder other than the "
                                           "committed suite, e.g. held-out prompts from `fvg miniworld suite`."),
    preset: str = typer.Option("mini", "--preset", "-p", help="A preset that makes MiniWorld videos."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: all cores)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="A preset field for every configuration, "
                                             "FIELD=VALUE, e.g. anchor_guidance=6 or guidance_scale=1 (repeatable)."),
):
    """MiniCompBench scores and wall times of t2v, upsampled and factorized at 50 and 15 steps."""
    from fvg.presets import preset_overrides
    from fvg.train.config import parse_set

    from .bench import parse_configs, run_bench
    from .generate import parse_seeds

    config_list, seed_list = parse_configs(configs), parse_seeds(seeds)
    overrides = preset_overrides(preset, parse_set(set_ or []))
    with progress_bar() as progress:
        tasks: dict[str, int] = {}

        def on_config(config, total):
            tasks[config.label] = progress.add_task(config.label, total=total)

        result = run_bench(out, preset, config_list, seed_list, limit, threads, overrides,
                           on_video=lambda label: progress.advance(tasks[label]), on_config=on_config,
                           prompt_dir=prompts)
    typer.echo((out / "bench.md").read_text(encoding="utf-8"))
    console.print(f"cold start {result.cold_start_s:.2f} s; wrote {out / 'bench.md'}, bench.json, bench.png, report.*")


@bench_app.command("compare")
def bench_compare(
    base: Path = typer.Argument(..., help="The bench to compare against, e.g. the shipped weights' (an `fvg bench "
                                          "mini --out` folder)."),
    new: Path = typer.Argument(..., help="The bench of the change: the same prompts and seeds."),
    base_also: Optional[list[Path]] = typer.Option(None, "--base-also", help="Another bench of BASE's weights on "
                                                   "other seeds, pooled with it (repeatable)."),
    new_also: Optional[list[Path]] = typer.Option(None, "--new-also", help="Another bench of NEW's weights on "
                                                  "other seeds, pooled with it (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write compare.md and compare.json here."),
):
    """Two benches of the same prompts and seeds, paired video by video: NEW - BASE per configuration and
    ladder rung, with 95% bootstrap intervals."""
    from fvg.io import check_output_dir

    from .bench_compare import compare_benches, to_markdown, write_comparison

    if out is not None:
        check_output_dir(out)
    base, new = [base, *(base_also or [])], [new, *(new_also or [])]
    comparisons = compare_benches(base, new)
    typer.echo(to_markdown(comparisons, base, new))
    if out is not None:
        try:
            written = write_comparison(comparisons, base, new, out)
        except OSError as exc:
            raise FvgError(f"cannot write into {out}: {exc.strerror or exc}") from None
        console.print(f"wrote {', '.join(str(p) for p in written)}")


def main(argv: list[str] | None = None) -> int:
    """`python -m fvg.eval.cli`: the eval commands alone, with fvg's error convention (one line, exit 2)."""
    return run_app(eval_app, argv)


if __name__ == "__main__":
    sys.exit(main())
