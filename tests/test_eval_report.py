"""`fvg eval import` (official T2V-CompBench CSV / VBench 2.0 JSON) and `fvg eval report`."""

import csv
import json

import numpy as np
import pytest

from fvg.eval.cli import main
from fvg.eval.importers import import_t2v_compbench, import_vbench2
from fvg.eval.report import bootstrap_ci, build_report, paired, to_csv, to_markdown
from fvg.io import FvgError

# VBench 2.0's `results_<time>_eval_results.json`: {dimension: [score, [per-video results]]}.
VBENCH = {
    "Mechanics": [0.5, [
        {"video_path": "/data/out/factorized/Mechanics/A ball rolls down a ramp-0.mp4", "video_results": 1},
        {"video_path": "/data/out/factorized/Mechanics/A ball rolls down a ramp-1.mp4", "video_results": 0},
    ]],
    "Human_Anatomy": [0.8125, [{"video_path": "/data/out/factorized/Human_Anatomy/A man waves-0.mp4",
                                "video_results": {"hands": 0.9}}]],
}


def _official_csv(path):
    """eval_dynamic_attr.py's output: header, one row per video (bare ids), `score: ,X` last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "prompt", "1_answer1", "1_answer2", "_answer3", "2_answer1", "2_answer2",
                         "2_answer3", "inter_answers", "Score"])
        for i, score in ((1, 0.75), (2, 0.5), (3, 1.0)):
            writer.writerow([f"{i:04d}", f"prompt {i}", "a", "b", "c", "d", "e", "f", "[]", score])
        writer.writerow(["score: ", 0.75])
    return path


def test_import_t2v_compbench_mode_and_seed_from_folders(tmp_path):
    path = _official_csv(tmp_path / "factorized" / "seed2" / "mymodel_dynamic_attr_score.csv")
    rows = import_t2v_compbench(path)  # mode and seed from the folders, category from the script's file name
    per_video = [r for r in rows if not r.get("aggregate")]
    assert [(r["index"], r["prompt"], r["metrics"]["t2v_compbench"]) for r in per_video] == [
        (1, "prompt 1", 0.75), (2, "prompt 2", 0.5), (3, "prompt 3", 1.0)]
    assert {(r["mode"], r["seed"], r["category"]) for r in rows} == {("factorized", 2, "dynamic_attr")}
    assert rows[-1]["aggregate"] and rows[-1]["metrics"]["t2v_compbench"] == 0.75
    renamed = path.rename(tmp_path / "results.csv")
    with pytest.raises(FvgError, match="not a file T2V-CompBench's scripts write"):
        import_t2v_compbench(renamed)
    with pytest.raises(FvgError, match="--mode"):
        import_t2v_compbench(renamed, category="dynamic_attr")
    rows = import_t2v_compbench(renamed, mode="t2v", seed=0, category="dynamic_attr")
    assert rows[0]["index"] == 1 and rows[0]["mode"] == "t2v"


def test_import_vbench2_json(tmp_path):
    path = tmp_path / "results_2025-03-27-19:00:45_eval_results.json"
    path.write_text(json.dumps(VBENCH, indent=4))
    rows = import_vbench2(path)  # mode from the video paths
    per_video = [r for r in rows if not r.get("aggregate")]
    assert [(r["category"], r["prompt"], r["sample"], r["metrics"]["vbench2"]) for r in per_video] == [
        ("Mechanics", "A ball rolls down a ramp", 0, 1.0), ("Mechanics", "A ball rolls down a ramp", 1, 0.0)]
    aggregates = {r["category"]: r["metrics"]["vbench2"] for r in rows if r.get("aggregate")}
    assert aggregates == {"Mechanics": 0.5, "Human_Anatomy": 0.8125}  # structured per-video results: score only
    assert {r["mode"] for r in rows} == {"factorized"}
    named = tmp_path / "upsampled" / "Mechanics" / "results_x_eval_results.json"  # mode from the output folder
    named.parent.mkdir(parents=True)
    named.write_text(json.dumps({"Mechanics": 0.4}))  # a bare score
    assert [(r["mode"], r["metrics"]["vbench2"]) for r in import_vbench2(named)] == [("upsampled", 0.4)]
    anonymous = tmp_path / "results.json"
    anonymous.write_text(json.dumps({"Mechanics": 0.4}))
    with pytest.raises(FvgError, match="--mode"):
        import_vbench2(anonymous)
    assert import_vbench2(anonymous, mode="t2v")[0]["mode"] == "t2v"


def test_import_command_merges_rows(tmp_path):
    csv_path = _official_csv(tmp_path / "m_dynamic_attr_score.csv")
    to = tmp_path / "official.jsonl"
    argv = ["import", "t2v-compbench", str(csv_path), "--to", str(to), "--mode", "t2v", "--seed", "0"]
    assert main(argv) == 0 and main(argv) == 0  # importing twice replaces, never duplicates
    assert len(to.read_text().splitlines()) == 4
    assert main(["import", "vbench3", str(csv_path), "--to", str(to)]) == 2


def _row(mode, category, index, seed, value, metric="m"):
    return {"source": "fvg", "mode": mode, "category": category, "index": index, "prompt": f"p{index}",
            "seed": seed, "sample": 0, "metrics": {metric: value}}


def test_report_numbers_on_hand_made_scores():
    rows = []
    for seed in (0, 1):
        for i in (1, 2):
            rows.append(_row("t2v", "a", i, seed, 0.5))
            rows.append(_row("factorized", "a", i, seed, 0.5 + 0.1 * i))  # diffs 0.1, 0.2
            rows.append(_row("t2v", "b", i, seed, 1.0))
            rows.append(_row("factorized", "b", i, seed, 1.0))
    rows.append({"source": "t2v-compbench", "mode": "t2v", "category": "a", "aggregate": True,
                 "metrics": {"t2v_compbench": 0.4}})
    report = build_report(rows)
    cell = report.tables["m"]["factorized"]
    assert cell["a"].mean == pytest.approx(0.65) and cell["a"].n == 4 and cell["b"].mean == 1.0
    assert report.tables["t2v_compbench"]["t2v"]["a"].mean == 0.4
    assert list(report.tables["m"]) == ["t2v", "factorized"]
    comps = {(c.metric, c.category): c for c in report.comparisons}
    a = comps[("m", "a")]
    assert (a.treatment, a.baseline, a.n_pairs) == ("factorized", "t2v", 4)
    assert a.mean_diff == pytest.approx(0.15) and a.ci_low >= 0.1 - 1e-12 and a.ci_high <= 0.2 + 1e-12
    assert comps[("m", "b")].mean_diff == 0 and comps[("m", "b")].ci_low == comps[("m", "b")].ci_high == 0
    assert comps[("m", "all")].n_pairs == 8 and comps[("m", "all")].mean_diff == pytest.approx(0.075)
    md = to_markdown(report)
    assert "| factorized | 0.6500 | 1.0000 | 0.8250 |" in md and "| t2v | 0.5000 | 1.0000 | 0.7500 |" in md
    table = list(csv.DictReader(to_csv(report).splitlines()))
    assert {"metric": "m", "mode": "factorized", "category": "mean", "mean": "0.825", "n": "2",
            "source": "categories"} in table
    with pytest.raises(FvgError, match="no scores for mode upsampled"):
        build_report(rows, [("upsampled", "t2v")])


def test_bootstrap_is_reproducible_and_covers_the_mean():
    diffs = np.random.default_rng(5).normal(0.3, 1.0, 200)
    low, high = bootstrap_ci(diffs)
    assert (low, high) == bootstrap_ci(diffs)  # fixed RNG seed
    assert low < diffs.mean() < high and high - low == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.2)
    assert paired([_row("t2v", "a", 1, 0, 1.0)], "factorized", "t2v") == []


def test_report_command_writes_files(tmp_path):
    scores = tmp_path / "scores.jsonl"
    rows = [_row(m, c, i, 0, v + (0.2 if m == "factorized" else 0.1 if m == "upsampled" else 0))
            for m in ("t2v", "upsampled", "factorized") for c in ("x", "y") for i, v in ((1, 0.1), (2, 0.3))]
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    assert main(["report", str(scores), "--out", str(out)]) == 0
    for name in ("report.md", "report.csv", "report.json", "paired.csv", "plots/m.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    data = json.loads((out / "report.json").read_text())
    assert data["tables"]["m"]["factorized"]["x"] == {"mean": pytest.approx(0.4), "n": 2, "source": "videos"}
    pairs = {(c["treatment"], c["baseline"], c["category"]): c["mean_diff"] for c in data["comparisons"]}
    assert pairs[("factorized", "t2v", "all")] == pytest.approx(0.2)
    assert pairs[("upsampled", "t2v", "x")] == pytest.approx(0.1)
    assert pairs[("factorized", "upsampled", "y")] == pytest.approx(0.1)
    assert (out / "plots/m.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(scores), "--out", str(out), "--compare", "factorized-t2v"]) == 2
    assert main(["report", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
