"""`fvg eval import`: the official evaluators' outputs as score rows, so they land in the same tables.

Score rows (JSONL, the format `fvg eval score` writes too) carry `source`, `mode`, `seed`,
`sample`, `category`, `index`, `prompt` and `metrics` ({name: value}); a row with
`"aggregate": true` is a category score the tool reported without per-video values.

Assumed formats (modelled on what the tools write; see docs/evaluation.md):

- T2V-CompBench: one CSV per category and run. Each data row names a video (a field like
  `0001.mp4` or `0001`, whose first 4 digits are the 1-based prompt line) and ends with
  its score; a header row is optional; the last line is `score: X`, the category mean.
- VBench 2.0: `<name>_eval_results.json`, {dimension: [aggregate, [{"video_path": ...,
  "video_results": value}, ...]]} (a bare number instead of the list is accepted too);
  video names are `<prompt[:180]>-<i>.mp4`.

Mode, seed and category come from the options or, failing those, from the file's path
(a folder named like a mode, a `seed<N>` folder, a category name in the file name).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from fvg.io import FvgError, write_text
from fvg.presets import MODES

T2V_COMPBENCH_CATEGORIES = ("consistent_attr", "dynamic_attr", "spatial_relationship", "motion_binding",
                            "action_binding", "interaction", "numeracy")
# Other spellings of the categories in the tools' own file and folder names.
_ALIASES = {"spatial": "spatial_relationship", "object_interactions": "interaction",
            "generative_numeracy": "numeracy", "consistent_attribute": "consistent_attr",
            "dynamic_attribute": "dynamic_attr"}
_VIDEO_ID = re.compile(r"^(\d{4})(\.mp4)?$")
_SEED = re.compile(r"^seed(\d+)$")


def _mode_seed_from_path(path: Path) -> tuple[str | None, int | None]:
    """A folder named like a mode (or a mode as a word of the file name), and a `seed<N>` folder."""
    mode = seed = None
    for part in path.resolve().parts[:-1]:
        if part in MODES:
            mode = part
        elif m := _SEED.match(part):
            seed = int(m.group(1))
    if mode is None:
        words = [w for w in re.split(r"[_\-.\s]+", path.stem) if w in MODES]
        mode = words[0] if len(set(words)) == 1 else None
    return mode, seed


def _category_from_name(path: Path, known: tuple[str, ...]) -> str | None:
    """The longest known category (or alias) in the file name, else in its folders."""
    names = {c: c for c in known} | {a: c for a, c in _ALIASES.items() if c in known}
    for text in [path.stem, *reversed(path.resolve().parts[:-1])]:
        hits = [n for n in names if n in text.lower()]
        if hits:
            return names[max(hits, key=len)]
    return None


def _required(value, what: str, path: Path, option: str):
    if value is None:
        raise FvgError(f"cannot tell the {what} of {path} from its path: pass {option}")
    return value


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def import_t2v_compbench(path: str | Path, mode: str | None = None, seed: int | None = None,
                         category: str | None = None) -> list[dict]:
    """Rows for one T2V-CompBench CSV: one per video, plus the `score:` line as an aggregate."""
    path = Path(path)
    if not path.is_file():
        raise FvgError(f"T2V-CompBench CSV not found: {path}")
    path_mode, path_seed = _mode_seed_from_path(path)
    mode = _required(mode or path_mode, "mode", path, "--mode")
    seed = _required(seed if seed is not None else path_seed, "seed", path, "--seed")
    category = _required(category or _category_from_name(path, T2V_COMPBENCH_CATEGORIES), "category", path,
                         "--category")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or not lines[-1].lower().startswith("score:"):
        raise FvgError(f"{path} is not a T2V-CompBench result: its last line should be 'score: X'")
    total = _float(lines[-1].split(":", 1)[1].strip())
    if total is None:
        raise FvgError(f"{path}: cannot read the number in '{lines[-1]}'")
    base = {"source": "t2v-compbench", "suite": "t2v-compbench", "mode": mode, "seed": seed, "sample": 0,
            "category": category}
    rows = []
    for fields in csv.reader(io.StringIO("\n".join(lines[:-1]))):
        ids = [m for f in fields if (m := _VIDEO_ID.match(Path(f.strip()).name))]
        values = [v for f in fields if (v := _float(f.strip())) is not None and not _VIDEO_ID.match(f.strip())]
        if ids and values:  # the header and anything else without a video and a score are skipped
            index = int(ids[0].group(1))
            rows.append({**base, "index": index, "prompt": None, "metrics": {"t2v_compbench": values[-1]},
                         "video": f"{mode}/seed{seed}/{category}/{index:04d}.mp4"})
    rows.append({**base, "index": None, "prompt": None, "aggregate": True, "metrics": {"t2v_compbench": total}})
    return rows


def _vbench_name(video_path: str) -> tuple[str, int | None]:
    stem = Path(video_path).name.removesuffix(".mp4")
    name, _, sample = stem.rpartition("-")
    return (name, int(sample)) if name and sample.isdigit() else (stem, None)


def import_vbench2(path: str | Path, mode: str | None = None) -> list[dict]:
    """Rows for one VBench 2.0 `*_eval_results.json`: per video where given, one aggregate per dimension."""
    path = Path(path)
    if not path.is_file():
        raise FvgError(f"VBench 2.0 result file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FvgError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise FvgError(f"{path} is not a VBench result: expected {{dimension: [score, [per-video results]]}}")
    rows = []
    for dimension, result in data.items():
        aggregate, videos = (result[0], result[1]) if isinstance(result, list) and len(result) == 2 else (result, [])
        if isinstance(aggregate, bool) or not isinstance(aggregate, (int, float)):
            raise FvgError(f"{path}: the score of dimension {dimension} is not a number")
        videos = [v for v in videos if isinstance(v, dict) and isinstance(v.get("video_path"), str)] \
            if isinstance(videos, list) else []
        # The evaluator ran on OUT/<mode>/, so the video paths name the mode; else the file's path does.
        video_modes = {_mode_seed_from_path(Path(v["video_path"]))[0] for v in videos} - {None}
        file_mode = mode or (video_modes.pop() if len(video_modes) == 1 else _mode_seed_from_path(path)[0])
        for video in videos:
            value = video.get("video_results")
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, (int, float)):
                continue  # dimensions whose per-video results are structures: only the aggregate counts
            video_mode = mode or _mode_seed_from_path(Path(video["video_path"]))[0] or file_mode
            name, sample = _vbench_name(video["video_path"])
            rows.append({"source": "vbench2", "suite": "vbench2", "mode": _required(video_mode, "mode", path, "--mode"),
                         "seed": None, "sample": sample, "category": dimension, "index": None, "prompt": name,
                         "video": video["video_path"], "metrics": {"vbench2": float(value)}})
        rows.append({"source": "vbench2", "suite": "vbench2", "mode": _required(file_mode, "mode", path, "--mode"),
                     "seed": None, "sample": None, "category": dimension, "index": None, "prompt": None,
                     "aggregate": True, "metrics": {"vbench2": float(aggregate)}})
    return rows


def _row_key(row: dict) -> tuple:
    return (row.get("source"), row.get("mode"), row.get("seed"), row.get("sample"), row.get("category"),
            row.get("index"), row.get("prompt"), bool(row.get("aggregate")))


def merge_rows(path: Path, rows: list[dict]) -> int:
    """Add `rows` to the JSONL at `path`, replacing rows for the same video or aggregate."""
    from .generate import read_jsonl

    new = {_row_key(r) for r in rows}
    kept = [r for r in read_jsonl(path) if _row_key(r) not in new] if path.is_file() else []
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept + rows))
    return len(rows)
