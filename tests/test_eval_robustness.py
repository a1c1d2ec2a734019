"""Bad files given to `fvg eval import`, `report`, `score`, `check` and left in a resumed eval folder:
each gets one line naming the problem and exit 2 (never a traceback), and nothing damaged is trusted."""

import csv
import json
from pathlib import Path

import pytest

from fvg.eval.cli import main
from fvg.eval.generate import VideoJob, _entry, _job_plan, _PlanStore, read_record
from fvg.io import read_jsonl
from fvg.eval.importers import import_vbench2
from fvg.eval.suites import SuitePrompt
from fvg.io import FvgError

DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5000

BAD_FILES = {
    "binary": b"\x00\x01\x02\xffPNG\x00",
    "not UTF-8": "caf\xe9,0.5\n".encode("latin-1"),
    "deep JSON": DEEP.encode(),
    "huge integer": HUGE_INT.encode(),
    "JSON list": b"[1, 2, 3]",
    "JSON string": b'"hello"',
    "empty": b"",
}


def _one_error_line(capsys, *needles):
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("tool, name", [("t2v-compbench", "t2v_seed0_consistent_attr_score.csv"),
                                        ("vbench2", "results_x_eval_results.json")])
def test_import_bad_result_files(tmp_path, capsys, kind, tool, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[kind])
    to = tmp_path / "official.jsonl"
    assert main(["import", tool, str(path), "--to", str(to), "--mode", "t2v"]) == 2
    _one_error_line(capsys, str(path))
    assert not to.exists()


@pytest.mark.parametrize("text, needle", [
    ('{"Mechanics": 1e999}', "not a finite number"),
    ('{"Mechanics": NaN}', "not a finite number"),
    ('{"Mechanics": [0.5, [1, 2]]}', "per-video results"),
    ('{"Mechanics": [0.5, "x"]}', "per-video results"),
    ('{"Mechanics": "0.5"}', "not a finite number"),
    ('{"Mechanics": [' + HUGE_INT + ', []]}', "not usable JSON"),
    ("{}", "not a VBench result"),
])
def test_import_vbench_values(tmp_path, capsys, text, needle):
    path = tmp_path / "results_eval_results.json"
    path.write_text(text)
    assert main(["import", "vbench2", str(path), "--to", str(tmp_path / "o.jsonl"), "--mode", "t2v"]) == 2
    _one_error_line(capsys, needle)


@pytest.mark.parametrize("last, needle", [("score: ,1e999", "not a finite number"),
                                          ("score: ,nan", "not a finite number"),
                                          (f"score: ,{HUGE_INT}", "not a finite number"),
                                          ("0002.png,p,a,b,5", "no 'score: ,X' last line")])
def test_import_compbench_values(tmp_path, capsys, last, needle):
    path = tmp_path / "t2v_seed0_consistent_attr_score.csv"
    path.write_text(f"name,prompt,answer_1,answer_2,Score\r\n0001.png,p,a,b,5\r\n{last}\r\n")
    assert main(["import", "t2v-compbench", str(path), "--to", str(tmp_path / "o.jsonl")]) == 2
    _one_error_line(capsys, needle)


def test_import_into_a_damaged_or_unwritable_target(tmp_path, capsys):
    path = tmp_path / "t2v_seed0_consistent_attr_score.csv"
    path.write_text("name,prompt,answer_1,answer_2,Score\r\n0001.png,p,a,b,5\r\nscore: ,1.0\r\n")
    to = tmp_path / "official.jsonl"
    to.write_bytes(b"\x00\x00")
    assert main(["import", "t2v-compbench", str(path), "--to", str(to)]) == 2
    _one_error_line(capsys, "binary")
    to.write_text('{"mode": "t2v"}\n[1]\n')
    assert main(["import", "t2v-compbench", str(path), "--to", str(to)]) == 2
    _one_error_line(capsys, "official.jsonl:2 is not a JSON object")
    assert to.read_text() == '{"mode": "t2v"}\n[1]\n'  # left as it was
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["import", "t2v-compbench", str(path), "--to", str(blocker / "o.jsonl")]) == 2
    _one_error_line(capsys, "cannot write")


GOOD_ROW = {"source": "fvg", "mode": "t2v", "category": "a", "index": 1, "seed": 0, "sample": 0, "metrics": {"m": 1}}


@pytest.mark.parametrize("content, needle", [
    (BAD_FILES["binary"], "binary"),
    (BAD_FILES["not UTF-8"], "not UTF-8"),
    (DEEP.encode() + b"\n", "nested too deeply"),
    (HUGE_INT.encode() + b"\n", "not usable JSON"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"mode": "t2v"\n', "not valid JSON"),
    (json.dumps({**GOOD_ROW, "metrics": {"m": 1e999}}).encode(), "non-finite value for metric 'm'"),
    (json.dumps({**GOOD_ROW, "metrics": {"m": "0.5"}}).encode(), "non-numeric value"),
    (json.dumps({**GOOD_ROW, "metrics": [1]}).encode(), "no 'metrics' object"),
    (json.dumps({**GOOD_ROW, "mode": ["t2v"]}).encode(), "no 'mode' name"),
    (json.dumps({**GOOD_ROW, "seed": [0]}).encode(), "'seed' that is not an integer"),
    (json.dumps({**GOOD_ROW, "aggregate": "yes"}).encode(), "'aggregate'"),
    (json.dumps({**GOOD_ROW, "metrics": {"m": int(HUGE_INT[:400])}}).encode(), "non-finite value"),
])
def test_report_on_bad_score_files(tmp_path, capsys, content, needle):
    scores = tmp_path / "scores.jsonl"
    scores.write_bytes(content)
    out = tmp_path / "report"
    assert main(["report", str(scores), "--out", str(out), "--no-plots"]) == 2
    _one_error_line(capsys, needle)
    assert not out.exists()


def test_report_missing_file_and_unwritable_out(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r")]) == 2
    _one_error_line(capsys, "not found")
    scores = tmp_path / "scores.jsonl"
    scores.write_text(json.dumps(GOOD_ROW) + "\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["report", str(scores), "--out", str(blocker), "--no-plots"]) == 2
    _one_error_line(capsys, "cannot write the report")


# --- a resumed `fvg eval generate` folder -------------------------------------------------------

@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle moves right\n")
    return path


def _generate(prompts: Path, out: Path) -> int:
    return main(["generate", "--suite", str(prompts), "--out", str(out), "--preset", "tiny", "--steps", "1",
                 "--modes", "t2v"])


DAMAGED_CONFIG = [BAD_FILES["binary"], BAD_FILES["deep JSON"], BAD_FILES["JSON list"], BAD_FILES["huge integer"],
                  b'{"modes": "t2v", "seeds": [0]}', b'{"modes": ["t2v"], "seeds": [[0]]}', b"{"]
ENTRY = {"video": "t2v/seed0/p/0001.mp4", "prompt": "a", "mode": "t2v", "category": "p", "index": 1, "seed": 0}
DAMAGED_MANIFEST = [BAD_FILES["binary"], b"[1]\n", b'{"video": 5}\n', b'{"video": "../x.mp4"}\n', DEEP.encode(),
                    json.dumps({**ENTRY, "prompt": 5}).encode(), json.dumps({**ENTRY, "anchor": "/etc/x"}).encode(),
                    json.dumps({**ENTRY, "seed": "0"}).encode()]


@pytest.mark.parametrize("name, content", [("eval.json", c) for c in DAMAGED_CONFIG]
                         + [("manifest.jsonl", c) for c in DAMAGED_MANIFEST])
def test_resume_refuses_a_damaged_folder_before_any_model_loads(tmp_path, capsys, prompts, name, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(content)
    assert _generate(prompts, out) == 2
    _one_error_line(capsys, name, "delete it")
    assert (out / name).read_bytes() == content and not (out / "t2v").exists()
    if name == "manifest.jsonl":
        assert main(["score", str(out), "--metrics", "motion"]) == 2
        _one_error_line(capsys, name)


def _job(mode="upsampled") -> VideoJob:
    item = SuitePrompt("c", 1, "a red circle moves right")
    video = f"{mode}/seed0/c/0001.mp4"
    return VideoJob(0, 0, item, mode, 0, 0, video, f"records/{video[:-4]}")


@pytest.mark.parametrize("content", [BAD_FILES["binary"], BAD_FILES["deep JSON"], BAD_FILES["JSON list"],
                                     BAD_FILES["huge integer"], b'{"eval": 5, "timings_s": [1], "video_prompt": 3}',
                                     b'{"prompt": "another prompt", "mode": "upsampled", "seed": 0, '
                                     b'"video_prompt": "stale", "timings_s": {"total": 1}}'])
def test_damaged_or_foreign_run_records_are_not_trusted(tmp_path, content):
    job = _job()
    record = tmp_path / job.record
    record.mkdir(parents=True)
    (record / "run.json").write_bytes(content)
    (record / "plan.json").write_bytes(content)
    entry = _entry(job, tmp_path, "skipped", 0)
    assert entry["video_prompt"] is None and entry["timings"] == {} and entry["plan"] is None
    assert read_record(record / "run.json") in (None, json.loads(content) if content.startswith(b"{") else None)


@pytest.mark.parametrize("plan", [
    {"prompt": "a red circle moves right", "first_frame_caption": "c", "upsampled_prompt": "u", "backend": "rules",
     "template_version": "1", "warnings": 5},  # from_dict would raise TypeError
    {"prompt": "a blue square", "first_frame_caption": "c", "upsampled_prompt": "u", "backend": "rules",
     "template_version": "1"},  # another prompt's plan
    {"prompt": 1},
])
def test_damaged_or_foreign_plans_are_planned_again(tmp_path, plan):
    job = _job()
    (tmp_path / job.record).mkdir(parents=True)
    (tmp_path / job.record / "plan.json").write_text(json.dumps(plan))
    assert _job_plan(job, tmp_path) is None

    class Planner:
        calls = 0

        def plan(self, prompt):
            Planner.calls += 1
            return "fresh"

    assert _PlanStore(Planner(), tmp_path).get([job])[0] == "fresh" and Planner.calls == 1


def test_read_jsonl_splits_on_newlines_only(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b\x0cc"}, ensure_ascii=False) + "\n")
    assert read_jsonl(path) == [{"prompt": "a\u2028b\x0cc"}]  # str.splitlines() would split this line in three
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": 1}).encode() + b"\n")
    assert read_jsonl(path) == [{"a": 1}]  # a BOM is tolerated
    with pytest.raises(FvgError, match="is a folder"):
        read_jsonl(tmp_path)


def test_check_on_damaged_folders(tmp_path, capsys):
    assert main(["check", str(tmp_path / "none"), "--suite", "minicompbench"]) == 2
    _one_error_line(capsys, "not found")
    assert main(["check", str(tmp_path)]) == 2
    _one_error_line(capsys, "no eval.json")
    (tmp_path / "eval.json").write_bytes(b"\x00")
    assert main(["check", str(tmp_path)]) == 2
    _one_error_line(capsys, "binary")
    (tmp_path / "eval.json").write_text('{"suite": 5}')
    assert main(["check", str(tmp_path)]) == 2
    _one_error_line(capsys, "names no suite")
    (tmp_path / "eval.json").write_text('{"suite": "minicompbench", "source": "fvg.miniworld"}')
    assert main(["check", str(tmp_path)]) == 2
    _one_error_line(capsys, "no video folders")
    # A held-out MiniCompBench is read from the folder its eval.json names.
    (tmp_path / "eval.json").write_text(json.dumps({"suite": "minicompbench", "source": str(tmp_path / "gone")}))
    assert main(["check", str(tmp_path)]) == 2
    _one_error_line(capsys, f"prompt folder not found: {tmp_path / 'gone'}")


@pytest.mark.parametrize("video_id, needle", [("9" * 5000 + ".png", "not a video id"), ("٣.png", "not a video id"),
                                               ("0001.png\n", None)])
def test_import_compbench_odd_ids(tmp_path, capsys, video_id, needle):
    path = tmp_path / "t2v_seed0_consistent_attr_score.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "prompt", "answer_1", "answer_2", "Score"])
        writer.writerow([video_id, "p", "a", "b", 5])
        writer.writerow(["score: ", 1.0])
    code = main(["import", "t2v-compbench", str(path), "--to", str(tmp_path / "o.jsonl")])
    if needle is None:
        assert code == 0
    else:
        assert code == 2
        _one_error_line(capsys, needle)


def test_odd_names_in_paths_do_not_crash(tmp_path, capsys):
    folder = tmp_path / ("seed" + "9" * 5000)[:200] / "t2v" / "Mechanics"
    folder.mkdir(parents=True)
    path = folder / "results_eval_results.json"
    path.write_text(json.dumps({"Mechanics": [0.5, [{"video_path": "/x/t2v/Mechanics/a ball-².mp4",
                                                     "video_results": 1}]]}))
    rows = import_vbench2(path)
    assert rows[0]["prompt"] == "a ball-²" and rows[0]["sample"] is None and rows[0]["mode"] == "t2v"
    out = tmp_path / "out"
    (out / "t2v" / ("seed" + "9" * 200)).mkdir(parents=True)
    assert main(["check", str(out), "--suite", "minicompbench"]) == 2
    _one_error_line(capsys, "no minicompbench videos")
