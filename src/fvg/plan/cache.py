"""Disk cache of LLM plans: one JSON file per (backend, model, template version, prompt)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from fvg.io import FvgError, cache_dir, write_json
from fvg.plan.base import Plan

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return cache_dir("plans")


def cache_key(backend: str, model: str | None, template_version: str, prompt: str,
              endpoint: str | None = None) -> str:
    """`endpoint` (an OpenAI-compatible server's URL) keeps two servers serving the same model name
    apart; local backends have none, and their keys are unchanged from before it existed."""
    parts = [backend, model, template_version, prompt] + ([endpoint] if endpoint is not None else [])
    payload = json.dumps(parts, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class PlanCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, backend: str, model: str | None, template_version: str, prompt: str,
            endpoint: str | None = None) -> Plan | None:
        """The cached plan (with `cached=True`), or None; unreadable entries count as misses."""
        path = self.path(cache_key(backend, model, template_version, prompt, endpoint))
        try:
            plan = Plan.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError, RecursionError, FvgError) as exc:
            log.warning("ignoring unreadable plan cache entry %s: %s", path, exc)
            return None
        if (plan.backend, plan.model, plan.template_version, plan.prompt) != (backend, model, template_version, prompt):
            return None
        plan.cached = True
        return plan

    def put(self, plan: Plan, endpoint: str | None = None) -> None:
        """Store `plan` atomically; a cache that cannot be written is logged, not fatal."""
        record = plan.to_dict()
        record["cached"] = False
        path = self.path(cache_key(plan.backend, plan.model, plan.template_version, plan.prompt, endpoint))
        try:
            write_json(path, record)
        except OSError as exc:
            log.warning("cannot write plan cache entry %s: %s", path, exc)
