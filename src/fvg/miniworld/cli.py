"""`fvg miniworld`: the MiniWorld data set and the `mini` preset's training.

    fvg miniworld dataset --out data/mini --clips 1000 --seed 0
    fvg miniworld train --out runs/mini --stage all --resume
    fvg miniworld train --out runs/mini --stage t2v --resume --time-limit 60
    fvg miniworld reuse --out runs/mini --stages t2v,lora
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fvg.console import set_torch_threads, setup_logging
from fvg.io import FvgError

# --threads of the commands that train or measure (train, diagnose): checked by fvg.console.set_torch_threads
ThreadsOpt = typer.Option(None, "--threads", help="torch CPU threads (default: all cores). On a machine shared with "
                                                  "other jobs, 1 is much faster.")

miniworld_app = typer.Typer(help="MiniWorld: training data and the `mini` preset's models.", no_args_is_help=True,
                            add_completion=False, pretty_exceptions_enable=False)


def register(app: typer.Typer) -> None:
    app.add_typer(miniworld_app, name="miniworld")


@miniworld_app.command()
def dataset(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for videos/, first_frames/ and metadata.jsonl."),
    clips: int = typer.Option(..., "--clips", "-n", help="Number of clips."),
    seed: int = typer.Option(0, "--seed"),
    categories: Optional[str] = typer.Option(None, "--categories", help="Comma-separated subset of categories."),
):
    """Render a MiniWorld data set (fvg train's data format: metadata.jsonl with video and caption)."""
    from .dataset import write_dataset
    from .spec import CATEGORIES

    cats = tuple(c.strip() for c in categories.split(",") if c.strip()) if categories else CATEGORIES
    path = write_dataset(out, clips, seed, cats)
    typer.echo(str(path))


@miniworld_app.command()
def suite(
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the prompt files (T2V-CompBench's layout)."),
    seed: int = typer.Option(1, "--seed", help="The sampler's seed (the committed suite's is 20240601)."),
    per_category: int = typer.Option(10, "--per-category", help="Prompts per category."),
):
    """Write held-out MiniCompBench prompts: fresh ones per category, none in the committed suite
    (score them with `fvg bench mini --prompts OUT`)."""
    from .suite import load_suite, write_held_out_suite

    path = write_held_out_suite(out, seed, per_category)
    typer.echo(f"wrote {len(load_suite(path))} prompts in {path}")


@miniworld_app.command()
def train(
    out: Path = typer.Option(Path("runs/mini"), "--out", "-o", help="Run folder (all stages' outputs)."),
    stage: str = typer.Option("all", "--stage", help="data, vae, latents, anchor, t2v, lora, export or all."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted stage from its last checkpoint."),
    profile: Optional[str] = typer.Option(None, "--profile", help="full (default) or tiny (seconds, for tests)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a setting: key=value (TOML value), "
                                                                 "e.g. t2v_steps=8000 or model.flow_shift=3.0."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Minutes: checkpoint and stop after this."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", help="Export target (default: the package's "
                                                                           "weights/mini)."),
    threads: Optional[int] = ThreadsOpt,
    device: str = typer.Option("cpu", "--device", help="Where the vae, latents, anchor and t2v stages train: cpu, "
                                                       "cuda or cuda:N (lora: fvg train's device)."),
    workers: int = typer.Option(1, "--workers", help="Processes that render clips for the vae and latents stages."),
):
    """Train the `mini` preset from scratch in resumable stages (docs/miniworld.md)."""
    from fvg.train.config import parse_set

    from .settings import PROFILES
    from .train import run

    if profile is not None and profile not in PROFILES:
        raise FvgError(f"unknown profile '{profile}' (choose from: {', '.join(PROFILES)})")
    setup_logging("fvg.miniworld", "fvg.train")
    set_torch_threads(threads)
    run(out, stage=stage, resume=resume, profile=profile, overrides=parse_set(set_ or []), time_limit=time_limit,
        weights_dir=weights_dir, device=device, workers=workers)


@miniworld_app.command()
def reuse(
    out: Path = typer.Option(Path("runs/mini"), "--out", "-o", help="Run folder, its latents stage complete."),
    stages: str = typer.Option(..., "--stages", help="Comma-separated stages to take from the export: anchor, "
                                                     "t2v, lora."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="An export (default: the package's "
                                                                   "weights/mini)."),
):
    """Take finished stages from an export instead of training them (a recipe change retrains one model)."""
    from .reuse import reuse_stages

    setup_logging("fvg.miniworld")
    names = reuse_stages(out, weights, [s.strip() for s in stages.split(",") if s.strip()])
    typer.echo(f"reused {', '.join(names)} from {weights or 'the shipped weights'} into {out}")


@miniworld_app.command()
def status(out: Path = typer.Option(Path("runs/mini"), "--out", "-o")):
    """Which stages of a run are complete, and where the unfinished one stands."""
    from fvg.train.trainer import checkpoint_dirs

    from .loop import done_info, read_log
    from .settings import require_run
    from .train import STAGES

    require_run(out)
    for name in STAGES:
        info = done_info(out / name)
        if info is not None:
            typer.echo(f"{name:8s} done   {info}")
            continue
        rows = read_log(out / name / "log.jsonl")
        if rows:
            r = rows[-1]
            typer.echo(f"{name:8s} step {r['step']} loss {r['loss']:.4f} after {r['elapsed_s']:.0f} s")
        elif checkpoints := checkpoint_dirs(out / name):  # the lora stage (`fvg train`) keeps no loss log here
            typer.echo(f"{name:8s} checkpoint {checkpoints[-1].name} (resume with --resume)")
        else:
            typer.echo(f"{name:8s} -")


@miniworld_app.command()
def curves(
    out: Path = typer.Option(Path("runs/mini"), "--out", "-o"),
    png: Optional[Path] = typer.Option(None, "--png", help="Write the loss curves here."),
):
    """Loss curves of a run: steps, seconds per step, smoothed loss and whether it plateaued."""
    import json

    from .curves import write_curves

    summary = write_curves(out, png)
    for name, info in summary.items():
        typer.echo(f"{name}: {info['steps']} steps, {info['s_per_step']} s/step, last-20% fitted relative drop "
                   f"{info['relative_drop']} (plateau: {info['plateau']}; mean loss of its halves "
                   f"{info['tail_halves']})")
        typer.echo("  " + " ".join(f"{step}:{loss:.4f}" for step, loss in info["curve"]))
    if not summary:
        typer.echo(json.dumps({}))


@miniworld_app.command("vae-preview")
def vae_preview(
    out: Path = typer.Option(Path("runs/mini"), "--out", "-o"),
    png: Path = typer.Option(Path("vae_preview.png"), "--png", help="Originals over reconstructions."),
):
    """Reconstruction quality of a run's VAE (final or latest checkpoint): PSNR, palette agreement, a PNG."""
    from .curves import vae_preview as preview

    typer.echo(preview(out, png))


@miniworld_app.command()
def diagnose(
    what: str = typer.Option("text,padding", "--what", help="Comma-separated: text (word order through the text "
                                                            "encoder), padding (the 512-token padding's cost), "
                                                            "patch (a patch-1 video model's step time), "
                                                            "noise (the anchor model from each noise level), "
                                                            "video-noise (the video stage from each noise level), "
                                                            "fit (the T2V base's loss on training against fresh "
                                                            "clips), lost (why a bench's objects are missing at "
                                                            "frame 16; needs --bench), still-code (the VAE's "
                                                            "latent frame 0 against the later ones), vae-rung "
                                                            "(the quality ladder's VAE rung)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights root (default: the shipped mini)."),
    run: Optional[Path] = typer.Option(None, "--run", help="noise: a training run's anchor model (its final "
                                                          "weights, else the latest checkpoint) instead of --weights."),
    limit: int = typer.Option(3, "--limit", help="noise, video-noise: the first N MiniCompBench prompts of each "
                                                 "category."),
    lora: Optional[str] = typer.Option(None, "--lora", help="video-noise: an anchor LoRA file instead of the "
                                                           "weights' own, or 'none' for the base model alone."),
    bench: Optional[Path] = typer.Option(None, "--bench", help="lost: an `fvg bench mini --out` folder."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="still-code, vae-rung: an AutoencoderKLWan directory "
                                                          "(e.g. a run's vae/still/final) instead of the weights' "
                                                          "VAE. still-code normalises by its latents_mean/std: "
                                                          "a run's latents/vae has them measured."),
    threads: Optional[int] = ThreadsOpt,
):
    """Measurements behind the mini recipe (docs/miniworld.md, v2 diagnosis)."""
    from . import diagnose as d

    parts = [w.strip() for w in what.split(",") if w.strip()]
    unknown = sorted(set(parts) - {"text", "padding", "patch", "noise", "video-noise", "fit", "lost",
                                   "still-code", "vae-rung"})
    if unknown or not parts:
        raise FvgError(f"unknown measurement(s) {', '.join(unknown) or '(none)'}: "
                       "choose from text, padding, patch, noise, video-noise, fit, lost, still-code, vae-rung")
    if vae is not None and not {"still-code", "vae-rung"} & set(parts):
        raise FvgError("--vae is only for --what still-code and vae-rung")
    if ("lost" in parts) != (bench is not None):
        raise FvgError("--what lost needs --bench DIR, and --bench is only for --what lost")
    if lora not in (None, "none") and not Path(lora).is_file():
        raise FvgError(f"--lora {lora}: file not found")
    if limit < 1:
        raise FvgError(f"--limit must be at least 1, got {limit}")
    set_torch_threads(threads)
    if "text" in parts:
        for r in d.text_order(d.default_encoders(weights), _tokenizer()):
            typer.echo(f"text {r.encoder}: roles swapped {r.swapped:.3f}, one word changed {r.one_word:.3f} "
                       f"(ratio {r.ratio:.2f})")
    if "padding" in parts:
        for name, t in d.padding_cost(weights).items():
            typer.echo(f"padding {name}: one CFG step {t[512] * 1000:.1f} ms with 512 text tokens, "
                       f"{t[32] * 1000:.1f} ms with 32 ({t[32] / t[512]:.2f}x)")
    if "patch" in parts:
        times = d.patch_cost()
        for name, seconds in times.items():
            base = times[name.split(",")[0] + ", patch 2, 512 text tokens"]
            typer.echo(f"patch: {name}: one CFG step {seconds * 1000:.1f} ms ({seconds / base:.2f}x)")
    if "noise" in parts:
        pipe, step = _anchor_pipeline(run, weights)
        for r in d.noise_restoration(pipe, limit=limit):
            typer.echo(f"noise: restored from sigma {r.sigma:.1f}: frame-0 score {r.mean:.3f} "
                       f"({', '.join(f'{k} {v:.2f}' for k, v in r.kinds.items())}){step}")
    if "video-noise" in parts:
        pipe = _video_pipeline(weights, lora)
        for r in d.video_noise_restoration(pipe, limit=limit):
            typer.echo(f"video-noise: animated from sigma {r.sigma:.1f}: score {r.mean:.3f} "
                       f"({', '.join(f'{k} {v:.2f}' for k, v in r.kinds.items())})")
    if "fit" in parts:
        from .models import read_manifest

        settings = read_manifest(weights).get("settings") or {}
        if not {"seed", "num_clips"} <= set(settings):
            raise FvgError("fit: the weights' manifest.json names no data seed and clip count")
        gaps, repeated = d.fit_gap(_video_pipeline(weights, "none"), settings["seed"], settings["num_clips"])
        for g in gaps:
            typer.echo(f"fit: sigma {g.sigma:.1f}: flow loss {g.train:.4f} on training clips, {g.fresh:.4f} on fresh "
                       f"clips ({g.ratio:.3f}x)")
        typer.echo(f"fit: {repeated} of the fresh clips' captions are training captions too")
    if "lost" in parts:
        for r in d.lost_objects(bench):
            missing = sum(r.reasons.values())
            typer.echo(f"lost: {r.label}: {missing} of {r.objects} objects missing at frame 16"
                       + (f" ({', '.join(f'{k} {n}' for k, n in r.reasons.items())})" if missing else "")
                       + (f"; found at frames {'/'.join(map(str, r.found))}: "
                          + " ".join(f"{v:.2f}" for v in r.found.values()) if r.found else ""))
    the_vae = None
    if {"still-code", "vae-rung"} & set(parts):
        from .stages import load_vae_dir

        the_vae = load_vae_dir(vae, "--vae") if vae is not None else _video_pipeline(weights, "none").vae
    if "still-code" in parts:
        for c in d.still_code(the_vae):
            typer.echo(f"still-code: latent frame {c.frame} against latent frame 0 of still clips: "
                       f"MSE {c.mse:.3f}, a per-pixel linear map explains R^2 {c.linear_r2:.3f}")
    if "vae-rung" in parts:
        r = d.vae_rung(the_vae)
        typer.echo(f"vae-rung: {r.mean:.4f} over {r.videos} videos ("
                   + ", ".join(f"{k} {v:.3f}" for k, v in r.per_category.items()) + ")")


def _video_pipeline(weights: Optional[Path], lora: Optional[str]):
    """The anchored video pipeline with the weights' LoRA, another LoRA file, or none ('none')."""
    from fvg.animate.loading import load_anchor_lora

    from .models import load_video_pipeline

    pipe = load_video_pipeline(weights, lora=lora is None)
    if lora not in (None, "none"):
        load_anchor_lora(pipe, lora)
    return pipe


def _anchor_pipeline(run: Optional[Path], weights: Optional[Path]):
    """(pipeline, label) of a run's anchor model or the shipped one."""
    if run is not None:
        from .curves import run_anchor_pipeline

        pipe, step = run_anchor_pipeline(run)
        return pipe, f" [{run} step {step}]"
    from diffusers import WanPipeline

    from .models import anchor_dir

    root = anchor_dir(weights)
    if not (root / "model_index.json").is_file():
        raise FvgError(f"no anchor pipeline in {root}")
    return WanPipeline.from_pretrained(str(root)), ""


def _tokenizer():
    from .models import build_tokenizer

    return build_tokenizer()


@miniworld_app.command("anchor-score")
def anchor_score(
    out: Path = typer.Option(Path("runs/mini"), "--out", "-o"),
    limit: int = typer.Option(3, "--limit", help="The first N MiniCompBench prompts of each category."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated anchor seeds."),
):
    """Score a run's anchor model (final, else its latest checkpoint) on the frame-0 checks, while it trains."""
    import json

    from .curves import anchor_stills_score

    if limit < 1:
        raise FvgError(f"--limit must be at least 1, got {limit}")
    try:
        seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
    except ValueError:
        raise FvgError(f"bad --seeds '{seeds}': write e.g. 0,1,2") from None
    typer.echo(json.dumps(anchor_stills_score(out, limit, seed_list or (0,))))
