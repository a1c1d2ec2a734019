"""MiniCompBench's evaluator: exact checks of a MiniWorld video against its prompt.

Only frames 0 and 16 are judged (SPEC.md, "What correct means"). Each pixel takes the
nearest palette colour (backgrounds included); 4-connected regions of one object colour
with at least 12 px are candidate objects. A region's shape is the ideal shape that
matches it best: for each of circle, square and upright triangle we rasterise the shape
with the region's area, placed so its centroid falls on the region's centroid, and keep
the highest intersection-over-union (a region whose best IoU is under 0.5 is noise,
e.g. a thin line of chroma bleed). Template matching rather than the bare fill ratio
(~0.79 / 1.0 / 0.5) keeps small pixelated disks from reading as squares. An object's
centre is the centre of its fitted shape (for a triangle, d/6 above the centroid), the
same convention as the renderer.

Objects are found in frame 0 by colour and shape, and followed to frame 16 by their final
colour (after `turns`) and shape, nearest first. A named size is checked too (the spec
leaves only unnamed sizes unchecked): small when the fitted d is under 13 px. A prompt's
score is the share of its checks that pass; a missing object fails every check that
needs it.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..io import FvgError, read_mp4, to_uint8
from .grammar import REL_VECTORS, Event, MiniPrompt, Obj, parse_prompt
from .render import shape_mask
from .spec import (
    BACKGROUNDS, COLORS, DIRECTIONS, FILL_RATIOS, GROW_RATIO, LAST, MAX_STILL, MIN_PUSHED_TRAVEL, MIN_REGION,
    MIN_TRAVEL, SHRINK_RATIO, SIZE, SIZES,
)

PALETTE_NAMES = (*BACKGROUNDS, *COLORS)
_PALETTE = np.array([*BACKGROUNDS.values(), *COLORS.values()], float)
MIN_IOU = 0.5  # ours: below this a region is no shape at all
SMALL_BELOW = (SIZES["small"] + SIZES["large"]) / 2  # 13 px
FRAME0_SUFFIX = "(frame 0)"  # how the names of frame-0 checks end


@dataclass(frozen=True)
class Region:
    color: str
    shape: str
    area: int
    center: tuple[float, float]  # (x, y) of the fitted shape's centre
    side: float  # fitted d

    def describe(self) -> str:
        return f"{self.color} {self.shape}, {self.area} px at ({self.center[0]:.1f}, {self.center[1]:.1f})"


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class PromptScore:
    prompt: str
    category: str
    score: float  # share of checks passed, in [0, 1]
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def quantize(frame: np.ndarray) -> np.ndarray:
    """Index into PALETTE_NAMES of the nearest palette colour, per pixel: [H, W] int."""
    dist = ((frame[..., None, :].astype(float) - _PALETTE) ** 2).sum(-1)
    return dist.argmin(-1)


def find_regions(frame: np.ndarray) -> list[Region]:
    """The candidate objects of one frame [64, 64, 3] (noise and shapeless regions dropped)."""
    return _regions(_components(quantize(frame)))


def _regions(components) -> list[Region]:
    regions = (_classify(pixels, color) for color, pixels in components)
    return [r for r in regions if r is not None]


def _components(labels: np.ndarray):
    """(colour name, pixels [n, 2] as (y, x)) of each 4-connected region of one object colour."""
    seen = labels < len(BACKGROUNDS)  # background colours are never objects
    grid = labels.tolist()
    for y0, x0 in np.argwhere(~seen):
        if seen[y0, x0]:
            continue
        color, pixels, queue = grid[y0][x0], [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < SIZE and 0 <= nx < SIZE and not seen[ny, nx] and grid[ny][nx] == color:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        yield PALETTE_NAMES[color], np.array(pixels)


def _shape_iou(pixels: np.ndarray, shape: str) -> tuple[float, tuple[float, float], float]:
    """(IoU, centre, d) of a region against the ideal `shape` of its area placed on its centroid."""
    area = len(pixels)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[pixels[:, 0], pixels[:, 1]] = True
    cy, cx = pixels.mean(0) + 0.5
    d = float(np.sqrt(area / FILL_RATIOS[shape]))
    center = (cx, cy - d / 6 if shape == "triangle" else cy)  # a triangle's centroid is d/6 below centre
    template = shape_mask(shape, *center, d)
    iou = float((mask & template).sum() / (mask | template).sum())
    return iou, (float(center[0]), float(center[1])), d


def _classify(pixels: np.ndarray, color: str) -> Region | None:
    if len(pixels) < MIN_REGION:
        return None
    best = None
    for shape in FILL_RATIOS:
        iou, center, d = _shape_iou(pixels, shape)
        if best is None or iou > best[0]:
            best = (iou, Region(color, shape, len(pixels), center, d))
    return best[1] if best[0] >= MIN_IOU else None


def shape_fidelity(prompt: str | MiniPrompt, frame: str | os.PathLike | np.ndarray) -> float:
    """A diagnostic, not part of the spec's score: how close frame 0 comes to drawing the named
    objects, in [0, 1]. For each object of the prompt (each copy of a counted group), the best IoU
    of a region of its colour (with the evaluator's MIN_REGION pixels at least: specks fit any
    template) with the ideal shape it names, fitted as the evaluator fits it; missing objects count
    0. The spec's checks are pass/fail at IoU 0.5 and a blob fails them as surely as noise does,
    so while a model learns to draw shapes they stay flat; this rises with every outline that gets
    closer. `frame`: as `score_first_frame` takes it."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return _fidelity(p, list(_components(quantize(_frame0(frame)))))


def _fidelity(p: MiniPrompt, components: list) -> float:
    slots = []
    for o in p.objects:
        ious = sorted((_shape_iou(px, o.shape)[0] for c, px in components if c == o.color and len(px) >= MIN_REGION),
                      reverse=True)
        slots += (ious + [0.0] * o.count)[:o.count]
    return float(np.mean(slots))


def _frame0(video: str | os.PathLike | np.ndarray) -> np.ndarray:
    """Frame 0 as uint8 [64, 64, 3] from an MP4, frames [T, 64, 64, 3] or one frame, or a one-line error."""
    frames = read_mp4(video) if isinstance(video, (str, os.PathLike)) else to_uint8(np.asarray(video))
    frame = frames if frames.ndim == 3 else frames[0]
    if frame.shape != (SIZE, SIZE, 3):
        raise FvgError(f"a MiniWorld frame is {SIZE}x{SIZE} RGB, got {frame.shape}")
    return frame


def score_video(prompt: str | MiniPrompt, video: str | os.PathLike | np.ndarray) -> PromptScore:
    """Score one video against its prompt: an MP4 path, or frames [T, 64, 64, 3] (T >= 17),
    uint8 or float in [0, 1] as diffusers returns them."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    frames = _video(video)
    first, last = find_regions(frames[0]), find_regions(frames[LAST])
    checks = _checks(p, first, last)
    checks.append(_background_check(p.background, frames[0], frames[LAST]))
    return PromptScore(str(p), p.category, sum(c.passed for c in checks) / len(checks), checks)


def _video(video: str | os.PathLike | np.ndarray) -> np.ndarray:
    frames = read_mp4(video) if isinstance(video, (str, os.PathLike)) else to_uint8(np.asarray(video))
    if frames.ndim != 4 or frames.shape[0] <= LAST or frames.shape[1:] != (SIZE, SIZE, 3):
        raise FvgError(f"a MiniWorld video has at least {LAST + 1} frames of {SIZE}x{SIZE} RGB, got {frames.shape}")
    return frames


def why_missing(prompt: str | MiniPrompt, video: str | os.PathLike | np.ndarray) -> list[str]:
    """A diagnostic, not part of the spec's score: for each single object whose presence check fails in the
    last frame, what the frame holds of it. "colour gone": no region of its final colour large enough to be
    an object (merged into another one, or faded); "read as <shape>": its colour's largest region fits that
    other shape's outline best (corners rounded off make squares and triangles circles); "no shape fits": a
    shapeless blob; "there": found, but claimed by another object of the same colour and shape. `video`: as
    `score_video` takes it."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    frames = _video(video)
    components = list(_components(quantize(frames[LAST])))  # labelled once: for the regions and the colours
    _, at16 = _track(p, find_regions(frames[0]), _regions(components))
    reasons = []
    for i, (o, e) in enumerate(zip(p.objects, p.events)):
        if o.count > 1 or at16[i] is not None:
            continue
        color = _final_color(o, e)
        mine = [px for c, px in components if c == color and len(px) >= MIN_REGION]
        region = _classify(max(mine, key=len), color) if mine else None
        reasons.append("colour gone" if not mine else "no shape fits" if region is None else
                       "there" if region.shape == o.shape else f"read as {region.shape}")
    return reasons


def score_first_frame(prompt: str | MiniPrompt, video: str | os.PathLike | np.ndarray) -> PromptScore:
    """Only the checks of frame 0 (presence, named size, count, relation, background): how an anchor
    image is judged on its own. A still video would fail every change check by construction, so
    the text-to-image stage is scored on the checks it is responsible for. `video`: an MP4, frames
    [T, 64, 64, 3], or one frame [64, 64, 3]."""
    return score_anchor(prompt, video)[0]


def score_anchor(prompt: str | MiniPrompt, video: str | os.PathLike | np.ndarray) -> tuple[PromptScore, float]:
    """`score_first_frame` and `shape_fidelity` of one image, its colours labelled once."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    frame = _frame0(video)
    components = list(_components(quantize(frame)))
    regions = _regions(components)
    checks = [c for c in _checks(p, regions, regions) if c.name.endswith(FRAME0_SUFFIX)]
    checks.append(_background_check(p.background, frame))
    return PromptScore(str(p), p.category, sum(c.passed for c in checks) / len(checks), checks), _fidelity(p, components)


@dataclass(frozen=True)
class ScoreSummary:
    mean: float  # the mean of the per-category means (each category counts alike)
    per_category: dict[str, float]  # grammar category -> mean score, in first-seen order
    kinds: dict[str, float]  # kind of check (`check_kind`) -> pass rate, sorted by kind


def summarize(results: list[PromptScore]) -> ScoreSummary:
    """Means per category and pass rates per kind of check over scored prompts (scores to 4 places,
    pass rates to 3), as the anchor-model diagnoses report them."""
    scores: dict[str, list[float]] = {}
    kinds: dict[str, list[bool]] = {}
    for result in results:
        scores.setdefault(result.category, []).append(result.score)
        for c in result.checks:
            kinds.setdefault(check_kind(c.name), []).append(c.passed)
    per_category = {c: round(float(np.mean(v)), 4) for c, v in scores.items()}
    return ScoreSummary(round(float(np.mean(list(per_category.values()))), 4), per_category,
                        {k: round(float(np.mean(v)), 3) for k, v in sorted(kinds.items())})


def check_kind(name: str) -> str:
    """What a check tests, from its name: present, size, count, relation, moves, stays still, grows,
    shrinks, turns, pushes or background (for tables of pass rates per kind)."""
    head = name.split(":", 1)[0].split(" ")[0]
    return {"move": "moves", "stays": "stays still"}.get(head, head)


def _background_check(background: str, *frames: np.ndarray) -> Check:
    found = [PALETTE_NAMES[np.bincount(quantize(f).ravel()).argmax()] for f in frames]
    ok = all(f == background for f in found)
    return Check(f"background {background}", ok, f"most common colour: {', '.join(found)}")


def _checks(p: MiniPrompt, first: list[Region], last: list[Region]) -> list[Check]:
    at0, at16 = _track(p, first, last)
    checks: list[Check] = []
    for i, (o, e) in enumerate(zip(p.objects, p.events)):
        if o.count > 1:
            for t, regions in ((0, first), (LAST, last)):
                n = len(_of(regions, o.color, o.shape))
                checks.append(Check(f"count: {o.label()} (frame {t})", n == o.count, f"found {n}"))
            continue
        end = Obj(_final_color(o, e), o.shape)
        checks.append(_present(f"{o.label()} (frame 0)", at0[i], o))
        checks.append(_present(f"{end.label()} (frame {LAST})", at16[i], end))
        if o.size:  # a named size is checked; growers and shrinkers end at the other size
            size16 = {"grows": "large", "shrinks": "small"}.get(e.kind if e else None, o.size)
            checks.append(_size_check(o, 0, at0[i], o.size))
            checks.append(_size_check(o, LAST, at16[i], size16))
    for i, (o, e) in enumerate(zip(p.objects, p.events)):
        if e is None:
            continue
        name = f"{e.phrase(plural=o.count > 1)}: {o.label()}"
        if o.count > 1:  # a group moves when its mean centre does
            a, b = (_mean_center(_of(r, o.color, o.shape)) for r in (first, last))
            checks.append(_motion_check(name, a, b, e.direction))
        elif e.kind == "pushes":
            checks.append(_push_check(name, at0[0], at16[0], at0[1], at16[1], e.direction))
        else:
            checks.append(_event_check(name, e, at0[i], at16[i], last))
    if p.relation:
        for t, a, b in ((0, at0[0], at0[1]), (LAST, at16[0], at16[1])):
            name = f"relation: {p.objects[0].label()} {p.relation} {p.objects[1].label()} (frame {t})"
            if a is None or b is None:
                checks.append(Check(name, False, "an object is missing"))
            else:
                along, across = _along_across(a.center, b.center, REL_VECTORS[p.relation])
                checks.append(Check(name, along > 0 and along > across, f"{a.describe()}; {b.describe()}"))
    return checks


def _track(p: MiniPrompt, first: list[Region], last: list[Region]):
    """Each single object's region in frame 0 (the largest of its colour and shape) and in
    frame 16 (of its final colour and shape, matched nearest-first to where it started)."""
    singles = [i for i, o in enumerate(p.objects) if o.count == 1]
    at0 = {i: max(_of(first, o.color, o.shape), key=lambda r: r.area, default=None) for i, o in enumerate(p.objects)}
    ends = {i: [k for k, r in enumerate(last) if (r.color, r.shape) == (_final_color(p.objects[i], p.events[i]),
                                                                       p.objects[i].shape)] for i in singles}
    pairs = sorted((_dist(at0[i].center, last[k].center), i, k) for i in singles if at0[i] for k in ends[i])
    at16: dict[int, Region | None] = {i: None for i in singles}
    used: set[int] = set()
    for _, i, k in pairs:
        if at16[i] is None and k not in used:
            at16[i] = last[k]
            used.add(k)
    for i in singles:  # missing in frame 0: any unclaimed candidate still counts as present
        if at0[i] is None:
            at16[i] = max((last[k] for k in ends[i] if k not in used), key=lambda r: r.area, default=None)
    return at0, at16


def _event_check(name: str, e: Event, a: Region | None, b: Region | None, last: list[Region]) -> Check:
    if a is None or (b is None and e.kind != "turns"):  # turns only needs where it started
        return Check(name, False, "not found")
    if e.kind == "moves":
        return _motion_check(name, a.center, b.center, e.direction)
    if e.kind == "stays still":
        moved = _dist(a.center, b.center)
        return Check(name, moved < MAX_STILL, f"travelled {moved:.1f} px")
    if e.kind in ("grows", "shrinks"):
        ratio = b.area / a.area
        return Check(name, ratio >= GROW_RATIO if e.kind == "grows" else ratio <= SHRINK_RATIO, f"area ratio {ratio:.2f}")
    # turns: follow the object by position and shape, whatever its colour now
    now = min((r for r in last if r.shape == a.shape), key=lambda r: _dist(a.center, r.center), default=None)
    return Check(name, now is not None and now.color == e.color, now.describe() if now else "not found")


def _of(regions: list[Region], color: str, shape: str) -> list[Region]:
    return [r for r in regions if r.color == color and r.shape == shape]


def _final_color(o: Obj, e: Event | None) -> str:
    return e.color if e and e.kind == "turns" else o.color


def _present(what: str, region: Region | None, obj: Obj) -> Check:
    return Check(f"present: {what}", region is not None, region.describe() if region else f"no {obj.color} {obj.shape}")


def _size_check(o: Obj, t: int, region: Region | None, want: str) -> Check:
    name = f"size {want}: {o.color} {o.shape} (frame {t})"
    if region is None:
        return Check(name, False, "not found")
    return Check(name, (region.side < SMALL_BELOW) == (want == "small"), f"fitted d {region.side:.1f} px")


def _motion_check(name: str, a, b, direction: str) -> Check:
    if a is None or b is None:
        return Check(name, False, "not found")
    along, across = _along_across(a, b, DIRECTIONS[direction])
    return Check(name, along >= MIN_TRAVEL and along > across, f"{along:.1f} px along, {across:.1f} across")


def _push_check(name: str, a0, a16, b0, b16, direction: str) -> Check:
    if None in (a0, a16, b0, b16):
        return Check(name, False, "an object is missing")
    u = DIRECTIONS[direction]
    pusher, pushed = _along_across(a0.center, a16.center, u)[0], _along_across(b0.center, b16.center, u)[0]
    ahead = _along_across(a16.center, b16.center, u)[0]  # > 0: the pusher is still behind
    ok = pushed >= MIN_PUSHED_TRAVEL and pusher >= MIN_TRAVEL and ahead > 0
    return Check(name, ok, f"pusher {pusher:.1f} px, pushed {pushed:.1f} px, then {ahead:.1f} px ahead")


def _along_across(a, b, u) -> tuple[float, float]:
    """Travel from a to b along the unit vector u, and the absolute travel across it."""
    delta = np.subtract(b, a)
    return float(delta @ np.array(u)), float(abs(delta @ np.array(u[::-1])))


def _mean_center(regions: list[Region]):
    return tuple(np.mean([r.center for r in regions], axis=0)) if regions else None


def _dist(a, b) -> float:
    return float(np.hypot(a[0] - b[0], a[1] - b[1]))
