"""The plan record and the planner protocol (`fvg.plan.factory.make_planner` picks a backend).

Stage 1 of Factorized Video Generation: a prompt becomes a caption of its first frame
(the scene before anything happens) plus an "upsampled", more detailed video prompt.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
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
        warnings = kwargs.get("warnings", [])
        if not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
            raise FvgError("invalid plan record: 'warnings' is not a list of texts")  # damaged: never trusted
        kwargs["warnings"] = warnings
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
