"""Benchmark prompt suites and the exact file layouts their official evaluators read.

Two layouts exist:

- "compbench" (T2V-CompBench, MiniCompBench, plain prompt files): one video per prompt and
  seed, `<mode>/seed<S>/<category>/0001.mp4 ...`, 4 digits, 1-based, in prompt-file order.
  T2V-CompBench's scripts do not read the number: they sort the folder and pair the i-th file
  with the i-th prompt of their meta_data JSON, so the numbers must run 0001..N without a gap
  and nothing else may be in the folder (`fvg eval check` verifies both). The category
  folder is the prompt file's stem without its `N_` prefix (`3_spatial_relationship.txt` ->
  `spatial_relationship/`), the same rule as `fvg.miniworld.suite`.
- "vbench" (VBench 2.0): `<mode>/<Dimension>/<prompt[:180]>-<i>.mp4`, i = 0.. n-1 with n = 3
  (20 for Diversity), named by the original prompt even when the planner rewrote it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from fvg.io import FvgError, SuitePrompt, compbench_prompt_file, read_prompt_lines

SUITES = ("t2v-compbench", "vbench2", "minicompbench")  # or a path to a .txt prompt list
MINICOMPBENCH_SOURCE = "fvg.miniworld"  # Suite.source of the committed MiniCompBench; other prompt folders: their path
VBENCH_NAME_CHARS = 180  # VBench's sampling script names videos by prompt[:180]
VBENCH_SAMPLES = 3  # videos per prompt in VBench 2.0 ...
VBENCH_DIVERSITY_SAMPLES = 20  # ... except for the Diversity dimension
# '/' would split the name into folders, NUL and control characters are invalid or invisible
# in names, '\\' is a separator on Windows. Everything else stays as VBench wrote it.
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")
_MAX_NAME_BYTES = 255  # ext4, XFS, APFS, NTFS all cap one name at 255 bytes


@dataclass(frozen=True)
class Suite:
    name: str  # "t2v-compbench", "vbench2", "minicompbench" or "file"
    layout: str  # "compbench" or "vbench"
    prompts: tuple[SuitePrompt, ...]
    source: str  # where the prompts were read from

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(p.category for p in self.prompts))

    def select(self, categories: list[str] | None = None, limit: int | None = None) -> "Suite":
        """Keep only `categories` (in suite order) and the first `limit` prompts of each."""
        if categories:
            unknown = [c for c in categories if c not in self.categories]
            if unknown:
                raise FvgError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
                               f"(suite has: {', '.join(self.categories)})")
        if limit is not None and limit < 1:
            raise FvgError(f"--limit must be at least 1, got {limit}")
        kept = [p for p in self.prompts if not categories or p.category in categories]
        if limit is not None:
            kept = [p for p in kept if p.index <= limit]
        return Suite(self.name, self.layout, tuple(kept), self.source)


def vbench_video_name(prompt: str, sample: int) -> str:
    """VBench 2.0's file name for the `sample`-th video of `prompt`: `<prompt[:180]>-<sample>.mp4`.

    Characters that cannot be in a file name ('/', '\\', control characters) become '_', and
    the stem is shortened further if the name would exceed 255 bytes (non-ASCII prompts).
    VBench's evaluators match names exactly, so only such prompts differ from its own script.
    """
    stem = _UNSAFE.sub("_", prompt[:VBENCH_NAME_CHARS])
    suffix = f"-{sample}.mp4"
    while len((stem + suffix).encode("utf-8")) > _MAX_NAME_BYTES:
        stem = stem[:-1]
    if stem in {"", ".", ".."}:
        stem = stem.replace(".", "_") or "_"
    return stem + suffix


def video_relpath(suite: Suite, item: SuitePrompt, mode: str, seed: int, sample: int) -> str:
    """Where the video goes, relative to the output folder: the layout the official scripts read."""
    if suite.layout == "vbench":
        return f"{mode}/{item.category}/{vbench_video_name(item.prompt, sample)}"
    return f"{mode}/seed{seed}/{item.video_path}"


def record_relpath(video: str) -> str:
    """The parallel tree for plans, anchors and run records: records/<video path without .mp4>/."""
    return f"records/{video.removesuffix('.mp4')}"


def load_suite(suite: str, suite_dir: str | Path | None = None, samples: int | None = None) -> Suite:
    """`suite` is a name from SUITES or a path to a .txt prompt list (one prompt per line)."""
    if suite == "t2v-compbench":
        if suite_dir is None:
            raise FvgError("--suite t2v-compbench needs --suite-dir (the T2V-CompBench checkout or its prompts/)")
        return load_t2v_compbench(suite_dir)
    if suite == "vbench2":
        if suite_dir is None:
            raise FvgError("--suite vbench2 needs --suite-dir (VBench 2.0's full-info JSON or prompt folder)")
        return load_vbench2(suite_dir, samples)
    if suite == "minicompbench":
        return load_minicompbench(suite_dir)
    path = Path(suite)
    if path.suffix == ".txt" or path.is_file():
        return load_prompt_list(path)
    raise FvgError(f"unknown suite '{suite}' (choose from: {', '.join(SUITES)}, or a .txt prompt file)")


def _read_lines(path: Path) -> list[str]:
    """Prompt lines of a file, read as `fvg generate --prompts` reads them (fvg.io.read_prompt_lines)."""
    return read_prompt_lines(path, allow_empty=True)


def load_t2v_compbench(suite_dir: str | Path) -> Suite:
    """T2V-CompBench's `prompts/N_<category>.txt` files, ordered by N."""
    root = Path(suite_dir)
    if not root.is_dir():
        raise FvgError(f"T2V-CompBench folder not found: {root}")
    prompt_dir = root / "prompts" if (root / "prompts").is_dir() else root
    files = [(*parsed, f) for f in prompt_dir.glob("*.txt") if (parsed := compbench_prompt_file(f.stem))]
    if not files:
        raise FvgError(f"no T2V-CompBench prompt files (N_<category>.txt) in {prompt_dir}")
    prompts = []
    for _, category, path in sorted(files):
        prompts += [SuitePrompt(category, i, text) for i, text in enumerate(_read_lines(path), start=1)]
    return Suite("t2v-compbench", "compbench", tuple(prompts), str(prompt_dir))


def load_prompt_list(path: str | Path) -> Suite:
    """Any prompt list: one prompt per line; the category is the file stem (without an `N_` prefix)."""
    path = Path(path)
    if not path.is_file():
        raise FvgError(f"prompt file not found: {path}")
    parsed = compbench_prompt_file(path.stem)
    category = parsed[1] if parsed else path.stem
    lines = _read_lines(path)
    if not lines:
        raise FvgError(f"prompt file {path} has no prompts")
    return Suite("file", "compbench", tuple(SuitePrompt(category, i, t) for i, t in enumerate(lines, 1)), str(path))


def load_minicompbench(prompt_dir: str | Path | None = None) -> Suite:
    """MiniWorld's MiniCompBench, in T2V-CompBench's layout (its prompts, as fvg.miniworld.suite reads them);
    `prompt_dir`: another folder of its prompt files instead of the committed ones, such as a held-out suite
    (`fvg miniworld suite`)."""
    from fvg.miniworld import load_suite as load_mini

    if prompt_dir is None:
        return Suite("minicompbench", "compbench", tuple(load_mini()), MINICOMPBENCH_SOURCE)
    if not Path(prompt_dir).is_dir():
        raise FvgError(f"MiniCompBench prompt folder not found: {prompt_dir}")
    return Suite("minicompbench", "compbench", tuple(load_mini(prompt_dir)), str(Path(prompt_dir).resolve()))


def _samples_for(dimension: str, samples: int | None) -> int:
    if samples is not None:
        if samples < 1:
            raise FvgError(f"--samples must be at least 1, got {samples}")
        return samples
    return VBENCH_DIVERSITY_SAMPLES if dimension == "Diversity" else VBENCH_SAMPLES


def load_vbench2(path: str | Path, samples: int | None = None) -> Suite:
    """VBench 2.0 prompts, from either of the two forms its repository ships:

    - the full-info JSON (a file, or the only `*.json` in a folder): a list of objects with
      `prompt_en` and `dimension` (a name or a list of names); a prompt listed under several
      dimensions gets a video in each dimension's folder;
    - a folder of per-dimension prompt files `<Dimension>.txt`, one prompt per line.
    """
    path = Path(path)
    if path.is_dir():
        jsons = sorted(path.glob("*.json"))
        txts = sorted(path.glob("*.txt"))
        if len(jsons) == 1:
            path = jsons[0]
        elif txts:
            return _vbench_from_txt(path, txts, samples)
        else:
            raise FvgError(f"no VBench 2.0 prompts in {path}: expected one full-info *.json or <Dimension>.txt files")
    if not path.is_file():
        raise FvgError(f"VBench 2.0 prompt file not found: {path}")
    if path.suffix == ".txt":
        return _vbench_from_txt(path.parent, [path], samples)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FvgError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise FvgError(f"{path}: expected a list of {{'prompt_en': ..., 'dimension': [...]}} objects")
    by_dim: dict[str, list[str]] = {}
    for n, entry in enumerate(entries):
        prompt = entry.get("prompt_en") if isinstance(entry, dict) else None
        dims = entry.get("dimension") if isinstance(entry, dict) else None
        if not isinstance(prompt, str) or not prompt.strip() or not dims:
            raise FvgError(f"{path}: entry {n} lacks a 'prompt_en' string or a 'dimension'")
        for dim in [dims] if isinstance(dims, str) else dims:
            by_dim.setdefault(str(dim), []).append(prompt.strip())
    prompts = [SuitePrompt(dim, i, p, _samples_for(dim, samples))
               for dim, texts in by_dim.items() for i, p in enumerate(texts, start=1)]
    return Suite("vbench2", "vbench", tuple(prompts), str(path))


def _vbench_from_txt(folder: Path, files: list[Path], samples: int | None) -> Suite:
    prompts = []
    for f in files:
        prompts += [SuitePrompt(f.stem, i, p, _samples_for(f.stem, samples))
                    for i, p in enumerate(_read_lines(f), start=1)]
    if not prompts:
        raise FvgError(f"no prompts in the VBench 2.0 prompt files in {folder}")
    return Suite("vbench2", "vbench", tuple(prompts), str(folder))
