"""`make_planner`: the planner for a backend name.

It lives apart from `fvg.plan.base` (the plan record and protocol, which every backend imports)
so that it can import the backends directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fvg.io import FvgError
from fvg.plan.base import BACKENDS, DEFAULT_MODEL, Planner
from fvg.plan.cache import PlanCache
from fvg.plan.llm import OpenAIPlanner, TransformersPlanner
from fvg.plan.rules import RulesPlanner


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
        return RulesPlanner()
    if max_retries < 0:
        raise FvgError(f"max_retries must be >= 0, got {max_retries}")
    if timeout <= 0:
        raise FvgError(f"timeout must be positive, got {timeout}")

    cache = PlanCache(cache_dir) if use_cache else None
    if backend == "transformers":
        return TransformersPlanner(
            model or DEFAULT_MODEL, device=device, dtype=dtype, max_retries=max_retries, cache=cache, **options
        )
    return OpenAIPlanner(
        model or DEFAULT_MODEL,
        base_url=base_url,
        api_key_env=api_key_env,
        timeout=timeout,
        max_retries=max_retries,
        cache=cache,
        **options,
    )
