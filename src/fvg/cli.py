"""The `fvg` command line: generate, plan, anchor, animate, presets (and train, eval, studio)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from fvg.console import (ApiKeyEnvOpt, AttentionBackendOpt, CacheOpt, CompileOpt, ContextParallelModeOpt,
                         ContextParallelOpt, PlanCacheOpt, PlannerModelOpt,
                         PlannerOpt, PlannerUrlOpt, StageProgress, console,
                         planner_options, progress_bar, run_app, setup_logging)
from fvg.io import (FvgError, check_output_dir, check_output_file, mp4_is_valid, read_prompt_lines, run_name,
                    save_image, sweep_stale_temps, write_json)
from fvg.presets import DEFAULT_PRESET
from fvg.weight_storage import QUANTIZERS, WeightStorage

app = typer.Typer(help="Factorized Video Generation: plan the first frame, anchor it, then animate.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

PresetOpt = typer.Option(DEFAULT_PRESET, "--preset", "-p", help="Preset name (see `fvg presets`).")
SeedOpt = typer.Option(0, "--seed", help="Seed: the video noise; anchor candidate i uses seed + i.")
MemoryOpt = typer.Option(
    "auto", "--memory", help="auto, gpu, model-offload, group-offload or sequential: how each stage's models "
    "use the device (one stage on it at a time; auto picks the fastest that fits).")
VaeTilingOpt = typer.Option(None, "--vae-tiling/--no-vae-tiling",
                            help="Tile the VAE decode (default: on at 704p and above).")
WeightsOpt = typer.Option("native", "--weights", help="native or fp8: fp8 stores every denoiser's weights in "
                          "float8 and casts each layer to --dtype for its forward (half of bf16).")
QuantizeOpt = typer.Option(None, "--quantize", help="Quantize the denoisers and text encoder while loading: "
                           + "; ".join(f"{q.name}: {q.summary}" for q in QUANTIZERS.values())
                           + ". Needs pip install 'fvg\\[quant]'.")
VideoTransformerOpt = typer.Option(None, "--video-transformer", help="The video transformer from a GGUF file "
                                   "(Wan, original key layout), quantized in memory.")
VideoTransformer2Opt = typer.Option(None, "--video-transformer-2", help="Wan2.2-A14B: the low-noise expert "
                                    "(transformer_2) from a GGUF file.")
StepsOpt = typer.Option(None, "--steps", help="Denoising steps (default: the preset's, 15 factorized / 50 others).")
Lora2Opt = typer.Option(None, "--lora-2", help="Two-expert models (Wan2.2-A14B): the low-noise expert's LoRA, 'same' "
                                               "(the --lora file in both) or 'none' (default: anchor_lora_2* next to "
                                               "--lora).")


GuidanceOpt = typer.Option(None, "--guidance", help="Classifier-free guidance scale.")
LoraOpt = typer.Option(None, "--lora", help="Anchor LoRA (.safetensors, diffusers or Wan keys).")
VideoModelOpt = typer.Option(None, "--video-model", help="Override the video model id/path.")
AnchorModelOpt = typer.Option(None, "--anchor-model", help="Override the text-to-image model.")
HeightOpt = typer.Option(None, "--height")
WidthOpt = typer.Option(None, "--width")
FramesOpt = typer.Option(None, "--frames", help="Frame count, 4n+1.")
FpsOpt = typer.Option(None, "--fps")
DeviceOpt = typer.Option(None, "--device", help="cuda, cpu, ... (default: cuda if available).")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16 or float16.")
CpuOffloadOpt = typer.Option(False, "--cpu-offload", help="Same as --memory model-offload.")
StillStrengthOpt = typer.Option(None, "--still-strength", help="Factorized videos start from the anchor held "
                                "still, noised for the last fraction of the steps (0-1]; an option, not the "
                                "paper's method (Wan family).")


def _pick(cls, params: dict, **overrides):
    """`cls` built from a command's parameters (its `locals()`): the fields it offers as options,
    the rest at their defaults. One helper, so a command lists each option once, in its signature."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in names}, **overrides)


@dataclass(frozen=True)
class _PipelineOptions:
    """The options that choose and load the pipeline (generate, animate, plan, anchor).

    A command that does not offer an option gets the default here, which is `from_preset`'s.
    Typer reads a command's options from its signature, so each command lists the names it
    offers; the flags, defaults and help are declared once, in the `...Opt` objects above.
    """

    preset: str = DEFAULT_PRESET
    lora: Optional[str] = None
    lora_2: Optional[str] = None
    video_model: Optional[str] = None
    anchor_model: Optional[str] = None
    planner: Optional[str] = None
    planner_model: Optional[str] = None
    planner_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    plan_cache: Optional[Path] = None
    height: Optional[int] = None
    width: Optional[int] = None
    frames: Optional[int] = None
    fps: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    cpu_offload: bool = False
    vae_tiling: Optional[bool] = None
    memory: str = "auto"
    weights: str = "native"
    quantize: Optional[str] = None
    video_transformer: Optional[str] = None
    video_transformer_2: Optional[str] = None
    attention_backend: Optional[str] = None
    compile: bool = False
    cache: str = "none"
    context_parallel: int = 1
    context_parallel_mode: str = "ulysses"
    still_strength: Optional[float] = None

    def load(self):
        from fvg.pipeline import FactorizedPipeline

        setup_logging("fvg.animate")  # says which LoRA each expert got when one was found on disk
        storage = WeightStorage(self.weights, self.quantize, self.video_transformer, self.video_transformer_2)
        return FactorizedPipeline.from_preset(
            self.preset, device=self.device, dtype=self.dtype, cpu_offload=self.cpu_offload,
            vae_tiling=self.vae_tiling, memory=self.memory, storage=storage,
            attention_backend=self.attention_backend, compile=self.compile, cache=self.cache,
            context_parallel=self.context_parallel, context_parallel_mode=self.context_parallel_mode,
            planner_options=planner_options(self.api_key_env, self.planner_url, self.plan_cache),
            lora=self.lora, lora_2=self.lora_2, video_model=self.video_model, anchor_model=self.anchor_model,
            planner=self.planner, planner_model=self.planner_model, height=self.height, width=self.width,
            num_frames=self.frames, fps=self.fps, still_strength=self.still_strength,
        )


@dataclass(frozen=True)
class _CallOptions:
    """How each video is made: what `FactorizedPipeline.__call__` takes (generate, animate)."""

    mode: str = "factorized"
    seed: int = 0
    steps: Optional[int] = None
    num_candidates: int = 1
    select: int = 0
    guidance: Optional[float] = None

    def kwargs(self) -> dict:
        return dict(mode=self.mode, seed=self.seed, steps=self.steps, num_candidates=self.num_candidates,
                    selected=self.select, guidance_scale=self.guidance)


def _default_out(prompt: str) -> Path:
    return Path("outputs") / run_name(prompt)


def _warn(warnings: list[str]) -> None:
    for w in dict.fromkeys(warnings):
        console.print(f"[yellow]warning:[/] {escape(w)}")


@dataclass
class _BatchItemSpec:
    """What a batch item's run record must say for a rerun to skip it (see `_is_done`)."""

    mode: str
    seed: int
    steps: int
    settings: dict  # preset fields and guidance, as the run record's "settings" holds them
    candidates: tuple[int, int] | None  # (number, selected) in factorized mode

    @classmethod
    def of(cls, pipe, mode: str, seed: int, steps: Optional[int], guidance: Optional[float],
           num_candidates: int, select: int) -> "_BatchItemSpec":
        preset = asdict(pipe.preset)
        settings = {k: preset[k] for k in ("video_model", "anchor_model", "lora", "lora_2", "height", "width",
                                           "num_frames", "fps", "planner", "planner_model", "negative_prompt")}
        settings["guidance_scale"] = pipe.preset.guidance_scale if guidance is None else guidance
        if not pipe.storage.is_default:  # fp8/quantized/GGUF videos are not the native ones (older records lack it)
            settings["weights"] = pipe.storage.record()
        settings["cache"] = pipe.speed.cache  # a step cache changes the video
        settings["still_strength"] = pipe.preset.still_strength
        return cls(mode, seed, pipe.preset.steps_for(mode) if steps is None else steps, settings,
                   (num_candidates, select) if mode == "factorized" else None)


def _is_done(out: Path, stem: str, prompt: str, spec: _BatchItemSpec) -> bool:
    """A batch item counts as done only if its run record parses, is of this prompt, mode and
    settings, and its video decodes. A garbage record, or one left by another prompt on that
    line, another --mode or other settings, is redone."""
    try:
        record = json.loads((out / f"{stem}.run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        return False
    if (record.get("prompt"), record.get("mode"), record.get("seed"), record.get("steps")) != \
            (prompt, spec.mode, spec.seed, spec.steps):
        return False
    recorded = {"cache": "none", "still_strength": None, **record["settings"]}  # records from before these options
    if any(recorded.get(k) != v for k, v in spec.settings.items()):
        return False
    if spec.candidates is not None:
        anchor = record.get("anchor")
        if not isinstance(anchor, dict) or not isinstance(anchor.get("seeds"), list) or \
                (len(anchor["seeds"]), anchor.get("selected")) != spec.candidates:
            return False
    return mp4_is_valid(out / f"{stem}.mp4")


def _batch_todo(pipe, out: Path, prompt_list: list[str], call: _CallOptions) -> set[int]:
    """Line numbers of the prompts still to generate; sweeps what killed runs left behind first."""
    swept = sweep_stale_temps(out) + [p for d in out.glob("*.candidates") for p in sweep_stale_temps(d)]
    if swept:
        console.print(f"removed {len(swept)} temporary file(s) an interrupted run left in {escape(str(out))}",
                      highlight=False)
    spec = _BatchItemSpec.of(pipe, call.mode, call.seed, call.steps, call.guidance, call.num_candidates, call.select)
    return {i for i, text in enumerate(prompt_list, start=1) if not _is_done(out, f"{i:04d}", text, spec)}


def _check_generate(prompt: Optional[str], prompts: Optional[Path], out: Optional[Path], anchor: Optional[Path],
                    call: _CallOptions) -> None:
    """The option combinations `generate` refuses, before any model loads."""
    from fvg.presets import validate_mode

    validate_mode(call.mode)
    if (prompt is None) == (prompts is None):
        raise FvgError("give either a PROMPT or --prompts FILE")
    if prompts is not None and out is None:
        raise FvgError("--prompts needs --out DIR")
    if anchor is not None and prompts is not None:
        raise FvgError("--anchor applies to a single prompt, not a batch")
    if anchor is not None and call.mode != "factorized":
        raise FvgError(f"an anchor image only applies to mode 'factorized', not '{call.mode}'")
    if prompts is None and not prompt.strip():
        raise FvgError("prompt is empty")
    from fvg.pipeline import validate_call  # torch loads only once the options are right

    validate_call(call.seed, call.num_candidates, call.select, call.steps, call.guidance)


def _generate(prompt: Optional[str], prompts: Optional[Path], out: Optional[Path], anchor: Optional[Path],
              call: _CallOptions, options: _PipelineOptions) -> None:
    """`fvg generate` and `fvg animate`: check, load, skip what a batch already has, then generate."""
    from fvg.parallel import broadcast_from_main, is_main_process, torchrun_world

    world = torchrun_world()
    if options.context_parallel > 1 and world is not None and world.rank != 0:
        console.quiet = True  # rank 0 speaks for all (the ranks run the same steps and fail alike)
    _check_generate(prompt, prompts, out, anchor, call)
    prompt_list = read_prompt_lines(prompts) if prompts else [prompt]
    out_dir = check_output_dir(out or _default_out(prompt))
    pipe = options.load()
    pipe.check_still_start(call.mode, call.steps)
    if anchor is not None:
        pipe.anchor_from_image(anchor)  # validate the image before any model loads
    if pipe.preset.output_is_noise:
        console.print(f"[yellow]note:[/] preset '{pipe.preset.name}' has random weights: its output is noise.")
    if prompts is None:
        pipe.load(call.mode, anchor_model=anchor is None)
        with progress_bar() as progress:
            result = pipe(prompt, anchor_image=anchor, progress=StageProgress(progress), **call.kwargs())
        video = result.save(out_dir)
        _warn(result.warnings)
        console.print(f"wrote {escape(str(video))} ({result.timings['total']:.1f} s)", highlight=False)
        return
    todo = _batch_todo(pipe, out_dir, prompt_list, call) if is_main_process() else None
    todo = broadcast_from_main(todo)  # under context parallelism the ranks must run the same prompts
    if not todo:
        console.print(f"nothing to do: all {len(prompt_list)} videos in {escape(str(out_dir))} are complete "
                      "for these prompts and settings", highlight=False)
        return
    pipe.load(call.mode, anchor_model=True)
    _generate_batch(pipe, prompt_list, todo, call, out)


def _generate_batch(pipe, prompt_list: list[str], todo: set[int], call: _CallOptions, out: Path) -> None:
    """`out/0001.mp4 ...`: the prompts in `todo` (line numbers), one progress bar over all of them."""
    done = skipped = 0
    with progress_bar() as progress:
        overall = progress.add_task("prompts", total=len(prompt_list))
        for index, text in enumerate(prompt_list, start=1):
            stem = f"{index:04d}"
            if index not in todo:
                skipped += 1
            else:
                stages = StageProgress(progress, f"{stem} ")
                result = pipe(text, progress=stages, **call.kwargs())
                stages.done()
                result.save(out, stem=stem)
                _warn(result.warnings)
                done += 1
            progress.advance(overall)
    console.print(f"batch done: {done} generated, {skipped} already present, in {escape(str(out))}",
                  highlight=False)


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The video prompt."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Batch: a text file, one prompt per line."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (batch: DIR/0001.mp4 ...)."),
    preset: str = PresetOpt,
    mode: str = typer.Option("factorized", "--mode", "-m", help="t2v, upsampled or factorized."),
    steps: Optional[int] = StepsOpt,
    seed: int = SeedOpt,
    num_candidates: int = typer.Option(1, "--num-candidates", "-n", help="Anchor candidates to render."),
    select: int = typer.Option(0, "--select", help="Which candidate anchors the video (0-based)."),
    anchor: Optional[Path] = typer.Option(None, "--anchor", help="Use this image as the anchor (skips planning)."),
    guidance: Optional[float] = GuidanceOpt,
    lora: Optional[str] = LoraOpt,
    lora_2: Optional[str] = Lora2Opt,
    video_model: Optional[str] = VideoModelOpt,
    anchor_model: Optional[str] = AnchorModelOpt,
    planner: Optional[str] = PlannerOpt,
    planner_model: Optional[str] = PlannerModelOpt,
    planner_url: Optional[str] = PlannerUrlOpt,
    api_key_env: str = ApiKeyEnvOpt,
    plan_cache: Optional[Path] = PlanCacheOpt,
    height: Optional[int] = HeightOpt,
    width: Optional[int] = WidthOpt,
    frames: Optional[int] = FramesOpt,
    fps: Optional[int] = FpsOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    memory: str = MemoryOpt,
    cpu_offload: bool = CpuOffloadOpt,
    vae_tiling: Optional[bool] = VaeTilingOpt,
    weights: str = WeightsOpt,
    quantize: Optional[str] = QuantizeOpt,
    video_transformer: Optional[str] = VideoTransformerOpt,
    video_transformer_2: Optional[str] = VideoTransformer2Opt,
    attention_backend: Optional[str] = AttentionBackendOpt,
    compile: bool = CompileOpt,
    cache: str = CacheOpt,
    context_parallel: int = ContextParallelOpt,
    context_parallel_mode: str = ContextParallelModeOpt,
    still_strength: Optional[float] = StillStrengthOpt,
):
    """Generate a video (or a batch with --prompts) with the factorized method or a baseline."""
    _generate(prompt, prompts, out, anchor, _pick(_CallOptions, locals()), _pick(_PipelineOptions, locals()))


@app.command()
def plan(
    prompt: str = typer.Argument(..., help="The video prompt."),
    preset: str = PresetOpt,
    planner: Optional[str] = PlannerOpt,
    planner_model: Optional[str] = PlannerModelOpt,
    planner_url: Optional[str] = PlannerUrlOpt,
    api_key_env: str = ApiKeyEnvOpt,
    plan_cache: Optional[Path] = PlanCacheOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the plan to this JSON file."),
):
    """Stage 1 alone: print the first-frame caption and upsampled prompt as JSON."""
    if out:
        check_output_file(out)
    pipe = _pick(_PipelineOptions, locals(), device="cpu").load()
    result = pipe.plan(prompt)
    if out:
        write_json(out, result.to_dict())
    _warn(result.warnings)
    typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))


@app.command()
def anchor(
    prompt: str = typer.Argument(..., help="The video prompt (planned first), or a caption with --caption."),
    caption: bool = typer.Option(False, "--caption", help="PROMPT is already a first-frame caption."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder."),
    preset: str = PresetOpt,
    seed: int = SeedOpt,
    num_candidates: int = typer.Option(4, "--num-candidates", "-n"),
    select: int = typer.Option(0, "--select"),
    anchor_model: Optional[str] = AnchorModelOpt,
    planner: Optional[str] = PlannerOpt,
    planner_model: Optional[str] = PlannerModelOpt,
    planner_url: Optional[str] = PlannerUrlOpt,
    api_key_env: str = ApiKeyEnvOpt,
    height: Optional[int] = HeightOpt,
    width: Optional[int] = WidthOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    weights: str = WeightsOpt,
    quantize: Optional[str] = QuantizeOpt,
):
    """Stages 1-2 alone: plan (unless --caption) and render anchor candidates."""
    if not prompt.strip():
        raise FvgError("prompt is empty")
    from fvg.pipeline import validate_call

    validate_call(seed, num_candidates, select, None, None)
    out_dir = check_output_dir(out or _default_out(prompt))
    pipe = _pick(_PipelineOptions, locals()).load()
    start = time.perf_counter()
    the_plan = None if caption else pipe.plan(prompt)
    text = prompt.strip() if caption else the_plan.first_frame_caption
    with progress_bar() as progress:
        result = pipe.make_anchor(text, seed, num_candidates, select, progress=StageProgress(progress))
    elapsed = time.perf_counter() - start
    (out_dir / "run.json").unlink(missing_ok=True)  # an older record must not describe these new files
    for i, cand in enumerate(result.candidates):
        save_image(out_dir / "candidates" / f"{i:02d}.png", cand.image)
    save_image(out_dir / "anchor.png", result.image)
    if the_plan is not None:
        write_json(out_dir / "plan.json", the_plan.to_dict())
    from fvg.provenance import package_versions

    write_json(out_dir / "run.json", {
        "fvg_run": 1, "stage": "anchor", "prompt": prompt, "caption": text, "seed": seed,
        "anchor": {"model": result.model, "seeds": [c.seed for c in result.candidates], "selected": select,
                   "settings": result.settings},
        "preset": pipe.preset.name, "weights": pipe.storage.for_anchor().record(),
        "timings_s": {"total": round(elapsed, 4)}, "versions": package_versions()})
    console.print(f"wrote {len(result.candidates)} candidates and {escape(str(out_dir / 'anchor.png'))}",
                  highlight=False)


@app.command()
def animate(
    prompt: str = typer.Argument(..., help="The video prompt."),
    anchor: Path = typer.Option(..., "--anchor", help="The first frame (PNG, JPEG or WebP)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o"),
    preset: str = PresetOpt,
    steps: Optional[int] = StepsOpt,
    seed: int = SeedOpt,
    guidance: Optional[float] = GuidanceOpt,
    lora: Optional[str] = LoraOpt,
    lora_2: Optional[str] = Lora2Opt,
    video_model: Optional[str] = VideoModelOpt,
    height: Optional[int] = HeightOpt,
    width: Optional[int] = WidthOpt,
    frames: Optional[int] = FramesOpt,
    fps: Optional[int] = FpsOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    memory: str = MemoryOpt,
    cpu_offload: bool = CpuOffloadOpt,
    vae_tiling: Optional[bool] = VaeTilingOpt,
    weights: str = WeightsOpt,
    quantize: Optional[str] = QuantizeOpt,
    video_transformer: Optional[str] = VideoTransformerOpt,
    video_transformer_2: Optional[str] = VideoTransformer2Opt,
    attention_backend: Optional[str] = AttentionBackendOpt,
    compile: bool = CompileOpt,
    cache: str = CacheOpt,
    context_parallel: int = ContextParallelOpt,
    context_parallel_mode: str = ContextParallelModeOpt,
    still_strength: Optional[float] = StillStrengthOpt,
):
    """Stage 3 alone: animate PROMPT from your own anchor image (one candidate, no planner)."""
    _generate(prompt, None, out, anchor, _pick(_CallOptions, locals()), _pick(_PipelineOptions, locals()))


@app.command()
def presets():
    """List the presets."""
    from rich.table import Table

    from fvg.presets import PRESETS

    table = Table("name", "video model", "anchor model", "size", "frames", "fps", "steps f/b", "notes")
    for p in PRESETS.values():
        notes = "noise (smoke tests)" if p.output_is_noise else ("needs anchor LoRA" if p.needs_lora else "")
        table.add_row(p.name, p.video_model, str(p.anchor_model), f"{p.height}x{p.width}", str(p.num_frames),
                      str(p.fps), f"{p.steps_factorized}/{p.steps_baseline}", notes)
    Console().print(table)


@app.command()
def memory(
    preset: str = PresetOpt,
    gpu_gib: Optional[float] = typer.Option(None, "--gpu-gib", help="GPU memory to plan for (default: the free memory of this GPU)."),
    memory_mode: str = typer.Option("auto", "--memory", help="auto, gpu, model-offload, group-offload or sequential."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Run dtype: bfloat16, float16 or float32."),
    planner: Optional[str] = typer.Option(None, "--planner", help="Count this planner backend (transformers: the LLM)."),
    height: Optional[int] = HeightOpt,
    width: Optional[int] = WidthOpt,
    frames: Optional[int] = FramesOpt,
    vae_tiling: Optional[bool] = typer.Option(None, "--vae-tiling/--no-vae-tiling",
                                              help="Count a tiled decode (default: tiled at 704p and above)."),
    weights: str = WeightsOpt,
    quantize: Optional[str] = QuantizeOpt,
    video_transformer: Optional[str] = VideoTransformerOpt,
    video_transformer_2: Optional[str] = VideoTransformer2Opt,
    context_parallel: int = ContextParallelOpt,
    context_parallel_mode: str = ContextParallelModeOpt,
):
    """Per-stage resident weights and activations of PRESET for each memory mode, without loading weights
    (--weights, --quantize and GGUF transformers as `generate` would store them; with --context-parallel N,
    per process of the N)."""
    from fvg.animate.loading import resolve_dtype
    from fvg.memory import GIB, MODES, device_budget_bytes, estimate
    from fvg.families import get_family
    from fvg.parallel import check_context_parallel_options
    from fvg.presets import get_preset

    if memory_mode != "auto" and memory_mode not in MODES:
        raise FvgError(f"unknown memory mode '{memory_mode}' (choose from: auto, {', '.join(MODES)})")
    p = get_preset(preset, height=height, width=width, num_frames=frames)
    get_family(p.family).check_shape(p.height, p.width, p.num_frames)
    storage = WeightStorage(weights, quantize, video_transformer, video_transformer_2).validate("cuda", planning=True)
    storage.check_memory_mode(memory_mode)
    budget = device_budget_bytes(gpu_gib)
    check_context_parallel_options(context_parallel, context_parallel_mode)  # planning: no torchrun needed
    est = estimate(p, resolve_dtype(dtype, "cuda"), storage=storage, vae_tiling=vae_tiling, planner=planner,
                   context_parallel=context_parallel, cp_mode=context_parallel_mode)
    modes = est.modes if memory_mode == "auto" else (memory_mode,)
    gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    from rich.table import Table

    out = Console()
    stored = ", ".join(f"{k} {v}" for k, v in storage.record().items() if v not in (None, "native"))
    models = Table("stage", "model", "parameters + buffers", "GiB", "stored as", "sized from",
                   title=f"{p.name}: {p.height}x{p.width}x{p.num_frames}, {dtype}{', ' + stored if stored else ''}")
    shown = set()
    for s in est.stages:
        if s.models in shown:  # decode runs on the animate stage's pipeline
            continue
        shown.add(s.models)
        for m in s.models:
            models.add_row(s.name, m.name, f"{m.numel:,}", gib(m.bytes), m.stored_as, m.source)
    out.print(models)
    peaks = Table("stage", "activation GiB", *modes, title="resident weights / peak (GiB) per memory mode")
    for s in est.stages:
        peaks.add_row(f"{s.name} ({s.note})" if s.note else s.name, gib(s.activation_bytes()),
                      *[f"{gib(s.resident_bytes(m))} / {gib(s.peak_bytes(m))}" for m in modes])
    out.print(peaks)
    transient = max(m.transient_bytes for s in est.stages for m in s.models)
    if transient:
        console.print(f"note: peaks include the running layer's weight in {dtype} (fp8 upcast or dequantized; "
                      f"at most {gib(transient)} GiB)", highlight=False)
    for note in est.notes:
        console.print(f"note: {note}")
    chosen = next((m for m in modes if est.peak_bytes(m) <= budget), None)
    if chosen is None:
        best = min(est.peak_bytes(m) for m in modes)
        where = "in every mode" if memory_mode == "auto" else f"in mode {memory_mode}"
        typer.echo(f"fits: no (peak {gib(best)} GiB > {gib(budget)} GiB {where})")
        raise typer.Exit(1)
    typer.echo(f"fits: yes (peak {gib(est.peak_bytes(chosen))} GiB, memory {chosen})")


# Commands that live with their stage register themselves here, one line each.
# (fvg.train.cli, fvg.eval.cli, fvg.studio add `register(app)`.)
from fvg.studio import register as _register_studio; _register_studio(app)  # noqa: E402
from fvg.eval.cli import register as _register_eval; _register_eval(app)  # noqa: E402
from fvg.train.cli import register as _register_train; _register_train(app)  # noqa: E402
from fvg.miniworld.cli import register as _register_miniworld; _register_miniworld(app)  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    code = run_app(app, argv)
    # Under torchrun (--context-parallel) every rank arrives before any leaves. A command that never imported
    # torch joined no process group, and importing it here (fvg.parallel does) would add a second to `--help`.
    if code == 0 and "torch.distributed" in sys.modules:
        from fvg.parallel import leave_process_group

        leave_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
