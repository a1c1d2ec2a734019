"""`fvg eval import`: the official evaluators' outputs as score rows, so they land in the same tables.

Score rows (JSONL, the format `fvg eval score` writes too) carry `source`, `mode`, `seed`,
`sample`, `category`, `index`, `prompt` and `metrics` ({name: value}); a row with
`"aggregate": true` is the tool's own category/dimension score.

What the official scripts write (read from their code, T2V-CompBench at commit 116f996 and
VBench-2.0 at 45e79ec; docs/evaluation.md has the table):

- T2V-CompBench: each category's script writes `{t2v_model}<suffix>.csv` (suffixes in
  `COMPBENCH_FILES`) with a header row, one row per video in the order it paired videos with
  prompts (sorted position), and, for the file that holds the category score, a last row
  written by `writer.writerow(["score: ", score])`, i.e. `score: ,0.9375`. Per-video values are
  on each script's own scale; the category score is the mean of a per-category transform of
  them, which `CompBenchFile.normalise` reproduces, so per-video rows land on the scale of the
  category score. The import re-derives the score line from the rows and refuses a file where
  they disagree (edited, or mixed from two runs).
- VBench 2.0: `results_<time>_eval_results.json`, {dimension: [score, [{"video_path": ...,
  "video_results": value}, ...]]}. Seven dimensions write `-1` for a video they could not judge
  and leave it out of the score (`VBENCH_INVALID_MARKER`); those rows are dropped here too.

Mode and seed come from the options, else the `--t2v-model` name in the file name
(`factorized_seed0_consistent_attr_score.csv`), else the file's folders (a folder named like a
mode, a `seed<N>` folder).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fvg.io import FvgError, parse_json, read_jsonl, read_text_file, write_text
from fvg.presets import MODES


def _consistent(s: float) -> float:
    return (s - 1) / 4  # 1-5 LLaVA score (eval_consistent_attr.py, eval_interaction.py)


def _action(s: float) -> float:
    return s / 5  # 0-5 score (eval_action_binding.py)


def _motion(s: float) -> float:
    return 0.0 if s < 0 else 0.2 + 0.8 * s  # -1 (no object found) .. 1 (motion_binding_score_cal.py)


def _same(s: float) -> float:
    return s  # already on the category score's scale


@dataclass(frozen=True)
class CompBenchFile:
    """One CSV a T2V-CompBench script writes as `{t2v_model}{suffix}`."""

    category: str  # fvg's folder name for the category
    suffix: str
    header: tuple[str, ...]  # its first row
    id_suffix: str  # per-video ids: the grid image name ("0001.png") or the bare stem ("0001")
    normalise: Callable[[float], float]  # per-video value -> the category score's scale
    skip_non_numbers: bool  # the script's mean skips rows whose score is not a number ("bad reply")
    by_position: bool  # every video gets a row, in sorted order: row k must name video k
    script: str


_GRID_HEADER = ("name", "prompt", "outputs_1", "outputs_2", "Score")
_VIDEO_HEADER = ("id", "Score_frame_1", "Score_1")
COMPBENCH_FILES = (
    CompBenchFile("consistent_attr", "_consistent_attr_score.csv", ("name", "prompt", "answer_1", "answer_2", "Score"),
                  ".png", _consistent, False, True, "MLLM_eval/eval_consistent_attr.py"),
    # Dynamic attribute skips a video without frames (no row), so its rows cannot be checked by position.
    CompBenchFile("dynamic_attr", "_dynamic_attr_score.csv",
                  ("name", "prompt", "1_answer1", "1_answer2", "_answer3", "2_answer1", "2_answer2", "2_answer3",
                   "inter_answers", "Score"), "", _same, True, False, "MLLM_eval/eval_dynamic_attr.py"),
    CompBenchFile("action_binding", "_action_binding_score.csv", _GRID_HEADER, ".png", _action, True, True,
                  "MLLM_eval/eval_action_binding.py"),
    CompBenchFile("interaction", "_object_interactions_score.csv", _GRID_HEADER, ".png", _consistent, True, True,
                  "MLLM_eval/eval_interaction.py"),
    # 3D rows only; the 2D rows are in `_2dvideo.csv` beside it, and the score line averages both.
    CompBenchFile("spatial_relationship", "_3dvideo.csv", _VIDEO_HEADER, "", _same, False, True,
                  "Detection_eval/eval_spatial_relationships.py.py"),
    CompBenchFile("numeracy", "_numeracy_video.csv", _VIDEO_HEADER, "", _same, False, True,
                  "Detection_eval/eval_numeracy.py"),
    CompBenchFile("motion_binding", "_score.csv", ("id", "object_1", "d_1", "object_2", "d_2", "Score"), "",
                  _motion, False, True, "Tracking_eval/motion_binding_score_cal.py"),
)
SPATIAL_2D_SUFFIX = "_2dvideo.csv"
# Files the scripts write on the way to the ones above: nothing to import from them.
COMPBENCH_INTERMEDIATE = ("_2dframe.csv", "_3dframe.csv", SPATIAL_2D_SUFFIX, "_numeracy_frame.csv",
                          "_foreground.csv", "_background.csv", "_back_fore.csv")
T2V_COMPBENCH_CATEGORIES = tuple(f.category for f in COMPBENCH_FILES)
# VBench-2.0 dimensions whose per-video result -1 means "could not judge" and is left out of the score.
VBENCH_INVALID_MARKER = frozenset({"Mechanics", "Material", "Thermotics", "Human_Clothes", "Human_Identity",
                                   "Motion_Order_Understanding", "Multi-View_Consistency"})
VBENCH_INTERMEDIATE = ("_full_info.json",)
_SEED = re.compile(r"^seed([0-9]{1,18})$")  # ASCII digits, bounded: int() of any match
_SCORE_TOLERANCE = 1e-9


def compbench_file(name: str) -> CompBenchFile | None:
    """The official output a file name ends with (the most specific suffix: `_score.csv` last)."""
    for spec in COMPBENCH_FILES:
        if name.endswith(spec.suffix) and len(name) > len(spec.suffix):
            return spec
    return None


def is_intermediate(path: Path, tool: str) -> bool:
    suffixes = COMPBENCH_INTERMEDIATE if tool == "t2v-compbench" else VBENCH_INTERMEDIATE
    return any(path.name.endswith(s) for s in suffixes)


def _mode_seed_from_words(text: str) -> tuple[str | None, int | None]:
    words = re.split(r"[_\-.\s]+", text)
    modes = {w for w in words if w in MODES}
    seeds = {int(m.group(1)) for w in words if (m := _SEED.match(w))}
    return (modes.pop() if len(modes) == 1 else None), (seeds.pop() if len(seeds) == 1 else None)


def _mode_seed_from_path(path: Path) -> tuple[str | None, int | None]:
    """The innermost folder named like a mode, and the innermost `seed<N>` folder."""
    mode = seed = None
    for part in Path(path).parts[:-1]:
        if part in MODES:
            mode = part
        elif m := _SEED.match(part):
            seed = int(m.group(1))
    return mode, seed


def _required(value, what: str, path: Path, option: str):
    if value is None:
        raise FvgError(f"cannot tell the {what} of {path} from its name or folders: pass {option}")
    return value


def _number(text: str) -> float | None:
    """A finite number, or None ("bad reply", "", "nan", "inf", 1e999)."""
    try:
        value = float(text)
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def _read_csv(path: Path) -> list[list[str]]:
    """All rows, reading quoted fields across lines (LLaVA's answers hold line breaks); blank rows dropped."""
    text = read_text_file(path, "CSV file")
    try:
        return [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    except csv.Error as exc:
        raise FvgError(f"{path} is not a readable CSV: {exc}") from None


def _video_rows(path: Path, spec: CompBenchFile, rows: list[list[str]]) -> list[tuple[int, str | None, str]]:
    """(video number, prompt or None, raw score) per data row, checking the header and the id forms."""
    if not rows or tuple(c.strip() for c in rows[0]) != spec.header:
        raise FvgError(f"{path} is not the CSV {spec.script} writes: its header should be {','.join(spec.header)}")
    pattern = re.compile(rf"^([0-9]{{1,9}}){re.escape(spec.id_suffix)}$")
    out = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(spec.header):
            raise FvgError(f"{path}: row {number} has {len(row)} fields, the header {len(spec.header)}")
        m = pattern.match(row[0].strip())
        if m is None:
            raise FvgError(f"{path}: row {number} names '{row[0][:40]}', not a video id like "
                           f"0001{spec.id_suffix} (the ids {spec.script} writes for fvg's 0001.mp4 ...)")
        prompt = row[1] if spec.header[1] == "prompt" else None
        out.append((int(m.group(1)), prompt, row[-1].strip()))
    return out


def _score_line(path: Path, rows: list[list[str]]) -> tuple[float, list[list[str]]]:
    """The `score: ,X` last row (from `writer.writerow(["score: ", score])`) and the rows before it."""
    last = rows[-1] if rows else []
    if len(last) != 2 or last[0].strip() != "score:":
        raise FvgError(f"{path} has no 'score: ,X' last line: the script did not finish, or this is not its final CSV")
    value = _number(last[1])
    if value is None:
        raise FvgError(f"{path}: the score line holds '{last[1][:40]}', not a finite number")
    return value, rows[:-1]


def _check_positions(path: Path, ids: list[int]) -> None:
    for position, video in enumerate(ids, start=1):
        if video != position:
            raise FvgError(f"{path}: video {video:04d} was scored as the video of prompt {position} (the script "
                           f"pairs videos with prompts by sorted position): its folder had a gap or a stray file; "
                           f"fix the folder (`fvg eval check`) and rerun the script")


def import_t2v_compbench(path: str | Path, mode: str | None = None, seed: int | None = None,
                         category: str | None = None) -> list[dict]:
    """Rows for one final T2V-CompBench CSV: one per video (normalised), plus the category score."""
    path = Path(path)
    spec = compbench_file(path.name)
    if category is not None:
        spec = next((f for f in COMPBENCH_FILES if f.category == category), None)
        if spec is None:
            raise FvgError(f"unknown T2V-CompBench category '{category}' (choose from: "
                           f"{', '.join(T2V_COMPBENCH_CATEGORIES)})")
    if spec is None:
        raise FvgError(f"{path.name} is not a file T2V-CompBench's scripts write (their final CSVs end in "
                       f"{', '.join(f.suffix for f in COMPBENCH_FILES)}): pass --category if it was renamed")
    prefix = path.name[:-len(spec.suffix)] if path.name.endswith(spec.suffix) else path.stem
    name_mode, name_seed = _mode_seed_from_words(prefix)
    path_mode, path_seed = _mode_seed_from_path(path.resolve())
    mode = _required(mode or name_mode or path_mode, "mode", path, "--mode")
    seed = _required(next((s for s in (seed, name_seed, path_seed) if s is not None), None), "seed", path, "--seed")

    score, rows = _score_line(path, _read_csv(path))
    videos = _video_rows(path, spec, rows)
    if spec.category == "spatial_relationship":  # the 2D videos are in the sibling file, without a score line
        sibling = path.with_name(prefix + SPATIAL_2D_SUFFIX)
        if not sibling.is_file():
            raise FvgError(f"{path}: its 2D half {sibling.name} is missing (the score line averages both)")
        videos = sorted(videos + _video_rows(sibling, spec, _read_csv(sibling)))
    ids = [v for v, _, _ in videos]
    if len(set(ids)) != len(ids):
        raise FvgError(f"{path}: a video is listed twice (mixed outputs of two runs?)")
    if spec.by_position:
        _check_positions(path, ids)

    base = {"source": "t2v-compbench", "suite": "t2v-compbench", "mode": mode, "seed": seed, "sample": 0,
            "category": spec.category}
    out, values = [], []
    for video, prompt, raw in videos:
        value = _number(raw)
        if value is None:
            if spec.skip_non_numbers:
                continue  # the script's own mean skips it too
            raise FvgError(f"{path}: video {video:04d} has the score '{raw[:40]}', not a finite number")
        values.append(spec.normalise(value))
        out.append({**base, "index": video, "prompt": prompt, "metrics": {"t2v_compbench": values[-1]},
                    "video": f"{mode}/seed{seed}/{spec.category}/{video:04d}.mp4"})
    if not values:
        raise FvgError(f"{path} holds no scored video")
    mean = math.fsum(values) / len(values)
    if not math.isclose(mean, score, rel_tol=_SCORE_TOLERANCE, abs_tol=_SCORE_TOLERANCE):
        raise FvgError(f"{path}: its videos average {mean:.6f} on the category scale but its score line says "
                       f"{score:.6f}: not one run's output (edited, mixed files, or another category)")
    out.append({**base, "index": None, "prompt": None, "aggregate": True, "metrics": {"t2v_compbench": score}})
    return out


def _vbench_name(video_path: str) -> tuple[str, int | None]:
    stem = Path(video_path).name.removesuffix(".mp4")
    name, _, sample = stem.rpartition("-")
    return (name, int(sample)) if name and re.fullmatch(r"[0-9]{1,9}", sample) else (stem, None)


def _finite(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            return None
        return value if math.isfinite(value) else None
    return None


def import_vbench2(path: str | Path, mode: str | None = None) -> list[dict]:
    """Rows for one VBench 2.0 `*_eval_results.json`: its dimension scores, and per video where numeric."""
    path = Path(path)
    data = parse_json(read_text_file(path, "VBench 2.0 result file"), str(path))
    if not isinstance(data, dict) or not data:
        raise FvgError(f"{path} is not a VBench result: expected {{dimension: [score, [per-video results]]}}")
    path_mode = _mode_seed_from_path(path.resolve())[0] or _mode_seed_from_words(path.stem)[0]
    rows = []
    for dimension, result in data.items():
        score, videos = (result[0], result[1]) if isinstance(result, list) and len(result) == 2 else (result, [])
        if _finite(score) is None or isinstance(score, bool):
            raise FvgError(f"{path}: the score of dimension {dimension[:60]} is not a finite number")
        if not isinstance(videos, list) or not all(isinstance(v, dict) and isinstance(v.get("video_path"), str)
                                                    for v in videos):
            raise FvgError(f"{path}: the per-video results of {dimension[:60]} are not "
                           f"[{{'video_path': ..., 'video_results': ...}}, ...]")
        # The evaluator ran on OUT/<mode>/<Dimension>, so the video paths name the mode.
        video_modes = {_mode_seed_from_path(Path(v["video_path"]))[0] for v in videos} - {None}
        dim_mode = mode or (video_modes.pop() if len(video_modes) == 1 else path_mode)
        dim_mode = _required(dim_mode, "mode", path, "--mode")
        for video in videos:
            value = _finite(video.get("video_results"))
            if value is None:
                continue  # structured per-video results (e.g. Human_Anatomy): the dimension score only
            if value == -1 and dimension in VBENCH_INVALID_MARKER:
                continue  # "could not judge": left out of the official score, so out of comparisons too
            name, sample = _vbench_name(video["video_path"])
            rows.append({"source": "vbench2", "suite": "vbench2", "mode": dim_mode, "seed": None, "sample": sample,
                         "category": dimension, "index": None, "prompt": name, "video": video["video_path"],
                         "metrics": {"vbench2": value}})
        rows.append({"source": "vbench2", "suite": "vbench2", "mode": dim_mode, "seed": None, "sample": None,
                     "category": dimension, "index": None, "prompt": None, "aggregate": True,
                     "metrics": {"vbench2": float(score)}})
    return rows


def import_files(tool: str, files: list[Path], mode: str | None = None, seed: int | None = None,
                 category: str | None = None) -> tuple[list[dict], list[Path]]:
    """Rows of every final output among `files` (a glob over an output folder is fine: the scripts'
    intermediate files are returned as skipped). Two files for the same run and category are refused:
    rerunning a script leaves both, and only one of them is current."""
    if tool not in ("t2v-compbench", "vbench2"):
        raise FvgError(f"unknown tool '{tool}' (choose from: t2v-compbench, vbench2)")
    if tool == "vbench2" and (seed is not None or category is not None):
        raise FvgError("--seed and --category apply to t2v-compbench; VBench names dimensions itself")
    rows, skipped, origin = [], [], {}
    for path in files:
        if is_intermediate(Path(path), tool) and category is None:
            skipped.append(Path(path))
            continue
        new = import_t2v_compbench(path, mode, seed, category) if tool == "t2v-compbench" else import_vbench2(path, mode)
        for row in new:
            if row.get("aggregate"):
                key = (row["mode"], row["seed"], row["category"])
                if key in origin:
                    raise FvgError(f"{origin[key]} and {path} both hold the {row['category']} score of "
                                   f"{row['mode']}" + (f" seed {row['seed']}" if row["seed"] is not None else "")
                                   + ": import only the current one")
                origin[key] = path
        rows += new
    if not rows:
        raise FvgError(f"none of the {len(files)} file(s) is a final {tool} output (only intermediate files)")
    return rows, skipped


def _run_key(row: dict) -> str:
    # JSON text: hashable whatever the values of an old row are
    return json.dumps([row.get(k) for k in ("source", "mode", "seed", "category")], sort_keys=True, default=str)


def merge_rows(path: Path, rows: list[dict]) -> int:
    """Add `rows` to the JSONL at `path`: an import replaces every earlier row of the same runs and
    categories (its videos and its score), so no row of an older evaluation of them stays behind."""
    replaced = {_run_key(r) for r in rows}
    old = read_jsonl(path) if path.exists() else []
    kept = [r for r in old if _run_key(r) not in replaced]
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept + rows))
    return len(rows)
