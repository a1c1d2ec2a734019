"""Stage 1 of Factorized Video Generation: plan the first frame of a video prompt.

    from fvg.plan import make_planner
    plan = make_planner("rules").plan("a leaf turns from green to red")
    plan.first_frame_caption  # "a green leaf"

Backends: "rules" (offline, deterministic, exact for MiniWorld v1), "transformers" (a local
chat LLM, default Qwen/Qwen2.5-7B-Instruct as in the paper) and "openai" (any
OpenAI-compatible chat endpoint). LLM backends cache their plans on disk and fall back to
the rules, recording why in `Plan.warnings`, when the model gives no valid answer.
"""

from fvg.plan.base import BACKENDS, DEFAULT_MODEL, Plan, Planner, validate_prompt
from fvg.plan.cache import PlanCache, cache_key, default_cache_dir
from fvg.plan.llm import (
    FEW_SHOT, SYSTEM_PROMPT, TEMPLATE_VERSION, OpenAIPlanner, TransformersPlanner, build_messages, parse_reply,
)
from fvg.plan.rules import RULES_VERSION, RulesPlanner, free_text_caption
from fvg.plan.factory import make_planner

__all__ = [
    "BACKENDS", "DEFAULT_MODEL", "FEW_SHOT", "RULES_VERSION", "SYSTEM_PROMPT", "TEMPLATE_VERSION", "OpenAIPlanner",
    "Plan", "PlanCache", "Planner", "RulesPlanner", "TransformersPlanner", "build_messages", "cache_key",
    "default_cache_dir", "free_text_caption", "make_planner", "parse_reply", "validate_prompt",
]
