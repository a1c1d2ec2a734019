"""`fvg eval report`: mode x category tables, plots and paired comparisons from score rows.

A table cell is the mean over the cell's videos (all prompts and seeds); where a source gave
only category scores (`aggregate` rows), the mean of those. The `mean` column averages the
categories equally, as the benchmarks' papers do.

Paired comparisons take, per prompt and seed, treatment minus baseline (e.g. factorized -
t2v) on the same metric: the seeds are shared across modes, so each difference isolates the
mode. The interval is a percentile bootstrap over the pairs (fixed RNG seed: reruns agree).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fvg.io import FvgError, atomic_path, write_json, write_text
from fvg.presets import MODES

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
ALL = "all"  # the pseudo-category of pooled comparisons


@dataclass(frozen=True)
class Cell:
    mean: float
    n: int  # videos, or category scores for aggregate-only cells


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
        values = per_video.get(key) or aggregate[key]  # per-video values when the source had them
        tables[metric][mode][category] = Cell(float(np.mean(values)), len(values))
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


def _pair_key(row: dict) -> tuple:
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
                values[(metric, row["mode"])][_pair_key(row)] = float(value)
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
        for mode, cells in by_mode.items():
            mean = category_mean(cells, cats)
            row = [_fmt(cells[c].mean) if c in cells else "-" for c in cats]
            lines.append(f"| {mode} | " + " | ".join(row) + f" | {'-' if mean is None else _fmt(mean)} |")
        lines.append("")
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


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", "mode", "category", "mean", "n"])
    for metric, by_mode in report.tables.items():
        for mode, cells in by_mode.items():
            for category in report.categories[metric]:
                if category in cells:
                    writer.writerow([metric, mode, category, cells[category].mean, cells[category].n])
            mean = category_mean(cells, report.categories[metric])
            if mean is not None:
                writer.writerow([metric, mode, "mean", mean, len(report.categories[metric])])
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
    from .generate import read_jsonl

    rows = []
    for path in paths:
        if not Path(path).is_file():
            raise FvgError(f"score file not found: {path}")
        rows += read_jsonl(Path(path))
    bad = [r for r in rows if not isinstance(r, dict) or "mode" not in r or "category" not in r]
    if bad:
        raise FvgError(f"{len(bad)} score rows lack 'mode' or 'category': not fvg score files")
    return rows
