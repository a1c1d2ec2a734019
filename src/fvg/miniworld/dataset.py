"""MiniWorld training data: rendered clips, their prompts and first-frame captions.

Layout of `out_dir`:
    videos/000001.mp4 ...        17 frames, 64x64, 8 fps
    first_frames/000001.png ...  frame 0 of each clip: the anchor model's training images
    metadata.jsonl               one row per clip: video, first_frame (relative paths),
                                 caption (the prompt), first_frame_caption, category, seed

Clip i is drawn from its own seed, derived from (seed, i), with categories taken in turn,
so a dataset is reproducible and its first n clips do not depend on how many follow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from rich.progress import track

from ..io import FvgError, save_image, write_mp4, write_text
from .grammar import MiniPrompt, first_frame_caption, sample_prompt
from .render import Scene, render_video, sample_scene
from .spec import CATEGORIES, FPS


def clip_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def sample_clip(category: str, seed: int) -> tuple[MiniPrompt, Scene]:
    """The prompt and scene of one clip, reproducible from its seed."""
    rng = np.random.default_rng(seed)
    prompt = sample_prompt(rng, category)
    return prompt, sample_scene(prompt, rng)


def clip_prompt(index: int, seed: int, categories: tuple[str, ...] | list[str] = CATEGORIES) -> MiniPrompt:
    """Clip `index`'s prompt alone, without its scene (drawn after the prompt from the same generator,
    and most of the cost): the captions of a whole data set in a second."""
    return sample_prompt(np.random.default_rng(clip_seed(seed, index)), categories[index % len(categories)])


def clip_row(index: int, seed: int, categories: tuple[str, ...] | list[str] = CATEGORIES) -> tuple[dict, Scene]:
    """Clip `index` of the data set drawn from `seed`: its metadata.jsonl row and its scene."""
    category, s = categories[index % len(categories)], clip_seed(seed, index)
    prompt, scene = sample_clip(category, s)
    name = f"{index + 1:06d}"
    return {
        "video": f"videos/{name}.mp4",
        "first_frame": f"first_frames/{name}.png",
        "caption": str(prompt),
        "first_frame_caption": first_frame_caption(prompt),
        "category": category,
        "seed": s,
    }, scene


def write_dataset(
    out_dir: str | os.PathLike, num_clips: int, seed: int, categories: tuple[str, ...] | list[str] = CATEGORIES
) -> Path:
    """Render `num_clips` clips into `out_dir`; returns the metadata path (written last)."""
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise FvgError(f"unknown MiniWorld categories {unknown}; expected some of {', '.join(CATEGORIES)}")
    if num_clips < 1:
        raise FvgError(f"num_clips must be at least 1, got {num_clips}")
    out = Path(out_dir)
    rows = []
    for i in track(range(num_clips), description="Rendering MiniWorld clips", disable=num_clips < 100):
        row, scene = clip_row(i, seed, categories)
        frames = render_video(scene)
        write_mp4(out / row["video"], frames, FPS)
        save_image(out / row["first_frame"], frames[0])
        rows.append(row)
    metadata = out / "metadata.jsonl"
    write_text(metadata, "".join(json.dumps(row) + "\n" for row in rows))
    return metadata
