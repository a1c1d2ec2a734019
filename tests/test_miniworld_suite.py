import json

import numpy as np
import pytest
from PIL import Image

from fvg.io import FvgError, read_mp4, write_mp4
from fvg.miniworld import (
    CATEGORIES, first_frame_caption, load_suite, parse_caption, parse_prompt, render_video, sample_clip,
    sample_scene, score_suite, write_dataset,
)
from fvg.miniworld.suite import PROMPT_DIR, PROMPT_FILES, spec_category

from conftest import COMPBENCH, needs_compbench


@needs_compbench
def test_suite_files_are_named_as_t2v_compbench_s():
    names = sorted(p.name for p in PROMPT_DIR.glob("*.txt"))
    assert names == sorted(p.name for p in (COMPBENCH / "prompts").glob("*.txt"))


def test_suite_files_and_layout():
    names = sorted(p.name for p in PROMPT_DIR.glob("*.txt"))
    assert names == sorted(f"{stem}.txt" for stem in PROMPT_FILES.values())
    suite = load_suite()
    assert len(suite) == 56
    for category in CATEGORIES:
        prompts = [s for s in suite if spec_category(s) == category]
        assert [s.index for s in prompts] == list(range(1, 9))
        assert len({s.prompt for s in prompts}) == 8
        assert all(parse_prompt(s.prompt).category == category for s in prompts)
    assert sum(s.prompt.endswith(" on a white background") for s in suite) >= 2
    folders = {spec_category(s): s.category for s in suite}  # category = folder, as in every suite
    assert folders["spatial"] == "spatial_relationship" and folders["consistent_attr"] == "consistent_attr"
    assert suite[0].video_path == "consistent_attr/0001.mp4"


def test_the_committed_suite_is_the_sampler_s_and_held_out_suites_avoid_it(tmp_path, monkeypatch):
    from fvg.miniworld import suite as suite_module
    from fvg.miniworld.suite import FOLDERS, generate_suite, held_out_suite, write_held_out_suite

    committed = load_suite()
    assert generate_suite() == {c: [s.prompt for s in committed if s.category == FOLDERS[c]] for c in CATEGORIES}
    held_out = held_out_suite(seed=1, per_category=10)
    assert held_out == held_out_suite(seed=1, per_category=10)  # a seed names one suite
    assert list(held_out) == list(CATEGORIES)
    for category, prompts in held_out.items():
        assert len(prompts) == len(set(prompts)) == 10
        assert all(parse_prompt(p).category == category for p in prompts)
    assert {p for ps in held_out.values() for p in ps}.isdisjoint(s.prompt for s in committed)

    out = write_held_out_suite(tmp_path / "held-out", seed=1, per_category=10)
    assert [s.prompt for s in load_suite(out)] == [p for ps in held_out.values() for p in ps]
    made = json.loads((out / "suite.json").read_text())
    assert (made["seed"], made["per_category"], made["prompts"]) == (1, 10, 70)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{stem}.txt" for stem in PROMPT_FILES.values()] +
                                                          ["suite.json"])
    with pytest.raises(FvgError, match="not an empty folder"):
        write_held_out_suite(out, seed=2)
    with pytest.raises(FvgError, match="at least 1"):
        write_held_out_suite(tmp_path / "none", per_category=0)
    # A category with fewer distinct prompts than asked fails, and writes nothing.
    one_prompt = parse_prompt(held_out["consistent_attr"][0])
    monkeypatch.setattr(suite_module, "sample_prompt", lambda rng, category: one_prompt)
    monkeypatch.setattr(suite_module, "MAX_DRAWS_PER_PROMPT", 3)
    with pytest.raises(FvgError, match="distinct consistent_attr prompts"):
        write_held_out_suite(tmp_path / "small", per_category=2)
    assert not (tmp_path / "small").exists() and not list(tmp_path.glob(".small*"))


def test_score_suite(tmp_path):
    suite = load_suite()
    rng = np.random.default_rng(0)
    for s in suite:
        write_mp4(tmp_path / s.video_path, render_video(sample_scene(s.prompt, rng)), fps=8)
    report = score_suite(tmp_path)
    assert report.overall == 1.0 and set(report.per_category) == set(CATEGORIES)
    assert [r.prompt for r in report.scores] == [s.prompt for s in suite]

    # A wrong video in one category lowers that category only.
    wrong = next(s for s in suite if s.category == "motion_binding")
    write_mp4(tmp_path / wrong.video_path, np.full((17, 64, 64, 3), 16, np.uint8), fps=8)
    report = score_suite(tmp_path)
    assert report.per_category["motion_binding"] < 1 and report.per_category["numeracy"] == 1
    assert report.overall == pytest.approx(np.mean([r.score for r in report.scores]))

    (tmp_path / "numeracy" / "0008.mp4").unlink()
    with pytest.raises(FvgError, match="numeracy/0008.mp4"):
        score_suite(tmp_path)


def test_write_dataset(tmp_path):
    metadata = write_dataset(tmp_path / "data", num_clips=9, seed=7)
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert len(rows) == 9
    assert [r["category"] for r in rows] == [*CATEGORIES, *CATEGORIES[:2]]
    for row in rows:
        assert set(row) == {"video", "first_frame", "caption", "first_frame_caption", "category", "seed"}
        prompt = parse_prompt(row["caption"])
        assert prompt.category == row["category"]
        assert row["first_frame_caption"] == first_frame_caption(prompt)
        parse_caption(row["first_frame_caption"])
        frames = read_mp4(tmp_path / "data" / row["video"])
        assert frames.shape == (17, 64, 64, 3)
        expected = render_video(sample_clip(row["category"], row["seed"])[1])  # reproducible from its seed
        png = np.asarray(Image.open(tmp_path / "data" / row["first_frame"]))
        assert (png == expected[0]).all()  # PNG is lossless
        assert np.abs(frames.astype(int) - expected).mean() < 3  # H.264 is not
    assert rows[0]["video"] == "videos/000001.mp4" and rows[0]["first_frame"] == "first_frames/000001.png"

    again = write_dataset(tmp_path / "again", num_clips=3, seed=7, categories=("numeracy",))
    rows_again = [json.loads(line) for line in again.read_text().splitlines()]
    assert [r["category"] for r in rows_again] == ["numeracy"] * 3
    same = write_dataset(tmp_path / "same", num_clips=2, seed=7)
    assert same.read_text().splitlines() == metadata.read_text().splitlines()[:2]
    with pytest.raises(FvgError):
        write_dataset(tmp_path / "bad", num_clips=1, seed=0, categories=("spatial_relationship",))
