"""Benchmark layouts: the file names the official evaluators read, from the real prompt files."""

import json
from pathlib import Path

import pytest

from fvg.eval.generate import parse_seeds, plan_jobs, sample_seed, shard
from fvg.eval.suites import load_suite, load_vbench2, vbench_video_name, video_relpath
from fvg.io import FvgError

from conftest import COMPBENCH, needs_compbench


@needs_compbench
def test_t2v_compbench_layout_matches_prompt_files():
    suite = load_suite("t2v-compbench", COMPBENCH)
    files = sorted((COMPBENCH / "prompts").glob("*.txt"), key=lambda p: int(p.stem.split("_")[0]))
    assert suite.categories == [f.stem.split("_", 1)[1] for f in files]
    assert suite.categories[2] == "spatial_relationship"  # stem without the "3_" prefix
    jobs = plan_jobs(suite, ["t2v", "factorized"], [0, 3])
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines()
        category = f.stem.split("_", 1)[1]
        items = [p for p in suite.prompts if p.category == category]
        assert [p.prompt for p in items] == [line.strip() for line in lines]  # same count, same order
        for mode in ("t2v", "factorized"):
            for seed in (0, 3):
                names = [j.video for j in jobs if (j.item.category, j.mode, j.seed) == (category, mode, seed)]
                assert names == [f"{mode}/seed{seed}/{category}/{i:04d}.mp4" for i in range(1, len(lines) + 1)]
                # T2V-CompBench maps a video back to its prompt by int(name[0:4]) - 1
                for name in names:
                    assert lines[int(Path(name).name[0:4]) - 1].strip() == items[int(Path(name).name[0:4]) - 1].prompt
    assert len({j.video for j in jobs}) == len(jobs) == len(suite.prompts) * 4
    assert all(j.record == "records/" + j.video[:-4] for j in jobs)


@needs_compbench
def test_select_limit_and_categories():
    suite = load_suite("t2v-compbench", COMPBENCH / "prompts").select(["numeracy", "consistent_attr"], 2)
    assert [(p.category, p.index) for p in suite.prompts] == [
        ("consistent_attr", 1), ("consistent_attr", 2), ("numeracy", 1), ("numeracy", 2)]
    with pytest.raises(FvgError, match="unknown category"):
        suite.select(["spatial"])
    with pytest.raises(FvgError, match="--limit"):
        suite.select(limit=0)


def test_vbench_names_use_original_prompt_and_safe_characters(tmp_path):
    long = "A chef slices a tomato " * 20
    info = [{"prompt_en": "A person pours 1/2 cup of water\\into a glass", "dimension": ["Mechanics"]},
            {"prompt_en": long, "dimension": "Human_Anatomy"},
            {"prompt_en": "A cat walks", "dimension": ["Diversity"]},
            {"prompt_en": "two dogs", "dimension": ["Composition", "Instance_Preservation"]}]
    (tmp_path / "VBench2_full_info.json").write_text(json.dumps(info))
    suite = load_vbench2(tmp_path)  # a folder with one full-info JSON
    assert suite.layout == "vbench"
    jobs = plan_jobs(suite, ["t2v", "factorized"], [0, 1, 2])
    names = {j.video for j in jobs}
    assert "factorized/Mechanics/A person pours 1_2 cup of water_into a glass-2.mp4" in names
    assert f"t2v/Human_Anatomy/{long[:180]}-0.mp4" in names
    assert "t2v/Diversity/A cat walks-19.mp4" in names and "t2v/Diversity/A cat walks-20.mp4" not in names
    assert {"t2v/Composition/two dogs-0.mp4", "t2v/Instance_Preservation/two dogs-0.mp4"} <= names
    assert len(jobs) == 2 * (3 + 3 + 20 + 3 + 3)
    # the i-th video uses the i-th seed, the same in every mode; seeds continue past the list
    assert {(j.sample, j.seed) for j in jobs if j.item.category == "Diversity"} == {(i, i) for i in range(20)}
    assert sample_seed([5, 9], 3) == 11
    # the name never depends on the planner: it is a function of the original prompt only
    assert vbench_video_name("a/b", 0) == "a_b-0.mp4"
    assert len(vbench_video_name("é" * 180, 12).encode()) <= 255


def test_vbench_per_dimension_txt_files(tmp_path):
    (tmp_path / "Camera_Motion.txt").write_text("A camera pans left over a city\nA drone rises\n")
    (tmp_path / "Diversity.txt").write_text("A bird\n")
    suite = load_suite("vbench2", tmp_path, samples=2)
    assert [(p.category, p.index, p.samples) for p in suite.prompts] == [
        ("Camera_Motion", 1, 2), ("Camera_Motion", 2, 2), ("Diversity", 1, 2)]
    assert video_relpath(suite, suite.prompts[1], "upsampled", 7, 1) == "upsampled/Camera_Motion/A drone rises-1.mp4"


def test_prompt_file_and_minicompbench(tmp_path):
    path = tmp_path / "my_prompts.txt"
    path.write_text("a red circle moves right\n\n")  # trailing blank lines are fine
    suite = load_suite(str(path))
    assert [j.video for j in plan_jobs(suite, ["t2v"], [0, 1])] == [
        "t2v/seed0/my_prompts/0001.mp4", "t2v/seed1/my_prompts/0001.mp4"]
    path.write_text("first\n\nthird\n")
    with pytest.raises(FvgError, match="2 is empty"):
        load_suite(str(path))
    mini = load_suite("minicompbench")
    assert len(mini.prompts) == 56 and "spatial_relationship" in mini.categories
    from fvg.miniworld import load_suite as load_mini

    assert [f"t2v/seed0/{p.video_path}" for p in load_mini()] == [j.video for j in plan_jobs(mini, ["t2v"], [0])]
    assert mini.prompts == tuple(load_mini())  # one SuitePrompt type (fvg.io), category = folder in both
    # --suite-dir: a held-out prompt folder in the same layout; its path is the suite's source.
    from fvg.miniworld.suite import write_held_out_suite

    held_out = load_suite("minicompbench", write_held_out_suite(tmp_path / "held-out", seed=4, per_category=2))
    assert held_out.source == str((tmp_path / "held-out").resolve()) and mini.source == "fvg.miniworld"
    assert held_out.categories == mini.categories and len(held_out.prompts) == 14
    with pytest.raises(FvgError, match="prompt folder not found"):
        load_suite("minicompbench", tmp_path / "missing")


def test_sharding_covers_every_job_once_and_keeps_prompts_together(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(7)))
    jobs = plan_jobs(load_suite(str(path)), ["t2v", "upsampled", "factorized"], [0, 1])
    for world in (1, 2, 3):
        parts = [shard(jobs, r, world) for r in range(world)]
        assert sorted(j.order for p in parts for j in p) == list(range(len(jobs)))
        for r, part in enumerate(parts):
            assert {j.group % world for j in part} <= {r}


def test_parse_seeds_and_bad_input():
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("a", "-1", ""):
        with pytest.raises(FvgError):
            parse_seeds(bad)
    with pytest.raises(FvgError, match="unknown suite"):
        load_suite("t2v_compbnch")
    with pytest.raises(FvgError, match="needs --suite-dir"):
        load_suite("vbench2")
