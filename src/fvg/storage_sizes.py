"""The bytes a model's tensors take under `--weights fp8`, `--quantize` or a GGUF transformer, without loading it.

`fvg memory` (`fvg.memory`) sizes every model as the pipeline holds it; `fvg.weight_storage`
decides which components each option reaches. This module turns one model, built on the meta
device from its config (shapes and module types, no memory), into the bytes of each of its tensors
as stored after that option, and the largest weight one layer's forward materialises in the compute
dtype on top of them (`StoredTensors.transient_bytes`). The rules are the libraries' own, read from
their sources (diffusers 0.42, transformers 5.23, torchao 0.18, bitsandbytes 0.50) and checked
against real conversions of tiny models (tests/test_memory.py):

* **fp8 layerwise casting** is diffusers' own `enable_layerwise_casting`, run on the meta model:
  whatever it casts is float8 afterwards, so its skip rules apply exactly (the default patterns
  `pos_embed`, `patch_embed`, `norm`, `^proj_in$`, `^proj_out$`, the class's
  `_skip_layerwise_casting_patterns` and `_keep_in_fp32_modules`, PEFT's adapter layers; only
  Linear, Conv and Embedding layers are hooked, so parameters held by other modules, such as Wan's
  `scale_shift_table`, keep their dtype). A layer is upcast whole for its forward: transient = the
  largest cast layer in the compute dtype.
* **Quantization** replaces `nn.Linear` weights only. diffusers models skip the modules named in
  `_keep_in_fp32_modules` (its `modules_to_not_convert`: `key + "."` inside the weight's name);
  transformers models skip `get_keys_to_not_convert` (tied and output embeddings, the last module)
  plus `_keep_in_fp32_modules`, matched by `should_convert_module` on the weight's name (torchao)
  or the module's name (bitsandbytes, which also converts exact `nn.Linear` only). Biases, norms,
  embeddings and skipped layers stay in the run dtype (fp32-kept ones in fp32).
  Bytes of one quantized [out, in] weight (`quantized_weight_bytes`):
  torchao-int8wo: int8 data + an fp32 scale and an int8 zero point per row (torchao's `Int8Tensor`);
  bnb-8bit: int8 data + an fp32 row scale (`SCB`);
  bnb-4bit (NF4, double quantization, blocks of 64): 4 bits a weight packed in uint8, one uint8
  absmax per 64-weight block, one fp32 absmax per 256 of those, an fp32 offset and the 16-entry
  fp32 NF4 code per layer, and the 256-entry fp32 code of the second level once per model.
  Transient: bitsandbytes NF4, torchao and GGUF dequantize the weight to the compute dtype for
  the matmul (largest quantized weight); LLM.int8 multiplies in int8 (none counted).
* **GGUF**: the file's header gives every tensor's type and byte size (`gguf.GGUFReader` memory-maps
  the file and reads no tensor data); names are converted to the model's as diffusers converts them.
  Quantized tensors stay as their raw bytes; F32/F16 tensors load in the run dtype; tensors of
  `_keep_in_fp32_modules` load (dequantized) in fp32.

Non-persistent buffers (rotary tables) are not in checkpoints and are left as the constructor made
them by `from_pretrained` (fp32): they are counted in every case, at that dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fvg.io import FvgError
from fvg.weight_storage import DENOISERS, FP8_STORAGE, QUANTIZERS, TEXT_ENCODERS, WeightStorage

NF4_BLOCK = 64  # bitsandbytes' default 4-bit block size (CUDA)
NF4_NESTED_BLOCK = 256  # double quantization: the absmaxes quantized in blocks of 256
NF4_CODE_ENTRIES = 16  # the NF4 lookup table, fp32, one per layer
DYNAMIC_CODE_ENTRIES = 256  # the second level's 8-bit dynamic map, fp32, shared


@dataclass(frozen=True)
class Conversion:
    """What happens to one component's weights: "native", "fp8", a `QUANTIZERS` name, or "gguf" (with `path`)."""

    kind: str = "native"
    path: str | None = None

    @property
    def label(self) -> str:
        return "GGUF" if self.kind == "gguf" else self.kind


NATIVE = Conversion()


def conversion_for(storage: WeightStorage | None, component: str) -> Conversion:
    """The option that reaches `component` of a pipeline loaded with `storage` (`fvg.weight_storage`'s
    rules: GGUF files replace the video transformers, quantization reaches the other denoisers and the
    text encoder, fp8 the denoisers). The anchor stage passes `storage.for_anchor()` (no GGUF there)."""
    if storage is None:
        return NATIVE
    gguf = {"transformer": storage.video_transformer, "transformer_2": storage.video_transformer_2}.get(component)
    if gguf is not None:
        return Conversion("gguf", gguf)
    if storage.quantize is not None and component in (*DENOISERS, *TEXT_ENCODERS):
        return Conversion(storage.quantize)
    if storage.weights == "fp8" and component in DENOISERS:
        return Conversion("fp8")
    return NATIVE


@dataclass(frozen=True)
class StoredTensors:
    """Every tensor of one model as stored (name -> element count, name -> bytes), and the largest
    weight one layer's forward materialises in the compute dtype on top of them."""

    numels: dict[str, int]
    bytes: dict[str, int]
    transient_bytes: int = 0


def non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers a checkpoint does not hold (rotary tables): `from_pretrained` keeps the constructor's dtype."""
    found = {}
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None:
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def native_tensors(model: torch.nn.Module, bytes_per_element: int, keep_fp32: tuple[str, ...] = ()) -> StoredTensors:
    """The model's parameters and persistent buffers in the run dtype (fp32-kept modules at 4 bytes; a tied
    weight once), its non-persistent buffers as constructed."""
    constructed = non_persistent_buffers(model)
    numels, nbytes = {}, {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        numels[name] = tensor.numel()
        if name in constructed:
            nbytes[name] = tensor.numel() * tensor.element_size()
        else:
            nbytes[name] = tensor.numel() * (4 if is_kept_fp32(name, keep_fp32) else bytes_per_element)
    return StoredTensors(numels, nbytes)


def is_kept_fp32(name: str, keep_fp32: tuple[str, ...]) -> bool:
    """Whether tensor `name` lies under a module of `keep_fp32` (matched on a dotted name component, as the libraries do)."""
    return bool(keep_fp32) and any(k in name.split(".") for k in keep_fp32)


def convert(model: torch.nn.Module, native: StoredTensors, conversion: Conversion, compute_bytes: int
            ) -> StoredTensors:
    """`native` (from `native_tensors` of this meta `model`) after `conversion`. fp8 casts `model` itself:
    pass a fresh meta model."""
    if conversion.kind == "native":
        return native
    if conversion.kind == "fp8":
        return _fp8(model, native, compute_bytes)
    if conversion.kind == "gguf":
        return _gguf(model, native, conversion.path, compute_bytes)
    if conversion.kind in QUANTIZERS:
        return _quantized(model, native, conversion.kind, compute_bytes)
    raise FvgError(f"unknown weight conversion '{conversion.kind}'")


# -- fp8 layerwise casting ----------------------------------------------------------------------------

def _fp8(model: torch.nn.Module, native: StoredTensors, compute_bytes: int) -> StoredTensors:
    fp8 = getattr(torch, FP8_STORAGE)
    if not hasattr(model, "enable_layerwise_casting"):
        raise FvgError(f"--weights fp8 applies to diffusers models, not {type(model).__name__}")
    model.enable_layerwise_casting(storage_dtype=fp8, compute_dtype=torch.bfloat16)  # compute dtype: unused here
    nbytes = dict(native.bytes)
    transient = 0
    for _, module in model.named_modules():
        own = [t for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)] if t.dtype == fp8]
        transient = max(transient, sum(t.numel() for t in own) * compute_bytes)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.dtype == fp8:
            nbytes[name] = tensor.numel()
    return StoredTensors(native.numels, nbytes, transient)


# -- quantization while loading -----------------------------------------------------------------------

def quantized_weight_bytes(quantizer: str, out_features: int, in_features: int) -> int:
    """Bytes one quantized [out_features, in_features] Linear weight holds (layouts: module docstring)."""
    n = out_features * in_features
    if quantizer == "torchao-int8wo":
        return n + out_features * (4 + 1)
    if quantizer == "bnb-8bit":
        return n + out_features * 4
    if quantizer == "bnb-4bit":
        blocks = math.ceil(n / NF4_BLOCK)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 + 4 * NF4_CODE_ENTRIES
    raise FvgError(f"unknown quantizer '{quantizer}'")


def quantized_linears(model: torch.nn.Module, quantizer: str) -> dict[str, torch.nn.Linear]:
    """The Linear layers whose weight the quantizer converts while `from_pretrained` loads `model`."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or ())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if type(model).__module__.startswith("diffusers"):  # diffusers' quantizers: modules_to_not_convert = fp32-kept
        return {name: m for name, m in linears.items() if not any(f"{k}." in f"{name}." for k in keep)}
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list({*get_keys_to_not_convert(model), *keep})
    if quantizer.startswith("bnb"):  # replace_with_bnb_linear: module names, exact nn.Linear
        return {name: m for name, m in linears.items() if type(m) is torch.nn.Linear and should_convert_module(name, skip)}
    return {name: m for name, m in linears.items() if should_convert_module(f"{name}.weight", skip)}


def _quantized(model: torch.nn.Module, native: StoredTensors, quantizer: str, compute_bytes: int) -> StoredTensors:
    nbytes = dict(native.bytes)
    transient = 0
    linears = quantized_linears(model, quantizer)
    for name, linear in linears.items():
        nbytes[f"{name}.weight"] = quantized_weight_bytes(quantizer, linear.out_features, linear.in_features)
        if quantizer != "bnb-8bit":
            transient = max(transient, linear.weight.numel() * compute_bytes)
    if quantizer == "bnb-4bit" and linears:
        nbytes["(nf4 second-level code)"] = 4 * DYNAMIC_CODE_ENTRIES  # bytes, not one of the model's elements
    return StoredTensors(native.numels, nbytes, transient)


# -- GGUF single files --------------------------------------------------------------------------------

def _gguf(model: torch.nn.Module, native: StoredTensors, path: str, compute_bytes: int) -> StoredTensors:
    """diffusers passes the class's `_keep_in_fp32_modules` to a quantizer whatever the dtype: their
    tensors load in fp32, dequantized if the file has them quantized."""
    from gguf import GGMLQuantizationType

    from fvg.weight_storage import check_gguf_keys, gguf_tensors

    check_gguf_keys(path, model, type(model))
    plain = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)  # diffusers loads these as ordinary tensors
    keep_fp32 = tuple(model._keep_in_fp32_modules or ())
    nbytes = dict(native.bytes)
    transient = 0
    for name, tensors in gguf_tensors(path, type(model).__name__).items():
        numel = sum(int(t.n_elements) for t in tensors)
        if is_kept_fp32(name, keep_fp32):
            nbytes[name] = numel * 4  # diffusers dequantizes fp32-kept tensors while loading
        elif all(t.tensor_type in plain for t in tensors):
            nbytes[name] = numel * compute_bytes
        else:
            nbytes[name] = sum(int(t.n_bytes) for t in tensors)
            transient = max(transient, numel * compute_bytes)  # GGUFLinear dequantizes for its matmul
    return StoredTensors(native.numels, nbytes, transient)
