"""Loss curves of a `mini` run (with a plateau check) and the VAE's reconstruction preview."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from fvg.io import FvgError

from . import models
from .loop import done, read_log
from .settings import load_settings
from .stages import dataset_rows, render_clip, to_pixels, trained_vae_dir, vae_quality

log = logging.getLogger("fvg.miniworld")


def smoothed(rows: list[dict], points: int = 20) -> list[tuple[int, float]]:
    """(last step, mean loss) over `points` equal slices of the log."""
    if not rows:
        return []
    size = max(1, len(rows) // points)
    return [(chunk[-1]["step"], sum(r["loss"] for r in chunk) / len(chunk))
            for chunk in (rows[i:i + size] for i in range(0, len(rows), size))]


def plateau(rows: list[dict], tail: float = 0.2) -> dict:
    """How much the loss still falls over the last `tail` of training: a least-squares line through
    the tail's logged losses, its drop across the tail relative to the tail's mean (a line uses every
    point, so one noisy slice cannot decide it). Under 2% counts as a plateau. Also the mean loss of
    the tail's two halves, to read the same thing without a fit."""
    if len(rows) < 20:
        return {"relative_drop": None, "plateau": None, "tail_halves": None}
    n = len(rows)
    losses = np.array([r["loss"] for r in rows[n - max(4, int(n * tail)):]])
    slope = np.polyfit(np.arange(len(losses)), losses, 1)[0]
    drop = float(-slope * len(losses) / losses.mean())
    half = len(losses) // 2
    return {"relative_drop": round(drop, 4), "plateau": drop < 0.02,
            "tail_halves": [round(float(losses[:half].mean()), 5), round(float(losses[half:].mean()), 5)]}


def write_curves(out: str | Path, png: str | Path | None = None) -> dict:
    """Loss curves of the vae, anchor and t2v stages (and the LoRA's from fvg.train's run.json):
    a summary dict, and a PNG if matplotlib is installed."""
    out = Path(out)
    curves: dict[str, list[dict]] = {n: read_log(out / n / "log.jsonl") for n in ("vae", "anchor", "t2v")}
    run_json = out / "lora" / "run.json"
    if run_json.is_file():
        losses = json.loads(run_json.read_text(encoding="utf-8"))["loss"]["per_step"]
        curves["lora"] = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    summary = {}
    for name, rows in curves.items():
        if rows:
            summary[name] = {"steps": rows[-1]["step"], "seconds": rows[-1].get("elapsed_s"),
                             "s_per_step": round(rows[-1]["elapsed_s"] / rows[-1]["step"], 3)
                             if rows[-1].get("elapsed_s") else None,
                             "curve": [(s, round(v, 4)) for s, v in smoothed(rows)], **plateau(rows)}
    if png is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib is not installed (pip install 'fvg[eval]'): no PNG")
        else:
            names = [n for n in summary]
            fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.2))
            for ax, name in zip(np.atleast_1d(axes), names):
                pts = smoothed(curves[name], 100)
                ax.plot([p[0] for p in pts], [p[1] for p in pts])
                ax.set_title(name)
                ax.set_xlabel("step")
                ax.set_ylabel("loss")
                ax.set_yscale("log")
                ax.grid(alpha=0.3, which="both")
            fig.tight_layout()
            fig.savefig(str(png), dpi=100)
            plt.close(fig)
    return summary


@torch.no_grad()
def vae_preview(out: str | Path, png: str | Path, clips: int = 4) -> dict:
    """Reconstruct the last `clips` training clips (full 17 frames) with the run's VAE (final, else the
    latest checkpoint): a PNG of frames 0, 4, 8, 12, 16 (original row over reconstruction) + metrics."""
    from PIL import Image

    out = Path(out)
    s = load_settings(out)
    final = trained_vae_dir(out, s)
    if (final / "config.json").is_file():
        from diffusers import AutoencoderKLWan

        vae, step = AutoencoderKLWan.from_pretrained(str(final)), s.vae_steps + s.vae_still_steps
    else:  # the first phase's latest checkpoint (a still-scene fine-tune in progress is not previewed)
        ckpt = out / "vae" / "ckpt.pt"
        if not ckpt.is_file():
            raise FvgError(f"no VAE in {out / 'vae'} yet")
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        vae, step = models.build_vae(s.model.vae), state["step"]
        vae.load_state_dict(state["model"])
    vae.eval()
    rows = dataset_rows(out)[-max(clips, 16):]
    frames = np.stack([render_clip(r) for r in rows])
    quality = vae_quality(vae, frames)
    recon = vae.decode(vae.encode(to_pixels(frames[:clips])).latent_dist.mode()).sample.clamp(-1, 1)
    recon = ((recon + 1) * 127.5).round().to(torch.uint8).movedim(1, -1).numpy()
    picks = [0, 4, 8, 12, 16]
    grid = np.concatenate([np.concatenate([np.concatenate(list(a[picks]), 1), np.concatenate(list(b[picks]), 1)], 0)
                           for a, b in zip(frames[:clips], recon)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(str(png))
    return {"step": step, **quality}


@torch.no_grad()
def anchor_stills_score(out: str | Path, limit: int = 3, seeds: tuple[int, ...] = (0,), steps: int = 15,
                        guidance: float = 4.0) -> dict:
    """Quality of a run's anchor model while it trains: its final weights, else the latest checkpoint's
    EMA weights, scored by `score_anchor_pipeline`."""
    pipe, step = run_anchor_pipeline(out)
    return {"step": step, **score_anchor_pipeline(pipe, limit, seeds, steps, guidance)}


def score_anchor_pipeline(pipe, limit: int = 3, seeds: tuple[int, ...] = (0,), steps: int = 15,
                          guidance: float = 4.0) -> dict:
    """A one-frame anchor WanPipeline sampled as the `mini` preset samples anchors (DiffusersAnchorSource)
    for the first-frame captions of MiniCompBench's first `limit` prompts per category, scored on the
    frame-0 checks like the ladder's anchor-stills rung (from the arrays, without MP4), with
    `score.shape_fidelity`'s mean beside them (it moves while the pass/fail checks stay flat)."""
    from fvg.anchor import DiffusersAnchorSource

    from .grammar import first_frame_caption
    from .score import score_anchor, summarize
    from .suite import load_suite

    source = DiffusersAnchorSource(pipe, steps=steps, guidance_scale=guidance)
    scored, fidelity = [], []
    for item in (p for p in load_suite() if p.index <= limit):
        for seed in seeds:
            image = np.asarray(source(first_frame_caption(item.prompt), 64, 64, seed=seed).image)
            score, shape = score_anchor(item.prompt, image)
            scored.append(score)
            fidelity.append(shape)
    summary = summarize(scored)
    return {"mean": summary.mean, "per_category": summary.per_category, "kinds": summary.kinds,
            "shape_fidelity": round(float(np.mean(fidelity)), 4)}


def run_anchor_pipeline(out: str | Path):
    """(the one-frame WanPipeline of a run's anchor model, its step): the assembled pipeline of a finished (or
    reused) stage, which holds the VAE the model learnt on; else the latest checkpoint's EMA weights, with the
    run's frozen text encoder and VAE."""
    from diffusers import AutoencoderKLWan, WanPipeline

    from .stages import text_parts

    out = Path(out)
    assembled = out / "pipelines" / models.ANCHOR_SUBDIR
    if done(out / "anchor") and (out / "anchor" / "final" / "config.json").is_file() and \
            models.is_pipeline_dir(assembled):
        return WanPipeline.from_pretrained(str(assembled)), load_settings(out).anchor_steps
    if not done(out / "latents"):
        raise FvgError(f"{out}: the latents stage is not complete (the anchor model needs its text encoder and VAE)")
    s = load_settings(out)
    tokenizer, encoder = text_parts(out, s)
    vae = AutoencoderKLWan.from_pretrained(str(out / "latents" / "vae"))
    transformer, step = _anchor_transformer(out, s, vae.config.z_dim, encoder.config.d_model)
    return models.assemble_pipeline(tokenizer, encoder, vae, transformer, s.model.flow_shift), step


def _anchor_transformer(out: Path, s, in_channels: int, text_dim: int):
    from diffusers import WanTransformer3DModel

    final = out / "anchor" / "final"
    if (final / "config.json").is_file():
        return WanTransformer3DModel.from_pretrained(str(final)).eval(), s.anchor_steps
    ckpt = out / "anchor" / "ckpt.pt"
    if not ckpt.is_file():
        raise FvgError(f"no anchor model in {out / 'anchor'} yet")
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    model = models.build_transformer(s.model.anchor, in_channels, text_dim)
    model.load_state_dict(state["ema"])
    return model.eval(), state["step"]
