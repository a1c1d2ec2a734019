"""The plan record, the planner protocol and `make_planner`, which picks a backend.

Stage 1 of Factorized Video Generation: a prompt becomes a caption of its first frame
(the scene before anything happens) plus an "upsampled", more detailed video prompt.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fvg.io import FvgError

BACKENDS = ("rules", "transformers", "openai")
DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"  # the planner LLM of the paper


@dataclass
class Plan:
    prompt: str  # original prompt (surrounding whitespace removed)
    first_frame_caption: str
    upsampled_prompt: str  # detailed video prompt (the paper's "upsampled" baseline)
    backend: str  # what actually produced the caption: "rules" | "transformers" | "openai"
    model: str | None  # model id / name that produced it (None for rules)
    template_version: str  # version of the system prompt (LLM backends) or of the rules
    warnings: list[str] = field(default_factory=list)  # e.g. why an LLM fell back to rules
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict):
            raise FvgError(f"invalid plan record: a JSON {type(d).__name__}, not an object")
        names = {f.name for f in fields(cls)}
        required = ("prompt", "first_frame_caption", "upsampled_prompt", "backend", "template_version")
        missing = [k for k in required if not isinstance(d.get(k), str)]
        if missing:
            raise FvgError(f"invalid plan record: missing or non-string {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        warnings = kwargs.get("warnings")
        kwargs["warnings"] = [w for w in warnings if isinstance(w, str)] if isinstance(warnings, list) else []
        kwargs["model"] = kwargs.get("model") if isinstance(kwargs.get("model"), str) else None
        kwargs["cached"] = kwargs.get("cached") is True
        return cls(**kwargs)


@runtime_checkable
class Planner(Protocol):
    name: str  # backend name
    model: str | None

    def plan(self, prompt: str) -> Plan: ...


def validate_prompt(prompt: Any) -> str:
    """The prompt without surrounding whitespace; FvgError if it is not a non-empty string."""
    if not isinstance(prompt, str):
        raise FvgError(f"prompt must be a string, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise FvgError("prompt is empty")
    return prompt


def normalize_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def make_planner(
    backend: str = "rules",
    model: str | None = None,
    *,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    cache_dir: str | Path | None = None,
    timeout: float = 60.0,
    max_retries: int = 3,
    device: str | None = None,
    dtype: str | None = None,
    use_cache: bool = True,
    **options: Any,
) -> Planner:
    """Build the planner for `backend`.

    - "rules": offline and deterministic (exact for MiniWorld prompts); `model` is ignored.
    - "transformers": a local chat model (model id or directory; default Qwen2.5-7B-Instruct),
      loaded lazily on the first uncached prompt. `device`, `dtype` apply to it.
    - "openai": an OpenAI-compatible `/chat/completions` endpoint at `base_url`
      (default `$OPENAI_BASE_URL` or https://api.openai.com/v1), key from `$<api_key_env>`.

    LLM plans are cached on disk under `cache_dir` (default `$FVG_CACHE_DIR/plans` or
    ~/.cache/fvg/plans) unless `use_cache` is false. A failed LLM attempt is retried up to
    `max_retries` times; then the plan comes from the rules with the reason in `warnings`.
    Extra `options` go to the backend class (e.g. `max_new_tokens`, `backoff`).
    """
    if not isinstance(backend, str) or backend.strip().lower() not in BACKENDS:
        raise FvgError(f"unknown planner backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    backend = backend.strip().lower()
    if backend == "rules":
        from fvg.plan.rules import RulesPlanner

        return RulesPlanner()
    if max_retries < 0:
        raise FvgError(f"max_retries must be >= 0, got {max_retries}")
    if timeout <= 0:
        raise FvgError(f"timeout must be positive, got {timeout}")

    from fvg.plan.cache import PlanCache

    cache = PlanCache(cache_dir) if use_cache else None
    if backend == "transformers":
        from fvg.plan.llm import TransformersPlanner

        return TransformersPlanner(
            model or DEFAULT_MODEL, device=device, dtype=dtype, max_retries=max_retries, cache=cache, **options
        )
    from fvg.plan.llm import OpenAIPlanner

    return OpenAIPlanner(
        model or DEFAULT_MODEL,
        base_url=base_url,
        api_key_env=api_key_env,
        timeout=timeout,
        max_retries=max_retries,
        cache=cache,
        **options,
    )
