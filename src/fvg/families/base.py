"""`ModelFamily`: the interface one video model family implements (finetrainers' model-specification style).

Everything fvg does differently for Wan, CogVideoX or a future family lives behind this class,
so the rest of the package (pipeline, training, export, presets) asks the family instead of
branching on its name. A family module subclasses `ModelFamily`, fills in the facts (class
attributes) and implements the hooks; `fvg.families` registers it with one line.

The hooks, by stage:
  loading       `load_pipeline`, `tiny_components`
  shape rules   `frame_step`, `pixel_multiple` (checked by `check_shape`)
  inference     `call_arguments` (extra `__call__` arguments, anchored-call checks)
  parallelism   `context_parallel_plan`, `check_context_parallel` (one video over N processes)
  training data `encode_clip`, `encode_clip_anchor`, `encode_captions`, `cache_key_parts`
  objective     `adapt_train_config`, `training_objective`
  LoRA          `lora_converters` (key formats beside diffusers'), `lora_info`
  memory facts  `memory` (a `MemoryFacts` or None; see below)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

from fvg.io import FvgError

# LoRA key-format converter: (PEFT state dict, lora_alpha) -> the tensors of another key layout.
LoraConverter = Callable[[dict, float], dict]


def check_video_shape(height: int, width: int, num_frames: int, frame_step: int = 4, pixel_multiple: int = 16) -> None:
    """The VAE needs `frame_step`n+1 frames and the transformer `pixel_multiple`-pixel sides: say so before
    loading anything. The one place this rule is written (presets, the pipeline and training call it)."""
    if num_frames < 1 or (num_frames - 1) % frame_step:
        examples = ", ".join(str(frame_step * n + 1) for n in (4, 12, 20))
        raise FvgError(f"frames must be {frame_step}n+1 (e.g. {examples}), got {num_frames}")
    if height % pixel_multiple or width % pixel_multiple or height <= 0 or width <= 0:
        raise FvgError(f"height and width must be positive multiples of {pixel_multiple}, got {height}x{width}")


def load_components_onto(model_id: str, dtype, devices: dict | None) -> dict:
    """Components of a diffusers checkpoint loaded straight onto their devices: `devices` maps a component
    name (`transformer`, `transformer_2`, `text_encoder`) to its device.

    Each named component is read from its safetensors with `device_map=<device>` (diffusers and
    transformers load on the meta device, then put each tensor on the device in `dtype`): no host copy
    of the whole model, no float32 copy. Pass the result to the pipeline's `from_pretrained`, which then
    loads only the rest (on the host). A component the checkpoint does not have (Wan2.1's
    `transformer_2`) is left out; whoever needs it says so."""
    import importlib

    from diffusers import DiffusionPipeline

    from fvg.io import load_or_explain

    if not devices:
        return {}
    index = load_or_explain(DiffusionPipeline.load_config, model_id)  # model_index.json: name -> [library, class]
    loaded = {}
    for name, device in devices.items():
        library, class_name = (index.get(name) or [None, None])[:2]
        if class_name is None:
            continue
        cls = getattr(importlib.import_module(library), class_name)
        loaded[name] = load_or_explain(cls.from_pretrained, model_id, subfolder=name, dtype=dtype,
                                       device_map=str(device))
    return loaded


def place_built(pipe, dtype, devices: dict | None) -> None:
    """A tiny pipeline built in float32 on the host: cast the transformer(s) and text encoder to `dtype` and
    move the components named in `devices` there, each with one `.to` (the tiny builds have no files)."""
    for name in ("transformer", "transformer_2", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to((devices or {}).get(name, "cpu"), dtype)


class MemoryFacts(Protocol):
    """Slot for a family's memory facts (not implemented by any family yet; `ModelFamily.memory` is None).

    A family that knows its memory use answers here, e.g. the activation bytes of one forward pass
    at a shape, so that planning a run (batch size, offloading, tiling) needs no trial and error."""

    def activation_bytes(self, batch: int, height: int, width: int, num_frames: int, dtype_bytes: int) -> int:
        ...


@dataclass
class TrainingObjective:
    """What the training loop needs from a family's objective.

    `samplers` holds one timestep/sigma sampler per trained expert (each with `mass()`, its share
    of the full distribution); `step_loss(model, sampler, batch, generator)` draws the noise of one
    micro-batch from `generator`, runs `model` and returns the scalar loss."""

    samplers: list
    step_loss: Callable[[Any, Any, dict, Any], Any]
    flow_shift: float | None = None  # recorded in run.json and the LoRA metadata (None: not a flow model)


class ModelFamily(ABC):
    """One video model family. Subclasses set the facts and implement the hooks (see the module docstring)."""

    name: ClassVar[str]  # registry key, `Preset.family`, `TrainConfig.family`
    label: ClassVar[str]  # for messages: "Wan", "CogVideoX"
    # Lower-case substrings that identify the family in a model id or a pipeline/transformer class name.
    keywords: ClassVar[tuple[str, ...]] = ()
    tiny_model_id: ClassVar[str]  # `builtin:` id of the tiny random instance (smoke tests)
    frame_step: ClassVar[int] = 4  # the VAE's temporal compression: videos have frame_step * n + 1 frames
    pixel_multiple: ClassVar[int] = 16  # the VAE's spatial compression x the transformer's patch
    # Key formats written beside the diffusers file, by name (file suffix `_<name>`).
    lora_converters: ClassVar[dict[str, LoraConverter]] = {}
    lora_method: ClassVar[str] = "anchor LoRA: clean latent frame 0 at timestep 0 (Factorized Video Generation)"
    memory: ClassVar[MemoryFacts | None] = None  # memory facts: the slot is documented above, not filled yet
    # Whether the anchored pipeline can start from the anchor held still (`Preset.still_strength`).
    still_start: ClassVar[bool] = False

    # -- identity and shapes -------------------------------------------------------------------

    def matches(self, text: str) -> bool:
        """Whether a model id or class name names this family."""
        text = text.lower()
        return any(k in text for k in self.keywords)

    def check_shape(self, height: int, width: int, num_frames: int) -> None:
        check_video_shape(height, width, num_frames, self.frame_step, self.pixel_multiple)

    # -- loading -------------------------------------------------------------------------------

    @abstractmethod
    def load_pipeline(self, model_id: str, dtype, flow_shift: float | None = None, devices: dict | None = None,
                      storage=None):
        """The family's anchored pipeline from a diffusers checkpoint, or `tiny_model_id`'s random one.
        On the host, except the components named in `devices` (name -> device), which are loaded straight
        onto their device (`load_components_onto`; training places what it trains this way).
        `storage` (`fvg.weight_storage.WeightStorage`, None: as stored) quantizes while loading or
        takes transformers from GGUF files (`fvg.weight_storage.from_pretrained_arguments`)."""

    @abstractmethod
    def tiny_components(self, seed: int = 0) -> dict:
        """Components of a tiny random instance of the real classes (built offline, in float32)."""

    # -- inference -----------------------------------------------------------------------------

    def call_arguments(self, pipe, preset, anchored: bool) -> dict:
        """Extra keyword arguments of the pipeline call for `preset`; raises FvgError for a shape the
        anchored call cannot take."""
        return {}

    def guidance_batching(self, pipe) -> tuple[object, dict]:
        """(`pipe` or a pipeline over the same components, call arguments) that run classifier-free guidance's two
        predictions in one transformer call (`Preset.batch_guidance`). The base: the pipeline as it is, which
        for a family whose pipelines already batch them (CogVideoX) is the answer."""
        return pipe, {}

    def compact_text_padding(self, pipe) -> list:
        """Sampling-time compaction of `pipe`'s zero-padded text (`Preset.compact_text`), as removable hooks.
        Only families whose pipelines pad text with zeros have it; the base refuses in one line."""
        raise FvgError(f"text compaction applies to Wan-family pipelines, not {self.label} "
                       f"({type(pipe).__name__} does not zero-pad its text)")

    # -- context parallelism (`fvg.parallel`) ---------------------------------------------------

    def context_parallel_plan(self, transformer) -> dict | None:
        """diffusers' context-parallel plan for `transformer` (which inputs split along the sequence, which
        output gathers it back), or None where the family has none: diffusers' `_cp_plan` of the class."""
        return getattr(transformer, "_cp_plan", None)

    def check_context_parallel(self, pipe, height: int, width: int, num_frames: int, degree: int, mode: str) -> None:
        """FvgError for a video that `degree` ranks cannot split (checked once the pipeline is loaded, before any
        compute). The base rule: the family must have a plan."""
        denoisers = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
        for model in denoisers:
            if self.context_parallel_plan(model) is None:
                raise FvgError(f"--context-parallel: {self.label} has no context-parallel plan (diffusers ships "
                               f"none for {type(model).__name__}); run it with --context-parallel 1")

    # -- training data -------------------------------------------------------------------------

    @abstractmethod
    def encode_clip(self, pipe, pixels):
        """The latent of a clip (pixels [1, 3, T, H, W] in [-1, 1]) exactly as the anchored pipeline sees latents."""

    def encode_clip_anchor(self, pipe, pixels):
        """The clip's first frame encoded alone when the family needs it apart from the clip latent, else None."""
        return None

    @abstractmethod
    def encode_captions(self, pipe, captions: list[str], max_sequence_length: int, device) -> list:
        """Text embeddings per caption, as the pipeline's `encode_prompt` computes them (stored in the cache)."""

    def cache_key_parts(self) -> dict:
        """Extra entries of the latent-cache key (the first family adds none, so its caches stay valid)."""
        return {"family": self.name}

    # -- training objective --------------------------------------------------------------------

    def adapt_train_config(self, cfg, pipe) -> dict:
        """Settings to change before training, in the family's terms (text length, LoRA module names)."""
        return {}

    @abstractmethod
    def training_objective(self, pipe, cfg, experts: list[str], device, autocast, weight_dtype) -> TrainingObjective:
        """The objective for training `experts` of `pipe` under `cfg` (`autocast`: the accelerator's context,
        `weight_dtype`: the frozen weights' dtype)."""

    # -- LoRA ----------------------------------------------------------------------------------

    def lora_info(self, info: dict) -> dict:
        """The fvg metadata written into a LoRA file's header."""
        return {**info, "method": self.lora_method}
