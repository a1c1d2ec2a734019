"""`fvg bench compare`: two benches paired video by video, from their OUT/scores.jsonl."""

import json

import pytest

from fvg.eval.bench_compare import compare_benches, to_markdown
from fvg.io import FvgError


def _bench(folder, scores_by_label, seeds=(0, 1), prompts=("a red circle moves up", "a blue square moves left")):
    """A bench folder whose scores.jsonl holds, per label, the given scores in (prompt, seed) order."""
    folder.mkdir(parents=True)
    rows = []
    for label, scores in scores_by_label.items():
        keys = [(i, p, s) for i, p in enumerate(prompts, start=1) for s in seeds]
        for (index, prompt, seed), score in zip(keys, scores):
            rows.append({"source": "fvg", "suite": "minicompbench", "category": f"cat{index}", "index": index,
                         "sample": 0, "prompt": prompt, "mode": label, "seed": seed,
                         "metrics": {"minicompbench": score, "minicompbench_frame0": 1.0}})
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_compare_pairs_by_prompt_and_seed_in_ladder_order(tmp_path):
    base = _bench(tmp_path / "base", {"factorized@15": [0.5, 0.5, 0.2, 0.4], "first-frame@15": [0.6, 0.6, 0.6, 0.6],
                                      "vae": [1.0, 1.0, 1.0, 1.0], "t2v@50": [0.1, 0.1, 0.1, 0.1]})
    new = _bench(tmp_path / "new", {"factorized@15": [0.7, 0.5, 0.4, 0.6], "first-frame@15": [0.5, 0.7, 0.6, 0.6],
                                    "vae": [1.0, 1.0, 1.0, 1.0], "upsampled@50": [0.3] * 4})
    got = compare_benches(base, new)
    # The ladder's rungs first, then the configurations; a label one bench lacks is not compared.
    assert [c.label for c in got] == ["vae", "first-frame@15", "factorized@15"]
    f15 = got[2]
    assert f15.base == pytest.approx(0.4) and f15.new == pytest.approx(0.55)
    assert f15.diff == pytest.approx(0.15) and f15.pairs == 4 and f15.unpaired == 0
    # Differences 0.2, 0, 0.2, 0.2: every resample's mean lies in [0, 0.2].
    assert 0 <= f15.ci_low <= f15.diff <= f15.ci_high <= 0.2
    assert f15.by_category == pytest.approx({"cat1": 0.1, "cat2": 0.2})
    assert got[0].diff == 0 and got[0].ci_low == got[0].ci_high == 0
    assert got[1].diff == pytest.approx(0.0) and got[1].ci_low < 0 < got[1].ci_high
    md = to_markdown(got, base, new)
    assert "| factorized@15 | 0.400 | 0.550 | +0.150 [" in md and "**up**" not in md.split("| vae |")[1].split("\n")[0]


def test_compare_counts_videos_only_one_bench_made(tmp_path):
    base = _bench(tmp_path / "base", {"t2v@50": [0.2, 0.4, 0.6]}, seeds=(0, 1, 2), prompts=("a red circle moves up",))
    new = _bench(tmp_path / "new", {"t2v@50": [0.3, 0.5]}, seeds=(0, 1), prompts=("a red circle moves up",))
    (got,) = compare_benches(base, new)
    assert got.pairs == 2 and got.unpaired == 1
    assert got.base == pytest.approx(0.3) and got.diff == pytest.approx(0.1)


def test_compare_pools_benches_of_other_seeds_and_refuses_overlaps(tmp_path, capsys):
    from fvg.cli import main

    one = {"prompts": ("a red circle moves up",)}
    base = _bench(tmp_path / "base", {"t2v@50": [0.2, 0.4]}, seeds=(0, 1), **one)
    base_more = _bench(tmp_path / "base-23", {"t2v@50": [0.6, 0.0]}, seeds=(2, 3), **one)
    new = _bench(tmp_path / "new", {"t2v@50": [0.3, 0.5]}, seeds=(0, 1), **one)
    new_more = _bench(tmp_path / "new-23", {"t2v@50": [0.7, 0.1]}, seeds=(2, 3), **one)
    (got,) = compare_benches([base, base_more], [new, new_more])
    assert got.pairs == 4 and got.unpaired == 0
    assert got.base == pytest.approx(0.3) and got.diff == pytest.approx(0.1)  # every pair 0.1 apart
    assert main(["bench", "compare", str(base), str(new), "--base-also", str(base_more), "--new-also",
                 str(new_more), "--out", str(tmp_path / "cmp")]) == 0
    assert f"BASE {base} + {base_more}, NEW {new} + {new_more}:" in capsys.readouterr().out
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["new"] == [str(new), str(new_more)]
    with pytest.raises(FvgError, match="both hold t2v@50 of 'a red circle moves up' at seed 0: pool benches of "
                                       "other seeds only"):
        compare_benches([base, new], new_more)


def test_compare_refuses_benches_that_do_not_pair(tmp_path):
    base = _bench(tmp_path / "base", {"t2v@50": [0.2, 0.4]}, seeds=(0,))
    other_prompts = _bench(tmp_path / "held-out", {"t2v@50": [0.2, 0.4]}, seeds=(0,), prompts=("a cat", "a dog"))
    with pytest.raises(FvgError, match="t2v@50: no video of .* has the prompt and seed"):
        compare_benches(base, other_prompts)
    other_labels = _bench(tmp_path / "other", {"factorized@15": [0.2, 0.4]}, seeds=(0,))
    with pytest.raises(FvgError, match="share no configuration or ladder rung"):
        compare_benches(base, other_labels)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FvgError, match="has no scores.jsonl: run its `fvg bench mini` command again"):
        compare_benches(base, tmp_path / "empty")
    with pytest.raises(FvgError, match="is not a folder"):
        compare_benches(base, tmp_path / "missing")


def test_compare_cli_writes_its_tables_or_fails_in_one_line(tmp_path, capsys):
    from fvg.cli import main

    base = _bench(tmp_path / "base", {"factorized@15": [0.5, 0.5, 0.2, 0.4]})
    new = _bench(tmp_path / "new", {"factorized@15": [0.7, 0.7, 0.4, 0.6]})
    assert main(["bench", "compare", str(base), str(new), "--out", str(tmp_path / "cmp")]) == 0
    assert "+0.200 [+0.200, +0.200] **up**" in capsys.readouterr().out
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["comparisons"][0]["label"] == "factorized@15" and data["comparisons"][0]["pairs"] == 4
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("BASE ")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scores.jsonl").write_text('{"mode": "t2v@50"}\n')
    assert main(["bench", "compare", str(base), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "row 1 has no 'category' name" in err and "Traceback" not in err
