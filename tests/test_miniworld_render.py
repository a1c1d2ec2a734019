import numpy as np
import pytest

from fvg.io import FvgError
from fvg.miniworld import (
    CATEGORIES, Event, caption_for, parse_caption, render_first_frame, render_frame, render_video, sample_prompt,
    sample_scene,
)
from fvg.miniworld.grammar import REL_VECTORS, caption_objects
from fvg.miniworld.render import _sample
from fvg.miniworld.spec import BACKGROUNDS, COLORS, DIRECTIONS, SIZES


def scenes(n_per_category=15, seed=0):
    rng = np.random.default_rng(seed)
    for category in CATEGORIES:
        for _ in range(n_per_category):
            prompt = sample_prompt(rng, category)
            yield prompt, sample_scene(prompt, rng)


def boxes(scene, t):
    return [(o.centers[t], o.sizes[t]) for o in scene.objects]


def box_gap(a, b):
    (ca, da), (cb, db) = a, b
    return float((np.abs(ca - cb) - (da + db) / 2).max())


def push_pair(prompt):
    return {(0, 1)} if prompt.category == "interaction" else set()


def assert_caption_holds(caption, scene):
    """The geometric meaning of a first-frame caption, checked on frame 0 of a scene."""
    objs = caption_objects(caption)
    assert len(objs) == len(scene.objects)
    for o, so in zip(objs, scene.objects):
        assert (so.colors[0], so.shape) == (o.color, o.shape)
        if o.size:
            assert so.sizes[0] == SIZES[o.size]
    i = 0
    for item in caption.items:
        if item.other:
            a, b = scene.objects[i].centers[0], scene.objects[i + 1].centers[0]
            u = np.array(REL_VECTORS[item.relation])
            along, across = (b - a) @ u, abs((b - a) @ u[::-1])
            assert along > 0 and along > across
            if item.relation.startswith("just "):
                edge_gap = along - (scene.objects[i].sizes[0] + scene.objects[i + 1].sizes[0]) / 2
                assert across == 0 and 4 <= edge_gap <= 10
            i += 2
            continue
        for so in scene.objects[i:i + item.obj.count]:
            x, y = so.centers[0]
            side = {"left": x < 32, "right": x > 32, "top": y < 32, "bottom": y > 32, None: True}
            assert side[item.position], (item, so.centers[0])
        i += item.obj.count


def test_frame0_margins_separation_and_paths():
    for prompt, scene in scenes():
        assert 1 <= len(scene.objects) <= 4
        for o in scene.objects:
            lo, hi = o.centers - o.sizes[:, None] / 2, o.centers + o.sizes[:, None] / 2
            assert (lo >= 2).all() and (hi <= 62).all(), str(prompt)  # every frame, not only frame 0
        for t in range(scene.num_frames):
            b = boxes(scene, t)
            for i in range(len(b)):
                for j in range(i + 1, len(b)):
                    if (i, j) in push_pair(prompt) and t > 0:
                        assert box_gap(b[i], b[j]) >= -1e-9  # touching at most
                    else:
                        assert box_gap(b[i], b[j]) >= 4, (str(prompt), t)


def test_scenes_satisfy_first_frame_caption():
    for prompt, scene in scenes(seed=1):
        assert_caption_holds(caption_for(prompt), scene)
        assert scene.background == prompt.background


def test_events_follow_the_spec():
    for prompt, scene in scenes(seed=2):
        objs = [(o, e) for o, e in zip(prompt.objects, prompt.events) for _ in range(o.count)]
        for (o, e), so in zip(objs, scene.objects):
            travel = so.centers[16] - so.centers[0]
            kind = e.kind if e else None
            if kind in ("moves", "pushes"):
                assert np.allclose(travel, 24 * np.array(DIRECTIONS[e.direction]))
                assert np.allclose(np.diff(so.centers, axis=0), 1.5 * np.array(DIRECTIONS[e.direction]))
            elif prompt.category != "interaction":
                assert np.allclose(travel, 0)
            if kind == "grows":
                assert np.allclose(so.sizes, np.linspace(10, 16, 17))
            elif kind == "shrinks":
                assert np.allclose(so.sizes, np.linspace(16, 10, 17))
            else:
                assert (so.sizes == so.sizes[0]).all() and so.sizes[0] in (10, 16)
            final = e.color if kind == "turns" else o.color
            assert so.colors == (o.color,) * 8 + (final,) * 9


def test_pushes_touch():
    rng = np.random.default_rng(3)
    for _ in range(40):
        prompt = sample_prompt(rng, "interaction")
        scene = sample_scene(prompt, rng)
        a, b = scene.objects
        u = np.array(DIRECTIONS[prompt.events[0].direction])
        gaps = (b.centers - a.centers) @ u - (a.sizes + b.sizes) / 2
        assert 4 <= gaps[0] <= 10 and (np.abs((b.centers - a.centers) @ u[::-1]) == 0).all()
        contact = gaps[0] / 1.5
        for t in range(17):
            if t < contact:  # B waits, A closes the gap
                assert np.allclose(b.centers[t], b.centers[0]) and gaps[t] > 0
            else:  # then they move together, touching
                assert np.isclose(gaps[t], 0)
        assert ((b.centers[16] - b.centers[0]) @ u) >= 14


def test_rendering_is_exact():
    rng = np.random.default_rng(4)
    palette = {tuple(c) for c in (*BACKGROUNDS.values(), *COLORS.values())}
    for prompt, scene in scenes(3, seed=4):
        video = render_video(scene)
        assert video.shape == (17, 64, 64, 3) and video.dtype == np.uint8
        packed = np.unique(video.astype(np.int64) @ np.array([65536, 256, 1]))
        assert {(c >> 16, (c >> 8) & 255, c & 255) for c in packed.tolist()} <= palette
    square = sample_scene("a small red square and a large blue square move left", rng)
    frame = render_frame(square, 5)  # a half-pixel position: still exactly d x d pixels
    assert (frame == COLORS["red"]).all(-1).sum() == 100 and (frame == COLORS["blue"]).all(-1).sum() == 256
    tri = render_frame(sample_scene("a large green triangle turns red", rng), 0)
    ys, xs = np.nonzero((tri == COLORS["green"]).all(-1))
    rows = np.bincount(ys - ys.min())
    assert (np.diff(rows) >= 0).all() and rows[-1] >= 15  # apex on top, base of ~d at the bottom


def test_render_first_frame_from_caption():
    rng = np.random.default_rng(5)
    caption = "a purple circle just left of a green square and a small red triangle at the top on a white background"
    frame = render_first_frame(caption, rng)
    assert frame.shape == (64, 64, 3) and (frame[0, 0] == BACKGROUNDS["white"]).all()
    for color in ("purple", "green", "red"):
        assert (frame == COLORS[color]).all(-1).sum() > 30


def test_impossible_layout_raises():
    # Starting in the top half leaves no room to move 24 px up: no layout exists.
    caption = parse_caption("a large red circle at the top on a black background")
    with pytest.raises(FvgError, match="cannot lay out"):
        _sample(caption, [Event("moves", "up")], np.random.default_rng(0), str(caption))
