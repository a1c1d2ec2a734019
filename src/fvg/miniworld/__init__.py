"""MiniWorld v1 (docs/miniworld-spec.md): prompts, renderer, evaluator, benchmark suite, dataset.

Two layers share this package (tests/test_layering.py holds the table). The world, imported
here, is low-level data that `fvg.plan` and `fvg.eval` use: spec, grammar, render, score,
suite, dataset; it imports only `fvg.io`. The training of the `mini` models sits above
`fvg.train` and is never imported from here: models, settings, loop, sink, stages, train,
curves, diagnose, cli.
"""

from .dataset import clip_seed, sample_clip, write_dataset
from .grammar import (
    VOCABULARY, Caption, CaptionItem, Event, MiniPrompt, Obj, caption_for, first_frame_caption, format_caption,
    format_prompt, parse_caption, parse_prompt, sample_prompt,
)
from .render import Scene, SceneObject, render_first_frame, render_frame, render_video, sample_scene, shape_mask
from .score import Check, PromptScore, Region, find_regions, score_video
from .spec import CATEGORIES
from .suite import SuitePrompt, SuiteReport, load_suite, score_suite, spec_category

__all__ = [
    "CATEGORIES", "VOCABULARY", "Caption", "CaptionItem", "Check", "Event", "MiniPrompt", "Obj", "PromptScore",
    "Region", "Scene", "SceneObject", "SuitePrompt", "SuiteReport", "caption_for", "clip_seed", "find_regions",
    "first_frame_caption", "format_caption", "format_prompt", "load_suite", "parse_caption", "parse_prompt",
    "render_first_frame", "render_frame", "render_video", "sample_clip", "sample_prompt", "sample_scene",
    "score_suite", "score_video", "shape_mask", "spec_category", "write_dataset",
]
