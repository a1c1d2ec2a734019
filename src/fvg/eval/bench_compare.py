"""`fvg bench compare BASE NEW`: two benches of the same prompts and seeds, paired video by video.

    fvg bench compare runs/bench-v8 runs/bench-v9 --out runs/v9-vs-v8

How a new set of weights is judged against the shipped ones. Every configuration and ladder rung that
both benches ran is compared as NEW - BASE per (prompt, seed), from the per-video score rows `fvg bench
mini` writes (OUT/scores.jsonl): the mean difference pooled and per category, with its 95% paired
bootstrap interval. Pairs take out what the prompt and the seed contribute to a score, which is most of
its variance on MiniWorld, so a change between two weights shows at a size that two unpaired means
(each with its own interval) hide.

A video pairs with one of the other bench when the prompt, its category and index, and the seed are the
same; prompts or seeds only one bench ran are left out and counted. Two benches of different prompt
sets share no pair and are refused. Either side may be several benches of other seeds, pooled (`--base-also`,
`--new-also`: a bench of seeds 3-5 added to one of 0-2); a video two of them both hold is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fvg.io import FvgError, write_json, write_text

from .bench import ANCHOR_STILLS, METRIC, RENDERED, SCORES, VAE_ROUND_TRIP
from .report import ALL, pair_key, load_rows, paired

BASE, NEW = "base", "new"


@dataclass
class LabelComparison:
    """One configuration or rung of both benches, over the videos they share."""
    label: str
    base: float  # mean score over the paired videos
    new: float
    diff: float  # new - base
    ci_low: float
    ci_high: float
    pairs: int
    unpaired: int  # videos of this label in one bench only
    by_category: dict[str, float]  # new - base per category


def _folders(side: Path | list[Path]) -> list[Path]:
    return [Path(side)] if isinstance(side, (str, Path)) else [Path(f) for f in side]


def side_name(side: Path | list[Path]) -> str:
    """One side's folders as the report names them: `runs/a + runs/b`."""
    return " + ".join(str(f) for f in _folders(side))


def bench_rows(side: Path | list[Path]) -> list[dict]:
    """The score rows of one side: one bench, or several of other seeds pooled."""
    rows, origin = [], {}
    for folder in _folders(side):
        path = folder / SCORES
        if not folder.is_dir():
            raise FvgError(f"{folder} is not a folder: give two `fvg bench mini --out` folders")
        if not path.is_file():
            raise FvgError(f"{folder} has no {SCORES}: run its `fvg bench mini` command again (it resumes, "
                           "generates nothing new, and writes the file)")
        for row in load_rows([path]):
            key = (row["mode"], pair_key(row))
            if origin.setdefault(key, folder) != folder:
                raise FvgError(f"{origin[key]} and {folder} both hold {row['mode']} of '{row.get('prompt')}' at "
                               f"seed {row.get('seed')}: pool benches of other seeds only")
            rows.append(row)
    return rows


def _ordered_labels(rows: list[dict]) -> list[str]:
    """The ladder top to bottom, then the configurations in the order the bench ran them."""
    seen = list(dict.fromkeys(r["mode"] for r in rows))
    top = [label for label in (RENDERED, VAE_ROUND_TRIP, ANCHOR_STILLS) if label in seen]
    first_frame = [label for label in seen if label.startswith("first-frame@")]
    return top + first_frame + [label for label in seen if label not in top and label not in first_frame]


def _values(rows: list[dict], label: str) -> dict[tuple, float]:
    return {pair_key(r): float(r["metrics"][METRIC]) for r in rows
            if r["mode"] == label and r["metrics"].get(METRIC) is not None}


def compare_benches(base_dir: Path | list[Path], new_dir: Path | list[Path]) -> list[LabelComparison]:
    """NEW - BASE per label both ran; each side one bench folder or a list of them (other seeds, pooled)."""
    base_rows, new_rows = bench_rows(base_dir), bench_rows(new_dir)
    base_labels = {r["mode"] for r in base_rows}
    labels = [label for label in _ordered_labels(new_rows) if label in base_labels]
    if not labels:
        raise FvgError(f"{side_name(base_dir)} and {side_name(new_dir)} share no configuration or ladder rung")
    tagged = ([{**r, "mode": f"{r['mode']} {BASE}"} for r in base_rows] +
              [{**r, "mode": f"{r['mode']} {NEW}"} for r in new_rows])
    out = []
    for label in labels:
        old, now = _values(base_rows, label), _values(new_rows, label)
        keys = [k for k in now if k in old]
        if not keys:
            raise FvgError(f"{label}: no video of {side_name(new_dir)} has the prompt and seed of one in "
                           f"{side_name(base_dir)} "
                           "(benches of other prompt sets or seeds do not pair)")
        comps = {c.category: c for c in paired(tagged, f"{label} {NEW}", f"{label} {BASE}") if c.metric == METRIC}
        pooled = comps[ALL]
        out.append(LabelComparison(
            label, float(np.mean([old[k] for k in keys])), float(np.mean([now[k] for k in keys])),
            pooled.mean_diff, pooled.ci_low, pooled.ci_high, pooled.n_pairs, len(old) + len(now) - 2 * len(keys),
            {c: comps[c].mean_diff for c in sorted(comps) if c != ALL}))
    return out


def to_markdown(comparisons: list[LabelComparison], base_dir: Path | list[Path], new_dir: Path | list[Path]) -> str:
    cats = sorted({c for x in comparisons for c in x.by_category})
    lines = [f"BASE {side_name(base_dir)}, NEW {side_name(new_dir)}: mean MiniCompBench score over the videos both "
             "made, and NEW - BASE paired per (prompt, seed) with its 95% bootstrap interval.", "",
             "| configuration or rung | BASE | NEW | NEW - BASE (95% CI) | " +
             " | ".join(c.replace("_", " ") for c in cats) + " | pairs | unpaired |",
             "|---" * (len(cats) + 6) + "|"]
    for x in comparisons:
        sign = " **up**" if x.ci_low > 0 else (" **down**" if x.ci_high < 0 else "")
        lines.append(f"| {x.label} | {x.base:.3f} | {x.new:.3f} | {x.diff:+.3f} [{x.ci_low:+.3f}, {x.ci_high:+.3f}]"
                     f"{sign} | " + " | ".join(f"{x.by_category[c]:+.3f}" if c in x.by_category else "-" for c in cats)
                     + f" | {x.pairs} | {x.unpaired} |")
    lines += ["", "**up** / **down**: the interval excludes 0. Per category: NEW - BASE."]
    return "\n".join(lines) + "\n"


def write_comparison(comparisons: list[LabelComparison], base_dir: Path | list[Path], new_dir: Path | list[Path],
                     out: Path) -> list[Path]:
    out = Path(out)
    write_text(out / "compare.md", to_markdown(comparisons, base_dir, new_dir))
    write_json(out / "compare.json", {"base": [str(f) for f in _folders(base_dir)],
                                      "new": [str(f) for f in _folders(new_dir)], "metric": METRIC,
                                      "comparisons": [asdict(c) for c in comparisons]})
    return [out / "compare.md", out / "compare.json"]
