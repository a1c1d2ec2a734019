"""A tiny synthetic training set: coloured squares sliding over a plain background.

For smoke runs and tests of `fvg train` without real data: every clip is an MP4 whose
caption names the square's colour and direction ("a red square moves right"), in one of
the three layouts `fvg.train.data` reads. Captions use only words the tiny tokenizer knows.

    python -m fvg.train.synthetic runs/tiny-data --clips 16
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from fvg.io import write_json, write_mp4, write_text

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "orange": (245, 140, 30),
          "purple": (150, 60, 210), "cyan": (50, 210, 220)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = {"black": (16, 16, 16), "white": (240, 240, 240)}


def moving_square(color: str, direction: str, background: str, num_frames: int, size: int,
                  rng: np.random.Generator) -> np.ndarray:
    """[T, size, size, 3] uint8: a square crossing half the frame in `direction`."""
    side = max(4, size // 4)
    travel = size / 2
    dx, dy = DIRECTIONS[direction]
    start = np.array([size / 2 - dx * travel / 2, size / 2 - dy * travel / 2]) + rng.uniform(-2, 2, 2)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = BACKGROUNDS[background]
    for t in range(num_frames):
        cx, cy = start + np.array([dx, dy]) * travel * t / max(num_frames - 1, 1)
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        frames[t, max(y0, 0):max(y0 + side, 0), max(x0, 0):max(x0 + side, 0)] = COLORS[color]
    return frames


def write_synthetic_dataset(out_dir: str | Path, num_clips: int = 8, num_frames: int = 17, size: int = 64,
                            fps: int = 8, seed: int = 0, layout: str = "jsonl") -> list[Path]:
    """Write `num_clips` clips; `layout` is "jsonl" (metadata.jsonl), "csv" (metadata.csv) or "txt"
    (same-stem captions). Returns the video paths."""
    if layout not in ("jsonl", "csv", "txt"):
        raise ValueError(f"layout must be jsonl, csv or txt, got {layout}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows, paths = [], []
    for i in range(num_clips):
        color = list(COLORS)[rng.integers(len(COLORS))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        background = "white" if rng.random() < 0.25 else "black"
        caption = f"a {color} square moves {direction}" + (" on a white background" if background == "white" else "")
        path = out_dir / "clips" / f"{i:04d}.mp4"
        write_mp4(path, moving_square(color, direction, background, num_frames, size, rng), fps=fps)
        if layout == "txt":
            write_text(path.with_suffix(".txt"), caption + "\n")
        rows.append({"video": f"clips/{i:04d}.mp4", "caption": caption})
        paths.append(path)
    if layout == "jsonl":
        write_text(out_dir / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    elif layout == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=["video", "caption"])
        writer.writeheader()
        writer.writerows(rows)
        write_text(out_dir / "metadata.csv", buffer.getvalue())
    write_json(out_dir / "synthetic.json", {"num_clips": num_clips, "num_frames": num_frames, "size": size,
                                            "fps": fps, "seed": seed, "layout": layout})
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=["jsonl", "csv", "txt"], default="jsonl")
    args = parser.parse_args(argv)
    paths = write_synthetic_dataset(args.out_dir, args.clips, args.frames, args.size, args.fps, args.seed, args.layout)
    print(f"wrote {len(paths)} clips to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
