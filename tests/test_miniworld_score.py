import numpy as np
import pytest

from fvg.io import FvgError, read_mp4, write_mp4
from fvg.miniworld import (
    CATEGORIES, find_regions, render_video, sample_prompt, sample_scene, score_video,
)
from fvg.miniworld.render import Scene


def mp4_round_trip(tmp_path, frames, name="clip.mp4"):
    path = tmp_path / name
    write_mp4(path, frames, fps=8)
    return path


def video_of(prompt, seed=0):
    return render_video(sample_scene(prompt, np.random.default_rng(seed)))


def failed(result):
    return [c.name for c in result.failed]


@pytest.mark.parametrize("category", CATEGORIES)
def test_rendered_videos_score_perfectly_after_mp4(tmp_path, category):
    rng = np.random.default_rng(CATEGORIES.index(category))
    for k in range(12):
        prompt = sample_prompt(rng, category)
        path = mp4_round_trip(tmp_path, render_video(sample_scene(prompt, rng)), f"{k}.mp4")
        result = score_video(str(prompt), path)
        assert result.score >= 0.99, (str(prompt), [(c.name, c.detail) for c in result.failed])
        assert result.category == category and len(result.checks) >= 2


def test_detects_shapes_after_mp4(tmp_path):
    prompt = "a small red circle is to the left of a large blue triangle on a white background"
    frames = read_mp4(mp4_round_trip(tmp_path, video_of(prompt)))
    regions = sorted(find_regions(frames[0]), key=lambda r: r.center[0])
    assert [(r.color, r.shape) for r in regions] == [("red", "circle"), ("blue", "triangle")]
    assert regions[0].side == pytest.approx(10, abs=1.5) and regions[1].side == pytest.approx(16, abs=1.5)


def test_wrong_direction(tmp_path):
    path = mp4_round_trip(tmp_path, video_of("a red circle moves left while a blue square moves up"))
    result = score_video("a red circle moves right while a blue square moves up", path)
    assert failed(result) == ["moves right: red circle"]
    assert score_video("a red circle moves left while a blue square moves up", path).score == 1


def test_wrong_colour_and_missing_object(tmp_path):
    path = mp4_round_trip(tmp_path, video_of("a red circle and a blue square move down"))
    result = score_video("a green circle and a blue square move down", path)
    assert "present: green circle (frame 0)" in failed(result) and "moves down: green circle" in failed(result)
    assert result.score < 0.75

    scene = sample_scene("a red circle and a blue square move down", np.random.default_rng(1))
    alone = Scene(scene.objects[1:], scene.background)  # the red circle is gone
    result = score_video("a red circle and a blue square move down", mp4_round_trip(tmp_path, render_video(alone)))
    assert {"present: red circle (frame 0)", "present: red circle (frame 16)", "moves down: red circle"} <= set(failed(result))


def test_wrong_count(tmp_path):
    path = mp4_round_trip(tmp_path, video_of("three orange circles and a blue square"))
    result = score_video("two orange circles and a blue square", path)
    assert set(failed(result)) == {"count: two orange circles (frame 0)", "count: two orange circles (frame 16)"}
    assert result.score < 0.75
    assert score_video("three orange triangles and a blue square", path).score < 0.75


def test_wrong_shape_size_background(tmp_path):
    path = mp4_round_trip(tmp_path, video_of("a large cyan square is above a small purple circle"))
    assert score_video("a large cyan circle is above a small purple circle", path).score < 0.75
    assert set(failed(score_video("a small cyan square is above a small purple circle", path))) == {
        "size small: cyan square (frame 0)", "size small: cyan square (frame 16)"}
    assert failed(score_video("a large cyan square is above a small purple circle on a white background", path)) == [
        "background white"]
    swapped = score_video("a large cyan square is below a small purple circle", path)
    assert {c.name for c in swapped.failed} == {
        "relation: large cyan square below small purple circle (frame 0)",
        "relation: large cyan square below small purple circle (frame 16)"}


def test_dynamic_attributes(tmp_path):
    grow = mp4_round_trip(tmp_path, video_of("a small red triangle grows"), "grow.mp4")
    assert "shrinks: large red triangle" in failed(score_video("a large red triangle shrinks", grow))
    turn = mp4_round_trip(tmp_path, video_of("a green square turns orange"), "turn.mp4")
    assert score_video("a green square turns orange", turn).score == 1
    result = score_video("a green square turns blue", turn)
    assert {"turns blue: green square", "present: blue square (frame 16)"} <= set(failed(result))
    still = mp4_round_trip(tmp_path, np.repeat(video_of("a green square turns orange")[:1], 17, 0), "still.mp4")
    assert "turns orange: green square" in failed(score_video("a green square turns orange", still))


def test_static_video_fails_motion_and_pushes(tmp_path):
    frames = video_of("a purple circle pushes a green square right")
    path = mp4_round_trip(tmp_path, frames, "push.mp4")
    assert score_video("a purple circle pushes a green square right", path).score == 1
    assert failed(score_video("a purple circle pushes a green square left", path)) == ["pushes left: purple circle"]
    frozen = mp4_round_trip(tmp_path, np.repeat(frames[:1], 17, 0), "frozen.mp4")
    assert failed(score_video("a purple circle pushes a green square right", frozen)) == ["pushes right: purple circle"]
    moved = video_of("a red circle stays still while a blue square moves left")
    result = score_video("a red circle moves left while a blue square stays still", moved)
    assert {"moves left: red circle", "stays still: blue square"} == set(failed(result))


def test_blank_video_fails_cleanly():
    blank = np.full((17, 64, 64, 3), 16, np.uint8)
    for category in CATEGORIES:
        prompt = sample_prompt(np.random.default_rng(7), category)
        result = score_video(prompt, blank)
        assert result.failed and result.score < 0.75
        assert [c.name for c in result.checks if c.passed] == ["background black"] or prompt.background == "white"


def test_bad_input():
    with pytest.raises(FvgError):
        score_video("a red circle turns blue", np.zeros((8, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError):
        score_video("a red cat turns blue", np.zeros((17, 64, 64, 3), np.uint8))


def test_float_frames_are_accepted():
    frames = video_of("a red circle moves left while a blue square moves up")
    assert score_video("a red circle moves left while a blue square moves up", frames / 255.0).score == 1


def test_first_frame_score_keeps_only_frame0_checks(tmp_path):
    from fvg.miniworld.score import check_kind, score_first_frame

    prompt = "a red circle moves left while a blue square moves up"
    frames = video_of(prompt)
    path = mp4_round_trip(tmp_path, np.repeat(frames[:1], 17, axis=0))  # the first frame as a still video
    still = score_first_frame(prompt, path)
    assert still.score == 1.0
    assert sorted(check_kind(c.name) for c in still.checks) == ["background", "present", "present"]
    assert all(c.name.endswith("(frame 0)") or c.name.startswith("background") for c in still.checks)
    # The full evaluator fails the still on motion (and the frame-16 presence is fine): frame-0 checks are a subset.
    full = score_video(prompt, path)
    assert {check_kind(c.name) for c in full.failed} == {"moves"}
    assert score_first_frame(prompt, frames[0]).score == 1.0  # one frame works too
    blank = np.full((64, 64, 3), 16, np.uint8)
    assert [check_kind(c.name) for c in score_first_frame(prompt, blank).failed] == ["present", "present"]
    with pytest.raises(FvgError, match="64x64"):
        score_first_frame(prompt, np.zeros((32, 32, 3), np.uint8))


def test_check_kinds():
    from fvg.miniworld.score import check_kind

    assert check_kind("present: red circle (frame 0)") == "present"
    assert check_kind("size small: red circle (frame 16)") == "size"
    assert check_kind("move left: three red circles") == "moves"
    assert check_kind("stays still: blue square") == "stays still"
    assert check_kind("relation: red circle above blue square (frame 0)") == "relation"
    assert check_kind("background white") == "background"


def test_shape_fidelity_orders_exact_blurred_wrong_and_missing():
    """The diagnostic rises as outlines approach the named shapes: exact renders near 1, a wrong shape
    or a blurred outline lower, one object of two missing at most half, a blank frame 0."""
    from fvg.miniworld.score import shape_fidelity

    prompt = "a large red square is to the left of a large blue triangle on a white background"
    frame = video_of(prompt)[0]
    exact = shape_fidelity(prompt, frame)
    assert exact > 0.9
    swapped = "a large red triangle is to the left of a large blue square on a white background"
    assert shape_fidelity(swapped, frame) < exact - 0.15
    blurred = frame.astype(float)
    for axis in (0, 1):  # a box blur rounds the corners off, as a blob-drawing model does
        blurred = sum(np.roll(blurred, k, axis) for k in range(-3, 4)) / 7
    assert 0 < shape_fidelity(prompt, blurred.astype(np.uint8)) < exact
    no_red = frame.copy()
    no_red[(frame == frame[0, 0]).all(-1) == False] = frame[0, 0]  # noqa: E712  (objects painted over)
    assert shape_fidelity(prompt, no_red) == 0.0
    counted = "three blue circles and a purple square on a white background"
    one_circle = video_of("a large blue circle shrinks on a white background")[0]
    assert shape_fidelity(counted, one_circle) <= 0.25 + 1e-9  # one of four slots filled


def test_why_missing_tells_a_vanished_colour_from_a_lost_outline(tmp_path):
    import dataclasses

    from fvg.miniworld.score import why_missing
    from fvg.miniworld.spec import COLORS

    prompt = "a red square and a blue circle move down"
    scene = sample_scene(prompt, np.random.default_rng(1))
    frames = render_video(scene)
    assert why_missing(prompt, mp4_round_trip(tmp_path, frames)) == []  # everything found: nothing missing
    # The square's last frame drawn as a circle of its size: its colour is there, in a circle's outline.
    square = next(o for o in scene.objects if o.shape == "square")
    rounded = tuple(dataclasses.replace(o, shape="circle") if o is square else o for o in scene.objects)
    last = render_video(Scene(rounded, scene.background))[16]
    assert why_missing(prompt, np.concatenate([frames[:16], last[None]])) == ["read as circle"]
    # Painted over with the background: no red left.
    gone = frames.copy()
    red = np.abs(gone[16].astype(int) - COLORS["red"]).sum(-1) < 60
    gone[16][red] = gone[16][0, 0]
    assert why_missing(prompt, gone) == ["colour gone"]
    with pytest.raises(FvgError, match="at least 17 frames"):
        why_missing(prompt, frames[:5])
