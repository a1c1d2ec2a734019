"""Round trip with the official evaluators: their exact output files -> `fvg eval import` -> `fvg eval report`,
and `fvg eval check` on the folders their scripts read.

The fixtures make the same `csv.writer` / `json.dump` calls as the official scripts
(T2V-CompBench at commit 116f996, Vchitect/VBench's VBench-2.0 folder at 45e79ec): the same header rows, the
`writer.writerow(["score: ", score])` last line, the same per-video ids (`0001.png` from the grid
images, `0001` elsewhere) and the same per-video scales. Each category score below is worked out by
hand from the script's formula and written the way the script writes it.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fvg.eval.cli import main
from fvg.eval.importers import import_t2v_compbench, import_vbench2
from fvg.io import FvgError, write_json, write_mp4

LONG_ANSWER = "The video shows a blue car.\nIt passes a white fence,\n\"slowly\"."  # LLaVA answers span lines


def _write(path: Path, rows: list[list], mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, newline="") as f:  # the scripts' own open(..., newline='') + csv.writer
        writer = csv.writer(f)
        for row in rows:
            writer.writerow(row)


def _score_line(path: Path, score: float) -> None:
    _write(path, [["score: ", score]], mode="a")  # model_score(): writer.writerow(["score: ", score])


def consistent_attr(folder: Path, model: str, scores: list) -> float:
    """eval_consistent_attr.py: 1-5 per video, category = mean of (s - 1) / 4."""
    path = folder / f"{model}_consistent_attr_score.csv"
    _write(path, [["name", "prompt", "answer_1", "answer_2", "Score"]] +
           [[f"{i:04d}.png", f"prompt {i}", LONG_ANSWER, '{"option": "A1,A2"}', s] for i, s in enumerate(scores, 1)])
    score = sum((float(s) - 1) / 4 for s in scores) / len(scores)
    _score_line(path, score)
    return score


def action_binding(folder: Path, model: str, scores: list) -> float:
    """eval_action_binding.py: 0-5 per video ("bad reply" skipped), category = mean of s / 5."""
    path = folder / f"{model}_action_binding_score.csv"
    _write(path, [["name", "prompt", "outputs_1", "outputs_2", "Score"]] +
           [[f"{i:04d}.png", f"prompt {i}", LONG_ANSWER, "{}", s] for i, s in enumerate(scores, 1)])
    numbers = [float(s) / 5 for s in scores if s != "bad reply"]
    score = sum(numbers) / len(numbers)
    _score_line(path, score)
    return score


def spatial(folder: Path, model: str, frames_2d: dict[int, list], frames_3d: dict[int, list]) -> float:
    """eval_spatial_relationships: per-frame -2/-1/0/(0, 1] mapped to 0/0.2/0.4/0.4 + 0.6 x, video = sum / 16;
    2D videos in _2dvideo.csv (no score line), 3D in _3dvideo.csv whose score line averages both."""
    def mapped(x):
        return 0 if x < -1 else 0.2 if x < 0 else 0.4 if x == 0 else x * 0.6 + 0.4

    total, count = 0.0, 0
    for suffix, videos in (("_2dvideo.csv", frames_2d), ("_3dvideo.csv", frames_3d)):
        rows = [["id", "Score_frame_1", "Score_1"]]
        for vid, frames in videos.items():
            per_frame = [mapped(x) for x in frames]
            rows.append([f"{vid:04d}", per_frame, sum(per_frame) / 16])  # the list is written as its str()
            total += sum(per_frame) / 16
            count += 1
        _write(folder / f"{model}{suffix}", rows)
    _write(folder / f"{model}_2dframe.csv", [["video_name", "image_name", "prompt", "object_1", "object_2", "score"]])
    score = total / count
    _score_line(folder / f"{model}_3dvideo.csv", score)
    return score


def motion_binding(folder: Path, model: str, scores: list[float]) -> float:
    """motion_binding_score_cal.py: -1 (not detected) .. 1 per video; category = mean of (s < 0 -> 0, else
    0.2 + 0.8 s)."""
    path = folder / f"{model}_score.csv"
    _write(path, [["id", "object_1", "d_1", "object_2", "d_2", "Score"]] +
           [[f"{i:04d}", "dog", "left", "", "", s] for i, s in enumerate(scores, 1)])
    _write(folder / f"{model}_foreground.csv", [["id", "prompt"]])  # intermediate files the glob also finds
    _write(folder / f"{model}_back_fore.csv", [["id", "prompt"]])
    score = sum(0 if s < 0 else s * 0.8 + 0.2 for s in scores) / len(scores)
    _score_line(path, score)
    return score


def numeracy(folder: Path, model: str, frames: dict[int, list]) -> float:
    """eval_numeracy.py: per-frame 0/0.5/1, video = sum / 16, category = mean of videos, in _numeracy_video.csv."""
    path = folder / f"{model}_numeracy_video.csv"
    videos = {vid: sum(f) / 16 for vid, f in frames.items()}
    _write(path, [["id", "Score_frame_1", "Score_1"]] + [[f"{v:04d}", frames[v], s] for v, s in videos.items()])
    score = sum(videos.values()) / len(videos)
    _score_line(path, score)
    return score


def test_csv_fixture_is_byte_for_byte_what_the_scripts_write(tmp_path):
    score = consistent_attr(tmp_path, "m", [5, 4.5, 1])
    raw = (tmp_path / "m_consistent_attr_score.csv").read_bytes()
    assert raw.startswith(b"name,prompt,answer_1,answer_2,Score\r\n0001.png,prompt 1,")
    assert raw.endswith(b"score: ,0.625\r\n") and score == 0.625


def test_each_category_imports_to_its_official_score_and_scale(tmp_path):
    expected = {
        "consistent_attr": consistent_attr(tmp_path, "factorized_seed0", [5, 4.5, 1]),
        "action_binding": action_binding(tmp_path, "factorized_seed0", [5, "bad reply", 2]),
        "spatial_relationship": spatial(tmp_path, "factorized_seed0", {1: [1.0] * 16, 3: [-1] * 8 + [0] * 8},
                                        {2: [-2] * 16}),
        "motion_binding": motion_binding(tmp_path, "factorized_seed0", [0.25, -1, 0]),
        "numeracy": numeracy(tmp_path, "factorized_seed0", {1: [1] * 16, 2: [0.5] * 8 + [0] * 8}),
    }
    per_video = {}
    for path in sorted(tmp_path.glob("*.csv")):
        if path.name.endswith(("_2dvideo.csv", "_2dframe.csv", "_foreground.csv", "_back_fore.csv")):
            continue
        rows = import_t2v_compbench(path)
        assert {(r["mode"], r["seed"]) for r in rows} == {("factorized", 0)}  # from the --t2v-model name
        (score,) = [r for r in rows if r.get("aggregate")]
        per_video[score["category"]] = [(r["index"], r["metrics"]["t2v_compbench"]) for r in rows
                                        if not r.get("aggregate")]
        assert score["metrics"]["t2v_compbench"] == expected[score["category"]]
        values = [v for _, v in per_video[score["category"]]]
        assert np.mean(values) == pytest.approx(score["metrics"]["t2v_compbench"], abs=1e-12)  # same scale
    assert expected == pytest.approx({"consistent_attr": 0.625, "action_binding": 0.7, "spatial_relationship": 1.3 / 3,
                                      "motion_binding": 0.2, "numeracy": 0.625})
    assert per_video["consistent_attr"] == [(1, 1.0), (2, 0.875), (3, 0.0)]  # ids 0001.png -> 1
    assert per_video["action_binding"] == [(1, 1.0), (3, 0.4)]  # "bad reply" is skipped, as the script does
    assert per_video["motion_binding"] == [(1, pytest.approx(0.4)), (2, 0.0), (3, 0.2)]  # -1 -> 0
    assert per_video["spatial_relationship"] == [(1, 1.0), (2, 0.0), (3, pytest.approx(0.3))]  # 2D and 3D merged


def test_mis_paired_edited_or_mixed_csvs_are_refused(tmp_path):
    path = tmp_path / "t2v_seed0_consistent_attr_score.csv"
    _write(path, [["name", "prompt", "answer_1", "answer_2", "Score"], ["0001.png", "p", "a", "b", 5],
                  ["0003.png", "p", "a", "b", 5]])  # 0002 was missing: 0003 was scored against prompt 2
    _score_line(path, 1.0)
    with pytest.raises(FvgError, match="video 0003 was scored as the video of prompt 2"):
        import_t2v_compbench(path)
    consistent_attr(tmp_path, "t2v_seed0", [5, 3])
    text = path.read_text()
    path.write_text(text.replace("score: ,0.75", "score: ,0.9"))  # an edited score line
    with pytest.raises(FvgError, match="average 0.750000 .* says 0.900000"):
        import_t2v_compbench(path)
    path.write_text(text.replace("0001.png", "0001.mp4"))  # not the id form this script writes
    with pytest.raises(FvgError, match="not a video id like 0001.png"):
        import_t2v_compbench(path)
    path.write_text(text.rsplit("score:", 1)[0])  # the script stopped before model_score()
    with pytest.raises(FvgError, match="no 'score: ,X' last line"):
        import_t2v_compbench(path)
    spatial(tmp_path, "t2v_seed0", {1: [0] * 16}, {2: [0] * 16})
    (tmp_path / "t2v_seed0_2dvideo.csv").unlink()
    with pytest.raises(FvgError, match="2D half t2v_seed0_2dvideo.csv is missing"):
        import_t2v_compbench(tmp_path / "t2v_seed0_3dvideo.csv")
    unnamed = tmp_path / "mymodel_score.csv"
    motion_binding(tmp_path, "mymodel", [0.5])
    with pytest.raises(FvgError, match="--mode"):
        import_t2v_compbench(unnamed)
    assert import_t2v_compbench(unnamed, mode="t2v", seed=3)[-1]["metrics"]["t2v_compbench"] == pytest.approx(0.6)


VBENCH_RESULTS = {  # save_json(results_dict): json.dump({dimension: (all_results, video_results)}, indent=4)
    "Mechanics": [0.5, [{"video_path": "{out}/{mode}/Mechanics/A ball rolls down a ramp-0.mp4", "video_results": 1},
                        {"video_path": "{out}/{mode}/Mechanics/A ball rolls down a ramp-1.mp4", "video_results": 0},
                        {"video_path": "{out}/{mode}/Mechanics/A ball rolls down a ramp-2.mp4", "video_results": -1}]],
    # human_identity.py: per video consistent_frame_count / frame_num (here 20/20 and 10/40), -1 below 20
    # frames; compute_human_identity returns the plain mean of the valid ones, (1.0 + 0.25) / 2, not the
    # frame-weighted 30 / 60 that evaluate_id_consistency computes first and then discards.
    "Human_Identity": [0.625, [{"video_path": "{out}/{mode}/Human_Identity/A woman smiles-0.mp4", "video_results": 1.0},
                               {"video_path": "{out}/{mode}/Human_Identity/A woman smiles-1.mp4", "video_results": 0.25},
                               {"video_path": "{out}/{mode}/Human_Identity/A woman smiles-2.mp4", "video_results": -1}]],
    "Diversity": [0.4, [{"video_path": "{out}/{mode}/Diversity/A city street-0.mp4", "video_results": 0.4}]],
}


def _vbench_file(folder: Path, out: Path, mode: str, scale: float = 1.0) -> Path:
    text = json.dumps(VBENCH_RESULTS, indent=4).replace("{out}", str(out)).replace("{mode}", mode)
    data = json.loads(text)
    data["Mechanics"][1][1]["video_results"] = 0 if scale == 1.0 else 1  # t2v: [1, 1, -1]
    data["Mechanics"][0] = 0.5 if scale == 1.0 else 1.0
    path = folder / mode / "Mechanics" / "results_2025-03-27-19:00:45_eval_results.json"
    path.parent.mkdir(parents=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=4)
    (folder / mode / "Mechanics" / "results_2025-03-27-19:00:45_full_info.json").write_text("[]")
    return path


def test_vbench_drops_invalid_videos_and_keeps_the_official_dimension_score(tmp_path):
    rows = import_vbench2(_vbench_file(tmp_path / "official", tmp_path / "runs", "factorized"))
    scores = {r["category"]: r["metrics"]["vbench2"] for r in rows if r.get("aggregate")}
    assert scores == {"Mechanics": 0.5, "Human_Identity": 0.625, "Diversity": 0.4}
    videos = [(r["category"], r["sample"], r["metrics"]["vbench2"]) for r in rows if not r.get("aggregate")]
    assert videos == [("Mechanics", 0, 1.0), ("Mechanics", 1, 0.0), ("Human_Identity", 0, 1.0),
                      ("Human_Identity", 1, 0.25), ("Diversity", 0, 0.4)]  # the -1 rows are gone
    assert {r["mode"] for r in rows} == {"factorized"}


def test_end_to_end_import_then_report_shows_the_official_scores(tmp_path):
    official = tmp_path / "official" / "t2v-compbench"
    expected = {}
    for mode, attr, motion in (("t2v", [3, 3, 1], [0.1, -1, -1]), ("factorized", [5, 4.5, 1], [0.25, -1, 0])):
        expected[(mode, "consistent_attr")] = consistent_attr(official / "consistent_attr", f"{mode}_seed0", attr)
        expected[(mode, "motion_binding")] = motion_binding(official / "motion_binding", f"{mode}_seed0", motion)
    scores = tmp_path / "official.jsonl"
    files = [str(p) for p in sorted(official.glob("*/*.csv"))]  # intermediate CSVs included, as a glob finds them
    assert main(["import", "t2v-compbench", *files, "--to", str(scores)]) == 0
    vbench = tmp_path / "official" / "vbench2"
    for mode, scale in (("t2v", 0.0), ("factorized", 1.0)):
        path = _vbench_file(vbench, tmp_path / "runs", mode, scale)
        assert main(["import", "vbench2", str(path), str(path.with_name(path.name.replace("eval_results", "full_info"))),
                     "--to", str(scores)]) == 0
    assert main(["import", "t2v-compbench", *files, "--to", str(scores)]) == 0  # again: replaces, never duplicates
    out = tmp_path / "report"
    assert main(["report", str(scores), "--out", str(out), "--no-plots"]) == 0
    data = json.loads((out / "report.json").read_text())
    table = data["tables"]["t2v_compbench"]
    for (mode, category), score in expected.items():
        assert table[mode][category] == {"mean": score, "n": 1, "source": "official"}
    assert data["tables"]["vbench2"]["factorized"]["Mechanics"]["mean"] == 0.5
    assert data["tables"]["vbench2"]["t2v"]["Mechanics"]["mean"] == 1.0
    assert data["tables"]["vbench2"]["t2v"]["Human_Identity"]["mean"] == 0.625
    pairs = {(c["metric"], c["category"]): c for c in data["comparisons"]}
    attr = pairs[("t2v_compbench", "consistent_attr")]  # per video, normalised: [1, .875, 0] - [.5, .5, 0]
    assert attr["n_pairs"] == 3 and attr["mean_diff"] == pytest.approx((0.5 + 0.375 + 0) / 3)
    mech = pairs[("vbench2", "Mechanics")]  # -1 rows never pair
    assert mech["n_pairs"] == 2 and mech["mean_diff"] == pytest.approx(-0.5)
    md = (out / "report.md").read_text()
    assert "| factorized | 0.6250 | 0.2000 | 0.4125 |" in md
    assert "Cells: the official category/dimension score" in md
    assert len(scores.read_text().splitlines()) == len(set(scores.read_text().splitlines()))


def test_two_results_for_one_run_are_refused(tmp_path, capsys):
    folder = tmp_path / "csv"
    consistent_attr(folder, "t2v_seed0", [5])
    consistent_attr(folder / "old", "t2v_seed0", [1])
    code = main(["import", "t2v-compbench", str(folder / "t2v_seed0_consistent_attr_score.csv"),
                 str(folder / "old" / "t2v_seed0_consistent_attr_score.csv"), "--to", str(tmp_path / "s.jsonl")])
    assert code == 2 and "import only the current one" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()


# --- fvg eval check ------------------------------------------------------------------------------

def _t2v_compbench(root: Path, n: int = 3) -> Path:
    prompts = root / "T2V-CompBench" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "1_consistent_attr.txt").write_text("".join(f"attr prompt {i}\n" for i in range(n)))
    (prompts / "4_motion_binding.txt").write_text("".join(f"motion prompt {i}\n" for i in range(n)))
    return prompts.parent


def _video(path: Path, frames: int = 16, fps: int = 8) -> None:
    write_mp4(path, np.zeros((frames, 16, 16, 3), np.uint8), fps=fps)


def _run(root: Path, n: int = 3, frames: int = 16) -> Path:
    out = root / "out"
    for mode in ("t2v", "factorized"):
        for category in ("consistent_attr", "motion_binding"):
            for i in range(1, n + 1):
                _video(out / mode / "seed0" / category / f"{i:04d}.mp4", frames)
                if category == "motion_binding":
                    write_json(out / "records" / mode / "seed0" / category / f"{i:04d}" / "run.json",
                               {"frames": [frames, 16, 16, 3], "settings": {"fps": 8}})
    return out


def test_check_prints_the_official_commands(tmp_path, capsys):
    suite_dir, out = _t2v_compbench(tmp_path), _run(tmp_path)
    args = ["check", str(out), "--suite", "t2v-compbench", "--suite-dir", str(suite_dir),
            "--compbench-dir", str(suite_dir)]
    assert main(args) == 0
    captured = capsys.readouterr()
    script = captured.out
    assert "12 videos in 4 folders" in captured.err
    seed_dir = (out / "factorized" / "seed0").resolve()
    results = (out / "official" / "t2v-compbench").resolve()
    assert (f"python LLaVA/llava/eval/eval_consistent_attr.py --video-path {seed_dir / 'consistent_attr'} "
            f"--output-path {results / 'consistent_attr'} --read-prompt-file "
            f'"$COMPBENCH/meta_data/consistent_attribute_binding.json" --t2v-model factorized_seed0') in script
    assert (f"python Grounded-Segment-Anything/motion_binding_seg.py --video_folder {seed_dir / 'motion_binding'} "
            f'--read-prompt-file "$COMPBENCH/meta_data/motion_binding.json" --t2v-model factorized_seed0 '
            f"--total_frame 16 --fps 8") in script  # from the run records
    assert f"--video_folder {seed_dir / 'video_standard' / 'motion_binding'}" in script
    assert "python dot/motion_binding_score_cal.py --t2v-model t2v_seed0" in script
    assert f"fvg eval import t2v-compbench {results}/*/*.csv" in script


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "t2v/seed0/consistent_attr/0002.mp4").unlink(),
     "0002.mp4 is missing: T2V-CompBench pairs by sorted position, so 0003.mp4 would be scored against prompt 2"),
    (lambda out: (out / "t2v/seed0/consistent_attr/notes.txt").write_text("x"), "notes.txt: a stray entry"),
    (lambda out: (out / "t2v/seed0/consistent_attr/.0002.x1.tmp.mp4").write_bytes(b""), "a stray entry"),
    (lambda out: _video(out / "t2v/seed0/consistent_attr/0004.mp4"), "0004.mp4 has no prompt"),
    (lambda out: _video(out / "t2v/seed0/consistent_attr/0001.mp4", frames=9), "has 9 frames; T2V-CompBench"),
    (lambda out: (out / "t2v/seed0/consistent_attr/0003.mp4").write_bytes(b"\0" * 64), "cannot be read as a video"),
    (lambda out: (out / "t2v/seed0/image_grid/consistent_attr").mkdir(parents=True)
     or (out / "t2v/seed0/image_grid/consistent_attr/0007.png").write_bytes(b""), "left by an earlier run"),
    (lambda out: write_json(out / "records/t2v/seed0/motion_binding/0001/run.json",
                            {"frames": [49, 16, 16, 3], "settings": {"fps": 8}}), "stale record"),
])
def test_check_refuses_a_folder_the_scripts_would_mis_pair(tmp_path, capsys, damage, message):
    suite_dir, out = _t2v_compbench(tmp_path), _run(tmp_path)
    damage(out)
    assert main(["check", str(out), "--suite", "t2v-compbench", "--suite-dir", str(suite_dir)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and captured.out == ""


def test_check_refuses_short_motion_binding_clips(tmp_path, capsys):
    suite_dir, out = _t2v_compbench(tmp_path), _run(tmp_path)
    for i in (1, 2, 3):
        _video(out / "t2v/seed0/motion_binding" / f"{i:04d}.mp4", fps=24)
        write_json(out / "records/t2v/seed0/motion_binding" / f"{i:04d}" / "run.json",
                   {"frames": [16, 16, 16, 3], "settings": {"fps": 24}})
    assert main(["check", str(out), "--suite", "t2v-compbench", "--suite-dir", str(suite_dir)]) == 2
    assert "under one second" in capsys.readouterr().err


def _vbench_run(root: Path, frames: int = 21) -> tuple[Path, Path]:
    prompts = root / "vbench_prompts"
    prompts.mkdir()
    (prompts / "Mechanics.txt").write_text("A ball rolls down a ramp\nIce melts on a stove\n")
    (prompts / "Human_Identity.txt").write_text("A woman smiles\n")
    out = root / "vout"
    for mode in ("t2v", "factorized"):
        for dim, texts in (("Mechanics", ["A ball rolls down a ramp", "Ice melts on a stove"]),
                           ("Human_Identity", ["A woman smiles"])):
            for text in texts:
                for i in range(3):
                    _video(out / mode / dim / f"{text}-{i}.mp4", frames)
    return prompts, out


def test_check_vbench_prints_one_command_per_dimension_folder(tmp_path, capsys):
    prompts, out = _vbench_run(tmp_path)
    assert main(["check", str(out), "--suite", "vbench2", "--suite-dir", str(prompts)]) == 0
    script = capsys.readouterr().out
    folder = (out / "factorized" / "Mechanics").resolve()
    assert (f"python evaluate.py --videos_path {folder} --dimension Mechanics --output_path "
            f"{(out / 'official' / 'vbench2' / 'factorized' / 'Mechanics').resolve()}") in script
    assert script.count("python evaluate.py") == 4


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "t2v/Mechanics/Ice melts on a stove-2.mp4").unlink(), "standard mode stops at the first"),
    (lambda out: (out / "t2v/Mechanics/sub").mkdir(), "takes the video extension from the first entry"),
    (lambda out: _video(out / "t2v/Human_Identity/A woman smiles-1.mp4", 20), "needs at least 21"),
])
def test_check_vbench_refuses(tmp_path, capsys, damage, message):
    prompts, out = _vbench_run(tmp_path)
    damage(out)
    assert main(["check", str(out), "--suite", "vbench2", "--suite-dir", str(prompts)]) == 2
    assert message in capsys.readouterr().err
