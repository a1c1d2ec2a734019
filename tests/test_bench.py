"""`fvg bench mini`: configuration parsing, targets, and a whole (small) run on the tiny preset."""

import json

import pytest

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
    assert [c["label"] for c in data["configs"]] == ["t2v@2", "factorized@2", "factorized@1"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "| factorized@2 |" in md and "Cold start" in md
    assert (out / "report.md").is_file() and (out / "plots" / "minicompbench.png").is_file()
    # Resume: nothing is generated again, the numbers are the same.
    again = run_bench(out, "tiny", configs, seeds=[0, 1], limit=1, threads=1, overrides=sizes)
    assert all(c.generated == 0 for c in again.configs)
    assert [c.scores for c in again.configs] == [c.scores for c in result.configs]


def test_bench_cli_rejects_bad_input(tmp_path):
    from fvg.cli import main

    assert main(["bench", "mini", "--out", str(tmp_path / "b"), "--configs", "t2v50"]) == 2
    assert main(["bench", "mini", "--out", str(tmp_path / "b"), "--seeds", "x"]) == 2
    assert main(["bench", "mini", "--out", str(tmp_path / "b"), "--limit", "0"]) == 2
    assert not (tmp_path / "b").exists()
