"""MiniWorld scenes: sample concrete object paths for a prompt, then rasterise them.

Coordinates are continuous: pixel (row i, column j) is the unit square [j, j+1) x [i, i+1),
so the frame spans [0, 64] on both axes and its midline is 32. An object's centre is the
centre of its d x d bounding box. Rasterisation samples pixel centres: a pixel takes the
object's colour when (j + 0.5, i + 0.5) lies inside the shape, with
  - circle:   distance to the centre <= d / 2;
  - square:   cx - d/2 <= x < cx + d/2 and the same for y (a side d covers exactly d pixels);
  - triangle: top <= y < top + d and |x - cx| <= (y - top) / 2 (apex at the top centre,
              base d along the bottom edge, height d).
Colours are the exact palette values; there is no anti-aliasing.

Layout: frame-0 positions are drawn on the integer grid, one object (or pusher-pushed pair)
at a time, uniformly among the positions where its whole path stays 2 px inside the frame,
it keeps 4 px of bounding-box separation from every object placed before at every frame
(stricter than the spec's "no overlap" after frame 0, so decoded videos stay unambiguous;
a pusher and what it pushes are exempt, they touch),
and the first-frame caption holds (side of the frame, relations). A dead end restarts the
layout, with fresh random sizes, up to MAX_TRIES times.
"""

from __future__ import annotations

import zlib

from dataclasses import dataclass

import numpy as np

from ..io import FvgError
from .grammar import (
    REL_VECTORS, Caption, Event, MiniPrompt, Obj, caption_for, caption_objects, parse_caption, parse_prompt,
)
from .spec import (
    BACKGROUNDS, COLORS, DIRECTIONS, MARGIN, NUM_FRAMES, PUSH_GAP, SEPARATION, SIZE, SIZES, STEP, TURN_FRAME,
)

POS_MARGIN = 2  # ours: an object "on the left" has its centre at least 2 px left of the midline
REL_MARGIN = 4  # ours: "A left of B" holds with dx >= |dy| + 4, so decoding noise cannot flip it
MAX_TRIES = 200
_T = np.arange(NUM_FRAMES, dtype=float)
_GRID = np.stack(np.meshgrid(np.arange(SIZE + 1), np.arange(SIZE + 1)), -1).reshape(-1, 2).astype(float)
_PIXELS = np.arange(SIZE) + 0.5
_GROW = np.linspace(SIZES["small"], SIZES["large"], NUM_FRAMES)  # d of a grower, frame by frame


@dataclass(frozen=True, eq=False)
class SceneObject:
    shape: str
    colors: tuple[str, ...]  # per frame
    centers: np.ndarray  # [frames, 2] (x, y)
    sizes: np.ndarray  # [frames] d in px


@dataclass(frozen=True, eq=False)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str = "black"

    @property
    def num_frames(self) -> int:
        return len(self.objects[0].sizes) if self.objects else NUM_FRAMES


def shape_mask(shape: str, cx: float, cy: float, d: float, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of a shape centred at (cx, cy), by pixel-centre sampling."""
    x, y = _PIXELS[None, :size], _PIXELS[:size, None]
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= (d / 2) ** 2
    if shape == "square":
        return (cx - d / 2 <= x) & (x < cx + d / 2) & (cy - d / 2 <= y) & (y < cy + d / 2)
    if shape == "triangle":
        top = cy - d / 2
        return (top <= y) & (y < top + d) & (np.abs(x - cx) <= (y - top) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render_frame(scene: Scene, t: int) -> np.ndarray:
    frame = np.empty((SIZE, SIZE, 3), np.uint8)
    frame[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        frame[shape_mask(o.shape, *o.centers[t], o.sizes[t])] = COLORS[o.colors[t]]
    return frame


def render_video(scene: Scene) -> np.ndarray:
    """The scene as uint8 frames [17, 64, 64, 3]."""
    return np.stack([render_frame(scene, t) for t in range(scene.num_frames)])


def sample_scene(prompt: str | MiniPrompt, rng: np.random.Generator) -> Scene:
    """A random concrete scene (17 frames) that realises `prompt` and satisfies its first-frame caption."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    events = [e for o, e in zip(p.objects, p.events) for _ in range(o.count)]
    return _sample(caption_for(p), events, rng, str(p))


REFERENCE_SALT = 0x5EED


def reference_clip(prompt: str, seed: int) -> np.ndarray:
    """The reference scene of (prompt, seed), rendered [17, 64, 64, 3]: the quality ladder's "rendered"
    rung and the clip the diagnoses start from, drawn from rng((salt, seed, crc32(prompt)))."""
    rng = np.random.default_rng([REFERENCE_SALT, seed, zlib.crc32(prompt.encode("utf-8"))])
    return render_video(sample_scene(prompt, rng))


def render_first_frame(caption: str | Caption, rng: np.random.Generator) -> np.ndarray:
    """A random frame-0 image [64, 64, 3] satisfying a first-frame caption: an oracle anchor.

    Only the caption is known, so no room is reserved for motion that might follow.
    """
    c = parse_caption(caption) if isinstance(caption, str) else caption
    return render_frame(_sample(c, [None] * len(caption_objects(c)), rng, str(c)), 0)


def _sample(caption: Caption, events: list[Event | None], rng: np.random.Generator, what: str) -> Scene:
    for _ in range(MAX_TRIES):
        scene = _try_layout(caption, events, rng)
        if scene is not None:
            return scene
    raise FvgError(f"cannot lay out a MiniWorld scene for {what!r} in {MAX_TRIES} tries")


def _try_layout(caption: Caption, events: list[Event | None], rng: np.random.Generator) -> Scene | None:
    objs = caption_objects(caption)
    sides, relations = _constraints(caption)
    offsets, sizes, colors = _motions(objs, events, rng)

    # "A just left of B" places B beside A with a 4-10 px gap, aligned; if A pushes, B
    # stays still until A closes the gap, then moves with A, touching it.
    attached: dict[int, np.ndarray] = {}  # index of B -> its frame-0 offset from A
    for b, (a, rel) in relations.items():
        if rel.startswith("just "):
            u = np.array(REL_VECTORS[rel], float)
            gap = int(rng.integers(PUSH_GAP[0], PUSH_GAP[1] + 1))
            attached[b] = u * (sizes[a][0] / 2 + gap + sizes[b][0] / 2)
            if events[a] is not None and events[a].kind == "pushes":
                offsets[b] = np.maximum(0.0, STEP * _T - gap)[:, None] * u

    paths: list[np.ndarray | None] = [None] * len(objs)
    for i in range(len(objs)):
        if i in attached:
            continue  # placed with the object it is attached to
        unit = [(i, np.zeros(2))] + [(b, off) for b, off in attached.items() if relations[b][0] == i]
        ok = np.ones(len(_GRID), bool)
        for j, off in unit:
            path = _GRID[:, None, :] + off + offsets[j][None]  # [candidates, frames, 2]
            half = sizes[j][None, :, None] / 2
            ok &= ((path - half >= MARGIN) & (path + half <= SIZE - MARGIN)).all(axis=(1, 2))
            ok &= _on_side(path[:, 0], sides[j])
            for k, other in enumerate(paths):
                if other is not None:
                    gap = np.abs(path - other[None]) - (sizes[j] + sizes[k])[None, :, None] / 2
                    ok &= (gap.max(axis=2) >= SEPARATION).all(axis=1)
            if j in relations and j not in attached:
                a, rel = relations[j]
                ok &= _holds(paths[a], path, rel)
        if not ok.any():
            return None
        choice = _GRID[rng.choice(np.flatnonzero(ok))]
        for j, off in unit:
            paths[j] = choice + off + offsets[j]
    objects = tuple(SceneObject(o.shape, c, p, s) for o, c, p, s in zip(objs, colors, paths, sizes))
    return Scene(objects, caption.background)


def _constraints(caption: Caption) -> tuple[list[str | None], dict[int, tuple[int, str]]]:
    """Per object (caption order): its side of the frame; and B -> (A, REL) for each "A REL B"."""
    sides: list[str | None] = []
    relations: dict[int, tuple[int, str]] = {}
    for it in caption.items:
        if it.other:
            relations[len(sides) + 1] = (len(sides), it.relation)
            sides += [None, None]
        else:
            sides += [it.position] * it.obj.count
    return sides, relations


def _motions(objs: list[Obj], events: list[Event | None], rng: np.random.Generator):
    """Per object: centre offsets from frame 0 [frames, 2], sizes [frames], colours per frame."""
    offsets, sizes, colors = [], [], []
    for o, e in zip(objs, events):
        kind = e.kind if e else None
        step = np.array(DIRECTIONS[e.direction], float) if kind in ("moves", "pushes") else np.zeros(2)
        offsets.append(STEP * _T[:, None] * step)
        d = SIZES[o.size or ("small", "large")[rng.integers(2)]]  # an unnamed size is random
        sizes.append({"grows": _GROW, "shrinks": _GROW[::-1]}.get(kind, np.full(NUM_FRAMES, float(d))))
        new = e.color if kind == "turns" else o.color
        colors.append(tuple(o.color if t < TURN_FRAME else new for t in range(NUM_FRAMES)))
    return offsets, sizes, colors


def _on_side(centers: np.ndarray, side: str | None) -> np.ndarray:
    """Which frame-0 centres [candidates, 2] lie in the named half of the frame."""
    if side is None:
        return np.ones(len(centers), bool)
    axis = 0 if side in ("left", "right") else 1
    mid = SIZE / 2
    return centers[:, axis] <= mid - POS_MARGIN if side in ("left", "top") else centers[:, axis] >= mid + POS_MARGIN


def _holds(a: np.ndarray, b: np.ndarray, rel: str) -> np.ndarray:
    """'A REL B' with REL_MARGIN to spare at every frame; a: [frames, 2], b: [candidates, frames, 2]."""
    u = np.array(REL_VECTORS[rel], float)
    delta = b - a[None]
    along = delta @ u
    across = np.abs(delta @ u[::-1])
    return (along >= across + REL_MARGIN).all(axis=1)

