"""Speed flags for the video stage: attention backend, regional compilation and step caches.

    speed = SpeedOptions(attention_backend="flash", compile=True, cache="fbc")
    session = apply_speed(pipe, speed)            # once, after the (anchored) pipeline is built
    with session.sampling(key, steps):            # around every video
        pipe(...)

Every transformer of the pipeline gets the same treatment (`transformer` and, for Wan2.2-A14B,
`transformer_2`). Decisions:

- Hooks go on after the pipeline is built: the anchored pipelines swap the transformer and block
  classes at construction, and diffusers' hooks bind the forward they find.
- `--compile` is regional (`compile_repeated_blocks`): the blocks compile once and are reused by
  every block of the stack. Wan lists `FrameWanTransformerBlock` in `_repeated_blocks`; CogVideoX's
  transformer lists none, so its block class names are set on the instance. The graph is full
  (`fullgraph=True`) without a cache; a cache's hooks decide per step in Python whether a block
  runs, so with a cache the compile allows graph breaks.
- Caches are reset before every video (a failed call leaves no state behind) and diffusers resets
  them after every call (`maybe_free_model_hooks`). Each expert has its own hook state, so A14B's
  low-noise expert warms its cache up on its own steps.
- FirstBlockCache and TaylorSeer need nothing per model. TaylorSeer's default module patterns match
  no attention of Wan or CogVideoX (theirs are `attn1`/`attn2`): the self-attentions are named.
- MagCache needs per-model magnitude ratios, and they change with the step count and with anchoring
  (the anchor LoRA is on, frame 0 is clean). They are measured, not shipped: the first video of a
  (video model, LoRAs, anchored, steps) key runs uncached while hooks record the ratio of each step's
  residual norm (last block's output minus first block's input) to the previous step's, per CFG
  branch and expert; the ratios are stored in `cache_dir("magcache")` and every later video with
  that key skips steps. run.json says which happened (`cache_calibration`).
- `context_parallel=N` splits each transformer call's sequence over N torchrun processes (`fvg.parallel`,
  the family's plan). It goes on after the attention backend (diffusers checks the backend can run it)
  and before compilation; it refuses the step caches (each rank would decide alone whether to skip).
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fvg.io import FvgError, cache_dir, write_json
from fvg.parallel import NO_LSE_BACKENDS, enable_context_parallel, validate_context_parallel

log = logging.getLogger(__name__)

CACHES = ("none", "fbc", "magcache", "taylorseer")
TRANSFORMERS = ("transformer", "transformer_2")
# Wan's and CogVideoX's self-attentions (diffusers' default patterns name `attn` modules only)
SELF_ATTENTION = r"(transformer_)?blocks\.\d+\.attn1"
FBC_THRESHOLD = 0.05  # diffusers' default: relative change of the first block's residual
MAG_THRESHOLD, MAG_MAX_SKIP, MAG_RETENTION = 0.06, 3, 0.2  # diffusers' defaults (MagCache's paper)
TAYLOR_INTERVAL, TAYLOR_WARMUP = 2, 2  # refresh every other step after two full steps
COMPILE_BACKEND = "inductor"  # torch.compile's default; the CPU tests trace with "eager" (inductor: minutes)


@dataclass(frozen=True)
class SpeedOptions:
    attention_backend: str | None = None  # a diffusers attention dispatcher backend; None: the model's default
    compile: bool = False  # regional torch.compile of the repeated transformer blocks
    cache: str = "none"  # one of CACHES
    context_parallel: int = 1  # processes (torchrun) that split each video's sequence (`fvg.parallel`)
    context_parallel_mode: str = "ulysses"  # or "ring"

    def settings(self) -> dict:
        settings = {"attention_backend": self.attention_backend, "compile": self.compile, "cache": self.cache}
        if self.context_parallel > 1:
            settings["context_parallel"] = {"degree": self.context_parallel, "mode": self.context_parallel_mode}
        return settings


def attention_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return sorted(member.value for member in AttentionBackendName)


def validate_speed(options: SpeedOptions) -> SpeedOptions:
    """One-line FvgError for a cache, attention backend or context parallelism that does not exist or cannot
    run here (or together)."""
    if options.cache not in CACHES:
        raise FvgError(f"unknown cache '{options.cache}': use one of {', '.join(CACHES)}")
    validate_context_parallel(options.context_parallel, options.context_parallel_mode)
    backend = options.attention_backend
    if options.context_parallel > 1:
        check_parallel_combination(options)
    if backend is None:
        return options
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    names = attention_backends()
    if backend.lower() not in names:
        raise FvgError(f"unknown attention backend '{backend}': use one of {', '.join(names)}")
    try:
        _check_attention_backend_requirements(AttentionBackendName(backend.lower()))
    except (RuntimeError, ImportError, ValueError) as exc:
        raise FvgError(f"attention backend '{backend}' cannot run here: {' '.join(str(exc).split())}") from None
    return replace(options, attention_backend=backend.lower())


def check_parallel_combination(options: SpeedOptions) -> None:
    """Context parallelism refuses what would make the ranks disagree or cannot run."""
    if options.cache != "none":
        # each rank would judge "skip this step" from its own chunk of the sequence: ranks that skip a block
        # leave the others waiting in its attention's collective
        raise FvgError(f"--cache {options.cache} cannot be combined with --context-parallel: each rank would "
                       "decide from its own part of the video whether to skip a step")
    backend = (options.attention_backend or "native").lower()
    if options.context_parallel_mode == "ring" and backend in NO_LSE_BACKENDS:
        raise FvgError(f"ring attention needs an attention backend that returns the log-sum-exp (diffusers' "
                       f"'{backend}' does not): add --attention-backend flash, _native_flash, _native_cudnn or sage "
                       "(CUDA), or use --context-parallel-mode ulysses")


def transformers(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's denoisers by component name (Wan2.2-A14B has two)."""
    found = {name: getattr(pipe, name, None) for name in TRANSFORMERS}
    return {name: model for name, model in found.items() if model is not None}


def blocks(transformer) -> torch.nn.ModuleList:
    return transformer.blocks if hasattr(transformer, "blocks") else transformer.transformer_blocks


def compile_blocks(transformer, fullgraph: bool) -> None:
    """`compile_repeated_blocks` on `transformer`, naming its block classes where the model lists none."""
    if not getattr(transformer, "_repeated_blocks", None):
        transformer._repeated_blocks = sorted({type(block).__name__ for block in blocks(transformer)})
    transformer.compile_repeated_blocks(fullgraph=fullgraph, backend=COMPILE_BACKEND)


def set_attention_backend(transformer, backend: str) -> None:
    """diffusers' `set_attention_backend`, refused in one line where no attention of the model goes through
    diffusers' dispatcher (CogVideoX's processor calls torch's SDPA itself: the flag would do nothing)."""
    processors = [m.processor for m in transformer.modules() if getattr(m, "processor", None) is not None]
    if not any(hasattr(p, "_attention_backend") for p in processors):
        raise FvgError(f"--attention-backend does not apply to {type(transformer).__name__}: its attention "
                       f"processor ({type(processors[0]).__name__}) does not use diffusers' attention dispatcher")
    transformer.set_attention_backend(backend)


def step_cache_config(cache: str):
    """The diffusers config of a cache that needs nothing measured (`fbc`, `taylorseer`)."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if cache == "fbc":
        return FirstBlockCacheConfig(threshold=FBC_THRESHOLD)
    return TaylorSeerCacheConfig(cache_interval=TAYLOR_INTERVAL, disable_cache_before_step=TAYLOR_WARMUP,
                                 taylor_factors_dtype=torch.float32, cache_identifiers=[SELF_ATTENTION])


def apply_speed(pipe, options: SpeedOptions, family=None) -> "SpeedSession":
    """Set the attention backend, split the sequence over the ranks (context parallelism, with `family`'s plan),
    enable the cache (all but MagCache, which is set per video) and compile, on every transformer of `pipe`.
    Call once, after the pipeline is built and its LoRAs are loaded."""
    models = transformers(pipe)
    for model in models.values():
        if options.attention_backend is not None:
            set_attention_backend(model, options.attention_backend)
        if options.context_parallel > 1:  # after the backend: diffusers checks it can run context-parallel
            enable_context_parallel(model, options.context_parallel, options.context_parallel_mode,
                                    family.context_parallel_plan(model))
        if options.cache in ("fbc", "taylorseer"):
            model.enable_cache(step_cache_config(options.cache))
        if options.compile:
            compile_blocks(model, fullgraph=options.cache == "none")
    return SpeedSession(pipe, options, models)


@dataclass(frozen=True)
class MagCacheKey:
    """What MagCache's ratios depend on: one calibration per key."""

    video_model: str
    loras: tuple[str | None, ...]
    anchored: bool
    steps: int
    still_strength: float | None = None  # a still start runs fewer, later steps

    def digest(self) -> str:
        parts = [self.video_model, list(self.loras), self.anchored, self.steps]
        text = json.dumps(parts if self.still_strength is None else [*parts, self.still_strength])
        return hashlib.sha256(text.encode()).hexdigest()[:24]


class MagRatioStore:
    """Measured MagCache ratios on disk: one JSON file per key, {transformer name: [ratio per step]}."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else cache_dir("magcache", "FVG_MAGCACHE_DIR")

    def path(self, key: MagCacheKey) -> Path:
        return self.root / f"{key.digest()}.json"

    def get(self, key: MagCacheKey) -> dict[str, list[float]] | None:
        try:
            record = json.loads(self.path(key).read_text())
            return {name: [float(r) for r in ratios] for name, ratios in record["ratios"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # missing or unreadable: measure again

    def put(self, key: MagCacheKey, ratios: dict[str, list[float]]) -> None:
        """Store atomically; a store that cannot be written is logged (the next video measures again)."""
        try:
            write_json(self.path(key), {"key": key.__dict__, "ratios": ratios})
        except OSError as exc:
            log.warning("cannot write MagCache ratios %s: %s", self.path(key), exc)


class MagnitudeRecorder:
    """Per step, mean over tokens of |residual_t| / |residual_t-1|, where the residual is the last block's
    hidden-state output minus the first block's input (MagCache's definition). One series per CFG branch:
    the k-th transformer call of a step (a new timestep starts a step) is branch k; the ratios are averaged
    over branches."""

    def __init__(self, transformer):
        from diffusers.hooks._helpers import TransformerBlockRegistry

        stack = blocks(transformer)
        self.first = TransformerBlockRegistry.get(type(stack[0]))
        self.last = TransformerBlockRegistry.get(type(stack[-1]))
        self.timestep: float | None = None
        self.branch = -1
        self.block_input: torch.Tensor | None = None
        self.previous: dict[int, torch.Tensor] = {}
        self.series: dict[int, list[float]] = {}
        self.handles = [transformer.register_forward_pre_hook(self._call, with_kwargs=True),
                        stack[0].register_forward_pre_hook(self._before, with_kwargs=True),
                        stack[-1].register_forward_hook(self._after, with_kwargs=True)]

    def _call(self, _module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = float(torch.as_tensor(timestep).max())  # anchored calls give frame 0 timestep 0
        self.branch = self.branch + 1 if t == self.timestep else 0
        self.timestep = t

    def _before(self, _module, args, kwargs):
        self.block_input = self.first._get_parameter_from_args_kwargs(
            self.first.hidden_states_argument_name, args, kwargs).detach()

    def _after(self, _module, args, kwargs, output):
        hidden = output[self.last.return_hidden_states_index] if isinstance(output, tuple) else output
        residual = (hidden.detach() - self.block_input).float()
        previous = self.previous.get(self.branch)
        ratio = 1.0 if previous is None else (residual.norm(dim=-1) / (previous.norm(dim=-1) + 1e-8)).mean().item()
        self.series.setdefault(self.branch, []).append(ratio)
        self.previous[self.branch] = residual

    def ratios(self) -> list[float]:
        """The measured ratios, one per step; removes the hooks."""
        for handle in self.handles:
            handle.remove()
        series = list(self.series.values())
        steps = min(map(len, series), default=0)
        return [sum(s[i] for s in series) / len(series) for i in range(steps)]


class SpeedSession:
    """The speed options applied to one pipeline; `sampling` wraps each video."""

    def __init__(self, pipe, options: SpeedOptions, models: dict[str, torch.nn.Module],
                 store: MagRatioStore | None = None):
        self.pipe, self.options, self.models = pipe, options, models
        self.store = store or MagRatioStore()
        self._mag_key: MagCacheKey | None = None  # the key whose ratios the MagCache hooks hold now
        self.last_calibration: str | None = None  # for run.json: "measured" or the ratio file used

    def reset(self) -> None:
        for model in self.models.values():
            model._reset_stateful_cache()

    @contextmanager
    def sampling(self, key: MagCacheKey):
        """Around one video: fresh cache state before and after; MagCache configured (or measured) for `key`."""
        recorders = self._prepare_magcache(key) if self.options.cache == "magcache" else {}
        self.reset()
        try:
            yield self
        except BaseException:
            for recorder in recorders.values():
                recorder.ratios()  # removes the hooks; a failed video stores nothing
            raise
        finally:
            self.reset()
        if recorders:
            measured = {name: recorder.ratios() for name, recorder in recorders.items()}
            if all(measured.values()):
                self.store.put(key, measured)

    def _prepare_magcache(self, key: MagCacheKey) -> dict[str, MagnitudeRecorder]:
        from diffusers import MagCacheConfig

        if key == self._mag_key:
            self.last_calibration = str(self.store.path(key))
            return {}
        for model in self.models.values():
            if model.is_cache_enabled:
                model.disable_cache()
        self._mag_key = None
        ratios = self.store.get(key)
        if ratios is None or set(ratios) != set(self.models) or not all(ratios.values()):
            self.last_calibration = "measured"
            return {name: MagnitudeRecorder(model) for name, model in self.models.items()}
        for name, model in self.models.items():
            model.enable_cache(MagCacheConfig(
                threshold=MAG_THRESHOLD, max_skip_steps=MAG_MAX_SKIP, retention_ratio=MAG_RETENTION,
                num_inference_steps=len(ratios[name]), mag_ratios=ratios[name]))
        self._mag_key = key
        self.last_calibration = str(self.store.path(key))
        return {}
