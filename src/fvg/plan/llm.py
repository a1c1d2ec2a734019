"""LLM planners: the shared system prompt, reply validation, and two backends.

- `TransformersPlanner`: a local chat model through its tokenizer's chat template.
- `OpenAIPlanner`: any OpenAI-compatible `/chat/completions` endpoint (vLLM, Ollama,
  llama.cpp server, OpenAI).

Both ask for `{"first_frame_caption": ..., "upsampled_prompt": ...}`, take the first JSON
object of the reply, validate it and retry (with a reminder of what was wrong) up to
`max_retries` times. If no attempt succeeds the plan comes from the rules backend:
`backend="rules"`, `model=None`, and `warnings` says which LLM failed and why. Such
fallbacks are never cached; successful LLM plans are (see `fvg.plan.cache`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from fvg.io import DTYPE_NAMES, FvgError, load_or_explain
from fvg.plan.base import Plan, normalize_space, validate_prompt
from fvg.plan.cache import PlanCache
from fvg.plan.rules import RulesPlanner

log = logging.getLogger(__name__)

TEMPLATE_VERSION = "fvg-plan-v1"
MAX_CAPTION_CHARS = 1200
MAX_UPSAMPLED_CHARS = 3000

SYSTEM_PROMPT = """\
You plan videos for a two-stage text-to-video pipeline. First a text-to-image model renders \
the FIRST FRAME of the video from your caption; then a video model animates that frame \
according to the original prompt. A wrong first frame ruins the video, so the caption must \
show exactly the scene at the very first moment, before anything in the prompt has happened.

Given a video prompt, write two texts.

1. "first_frame_caption": a caption of the initial scene only, rendered as one still image.
- Include every entity the prompt mentions or implies, with its exact count and all of its \
attributes (colour, size, material, clothing, shape). Keep each attribute bound to the right \
entity. Do not add entities the prompt does not imply.
- Show every entity in its START state: a change has not happened yet. "A leaf turns from green \
to red" starts with a green leaf; "a plant grows" starts with a small plant; "ice melts" starts \
with solid ice; "a door opens" starts with a closed door; "a balloon inflates" starts with a \
deflated balloon. If the prompt does not say what the start state is, leave the changing \
property unstated and never describe the end state ("a car turns blue" -> just the car).
- Put every moving entity at its START position and leave room for the motion: something that \
moves to the left starts on the right side of the frame; something that moves up starts near \
the bottom; something that walks towards a house starts at a distance from it; something that \
will enter a room is still outside it.
- Describe actions as a still pose at their beginning (a dog that will run is standing, a cat \
that will jump is crouching). No motion, no sequence of events: avoid words such as "then", \
"begins", "gradually", "turns into", "moves".
- Keep the relations that hold at the start (left of, above, on top of), the setting, the \
background, the style and the viewpoint.
- One or two plain, concrete sentences, at most about 80 words.

2. "upsampled_prompt": a richer version of the whole video prompt for a text-to-video model: \
the same entities, counts, attributes and events in the same order, with concrete visual detail \
(appearance, setting, lighting, camera) and a clear description of the motion from start to \
end. Do not change what happens. At most about 120 words.

Reply with one JSON object and nothing else, in exactly this form:
{"first_frame_caption": "...", "upsampled_prompt": "..."}"""

FEW_SHOT: list[tuple[str, dict[str, str]]] = [
    (
        "a leaf turns from green to red",
        {
            "first_frame_caption": "A single fresh green leaf against a plain light background, in sharp focus.",
            "upsampled_prompt": "A single fresh green leaf against a plain light background. Over the course "
            "of the video its colour shifts steadily from green to a deep red, starting at the edges and "
            "spreading to the centre, while the leaf itself stays still. Soft, even lighting; static close-up "
            "camera; smooth, gradual colour change.",
        },
    ),
    (
        "a red car drives to the left while a blue bicycle moves to the right on a city street",
        {
            "first_frame_caption": "A city street with buildings in the background; a red car on the right side "
            "of the frame facing left, and a blue bicycle on the left side of the frame facing right.",
            "upsampled_prompt": "On a sunny city street lined with buildings, a red car drives from the right "
            "side of the frame towards the left, while a blue bicycle rolls from the left side towards the "
            "right; they pass each other in the middle of the street. Wide shot, static camera, natural "
            "daylight, smooth and steady motion.",
        },
    ),
    (
        "three puppies run towards a little girl in a garden",
        {
            "first_frame_caption": "A green garden with three puppies standing together on one side of the lawn "
            "and a little girl standing on the far side, some distance away from them.",
            "upsampled_prompt": "In a green garden on a bright afternoon, three playful puppies run across the "
            "lawn towards a little girl who waits on the far side, until they reach her feet. Eye-level "
            "wide shot, soft sunlight, natural and fluid motion.",
        },
    ),
    (
        "a cat jumps onto a sofa as a lamp lights up",
        {
            "first_frame_caption": "A cosy living room with a cat crouching on the floor next to a sofa, "
            "and an unlit lamp beside the sofa.",
            "upsampled_prompt": "In a cosy living room, a cat crouches on the floor, then leaps up and lands "
            "on the sofa; at the same moment the lamp beside the sofa switches on and fills the room with "
            "warm light. Medium shot, static camera, smooth and realistic motion.",
        },
    ),
]

REMINDER = (
    "Your previous reply could not be used ({error}). Reply with exactly one JSON object with the keys "
    '"first_frame_caption" and "upsampled_prompt", both non-empty strings, and nothing else.'
)


def build_messages(prompt: str, reminder: str | None = None) -> list[dict[str, str]]:
    """The chat sent to the LLM: system prompt, few-shot examples, then the prompt."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for example, answer in FEW_SHOT:
        messages.append({"role": "user", "content": f"Video prompt: {example}"})
        messages.append({"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)})
    user = f"Video prompt: {prompt}"
    messages.append({"role": "user", "content": f"{user}\n\n{reminder}" if reminder else user})
    return messages


class ReplyError(ValueError):
    """The model answered, but not with a usable plan."""


def parse_reply(text: str) -> tuple[str, str]:
    """(first_frame_caption, upsampled_prompt) from the first JSON object in `text`."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)  # reasoning models
    decoder = json.JSONDecoder()
    data = None
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            data, _ = decoder.raw_decode(text, start)
            break
        except ValueError:
            continue
    if not isinstance(data, dict):
        raise ReplyError("no JSON object in the reply")
    out = []
    for key, limit in (("first_frame_caption", MAX_CAPTION_CHARS), ("upsampled_prompt", MAX_UPSAMPLED_CHARS)):
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ReplyError(f'"{key}" is missing or not a non-empty string')
        value = normalize_space(value)
        if len(value) > limit:
            raise ReplyError(f'"{key}" is too long ({len(value)} characters, at most {limit})')
        out.append(value)
    return out[0], out[1]


# --- credentials never leave the process ------------------------------------------------------

_SECRET_PARAMS = ("key", "api_key", "apikey", "api-key", "access_token", "token", "auth", "authorization",
                  "password", "passwd", "secret", "client_secret", "sig", "signature", "code", "session")
_SECRET_PARAM_RE = re.compile(
    r"(?P<name>\b(?:[\w-]*(?:key|token|secret|password|passwd|auth|sig|signature|session)[\w-]*))"
    r"(?P<sep>\s*[=:]\s*\"?)(?P<value>[^&\s\"',;}]+)", re.IGNORECASE)
_USERINFO_RE = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
_BEARER_RE = re.compile(r"\b(?P<kind>Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_TOKEN_LIKE_RE = re.compile(r"\b(?:sk|pk|rk|hf|ghp|gho|xox[abp])[-_][A-Za-z0-9_-]{12,}")
REDACTED = "***"


def secrets_of_url(url: str | None) -> list[str]:
    """The credentials inside a URL: the userinfo's password (and user), secret-looking query values."""
    if not url:
        return []
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    found = [v for v in (parts.password, parts.username) if v]
    found += [v for k, v in urllib.parse.parse_qsl(parts.query) if v and _SECRET_PARAM_RE.match(f"{k}=x")]
    forms = {form for v in found for form in (v, urllib.parse.unquote(v), urllib.parse.quote(v, safe=""))}
    return sorted(form for form in forms if len(form) >= 3)


def redact(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """`text` with credentials replaced by ***: known secret values wherever they appear (an error
    body echoing the Authorization header, say), URL userinfo, key=/token= parameters, bearer
    tokens and provider-style keys (sk-..., hf_...). Applied to every message that names the
    endpoint or quotes a server's answer, before it reaches a plan, a record, a log or the terminal."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _BEARER_RE.sub(lambda m: f"{m.group('kind')} {REDACTED}", text)
    text = _SECRET_PARAM_RE.sub(lambda m: f"{m.group('name')}{m.group('sep')}{REDACTED}", text)
    return _TOKEN_LIKE_RE.sub(REDACTED, text)


class _RedactingFilter(logging.Filter):
    """Redacts log records of the HTTP client (it logs each request's full URL at INFO)."""

    def __init__(self):
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), tuple(self.secrets)), ()
        return True


_HTTP_LOG_FILTER = _RedactingFilter()
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).addFilter(_HTTP_LOG_FILTER)


class TransientError(RuntimeError):
    """A failure worth retrying after a pause: connection, timeout, 5xx, 429, unreadable body."""


class FatalError(RuntimeError):
    """A failure that retrying cannot fix (e.g. HTTP 401 or 404): fall back at once."""


class _LLMPlanner:
    """Cache lookup, retries with reminders, validation and fallback, shared by both backends."""

    name = ""

    def __init__(self, model: str, *, max_retries: int, cache: PlanCache | None, backoff: float):
        self.model = model
        self.max_retries = max_retries
        self.cache = cache
        self.backoff = backoff

    def _complete(self, messages: list[dict[str, str]], attempt: int) -> str:
        raise NotImplementedError

    endpoint: str | None = None  # where plans come from, beyond the model name (part of the cache key)

    def _redact(self, text: str) -> str:
        return text

    def cached(self, prompt: str) -> bool:
        """Whether `plan(prompt)` would answer from the cache (no model needed)."""
        return self.cache is not None and self.cache.get(self.name, self.model, TEMPLATE_VERSION, prompt,
                                                         endpoint=self.endpoint) is not None

    def plan(self, prompt: str) -> Plan:
        prompt = validate_prompt(prompt)
        if self.cache is not None:
            hit = self.cache.get(self.name, self.model, TEMPLATE_VERSION, prompt, endpoint=self.endpoint)
            if hit is not None:
                return hit
        reminder, error = None, "no attempt"
        for attempt in range(self.max_retries + 1):
            try:
                caption, upsampled = parse_reply(self._complete(build_messages(prompt, reminder), attempt))
            except ReplyError as exc:
                error, reminder = f"invalid reply: {exc}", REMINDER.format(error=exc)
            except TransientError as exc:
                error = self._redact(str(exc))
                if attempt < self.max_retries:
                    time.sleep(min(self.backoff * 2**attempt, 30.0))
            except FatalError as exc:
                error = self._redact(str(exc))
                break
            else:
                plan = Plan(prompt, caption, upsampled, self.name, self.model, TEMPLATE_VERSION)
                if self.cache is not None:
                    self.cache.put(plan, endpoint=self.endpoint)
                return plan
            log.info("%s planner, attempt %d/%d failed: %s", self.name, attempt + 1, self.max_retries + 1, error)
        message = (f"{self.name}: {self.model}: no valid plan after {attempt + 1} attempt(s) ({error}); "
                   "fell back to rules")
        log.warning(message)
        plan = RulesPlanner().plan(prompt)
        plan.warnings.append(message)
        return plan


class TransformersPlanner(_LLMPlanner):
    """A local chat model (hub id or directory) run with greedy decoding.

    Retries add a reminder to the prompt and sample at `retry_temperature` with a seed equal
    to the attempt number, so they differ from the first (greedy) answer yet stay reproducible.
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_retries: int = 3,
        cache: PlanCache | None = None,
        max_new_tokens: int = 512,
        retry_temperature: float = 0.7,
    ):
        super().__init__(model, max_retries=max_retries, cache=cache, backoff=0.0)
        if dtype is not None and dtype != "auto" and dtype not in DTYPE_NAMES:
            raise FvgError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(DTYPE_NAMES))}")
        self.device, self.dtype = device, dtype
        self.max_new_tokens, self.retry_temperature = max_new_tokens, retry_temperature
        self._tokenizer: Any = None
        self._model: Any = None

    def load(self) -> None:
        """Load tokenizer and model (done on the first uncached prompt)."""
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.dtype in (None, "auto"):
            dtype = "auto" if self.dtype == "auto" or device != "cpu" else torch.float32
        else:
            dtype = getattr(torch, DTYPE_NAMES[self.dtype])
        tokenizer = load_or_explain(AutoTokenizer.from_pretrained, self.model)
        model = load_or_explain(AutoModelForCausalLM.from_pretrained, self.model, dtype=dtype)
        if not getattr(tokenizer, "chat_template", None):
            raise FvgError(f"planner model {self.model!r} has no chat template; use an instruct/chat model")
        self._tokenizer, self._model = tokenizer, model.to(device).eval()

    @property
    def loaded_model(self):
        """The causal LM once loaded (None before the first uncached prompt)."""
        return self._model

    def to(self, device: str) -> "TransformersPlanner":
        """Where the LLM runs from now on; `FactorizedPipeline` moves it off the accelerator after planning."""
        self.device = device
        if self._model is not None and not hasattr(self._model, "_hf_hook"):
            self._model.to(device)
        return self

    def _complete(self, messages: list[dict[str, str]], attempt: int) -> str:
        import torch

        self.load()
        tok, model = self._tokenizer, self._model
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role (e.g. Gemma): fold it into the first user turn
            system, first, *rest = messages
            first = {"role": "user", "content": f"{system['content']}\n\n{first['content']}"}
            text = tok.apply_chat_template([first, *rest], tokenize=False, add_generation_prompt=True)
        inputs = tok(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        eos = tok.eos_token_id if tok.eos_token_id is not None else model.generation_config.eos_token_id
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "eos_token_id": eos,
                                  "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else eos}
        if attempt == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.retry_temperature, top_p=None, top_k=None)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(attempt)
            output = model.generate(**inputs, **kwargs)
        return tok.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class OpenAIPlanner(_LLMPlanner):
    """An OpenAI-compatible chat endpoint, queried with temperature 0.

    Connection errors, timeouts, HTTP 429/5xx and unreadable bodies are retried with
    exponential backoff (`backoff`, 2*backoff, ... seconds); other HTTP errors fall back at once.
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        cache: PlanCache | None = None,
        backoff: float = 1.0,
    ):
        super().__init__(model, max_retries=max_retries, cache=cache, backoff=backoff)
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.api_key_env, self.timeout = api_key_env, timeout
        # The cache key holds the endpoint without its credentials: two servers never share plans,
        # a rotated key keeps them, and no secret is hashed into a file name.
        self.endpoint = redact(self.base_url, secrets_of_url(self.base_url))
        _HTTP_LOG_FILTER.secrets.update(self._secrets())

    def _secrets(self) -> list[str]:
        key = os.environ.get(self.api_key_env) or ""
        return secrets_of_url(self.base_url) + ([key] if len(key) >= 3 else [])

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets())

    def _complete(self, messages: list[dict[str, str]], attempt: int) -> str:
        import httpx

        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = {"model": self.model, "messages": messages, "temperature": 0}
        url = f"{self.base_url}/chat/completions"
        shown = self._redact(url)  # every message below goes through _redact again in plan()
        try:
            response = httpx.post(url, json=body, headers=headers, timeout=self.timeout)
        except httpx.TimeoutException as exc:
            raise TransientError(f"timeout after {self.timeout:g} s from {shown}: {exc}") from None
        except httpx.HTTPError as exc:
            raise TransientError(f"cannot reach {shown}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            detail = f"HTTP {response.status_code} from {shown}: {response.text[:200]}"
            if response.status_code == 429 or response.status_code >= 500:
                raise TransientError(detail)
            raise FatalError(detail)
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise TransientError(f"unreadable response from {shown}: {response.text[:200]!r}") from None
        if not isinstance(content, str):
            raise TransientError(f"response from {shown} has no message content")
        return content
