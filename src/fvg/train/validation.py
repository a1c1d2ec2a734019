"""Validation during training: factorized-mode samples with the LoRA being trained.

Each item is a prompt and an anchor image (the first frame of a held-out clip, or an image
or video named in the config). Prompts and anchors are encoded once before training, so the
text encoder can leave the GPU; every validation then runs `AnchoredWanPipeline` with the
training transformer(s), exactly as `fvg generate --mode factorized` would, and writes
`validation/step_XXXXXX/NN.mp4` (+ `NN.anchor.png`, `prompts.json`).

Under FSDP or ZeRO-3 every process must take part in each forward, so all processes
sample all items (same seeds) and only the main process writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fvg.io import FvgError, load_image, save_image, write_json, write_mp4
from fvg.train.data import ClipError, load_clip

log = logging.getLogger("fvg.train")


@dataclass
class ValidationItem:
    prompt: str
    anchor: Image.Image
    source: str
    prompt_embeds: torch.Tensor | None = None
    anchor_latents: torch.Tensor | None = None


def anchor_from_file(path: str, cfg) -> Image.Image:
    """An image, or the first frame of a video, fitted to the training resolution."""
    p = Path(path)
    if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}:
        from fvg.anchor import fit_to_resolution

        return fit_to_resolution(load_image(p), cfg.height, cfg.width)
    if not p.is_file():
        raise FvgError(f"validation anchor not found: {p}")
    try:
        return Image.fromarray(load_clip(p, 1, cfg.fps, cfg.height, cfg.width)[0])
    except ClipError as exc:
        raise FvgError(f"validation anchor {p}: {exc}") from None


def held_out_items(entries: list[dict], cfg) -> list[ValidationItem]:
    items = []
    for entry in entries:
        try:
            frame = load_clip(Path(entry["video"]), 1, cfg.fps, cfg.height, cfg.width)[0]
        except ClipError as exc:  # cannot happen for a cached clip unless the file changed since
            log.warning("validation clip %s skipped: %s", entry["video"], exc)
            continue
        items.append(ValidationItem(entry["caption"], Image.fromarray(frame), entry["video"]))
    return items


@torch.no_grad()
def prepare(pipe, items: list[ValidationItem], cfg, device) -> torch.Tensor | None:
    """Encode prompts, the empty negative prompt and the anchors while the encoders are loaded."""
    for item in items:
        item.prompt_embeds, _ = pipe.encode_prompt(item.prompt, do_classifier_free_guidance=False,
                                                   max_sequence_length=cfg.max_sequence_length, device=device)
        item.anchor_latents = pipe.encode_anchor(item.anchor, cfg.height, cfg.width)
    if not items or cfg.validation_guidance <= 1.0:
        return None
    negative, _ = pipe.encode_prompt("", do_classifier_free_guidance=False,
                                     max_sequence_length=cfg.max_sequence_length, device=device)
    return negative


@torch.no_grad()
def run_validation(pipe, items: list[ValidationItem], negative_embeds, cfg, step: int, accelerator) -> Path | None:
    out_dir = Path(cfg.output_dir) / "validation" / f"step_{step:06d}"
    videos = []
    for i, item in enumerate(items):
        with accelerator.autocast():
            frames = pipe(
                prompt_embeds=item.prompt_embeds, negative_prompt_embeds=negative_embeds,
                anchor_latents=item.anchor_latents, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                num_inference_steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance,
                generator=torch.Generator().manual_seed(cfg.seed + i), output_type="np",
                max_sequence_length=cfg.max_sequence_length,
            ).frames[0]
        videos.append(frames)
    if not accelerator.is_main_process:
        return None
    for i, (item, frames) in enumerate(zip(items, videos)):
        write_mp4(out_dir / f"{i:02d}.mp4", frames, fps=cfg.fps)
        save_image(out_dir / f"{i:02d}.anchor.png", item.anchor)
    write_json(out_dir / "prompts.json", [{"video": f"{i:02d}.mp4", "prompt": it.prompt, "anchor_from": it.source}
                                          for i, it in enumerate(items)])
    _log_images(accelerator, videos, step)
    return out_dir


def _log_images(accelerator, videos: list[np.ndarray], step: int) -> None:
    """First, middle and last frame side by side in TensorBoard (its video panel needs moviepy)."""
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except Exception:
        return
    if not hasattr(writer, "add_image"):
        return
    for i, frames in enumerate(videos):
        strip = np.concatenate([frames[0], frames[len(frames) // 2], frames[-1]], axis=1)
        writer.add_image(f"validation/{i:02d}", np.clip(strip, 0, 1), step, dataformats="HWC")
