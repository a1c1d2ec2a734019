"""`fvg bench mini`: configuration parsing, targets, and a whole (small) run on the tiny preset."""

import json

import numpy as np
import pytest
from PIL import Image

from fvg.eval.bench import BenchConfig, ConfigResult, compute_targets, parse_configs, run_bench, to_markdown
from fvg.io import FvgError
from fvg.eval.suites import load_minicompbench

CATEGORIES = load_minicompbench().categories


def test_parse_configs():
    assert parse_configs("t2v@50, factorized@15") == [BenchConfig("t2v", 50), BenchConfig("factorized", 15)]
    assert parse_configs("factorized@15")[0].label == "factorized@15"
    for bad, words in [("t2v", "MODE@STEPS"), ("t2v@0", "at least 1"), ("t2v@5,t2v@5", "repeat"), ("", "no "),
                       ("video@5", "mode")]:
        with pytest.raises(FvgError, match=words):
            parse_configs(bad)


def _result(label, scores, seconds):
    mode, steps = label.split("@")
    mean = sum(scores.values()) / len(scores)
    return ConfigResult(label, mode, int(steps), 7, scores, mean, seconds, {}, 1.0, 7)


def test_targets_count_category_wins_and_ratios():
    cats = ["a", "b", "c", "d", "e", "f", "g"]
    t2v = _result("t2v@50", dict.fromkeys(cats, 0.5), 3.0)
    fac = _result("factorized@50", {**dict.fromkeys(cats[:5], 0.8), "f": 0.4, "g": 0.5}, 3.2)
    f15 = _result("factorized@15", {**dict.fromkeys(cats[:5], 0.79), "f": 0.4, "g": 0.5}, 1.0)
    targets = {t.name: t for t in compute_targets({r.label: r for r in (t2v, fac, f15)}, cats)}
    assert targets["categories where factorized@50 beats t2v@50"].value == 5  # a tie (g) is not a win
    assert targets["categories where factorized@50 beats t2v@50"].met
    assert targets["factorized@50 - t2v@50, mean score"].value == pytest.approx((5 * 0.3 - 0.1) / 7)
    assert targets["factorized@50 - factorized@15, mean score"].value == pytest.approx(0.05 / 7)
    assert targets["factorized@50 - factorized@15, mean score"].met
    assert targets["seconds per video, t2v@50 / factorized@15"].value == pytest.approx(3.0)
    assert targets["seconds per factorized@15 video, all stages, warm"].met
    gain = targets["factorized@15 - t2v@50, mean score"]
    assert gain.value == pytest.approx((5 * 0.29 - 0.1) / 7) and gain.met  # >= 0.10, no interval given
    assert targets["categories where factorized@15 beats t2v@50"].value == 5
    slow = _result("factorized@15", dict.fromkeys(cats, 0.1), 2.5)
    targets = {t.name: t for t in compute_targets({"t2v@50": t2v, "factorized@50": fac, "factorized@15": slow}, cats)}
    assert not targets["factorized@50 - factorized@15, mean score"].met
    assert not targets["seconds per video, t2v@50 / factorized@15"].met
    assert not targets["seconds per factorized@15 video, all stages, warm"].met
    assert "**no**" in to_markdown_for(targets.values(), cats)


def to_markdown_for(targets, cats):
    from fvg.eval.bench import BenchResult

    return to_markdown(BenchResult([], cats, list(targets), 0.0))


def test_bench_run_on_tiny_writes_scored_tables(tmp_path):
    # The tiny preset at MiniWorld's size: random weights, so the scores are low but real, and every
    # file the bench promises is written and consistent with the videos on disk.
    out = tmp_path / "bench"
    sizes = dict(height=64, width=64, num_frames=17)
    configs = parse_configs("t2v@2,factorized@2,factorized@1")
    result = run_bench(out, "tiny", configs, seeds=[0, 1], limit=1, threads=1, overrides=sizes)
    assert [c.label for c in result.configs] == ["t2v@2", "factorized@2", "factorized@1"]
    assert result.categories == list(CATEGORIES)
    for c in result.configs:
        assert c.videos == len(CATEGORIES) * 2 and c.generated == c.videos
        assert set(c.scores) == set(CATEGORIES) and all(0.0 <= v <= 1.0 for v in c.scores.values())
        assert c.seconds_per_video > 0
        assert len(list((out / c.label).rglob("*.mp4"))) == c.videos
    fac = result.by_label()["factorized@2"]
    assert set(fac.stage_seconds) == {"plan", "anchor", "animate"}
    assert "anchor" not in result.by_label()["t2v@2"].stage_seconds
    data = json.loads((out / "bench.json").read_text())
    assert data["setup"]["preset"] == "tiny" and data["setup"]["seeds"] == [0, 1]
    assert data["setup"]["preset_overrides"] == sizes
    assert [c["label"] for c in data["configs"]] == ["t2v@2", "factorized@2", "factorized@1"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "| factorized@2 |" in md and "Cold start" in md
    assert (out / "report.md").is_file() and (out / "plots" / "minicompbench.png").is_file()
    _check_ladder(out, result, md, data)
    # Every video's score row, configurations and rungs by label: a bench compared with itself moves nothing.
    from fvg.eval.bench_compare import compare_benches

    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in rows} == {"t2v@2", "factorized@2", "factorized@1", "rendered", "vae",
                                         "anchor-stills", "first-frame@1"}
    assert all(sum(r["mode"] == label for r in rows) == len(CATEGORIES) * 2 for label in ("t2v@2", "vae"))
    same = compare_benches(out, out)
    assert [c.label for c in same] == ["rendered", "vae", "anchor-stills", "first-frame@1", "t2v@2", "factorized@2",
                                       "factorized@1"]
    assert all(c.diff == 0 and c.pairs == len(CATEGORIES) * 2 and c.unpaired == 0 for c in same)
    assert same[-1].new == pytest.approx(np.mean([r["metrics"]["minicompbench"] for r in rows
                                                  if r["mode"] == "factorized@1"]))
    assert all((out / r["video"]).is_file() for r in rows)  # relative to the bench folder
    # Why objects are missing at frame 16, per label: the exact renders lose none.
    from fvg.miniworld.diagnose import lost_objects

    lost = {r.label: r for r in lost_objects(out)}
    assert set(lost) == {r["mode"] for r in rows} and lost["rendered"].reasons == {}
    assert lost["rendered"].objects == lost["t2v@2"].objects > 0
    assert lost["rendered"].found == {0: 1.0, 4: 1.0, 8: 1.0, 12: 1.0, 16: 1.0}
    assert all(sum(r.reasons.values()) <= r.objects for r in lost.values())
    # Resume: nothing is generated again, the numbers are the same.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "ladder").rglob("*.mp4")}
    again = run_bench(out, "tiny", configs, seeds=[0, 1], limit=1, threads=1, overrides=sizes)
    assert all(c.generated == 0 for c in again.configs)
    assert [c.scores for c in again.configs] == [c.scores for c in result.configs]
    assert {p: p.stat().st_mtime_ns for p in (out / "ladder").rglob("*.mp4")} == stamps
    assert [r.mean for r in again.ladder] == [r.mean for r in result.ladder]


def _check_ladder(out, result, md, data):
    from fvg.eval.bench import rendered_clip
    from fvg.eval.suites import load_minicompbench
    from fvg.io import read_mp4

    # The method rung is the factorized configuration with the fewest steps; the true first frame is
    # animated with the same steps.
    rungs = [r.label for r in result.ladder]
    assert rungs == ["rendered", "vae", "anchor-stills", "first-frame@1", "factorized@1"]
    by = {r.label: r for r in result.ladder}
    assert by["rendered"].mean == 1.0 and by["rendered"].met  # the exact evaluator on exact renders
    assert all(v == 1.0 for v in by["rendered"].kinds.values())
    assert by["vae"].diff_vs_above == pytest.approx(by["vae"].mean - 1.0)
    assert by["anchor-stills"].diff_metric == "minicompbench_frame0"  # stills are compared on frame-0 checks
    assert set(by["anchor-stills"].kinds) <= {"present", "size", "count", "relation", "background"}
    assert by["factorized@1"].scores == result.by_label()["factorized@1"].scores  # the same evaluator, same videos
    assert all(r.videos == len(CATEGORIES) * 2 for r in result.ladder)
    item = load_minicompbench().select(None, 1).prompts[0]
    rendered = read_mp4(out / "ladder" / "rendered" / "seed1" / item.category / f"{item.index:04d}.mp4")
    assert np.abs(rendered.astype(int) - rendered_clip(item, 1)).mean() < 3  # H.264 of the exact render
    still = read_mp4(out / "ladder" / "anchor-stills" / "seed0" / item.category / f"{item.index:04d}.mp4")
    anchor = np.asarray(Image.open(out / "factorized@1" / "records" / "factorized" / "seed0" / item.category /
                                   f"{item.index:04d}" / "anchor.png").convert("RGB"))
    # The tiny anchor model paints noise, which H.264 keeps only roughly: correlation, not equality.
    assert np.corrcoef(still[0].ravel(), anchor.ravel())[0, 1] > 0.9
    assert np.abs(still[0].astype(int) - still[-1]).mean() < 2  # a still
    # Each rung against the one above: paired bootstrap comparisons in the report.
    report = (out / "report.md").read_text()
    assert "vae - rendered" in report and "factorized@1 - first-frame@1" in report
    # Variability: seeds 1 with the anchor of seed 0, and the anchor of seed 1 with video seed 0.
    assert result.variability is not None and result.variability.videos_per_prompt == 2
    for kind in ("anchor-fixed", "seed-fixed"):
        assert len(list((out / "ladder" / kind).rglob("*.mp4"))) == len(CATEGORIES)
    assert all(v is None or v >= 0 for v in result.variability.variance.values())
    assert "Quality ladder" in md and "| anchor-stills |" in md and "Variability" in md
    sheet = np.asarray(Image.open(out / "ladder.png"))  # per category a row; per rung but vae and stills, 5 frames
    assert sheet.shape == (64 * len(CATEGORIES), 3 * 5 * 64 + 2 * 6, 3)
    first = read_mp4(out / "ladder" / "rendered" / "seed0" / item.category / f"{item.index:04d}.mp4")[0]
    assert np.array_equal(sheet[:64, :64], first)
    assert [r["label"] for r in data["ladder"]] == rungs and data["variability"]["videos_per_prompt"] == 2


def test_bench_cli_rejects_bad_input(tmp_path):
    from fvg.cli import main

    assert main(["bench", "mini", "--out", str(tmp_path / "b"), "--configs", "t2v50"]) == 2
    assert main(["bench", "mini", "--out", str(tmp_path / "b"), "--seeds", "x"]) == 2
    assert main(["bench", "mini", "--out", str(tmp_path / "b"), "--limit", "0"]) == 2
    assert main(["bench", "mini", "--out", str(tmp_path / "b"), "--set", "guidance=1"]) == 2
    assert main(["bench", "mini", "--out", str(tmp_path / "b"), "--set", "anchor_steps=fast"]) == 2
    assert main(["bench", "mini", "--out", str(tmp_path / "b"), "--set", "anchor_guidance"]) == 2
    assert main(["bench", "mini", "--out", str(tmp_path / "b"), "--prompts", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "b").exists()


def test_bench_on_held_out_prompts(tmp_path, capsys):
    # `--prompts`: the same bench over a held-out suite; the setup names the folder, every video is of one of
    # its prompts, and the folder cannot be resumed with the committed suite (the scores would mix).
    from fvg.cli import main
    from fvg.miniworld import load_suite

    prompts = tmp_path / "held-out"
    assert main(["miniworld", "suite", "--out", str(prompts), "--seed", "3", "--per-category", "2"]) == 0
    held_out = load_suite(prompts)
    out = tmp_path / "b"
    args = ["bench", "mini", "--preset", "tiny", "--out", str(out), "--configs", "t2v@1", "--seeds", "0",
            "--limit", "1", "--threads", "1", "--set", "height=64", "--set", "width=64", "--set", "num_frames=17"]
    assert main(args + ["--prompts", str(prompts)]) == 0, capsys.readouterr().err
    data = json.loads((out / "bench.json").read_text())
    assert data["setup"]["prompts"] == str(prompts.resolve())
    made = {json.loads(p.read_text())["prompt"] for p in (out / "t2v@1" / "records").rglob("run.json")}
    assert made == {item.prompt for item in held_out if item.index == 1}
    assert made.isdisjoint(item.prompt for item in load_suite())
    assert main(args) == 2
    assert "t2v@1 holds videos made with other settings (source" in capsys.readouterr().err
    # The ladder resumes by path: a configuration new to the folder does not let other prompts reuse it.
    assert main([a if a != "t2v@1" else "t2v@2" for a in args]) == 2
    assert "ladder holds videos made with other settings (source" in capsys.readouterr().err
    assert not (out / "t2v@2").exists()


def test_bench_cli_sets_preset_fields_for_every_configuration(tmp_path, capsys):
    from fvg.cli import main

    out = tmp_path / "b"
    args = ["bench", "mini", "--preset", "tiny", "--out", str(out), "--configs", "t2v@1,factorized@1", "--seeds",
            "0", "--limit", "1", "--threads", "1", "--set", "height=64", "--set", "width=64", "--set",
            "num_frames=17", "--set", "guidance_scale=1"]
    assert main(args) == 0, capsys.readouterr().err
    data = json.loads((out / "bench.json").read_text())
    assert data["setup"]["preset_overrides"] == {"height": 64, "width": 64, "num_frames": 17, "guidance_scale": 1.0}
    for label in ("t2v@1", "factorized@1"):
        run = json.loads(next((out / label / "records").rglob("run.json")).read_text())
        assert run["settings"]["guidance_scale"] == 1.0, run["settings"]


def test_gain_target_needs_the_bootstrap_interval_above_zero():
    from fvg.eval.report import Comparison

    cats = ["a", "b"]
    t2v, f15 = _result("t2v@50", dict.fromkeys(cats, 0.3), 3.0), _result("factorized@15", dict.fromkeys(cats, 0.45), 1.0)
    wide = [Comparison("minicompbench", "factorized@15", "t2v@50", "all", 0.15, -0.01, 0.3, 10)]
    tight = [Comparison("minicompbench", "factorized@15", "t2v@50", "all", 0.15, 0.05, 0.25, 10)]
    for comparisons, met in ((wide, False), (tight, True)):
        targets = compute_targets({"t2v@50": t2v, "factorized@15": f15}, cats, comparisons)
        gain = next(t for t in targets if t.name.startswith("factorized@15 - t2v@50"))
        assert gain.met is met and "95% CI" in gain.name
