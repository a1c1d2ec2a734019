"""MiniCompBench: a fixed suite of 56 MiniWorld prompts (8 per category) in T2V-CompBench's layout.

The prompt files in suite/prompts/ were generated once by `generate_suite()` and are
committed: they, not the sampler, define the benchmark, so later sampler changes never
move it. Videos to score live in `<video_dir>/<folder>/0001.mp4 ...`, 4 digits, 1-based,
in prompt-file order, where the folder is the prompt file's stem without its "N_" prefix
(e.g. `3_spatial_relationship.txt` -> `spatial_relationship/`), as in T2V-CompBench.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import FvgError, SuitePrompt, compbench_prompt_file, write_text
from .grammar import format_prompt, parse_prompt, sample_prompt
from .score import PromptScore, score_video
from .spec import CATEGORIES

PROMPT_DIR = Path(__file__).parent / "suite" / "prompts"
PROMPT_FILES = {  # spec category -> T2V-CompBench prompt file stem
    "consistent_attr": "1_consistent_attr",
    "dynamic_attr": "2_dynamic_attr",
    "spatial": "3_spatial_relationship",
    "motion_binding": "4_motion_binding",
    "action_binding": "5_action_binding",
    "interaction": "6_interaction",
    "numeracy": "7_numeracy",
}
SUITE_SEED = 20240601
PROMPTS_PER_CATEGORY = 8


FOLDERS = {spec: compbench_prompt_file(stem)[1] for spec, stem in PROMPT_FILES.items()}  # spec category -> folder
_SPEC_CATEGORY = {folder: spec for spec, folder in FOLDERS.items()}


def spec_category(item: SuitePrompt) -> str:
    """The grammar's category of a suite prompt (`spatial`), whose `category` is its folder
    (`spatial_relationship`), as in every suite (`fvg.io.SuitePrompt`)."""
    return _SPEC_CATEGORY[item.category]


@dataclass(frozen=True)
class SuiteReport:
    scores: list[PromptScore]  # suite order
    per_category: dict[str, float]  # mean score per spec category
    overall: float  # mean over all prompts


def generate_suite(seed: int = SUITE_SEED, per_category: int = PROMPTS_PER_CATEGORY) -> dict[str, list[str]]:
    """Distinct random prompts per category: how the committed files were made."""
    rng = np.random.default_rng(seed)
    suite: dict[str, list[str]] = {}
    for category in CATEGORIES:
        prompts: list[str] = []
        while len(prompts) < per_category:
            text = format_prompt(sample_prompt(rng, category))
            if text not in prompts:
                prompts.append(text)
        suite[category] = prompts
    return suite


def write_suite(prompt_dir: str | os.PathLike, suite: dict[str, list[str]]) -> None:
    for category, prompts in suite.items():
        write_text(Path(prompt_dir) / f"{PROMPT_FILES[category]}.txt", "".join(p + "\n" for p in prompts))


def load_suite(prompt_dir: str | os.PathLike = PROMPT_DIR) -> list[SuitePrompt]:
    """Every prompt of the suite, category by category, checked against the grammar; each prompt's
    `category` is its folder (`spec_category` gives the grammar's name)."""
    suite = []
    for category, stem in PROMPT_FILES.items():
        path = Path(prompt_dir) / f"{stem}.txt"
        if not path.is_file():
            raise FvgError(f"MiniCompBench prompt file missing: {path}")
        for index, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                parsed = parse_prompt(line)
            except ValueError as exc:
                raise FvgError(f"{path}:{index}: {exc}") from None
            if parsed.category != category:
                raise FvgError(f"{path}:{index}: a {parsed.category} prompt in the {category} file")
            suite.append(SuitePrompt(FOLDERS[category], index, line))
    return suite


def score_suite(video_dir: str | os.PathLike, suite: list[SuitePrompt] | None = None) -> SuiteReport:
    """Score `<video_dir>/<folder>/NNNN.mp4` for every suite prompt."""
    suite = load_suite() if suite is None else suite
    missing = [s.video_path for s in suite if not (Path(video_dir) / s.video_path).is_file()]
    if missing:
        raise FvgError(f"{len(missing)} MiniCompBench videos missing in {video_dir}, e.g. {missing[0]}")
    scores = [score_video(s.prompt, Path(video_dir) / s.video_path) for s in suite]
    per_category = {
        c: float(np.mean([r.score for r, s in zip(scores, suite) if spec_category(s) == c]))
        for c in CATEGORIES if any(spec_category(s) == c for s in suite)
    }
    return SuiteReport(scores, per_category, float(np.mean([r.score for r in scores])))
