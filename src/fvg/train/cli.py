"""`fvg train` and `fvg train-export`.

Mounted into the main CLI with `register(app)`; also runs on its own, which is how
multi-GPU runs start:

    fvg train --config configs/train/wan2.1-1.3b.toml
    accelerate launch --config_file configs/accelerate/ddp.yaml -m fvg.train.cli --config configs/train/wan2.1-1.3b.toml
    fvg train --config ... --resume latest
    fvg train-export runs/anchor-lora/checkpoints/step_003000 --out lora-3000/

(`-m fvg.train.cli` takes `train` as the default command.)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from fvg.console import run_app, setup_logging



def _setup_logging() -> None:
    # Under accelerate/torchrun only rank 0 reports progress; the others speak up for errors only.
    setup_logging("fvg.train", level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.ERROR)


def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Training TOML (configs/train/*.toml)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' or a checkpoint folder."),
    model: Optional[str] = typer.Option(None, "--model", help="Wan or CogVideoX checkpoint id/dir, or "
                                                              "builtin:tiny-wan / builtin:tiny-cogvideox."),
    data: Optional[str] = typer.Option(None, "--data", help="Clips folder or metadata.jsonl/csv."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Run folder."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Latent cache root."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Per process."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),
    learning_rate: Optional[float] = typer.Option(None, "--lr"),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank (paper: 256)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha (scale = alpha / rank)."),
    p_anchor: Optional[float] = typer.Option(None, "--p-anchor", help="Share of anchored samples (paper: 1.0)."),
    height: Optional[int] = typer.Option(None, "--height"),
    width: Optional[int] = typer.Option(None, "--width"),
    frames: Optional[int] = typer.Option(None, "--frames", help="4n+1."),
    fps: Optional[int] = typer.Option(None, "--fps"),
    expert: Optional[str] = typer.Option(None, "--expert", help="A14B: transformer, transformer_2 or both."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="no or bf16."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every"),
    validation_every: Optional[int] = typer.Option(None, "--validation-every", help="0 disables validation."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any setting, key=value in TOML syntax."),
):
    """Train the anchor LoRA (clean latent frame 0 at timestep 0) on a Wan or CogVideoX T2V model."""
    from fvg.train.config import load_config, parse_set
    from fvg.train.trainer import train as run_training

    _setup_logging()
    overrides = {
        "model": model, "data": data, "output_dir": output_dir, "cache_dir": cache_dir, "max_steps": max_steps,
        "batch_size": batch_size, "gradient_accumulation_steps": grad_accum, "learning_rate": learning_rate,
        "rank": rank, "alpha": alpha, "p_anchor": p_anchor, "height": height, "width": width, "num_frames": frames,
        "fps": fps, "expert": expert, "mixed_precision": mixed_precision, "seed": seed,
        "checkpoint_every": checkpoint_every, "validation_every": validation_every, "num_workers": num_workers,
    }
    overrides.update(parse_set(set_ or []))
    cfg = load_config(config, overrides)
    result = run_training(cfg, resume=resume)
    if result.lora_files:
        typer.echo(f"LoRA: {result.lora_files.get('transformer.diffusers') or next(iter(result.lora_files.values()))}")


def train_export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder (OUTPUT/checkpoints/step_XXXXXX)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the exported LoRA files."),
):
    """Export a training checkpoint's LoRA in diffusers and original Wan/ComfyUI key formats."""
    from fvg.train.export import export_checkpoint

    for name, path in export_checkpoint(checkpoint, out).items():
        typer.echo(f"{name}: {path}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("train-export")(train_export)


app = typer.Typer(help="Anchor-LoRA training for Factorized Video Generation.", add_completion=False,
                  pretty_exceptions_enable=False)
register(app)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (also under `accelerate launch -m fvg.train.cli`): `train` is the default command;
    user mistakes print one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "train-export", "--help"):
        argv.insert(0, "train")
    return run_app(app, argv)


if __name__ == "__main__":
    sys.exit(main())
