"""`fvg eval report`: mode x category tables, plots and paired comparisons from score rows.

A table cell is the official category/dimension score where an imported source gave one
(`aggregate` rows; the mean of them over runs, e.g. seeds), so the tables show the numbers the
benchmarks' own tools print; otherwise (fvg's local metrics) the mean over the cell's videos.
Per-video values serve the paired comparisons. The `mean` column averages the categories
equally, as the benchmarks' papers do.

Paired comparisons take, per prompt and seed, treatment minus baseline (e.g. factorized -
t2v) on the same metric: the seeds are shared across modes, so each difference isolates the
mode. The interval is a percentile bootstrap over the pairs (fixed RNG seed: reruns agree).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fvg.io import FvgError, atomic_path, write_json, write_text
from fvg.presets import MODES

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
ALL = "all"  # the pseudo-category of pooled comparisons


OFFICIAL = "official"  # Cell.source: the tool's own category/dimension score(s)
VIDEOS = "videos"  # Cell.source: the mean of per-video values


@dataclass(frozen=True)
class Cell:
    mean: float
    n: int  # official scores averaged (runs), or videos
    source: str = VIDEOS  # OFFICIAL or VIDEOS


@dataclass(frozen=True)
class Comparison:
    metric: str
    treatment: str
    baseline: str
    category: str  # a category or ALL
    mean_diff: float
    ci_low: float
    ci_high: float
    n_pairs: int


@dataclass
class Report:
    tables: dict[str, dict[str, dict[str, Cell]]]  # metric -> mode -> category -> cell
    categories: dict[str, list[str]]  # metric -> categories in first-seen order
    comparisons: list[Comparison]


def _modes_sorted(modes) -> list[str]:
    return sorted(modes, key=lambda m: (MODES.index(m) if m in MODES else len(MODES), m))


def build_tables(rows: list[dict]) -> tuple[dict, dict]:
    per_video: dict = defaultdict(list)
    aggregate: dict = defaultdict(list)
    categories: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        for metric, value in (row.get("metrics") or {}).items():
            if value is None:
                continue
            key = (metric, row["mode"], row["category"])
            (aggregate if row.get("aggregate") else per_video)[key].append(float(value))
            if row["category"] not in categories[metric]:
                categories[metric].append(row["category"])
    tables: dict = defaultdict(lambda: defaultdict(dict))
    for key in set(per_video) | set(aggregate):
        metric, mode, category = key
        if aggregate.get(key):  # the official score: what the benchmark's tool reports, with its own rules
            tables[metric][mode][category] = Cell(float(np.mean(aggregate[key])), len(aggregate[key]), OFFICIAL)
        else:
            tables[metric][mode][category] = Cell(float(np.mean(per_video[key])), len(per_video[key]), VIDEOS)
    return ({m: {mode: tables[m][mode] for mode in _modes_sorted(tables[m])} for m in sorted(tables)},
            dict(categories))


def bootstrap_ci(diffs: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    if len(diffs) == 1:
        return float(diffs[0]), float(diffs[0])
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 1000):  # chunks keep memory flat for many pairs
        idx = rng.integers(0, len(diffs), size=(min(1000, samples - start), len(diffs)))
        means[start:start + len(idx)] = diffs[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def pair_key(row: dict) -> tuple:
    return (row.get("source"), row["category"], row.get("index"), row.get("prompt"), row.get("seed"),
            row.get("sample"))


def paired(rows: list[dict], treatment: str, baseline: str) -> list[Comparison]:
    """treatment - baseline per (prompt, seed), per metric, per category and pooled."""
    values: dict = defaultdict(dict)  # (metric, mode) -> pair key -> value
    for row in rows:
        if row.get("aggregate") or row.get("mode") not in (treatment, baseline):
            continue
        for metric, value in (row.get("metrics") or {}).items():
            if value is not None:
                values[(metric, row["mode"])][pair_key(row)] = float(value)
    out = []
    for metric in sorted({m for m, _ in values}):
        a, b = values.get((metric, treatment), {}), values.get((metric, baseline), {})
        keys = [k for k in a if k in b]
        if not keys:
            continue
        by_category: dict = defaultdict(list)
        for k in keys:
            by_category[k[1]].append(a[k] - b[k])
        by_category[ALL] = [a[k] - b[k] for k in keys]
        for category, diffs in by_category.items():
            d = np.asarray(diffs)
            low, high = bootstrap_ci(d)
            out.append(Comparison(metric, treatment, baseline, category, float(d.mean()), low, high, len(d)))
    return out


def default_pairs(modes: set[str]) -> list[tuple[str, str]]:
    """Each mode against t2v, and factorized against upsampled (the paper's two questions)."""
    pairs = [(m, "t2v") for m in _modes_sorted(modes) if m != "t2v" and "t2v" in modes]
    if {"factorized", "upsampled"} <= modes:
        pairs.append(("factorized", "upsampled"))
    return pairs


def parse_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.count(":") != 1:
            raise FvgError(f"bad comparison '{part}': write TREATMENT:BASELINE, e.g. factorized:t2v")
        treatment, baseline = (s.strip() for s in part.split(":"))
        pairs.append((treatment, baseline))
    return pairs


def build_report(rows: list[dict], pairs: list[tuple[str, str]] | None = None) -> Report:
    if not rows:
        raise FvgError("no score rows to report on")
    tables, categories = build_tables(rows)
    modes = {r["mode"] for r in rows}
    comparisons = []
    for treatment, baseline in default_pairs(modes) if pairs is None else pairs:
        missing = [m for m in (treatment, baseline) if m not in modes]
        if missing:
            raise FvgError(f"no scores for mode {missing[0]} (have: {', '.join(_modes_sorted(modes))})")
        comparisons += paired(rows, treatment, baseline)
    comparisons.sort(key=lambda c: c.metric)  # stable: pairs keep their order within a metric
    return Report(tables, categories, comparisons)


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def category_mean(cells: dict[str, Cell], categories: list[str]) -> float | None:
    present = [cells[c].mean for c in categories if c in cells]
    return float(np.mean(present)) if len(present) == len(categories) else None


def to_markdown(report: Report) -> str:
    lines = ["# Evaluation report", ""]
    for metric, by_mode in report.tables.items():
        cats = report.categories[metric]
        lines += [f"## {metric}", "", "| mode | " + " | ".join(cats) + " | mean |",
                  "|---" * (len(cats) + 2) + "|"]
        sources = {cell.source for cells in by_mode.values() for cell in cells.values()}
        mark = "*" if len(sources) > 1 else ""  # marks per-video means in a table that mixes both
        for mode, cells in by_mode.items():
            mean = category_mean(cells, cats)
            row = [_fmt(cells[c].mean) + (mark if cells[c].source == VIDEOS else "") if c in cells else "-"
                   for c in cats]
            lines.append(f"| {mode} | " + " | ".join(row) + f" | {'-' if mean is None else _fmt(mean)} |")
        lines += ["", _source_note(sources, mark), ""]
    if report.comparisons:
        lines += ["## Paired comparisons", "",
                  f"Per prompt and seed, treatment - baseline; 95% percentile bootstrap interval "
                  f"({BOOTSTRAP_SAMPLES} resamples, seed {BOOTSTRAP_SEED}).", "",
                  "| metric | comparison | category | mean diff | 95% CI | pairs |", "|---|---|---|---|---|---|"]
        for c in report.comparisons:
            lines.append(f"| {c.metric} | {c.treatment} - {c.baseline} | {c.category} | {_fmt(c.mean_diff)} | "
                         f"[{_fmt(c.ci_low)}, {_fmt(c.ci_high)}] | {c.n_pairs} |")
        lines.append("")
    return "\n".join(lines)


def _source_note(sources: set[str], mark: str) -> str:
    official = ("the official category/dimension score (the mean over runs where there are several, "
                "e.g. seeds); per-video values serve only the paired comparisons")
    if sources == {OFFICIAL}:
        return f"Cells: {official}."
    if sources == {VIDEOS}:
        return "Cells: the mean over the cell's videos (all prompts and seeds)."
    return f"Cells: {official}; cells marked {mark}: the mean over their videos (no official score imported)."


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", "mode", "category", "mean", "n", "source"])
    for metric, by_mode in report.tables.items():
        for mode, cells in by_mode.items():
            for category in report.categories[metric]:
                if category in cells:
                    cell = cells[category]
                    writer.writerow([metric, mode, category, cell.mean, cell.n, cell.source])
            mean = category_mean(cells, report.categories[metric])
            if mean is not None:
                writer.writerow([metric, mode, "mean", mean, len(report.categories[metric]), "categories"])
    return buf.getvalue()


def comparisons_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", "treatment", "baseline", "category", "mean_diff", "ci_low", "ci_high", "n_pairs"])
    for c in report.comparisons:
        writer.writerow([c.metric, c.treatment, c.baseline, c.category, c.mean_diff, c.ci_low, c.ci_high, c.n_pairs])
    return buf.getvalue()


def to_json(report: Report) -> dict:
    return {
        "tables": {m: {mode: {c: asdict(cell) for c, cell in cells.items()} for mode, cells in by_mode.items()}
                   for m, by_mode in report.tables.items()},
        "categories": report.categories,
        "comparisons": [asdict(c) for c in report.comparisons],
        "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95},
    }


def plot(report: Report, out_dir: Path) -> list[Path]:
    """One PNG per metric: grouped bars (category x mode), and the paired differences with CIs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    for metric, by_mode in report.tables.items():
        cats = report.categories[metric]
        comps = [c for c in report.comparisons if c.metric == metric]
        fig, axes = plt.subplots(1, 2 if comps else 1, figsize=(12 if comps else 7, 4), squeeze=False)
        ax = axes[0][0]
        width = 0.8 / max(1, len(by_mode))
        x = np.arange(len(cats))
        for i, (mode, cells) in enumerate(by_mode.items()):
            ax.bar(x + i * width, [cells[c].mean if c in cells else np.nan for c in cats], width, label=mode)
        ax.set_xticks(x + width * (len(by_mode) - 1) / 2, cats, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.legend(fontsize=8)
        if comps:
            ax = axes[0][1]
            labels = [f"{c.treatment}-{c.baseline}\n{c.category}" for c in comps]
            means = np.array([c.mean_diff for c in comps])
            err = np.array([[c.mean_diff - c.ci_low for c in comps], [c.ci_high - c.mean_diff for c in comps]])
            ax.errorbar(means, np.arange(len(comps)), xerr=err, fmt="o", capsize=3)
            ax.axvline(0, color="grey", lw=0.8)
            ax.set_yticks(np.arange(len(comps)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{metric}: paired difference, 95% CI")
        fig.tight_layout()
        path = out_dir / "plots" / f"{metric}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_report(report: Report, out_dir: Path, plots: bool = True) -> list[Path]:
    out_dir = Path(out_dir)
    files = {"report.md": to_markdown(report), "report.csv": to_csv(report), "paired.csv": comparisons_csv(report)}
    for name, text in files.items():
        write_text(out_dir / name, text)
    write_json(out_dir / "report.json", to_json(report))
    written = [out_dir / name for name in [*files, "report.json"]]
    if plots:
        written += plot(report, out_dir)
    return written


def load_rows(paths: list[Path]) -> list[dict]:
    """Score rows of JSONL files, each checked (types of the fields the report uses, finite metric values):
    a damaged or foreign file is refused with the file and row named, never half-read."""
    from fvg.io import read_jsonl

    rows = []
    for path in paths:
        for number, row in enumerate(read_jsonl(Path(path)), start=1):
            problem = _row_problem(row)
            if problem:
                raise FvgError(f"{path}: row {number} {problem}: not an fvg score file "
                               f"(`fvg eval score` and `fvg eval import` write them)")
            rows.append(row)
    return rows


def _row_problem(row: dict) -> str | None:
    for key in ("mode", "category"):
        if not isinstance(row.get(key), str) or not row[key]:
            return f"has no '{key}' name"
    for key in ("source", "prompt"):
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"has a '{key}' that is not text"
    for key in ("seed", "index", "sample"):
        if row.get(key) is not None and (isinstance(row[key], bool) or not isinstance(row[key], int)):
            return f"has a '{key}' that is not an integer"
    if not isinstance(row.get("aggregate", False), bool):
        return "has an 'aggregate' that is not true or false"
    metrics = row.get("metrics")
    if not isinstance(metrics, dict):
        return "has no 'metrics' object"
    for name, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"has a non-numeric value for metric '{name[:40]}'"
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            return f"has a non-finite value for metric '{name[:40]}'"
    return None
