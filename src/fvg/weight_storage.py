"""How the big models' weights are stored: fp8 layerwise casting, quantization, or a GGUF transformer file.

Three independent ways to make a stage's weights smaller, each chosen by one option and
checked before anything loads (`WeightStorage.validate`):

* `--weights fp8`: every denoiser (the video transformer, A14B's `transformer_2`, the anchor's
  text-to-image transformer or UNet) keeps its weights in `float8_e4m3fn` and casts each layer
  to the run dtype just for its own forward (diffusers' layerwise casting). Half the bytes of
  bf16 on any device and with any memory mode, no extra package, no kernel requirement: the
  matmuls still run in the run dtype. diffusers skips the layers that are sensitive to precision
  (patch embedding, condition embedders, norms: `_skip_layerwise_casting_patterns`) and PEFT's
  LoRA layers. Order matters twice: the LoRA is loaded *before* the casting (PEFT moves a new
  adapter to its base layer's dtype, which would make it fp8), and the offload hooks are
  installed after it (at stage entry, `fvg.residency`), so offloading moves fp8 bytes and
  the layer casts on the device.
* `--quantize NAME`: the denoisers and the text encoder are quantized while loading, through
  diffusers' `PipelineQuantizationConfig` (diffusers' config classes for diffusers models,
  transformers' for the text encoder). A small set that is honest about where it runs:
  `torchao-int8wo` (int8 weights, per-channel scales; runs on CPU and CUDA, tested here on
  tiny models), `bnb-8bit` and `bnb-4bit` (bitsandbytes LLM.int8 / NF4 with double
  quantization; diffusers' bitsandbytes quantizers require a GPU; NF4 runs placed whole or one model
  at a time, LLM.int8 placed whole only: `failing_memory_modes`).
  The packages are an optional extra: `pip install 'fvg[quant]'`. Quantizing applies to checkpoints
  loaded from disk.
* `--video-transformer PATH.gguf` (`--video-transformer-2` for A14B's low-noise expert): the
  video transformer comes from a GGUF single file (the original Wan key layout, as the community
  quantizations ship it) and stays quantized in memory, dequantized per layer to the run dtype
  (diffusers' GGUF quantizer; pure Python `gguf` package, any device). Its architecture comes
  from the video model's own `transformer` config. Wan only: diffusers has no single-file
  converter for CogVideoX.

fp8 casting and quantization are exclusive: layerwise casting needs plain floating-point weights.
A GGUF transformer is already quantized, so fp8 does not apply to it (nor `--quantize`, which
then only reaches the text encoder).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fvg.io import FvgError

if TYPE_CHECKING:  # torch loads only when weights are touched: the CLI validates options without it
    import torch

WEIGHT_FORMATS = ("native", "fp8")
FP8_STORAGE = "float8_e4m3fn"  # torch dtype name; e4m3: more mantissa than e5m2, enough range for trained weights
DENOISERS = ("transformer", "transformer_2", "unet")  # pipeline components that get fp8 / quantization
TEXT_ENCODERS = ("text_encoder",)


@dataclass(frozen=True)
class Quantizer:
    """One `--quantize` choice: the package it needs, whether it needs a GPU, and its configs."""

    name: str
    package: str  # import name, from the `quant` extra
    needs_gpu: bool
    summary: str
    failing_memory_modes: tuple[str, ...] = ()  # `--memory` modes its weights do not run under

    def diffusers_config(self, compute_dtype: torch.dtype):
        from diffusers import BitsAndBytesConfig, TorchAoConfig

        return self._config(BitsAndBytesConfig, TorchAoConfig, compute_dtype)

    def transformers_config(self, compute_dtype: torch.dtype):
        from transformers import BitsAndBytesConfig, TorchAoConfig

        return self._config(BitsAndBytesConfig, TorchAoConfig, compute_dtype)

    def _config(self, bnb_config, torchao_config, compute_dtype: torch.dtype):
        if self.name == "bnb-4bit":
            return bnb_config(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
        if self.name == "bnb-8bit":
            return bnb_config(load_in_8bit=True)
        if self.name == "torchao-int8wo":
            from torchao.quantization import Int8WeightOnlyConfig

            # version 2 (`Int8Tensor`) explicitly: torchao 0.17's default is still version 1
            # (`AffineQuantizedTensor`), which cannot be pinned, so group offloading with streams fails
            # on it (measured on an H200, BENCHMARKS.md); 0.18 removed version 1.
            return torchao_config(Int8WeightOnlyConfig(version=2))
        raise FvgError(f"unknown quantizer '{self.name}'")


# bitsandbytes' quantized layers keep state beside their parameters, and the offload hooks that move
# parameters lose it or leave it behind. Measured on an H100 (torch 2.11, diffusers 0.42.1, transformers 5.23,
# bitsandbytes 0.50.2; tests/test_cuda_quantization.py, benchmarks/bench_gpu.py): group offloading failed
# for both formats (NF4: "invalid argument to getCurrentStream"; LLM.int8: "Expected a cuda device, but got:
# cpu"), and accelerate's sequential offload failed for NF4 ("Cannot copy out of meta tensor": the state
# stays on the meta device). LLM.int8 runs under model and sequential offload but offloads nothing: after its
# first forward each `Linear8bitLt` holds its int8 matrix in `state.CB`, which `Module.to` (a parameter
# walk) never moves, so the matrices stay on the device (wan2.1-1.3b under model-offload peaked at 11.95
# GiB, above the 10.5 GiB of everything placed whole; BENCHMARKS.md). Placing whole models (`gpu`,
# evicting a stage and placing it again) works for both, and NF4 under model-offload.
QUANTIZERS = {q.name: q for q in (
    Quantizer("torchao-int8wo", "torchao", False, "int8 weights, per-channel scales (torchao); CPU and CUDA"),
    Quantizer("bnb-8bit", "bitsandbytes", True, "LLM.int8 (bitsandbytes); CUDA; gpu mode only",
              ("model-offload", "group-offload", "sequential")),
    Quantizer("bnb-4bit", "bitsandbytes", True, "NF4 with double quantization (bitsandbytes); CUDA; gpu or "
              "model-offload", ("group-offload", "sequential")),
)}


def package_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@dataclass(frozen=True)
class WeightStorage:
    """The weight options of one run (recorded in run.json). The defaults change nothing."""

    weights: str = "native"  # "native" (the run dtype) or "fp8" (layerwise casting)
    quantize: str | None = None  # a `QUANTIZERS` name
    video_transformer: str | None = None  # a .gguf file for the video transformer
    video_transformer_2: str | None = None  # a .gguf file for A14B's low-noise expert

    @property
    def is_default(self) -> bool:
        return self == WeightStorage()

    def validate(self, device: str, planning: bool = False) -> "WeightStorage":
        """One FvgError line for a bad choice, a missing package or a device that cannot run it.

        `planning` (`fvg memory`, sizing for a GPU without loading): the quantizer's package need not be
        installed here; the choices, their combination and the GGUF files are checked as for a run."""
        if self.weights not in WEIGHT_FORMATS:
            raise FvgError(f"unknown --weights '{self.weights}' (choose from: {', '.join(WEIGHT_FORMATS)})")
        if self.quantize is not None:
            quantizer = QUANTIZERS.get(self.quantize)
            if quantizer is None:
                raise FvgError(f"unknown --quantize '{self.quantize}' (choose from: {', '.join(QUANTIZERS)})")
            if self.weights == "fp8":
                raise FvgError("--weights fp8 and --quantize exclude each other: fp8 layerwise casting needs "
                               "unquantized weights")
            if quantizer.needs_gpu and not device.startswith("cuda"):
                raise FvgError(f"--quantize {quantizer.name} needs a CUDA device (bitsandbytes quantizes on the "
                               f"GPU), not '{device}'; torchao-int8wo runs on CPU")
            if not planning and not package_available(quantizer.package):
                raise FvgError(f"--quantize {quantizer.name} needs the '{quantizer.package}' package: "
                               "pip install 'fvg[quant]'")
        for flag, path in (("--video-transformer", self.video_transformer),
                           ("--video-transformer-2", self.video_transformer_2)):
            if path is None:
                continue
            if Path(path).suffix.lower() != ".gguf":
                raise FvgError(f"{flag} takes a .gguf file, got {path}")
            if not Path(path).is_file():
                raise FvgError(f"{flag}: file not found: {path}")
            if not package_available("gguf"):
                raise FvgError(f"{flag} needs the 'gguf' package: pip install 'fvg[quant]'")
        if self.video_transformer_2 is not None and self.video_transformer is None:
            raise FvgError("--video-transformer-2 needs --video-transformer (the high-noise expert's file)")
        if self.weights == "fp8" and device.startswith("mps"):
            raise FvgError("--weights fp8 is not available on mps (torch has no float8 there)")
        if self.weights == "fp8" and self.video_transformer is not None:
            raise FvgError("--weights fp8 does not apply to a GGUF transformer: its weights are already quantized")
        return self

    @property
    def failing_memory_modes(self) -> tuple[str, ...]:
        """The memory modes this storage's quantized models do not run under (`auto` never picks them)."""
        return QUANTIZERS[self.quantize].failing_memory_modes if self.quantize else ()

    def usable_memory_modes(self, modes: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m for m in modes if m not in self.failing_memory_modes)

    def check_memory_mode(self, mode: str, asked_as: str | None = None) -> None:
        """One FvgError line when an explicit `--memory` mode cannot run this storage's models; `asked_as`
        names the option the user gave where it was not `--memory` (`--cpu-offload`)."""
        if mode in self.failing_memory_modes:
            from fvg.residency import MEMORY_MODES

            usable = " or ".join(self.usable_memory_modes(MEMORY_MODES[1:]))
            raise FvgError(f"{asked_as or '--memory ' + mode} does not work with --quantize {self.quantize}: the "
                           f"offload hooks lose or leave behind bitsandbytes' quantization state (measured on an "
                           f"H100); use --memory {usable}, or --quantize torchao-int8wo")

    def for_anchor(self) -> "WeightStorage":
        """What applies to the text-to-image stage: fp8 and quantization (the GGUF files are video transformers)."""
        return WeightStorage(self.weights, self.quantize)

    def record(self) -> dict:
        return asdict(self)


# -- fp8 layerwise casting -----------------------------------------------------------------------

def denoisers(pipe) -> dict[str, torch.nn.Module]:
    components = getattr(pipe, "components", {})
    return {name: components[name] for name in DENOISERS if components.get(name) is not None}


def store_denoisers_in_fp8(pipe, compute_dtype: torch.dtype | None = None) -> list[str]:
    """fp8 storage for every denoiser of `pipe` (after its LoRA is loaded, before offload hooks), computing
    in `compute_dtype` (None: each denoiser's present dtype).

    Returns the names of the components it cast. diffusers' default skip list (plus the model's
    own `_skip_layerwise_casting_patterns` and PEFT's adapter layers) keeps norms, embeddings and
    LoRA weights in their dtype."""
    import torch

    cast = []
    for name, model in denoisers(pipe).items():
        if _is_layerwise_cast(model):
            continue  # a stage's pipeline object shared between runs: casting it twice is refused by diffusers
        model.enable_layerwise_casting(storage_dtype=getattr(torch, FP8_STORAGE),
                                       compute_dtype=compute_dtype or model.dtype)
        cast.append(name)
    return cast


def _is_layerwise_cast(model: torch.nn.Module) -> bool:
    from diffusers.hooks.layerwise_casting import _is_layerwise_casting_active

    return _is_layerwise_casting_active(model)


# -- quantization while loading ---------------------------------------------------------------------

def pipeline_quantization(quantize: str | None, compute_dtype: torch.dtype, components: list[str]):
    """The `quantization_config` that `DiffusionPipeline.from_pretrained` receives, or None.

    A per-component mapping (not one backend for all) so that diffusers models get diffusers'
    config class and the transformers text encoder gets transformers' own."""
    if quantize is None or not components:
        return None
    from diffusers import PipelineQuantizationConfig

    quantizer = QUANTIZERS[quantize]
    mapping = {name: quantizer.transformers_config(compute_dtype) if name in TEXT_ENCODERS
               else quantizer.diffusers_config(compute_dtype) for name in components}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def checkpoint_components(model_id: str) -> list[str]:
    """Names of the components a diffusers checkpoint directory has (from its model_index.json); for a
    hub id, the usual denoiser and text encoder names."""
    import json

    index = Path(model_id) / "model_index.json"
    if not index.is_file():
        return ["transformer", "text_encoder"]
    spec = json.loads(index.read_text(encoding="utf-8"))
    return [name for name, value in spec.items() if isinstance(value, list) and value[0] is not None
            and value[1] is not None]


def quantized_components(model_id: str, skip: tuple[str, ...] = ()) -> list[str]:
    """The components of `model_id` that `--quantize` reaches: denoisers and text encoder, minus `skip`."""
    present = checkpoint_components(model_id)
    return [name for name in (*DENOISERS, *TEXT_ENCODERS) if name in present and name not in skip]


# -- GGUF single-file transformers ------------------------------------------------------------------

def load_gguf_transformer(model_class, path: str, config_id: str, subfolder: str, compute_dtype: torch.dtype):
    """`model_class` from a GGUF single file, architecture from `config_id`'s `subfolder` config."""
    from diffusers import GGUFQuantizationConfig

    try:
        model = model_class.from_single_file(
            path, config=config_id, subfolder=subfolder, torch_dtype=compute_dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FvgError(f"cannot load the GGUF transformer {path}: {str(exc).splitlines()[0]}") from None
    check_gguf_keys(path, model, model_class)
    return model


def check_gguf_keys(path: str, model, model_class) -> None:
    """FvgError unless the file's tensors are exactly `model`'s weights.

    diffusers drops tensors a single file has beyond the config (a 40-block file against a 30-block
    config loads "fine" with its extra blocks ignored), so the names are compared here, after the
    same key conversion diffusers applies (placeholder values: only the names are converted)."""
    found = set(gguf_tensors(path, model_class.__name__))
    expected = set(model.state_dict())
    extra, missing = sorted(found - expected), sorted(expected - found)
    if extra or missing:
        example = (extra or missing)[0]
        raise FvgError(f"the GGUF transformer {path} does not match the video model's transformer config: "
                       f"{len(extra)} tensors beyond the config, {len(missing)} missing (e.g. {example})")


def gguf_tensors(path: str, class_name: str) -> dict:
    """The tensors of a GGUF file (gguf's `ReaderTensor`: name, type, shape, bytes; data memory-mapped, not
    read), keyed by the model's own parameter names after diffusers' key conversion for `class_name`.

    Each placeholder handed to the converter carries its tensor's index, so a converter that only renames
    (Wan's) maps every file tensor to its parameter; one that concatenated would give several indices."""
    import torch
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(path).tensors
    except (OSError, ValueError, KeyError) as exc:
        raise FvgError(f"cannot read the GGUF transformer {path}: {str(exc).splitlines()[0]}") from None
    convert = SINGLE_FILE_LOADABLE_CLASSES[class_name]["checkpoint_mapping_fn"]
    converted = convert({t.name: torch.tensor([i]) for i, t in enumerate(tensors)})
    return {name: [tensors[i] for i in index.tolist()] for name, index in converted.items()}


def refuse_for_builtin(storage: WeightStorage, model_id: str) -> None:
    """A tiny `builtin:` model is built in memory: nothing is loaded that could be quantized or replaced."""
    if storage.quantize or storage.video_transformer:
        raise FvgError(f"--quantize and GGUF transformers apply to checkpoints on disk, not {model_id}")


def from_pretrained_arguments(storage: WeightStorage | None, model_id: str, compute_dtype: torch.dtype,
                              gguf_class=None, skip: tuple[str, ...] = ()) -> dict:
    """The extra `from_pretrained` arguments of a pipeline for `storage`: its GGUF transformers as
    ready components, and the quantization config for the other big components.

    `gguf_class` is the family's transformer class (None: the family has no GGUF loader); `skip`
    names components the caller loads itself (not quantized here)."""
    if storage is None:
        return {}
    gguf = {"transformer": storage.video_transformer, "transformer_2": storage.video_transformer_2}
    kwargs = {}
    for name, path in gguf.items():
        if path is None:
            continue
        if gguf_class is None:
            raise FvgError(f"GGUF transformers load for the Wan family only (diffusers has no single-file "
                           f"converter for {model_id})")
        kwargs[name] = load_gguf_transformer(gguf_class, path, model_id, name, compute_dtype)
    config = pipeline_quantization(storage.quantize, compute_dtype,
                                   quantized_components(model_id, skip=(*skip, *kwargs)))
    if config is not None:
        kwargs["quantization_config"] = config
    return kwargs
