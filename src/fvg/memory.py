"""How much accelerator memory a preset needs, stage by stage, without loading any weights.

`estimate(preset)` sizes every model a stage puts on the device and the activations of its
biggest forward pass, for each memory mode; `fvg memory` prints it. Nothing here reads a weight:

- **Model sizes are exact.** A local checkpoint is sized from its safetensors headers (the JSON
  header at the start of each file: dtype and shape of every tensor). Otherwise the published
  config shipped in `fvg/model_configs/` is instantiated on the meta device (no memory) and its
  parameters counted. `builtin:` models are built (they are a few thousand parameters).
  Bytes are element counts times the dtype the pipeline loads them in: transformers and text
  encoders in the run dtype; the video pipeline's VAE in float32 (`animate/loading.py`); the anchor
  pipeline whole in the run dtype (`DiffusersAnchorSource.from_pretrained`), the tiny one in float32;
  non-persistent buffers (rotary tables, not in checkpoints) as their constructor made them (fp32).
- **Activations** of the transformers are formulas, one small dataclass per family below, each
  saying what it counts; they were read off and are checked against the measured peak of reduced
  models of the real classes on CPU (`LiveTensorBytes`, tests/test_memory.py: within 5%). They
  assume batch 1 per forward pass where the pipeline runs CFG as separate passes (Wan, Qwen-Image),
  batch 2 where it concatenates (CogVideoX), SDPA/flash attention (no seq x seq matrix), and the
  per-frame Wan modulation (no [B, seq, 6, dim] tensor: anchored costs plain + O(frames x dim)).
  The VAE decode is simulated: the decoder runs on the meta device under the same tracker.
  Not counted: allocator fragmentation, CUDA context, cuDNN/attention workspaces; the GPU benchmark
  measures those.

Memory modes and what each keeps resident while a phase runs:

- `gpu`: every model of the stage's pipeline.
- `model-offload`: the model that runs (diffusers' `enable_model_cpu_offload`: one model at a time).
- `group-offload` (as `fvg.residency` applies it): a diffusers model's non-block parameters plus
  two of its blocks (block-level groups of one block, the next prefetched on a side stream; a VAE,
  without a top-level block list, is onloaded whole); a transformers model (text encoder, LLM)
  two leaf modules (leaf-level groups, one prefetched).
- `sequential`: the running model's largest leaf module (accelerate's per-module hooks).
- with `--weights fp8`, `--quantize` or a GGUF transformer (any mode): every figure is of the
  stored bytes, tensor by tensor (`fvg.storage_sizes`), and a phase adds the one layer its model
  holds in the compute dtype while it runs (the fp8 upcast, the dequantized weight).

`auto` picks the first mode of `MODES` (fastest first) whose peak over all stages fits.
"""

from __future__ import annotations

import json
import math
import re
import struct
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fvg.io import FvgError
from fvg.presets import Preset
from fvg.residency import MEMORY_MODES
from fvg.storage_sizes import (NATIVE, Conversion, StoredTensors, conversion_for, convert, is_kept_fp32,
                               native_tensors, non_persistent_buffers)
from fvg.weight_storage import WeightStorage, refuse_for_builtin

GIB = 1024**3
MODES = MEMORY_MODES[1:]  # fastest first; `auto` chooses among them
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# A parameter inside a repeated block: "blocks.3.attn1.to_q.weight", "encoder.block.7...", "layers.12...".
_BLOCK = re.compile(r"^(.*?\b(?:blocks|block|layers|transformer_blocks))\.(\d+)\.")


# -- sizes of one model --------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSize:
    """One model's element count, and the byte figures each memory mode needs, as the pipeline stores it."""

    name: str  # "transformer", "text_encoder", "vae", "planner", ...
    numel: int
    bytes: int  # parameters and buffers, in the dtypes (or quantized formats) the pipeline holds them in
    largest_leaf_bytes: int  # the biggest single module's own tensors (sequential offload)
    largest_block_bytes: int  # the biggest repeated block (group offload); 0 without blocks
    non_block_bytes: int  # everything outside the repeated blocks
    source: str  # "safetensors", "config", "built", "gguf"
    leaf_level_groups: bool = False  # transformers models: fvg group-offloads them leaf by leaf
    second_leaf_bytes: int = 0  # the second-biggest leaf: with the biggest, the worst pair in flight
    transient_bytes: int = 0  # fp8 / quantized / GGUF: one layer's weight in the compute dtype during its forward
    stored_as: str = ""  # "bfloat16", "fp8", "torchao-int8wo", "GGUF", ... (the table's column)
    whole_in_group_offload: bool = False  # a transformers model with torchao weights (fvg.residency.onload_for_forward)

    def _group_offload_bytes(self) -> int:
        """Block-level groups of one block (diffusers models): the non-block part plus two blocks in
        flight; leaf-level (transformers text encoders and LLMs, fvg.residency): two leaves in flight
        (the two biggest, an upper bound); a transformers model with torchao weights, and a diffusers
        model without a top-level block list (a VAE), are onloaded whole."""
        if self.whole_in_group_offload:
            return self.bytes
        if self.leaf_level_groups:
            return self.largest_leaf_bytes + self.second_leaf_bytes
        if not self.largest_block_bytes:
            return self.bytes
        return self.non_block_bytes + 2 * self.largest_block_bytes

    def resident_bytes(self, mode: str) -> int:
        """Stored bytes on the device in `mode` (the transient upcast of a running layer is the phase's, not here)."""
        if mode in ("gpu", "model-offload"):
            return self.bytes
        if mode == "group-offload":
            return self._group_offload_bytes()
        if mode == "sequential":
            return self.largest_leaf_bytes
        raise FvgError(f"unknown memory mode '{mode}' (choose from: auto, {', '.join(MODES)})")


def size_from_numels(name: str, numels: dict[str, int], bytes_per_element: int, source: str,
                     keep_fp32: tuple[str, ...] = (), leaf_level_groups: bool = False) -> ModelSize:
    """`size_from_bytes` with every tensor at `bytes_per_element`, except those under a module named in
    `keep_fp32` (the class's `_keep_in_fp32_modules`, matched on a dotted name component as diffusers
    and transformers match them) at 4 bytes."""
    nbytes = {t: n * (4 if is_kept_fp32(t, keep_fp32) else bytes_per_element) for t, n in numels.items()}
    return size_from_bytes(name, numels, nbytes, source, leaf_level_groups)


def size_from_bytes(name: str, numels: dict[str, int], nbytes: dict[str, int], source: str,
                    leaf_level_groups: bool = False, transient_bytes: int = 0, stored_as: str = "") -> ModelSize:
    """Group tensors (name -> element count, name -> bytes) into leaf modules and repeated blocks."""
    leaves: dict[str, int] = {}
    blocks: dict[str, int] = {}
    for tensor, size in nbytes.items():
        module = tensor.rsplit(".", 1)[0] if "." in tensor else ""
        leaves[module] = leaves.get(module, 0) + size
        match = _BLOCK.match(tensor)
        if match:
            key = f"{match.group(1)}.{match.group(2)}"
            blocks[key] = blocks.get(key, 0) + size
    total = sum(nbytes.values())
    return ModelSize(name, sum(numels.values()), total, max(leaves.values(), default=0),
                     max(blocks.values(), default=0), total - sum(blocks.values()), source, leaf_level_groups,
                     (sorted(leaves.values())[-2:-1] or [0])[0], transient_bytes, stored_as)


def kept_in_fp32(class_name: str, dtype: torch.dtype) -> tuple[str, ...]:
    """Modules the library loads in fp32 whatever the dtype asked for (diffusers: any dtype but fp32;
    transformers: `_keep_in_fp32_modules` for fp16 only, `_keep_in_fp32_modules_strict` for fp16/bf16)."""
    if dtype == torch.float32:
        return ()
    import diffusers
    import transformers

    cls = getattr(diffusers, class_name, None) or getattr(transformers, class_name, None)
    if cls is None:
        return ()
    if cls.__module__.startswith("diffusers"):
        return tuple(cls._keep_in_fp32_modules or ())
    keep = list(getattr(cls, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep += list(getattr(cls, "_keep_in_fp32_modules", None) or ())
    return tuple(keep)


def safetensors_numels(path: str | Path) -> dict[str, int]:
    """Tensor name -> element count, read from the file's JSON header only (no tensor data)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FvgError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise FvgError(f"{path} is not a safetensors file (header length {length})")
        header = json.loads(f.read(length))
    numels = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_BYTES:
            raise FvgError(f"{path}: unknown tensor dtype {info['dtype']} for {name}")
        numels[name] = math.prod(info["shape"])
    return numels


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files `from_pretrained` reads: the shards an index names, else the plain files
    (a `model.fp16.safetensors` variant beside `model.safetensors` is not loaded, so not counted)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    plain_indexes = [i for i in indexes if i.name.count(".") == 3] or indexes
    if plain_indexes:
        shards = json.loads(plain_indexes[0].read_text())["weight_map"].values()
        return [folder / name for name in sorted(set(shards))]
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if "." not in f.stem]
    return plain or files


def checkpoint_numels(folder: Path) -> dict[str, int]:
    files = checkpoint_files(folder)
    if not files:
        raise FvgError(f"no .safetensors weights in {folder}")
    numels: dict[str, int] = {}
    for f in files:
        numels.update(safetensors_numels(f))
    return numels


def meta_model(config: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A diffusers/transformers model built from its config on the meta device (shapes, no memory).

    Published configs carry fields the installed classes ignore (e.g. Qwen-Image's
    `pooled_projection_dim`), and casting warns about fp32-kept modules; the libraries' notes
    are silenced here."""
    import diffusers
    import transformers
    from diffusers.utils import logging as diffusers_logging

    d_level, t_level = diffusers_logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            if "_class_name" in config:
                model = getattr(diffusers, config["_class_name"]).from_config(config)
            else:
                arch = config["architectures"][0]
                model = getattr(transformers, arch)(transformers.AutoConfig.for_model(**config))
        return model if dtype == torch.float32 else model.to(dtype)
    finally:
        diffusers_logging.set_verbosity(d_level)
        transformers.logging.set_verbosity(t_level)


def meta_numels(config: dict) -> dict[str, int]:
    return module_numels(meta_model(config))


def module_numels(module: torch.nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in module.named_parameters()}


# -- where a model's config and weights are --------------------------------------------------------

def shipped_config_dir(model_id: str) -> Path | None:
    folder = MODEL_CONFIGS / model_id.replace("/", "--")
    return folder if folder.is_dir() else None


def local_checkpoint(model_id: str) -> Path | None:
    """A local folder, or the hub cache's snapshot when the model was downloaded; never the network."""
    if Path(model_id).is_dir():
        return Path(model_id)
    if model_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not in the cache (or no hub client): fall back to the shipped config
        return None


@dataclass(frozen=True)
class ModelSource:
    """One model of a pipeline: its config, and its weights folder when present locally."""

    model_id: str
    subfolder: str  # "" for a model at the repository's root (an LLM)
    config: dict
    weights: Path | None

    @property
    def label(self) -> str:
        return f"{self.model_id}/{self.subfolder}" if self.subfolder else self.model_id


def find_model(model_id: str, subfolder: str = "") -> ModelSource:
    local = local_checkpoint(model_id)
    if local is not None and (local / subfolder / "config.json").is_file():
        folder = local / subfolder
        weights = folder if any(folder.glob("*.safetensors")) else None
        return ModelSource(model_id, subfolder, json.loads((folder / "config.json").read_text()), weights)
    shipped = shipped_config_dir(model_id)
    if shipped is not None and (shipped / subfolder / "config.json").is_file():
        return ModelSource(model_id, subfolder, json.loads((shipped / subfolder / "config.json").read_text()), None)
    raise FvgError(f"cannot size {model_id}{'/' + subfolder if subfolder else ''}: no local checkpoint and no "
                   f"shipped config (fvg/model_configs/ has: {', '.join(sorted(p.name for p in MODEL_CONFIGS.iterdir() if p.is_dir()))})")


def size_model(source: ModelSource, name: str, dtype: torch.dtype, conversion: Conversion = NATIVE) -> ModelSize:
    """Sizes in `dtype`, as `from_pretrained(..., dtype=dtype)` loads the model (fp32-kept modules included),
    after `conversion` (fp8 storage, quantization, a GGUF file: `fvg.storage_sizes`).

    Unconverted, a local checkpoint's tensors are read from its safetensors headers; a converted model is
    sized from its config's module tree (the layer types decide what is converted) and, for GGUF, the file's."""
    class_name = source.config.get("_class_name") or source.config["architectures"][0]
    keep = kept_in_fp32(class_name, dtype)
    b = DTYPE_BYTES[dtype]
    model = meta_model(source.config)  # float32 as constructed: non-persistent buffers keep that dtype
    groups = "_class_name" not in source.config
    if conversion == NATIVE and source.weights is not None:
        numels = checkpoint_numels(source.weights)
        nbytes = {t: n * (4 if is_kept_fp32(t, keep) else b) for t, n in numels.items()}
        for t, buffer in non_persistent_buffers(model).items():
            numels[t], nbytes[t] = buffer.numel(), buffer.numel() * buffer.element_size()
        return size_from_bytes(name, numels, nbytes, "safetensors", groups, stored_as=_dtype_name(dtype))
    stored = convert(model, native_tensors(model, b, keep), conversion, b)
    kind = "gguf" if conversion.kind == "gguf" else "config"
    size = _size_stored(name, stored, kind, groups, conversion, dtype)
    if groups and conversion.kind.startswith("torchao"):
        return replace(size, whole_in_group_offload=True)
    return size


def _size_stored(name: str, stored: StoredTensors, source: str, leaf_level_groups: bool, conversion: Conversion,
                 dtype: torch.dtype) -> ModelSize:
    label = _dtype_name(dtype) if conversion == NATIVE else conversion.label
    return size_from_bytes(name, stored.numels, stored.bytes, source, leaf_level_groups, stored.transient_bytes, label)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pipeline_components(model_id: str) -> list[str]:
    """The model subfolders of a diffusers pipeline (model_index.json), transformer(s) first."""
    local = local_checkpoint(model_id)
    index = None
    for folder in (local, shipped_config_dir(model_id)):
        if folder is not None and (folder / "model_index.json").is_file():
            index = json.loads((folder / "model_index.json").read_text())
            break
    if index is None:
        raise FvgError(f"cannot size {model_id}: no model_index.json locally or in fvg/model_configs/")
    names = [k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] in ("diffusers", "transformers")
             and k in ("transformer", "transformer_2", "text_encoder", "vae")]
    order = ("transformer", "transformer_2", "text_encoder", "vae")
    return sorted(names, key=order.index)


# -- activations, one dataclass per family ---------------------------------------------------------

def latent_frames(frames: int, temporal: int = 4) -> int:
    """Frames after the VAE's causal temporal compression: the first frame alone, then `temporal` per latent."""
    return (frames - 1) // temporal + 1


@dataclass(frozen=True)
class WanActivation:
    """Wan2.x transformer forward (diffusers `WanTransformer3DModel`), batch 1 per CFG pass.

    tokens S = latent frames x (H / vae_spatial / 2) x (W / vae_spatial / 2), latent frames =
    (frames - 1) / 4 + 1; D = heads x head_dim, F = ffn_dim, b = bytes of the run dtype.
    Counted at a block's two worst moments (measured on a reduced model on CPU, tests/test_memory.py):
    - FFN: four [S, D] (the block's input, held by the caller; the residual; the cross-attention
      output; the normalised FFN input) and two [S, F] (the projection and its GELU);
    - self-attention: five [S, D] (input, normalised input, q, k, v) and the rotary embedding's
      fp32 temporaries, three [S, D] in fp32 (two when the run dtype is fp32: `.float()` is free);
    plus always: the rotary cos/sin tables (2 x [S, head_dim], fp32: diffusers keeps `rope` in fp32),
    the text stream and its cross-attention k/v (3 x [512, D]), and the per-frame modulation
    [frames, 6, D] fp32 (fvg's anchored path: anchored == plain + O(frames x dim)).
    Not counted: the S x S attention matrix (SDPA/flash never forms it).
    """

    dim: int
    ffn_dim: int
    vae_spatial: int
    head_dim: int = 128
    patch: int = 2
    vae_temporal: int = 4
    text_tokens: int = 512

    def tokens(self, height: int, width: int, frames: int) -> int:
        grid = (height // self.vae_spatial // self.patch) * (width // self.vae_spatial // self.patch)
        return latent_frames(frames, self.vae_temporal) * grid

    def activation_bytes(self, height: int, width: int, frames: int, b: int, context_parallel: int = 1,
                         cp_mode: str = "ulysses", per_token: bool | None = None) -> int:
        """Per process; `context_parallel` N > 1 (`fvg.parallel`): each rank's blocks hold S / N tokens, and the
        attention exchange adds Ulysses' all-to-all buffers, 3 x [S/N, D] in bf16 and 5 in fp32 (measured on 2
        gloo processes, benchmarks/bench_context_parallel.py; not derived), or ring's gathered keys and values
        (2 x [S, D]; not measured: ring needs a CUDA attention kernel). Timesteps per token (`per_token`; by
        default where N does not divide the latent frames, as the pipeline falls back): each rank holds its
        tokens' modulation, [S/N, 6, D] in the run dtype and its fp32 sum with the block's table, and the fp32
        time embedding [S/N, D], instead of the per-frame [F, 6, D]."""
        n, d, f = context_parallel, self.dim, latent_frames(frames, self.vae_temporal)
        s = self.tokens(height, width, frames) // n
        ffn = 4 * s * d * b + 2 * s * self.ffn_dim * b
        attention = 5 * s * d * b + (3 if b < 4 else 2) * s * d * 4
        if n > 1:
            attention += (3 if b < 4 else 5) * s * d * b if cp_mode == "ulysses" else 2 * n * s * d * b
        rope = 2 * s * self.head_dim * 4
        text = 3 * self.text_tokens * d * b
        if (n > 1 and f % n) if per_token is None else per_token:
            modulation = s * 6 * d * (b + 4) + s * d * 4
        else:
            modulation = f * 6 * d * 4
        return max(ffn, attention) + rope + text + modulation


@dataclass(frozen=True)
class CogVideoXActivation:
    """CogVideoX transformer forward: text and video tokens in one sequence, CFG batched (B = 2).

    S = ceil(latent frames / patch_t) x (H / 8 / 2) x (W / 8 / 2) + text tokens (226); the pipeline
    pads latent frames to a multiple of `patch_t`. Per batch element, at a block's worst moments
    (measured on a reduced model on CPU, tests/test_memory.py):
    - attention (the worst): seven [S, D] in the run dtype (the joined streams, q, k, v, their
      norms, the stacked rotary halves) and three fp32 [S, D] (the rotary embedding's upcast and products);
    - FFN: four [S, D] and two [S, 4D];
    plus the rotary cos/sin tables 2 x [S_video, head_dim] fp32, shared by the batch.
    """

    dim: int
    ffn_dim: int
    text_tokens: int
    head_dim: int = 64
    patch: int = 2
    patch_t: int = 2
    vae_spatial: int = 8
    vae_temporal: int = 4
    batch: int = 2

    def video_tokens(self, height: int, width: int, frames: int) -> int:
        t = math.ceil(latent_frames(frames, self.vae_temporal) / self.patch_t)
        return t * (height // self.vae_spatial // self.patch) * (width // self.vae_spatial // self.patch)

    def tokens(self, height: int, width: int, frames: int) -> int:
        return self.video_tokens(height, width, frames) + self.text_tokens

    def activation_bytes(self, height: int, width: int, frames: int, b: int) -> int:
        s, d = self.tokens(height, width, frames), self.dim
        attention = 7 * s * d * b + 3 * s * d * 4
        ffn = 4 * s * d * b + 2 * s * self.ffn_dim * b
        rope = 2 * self.video_tokens(height, width, frames) * self.head_dim * 4
        return self.batch * max(attention, ffn) + rope


@dataclass(frozen=True)
class QwenImageActivation:
    """Qwen-Image (MMDiT) forward at its generation size, batch 1 per true-CFG pass.

    image tokens S_img = (H / 8 / 2) x (W / 8 / 2) (1328 x 1328: 83 x 83 = 6889), text tokens up to
    512 (S = S_img + S_txt), D = heads x head_dim, FFN 4 x D. Counted at the image FFN's GELU, the
    block's worst moment (measured on a reduced model on CPU, tests/test_memory.py): seven [S, D]
    (both streams' inputs, normalised inputs, attention outputs and residuals), two [S_img, 4D], the
    image rotary table (S_img x head_dim/2 complex64) and the rope cache (4096 positions). The
    attention moment (q, k, v and complex64 rotary copies of q and k) is counted too and is smaller.
    """

    dim: int
    ffn_dim: int
    head_dim: int = 128
    vae_spatial: int = 8
    patch: int = 2
    text_tokens: int = 512

    def image_tokens(self, height: int, width: int) -> int:
        return (height // self.vae_spatial // self.patch) * (width // self.vae_spatial // self.patch)

    def tokens(self, height: int, width: int) -> int:
        return self.image_tokens(height, width) + self.text_tokens

    def activation_bytes(self, height: int, width: int, b: int) -> int:
        s_img, s, d = self.image_tokens(height, width), self.tokens(height, width), self.dim
        ffn = 7 * s * d * b + 2 * s_img * self.ffn_dim * b
        attention = 10 * s * d * b + 2 * s * d * 4
        rope = s_img * (self.head_dim // 2) * 8 + 4096 * (self.head_dim // 2) * 8
        return max(ffn, attention) + rope


@dataclass(frozen=True)
class TextEncoderActivation:
    """A text encoder (UMT5, T5, Qwen2.5-VL) over one prompt: hidden states [T, d] and the FFN
    intermediate [T, d_ff] twice (gated), plus the output kept for the denoiser. Small next to weights."""

    dim: int
    ffn_dim: int
    tokens: int

    def activation_bytes(self, b: int) -> int:
        return 3 * self.tokens * self.dim * b + 3 * self.tokens * self.ffn_dim * b


@dataclass(frozen=True)
class PlannerActivation:
    """The LLM planner (transformers `generate`): KV cache for `tokens` (prompt + reply, 2048 by
    default) in the run dtype, the prefill's FFN intermediate, and fp32 logits of the last position."""

    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int
    tokens: int = 2048

    def activation_bytes(self, b: int) -> int:
        kv_cache = 2 * self.layers * self.kv_heads * self.head_dim * self.tokens * b
        prefill = self.tokens * (4 * self.hidden + 3 * self.intermediate) * b
        return kv_cache + prefill + self.vocab * 4 * 2


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensors alive while it is active, and their peak.

    Every tensor an operator returns is counted until its storage is freed (a weak reference on the
    storage, keyed by identity so that it works on the meta device too); tensors that existed
    before (`ignore`: weights, inputs) are not counted. On CPU this is the measured activation
    peak; on the meta device it simulates a forward pass's allocations exactly without computing.
    Not seen: workspace an operator allocates and frees inside itself (cuDNN, flash attention).
    """

    def __init__(self, ignore=()):
        super().__init__()
        self.ignore = {id(t.untyped_storage()) for t in ignore}
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key in self.live or key in self.ignore or storage.nbytes() == 0:
                    continue
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)
        return out


@dataclass(frozen=True)
class VaeDecodeActivation:
    """Decoding latents to frames, from a simulation of the decoder rather than a guess.

    diffusers decodes Wan/Qwen VAEs one latent frame at a time with a causal-conv cache and
    CogVideoX's two at a time, so the working set of one chunk does not grow with the frame count;
    the decoded frames accumulate. `chunk_peak_bytes` is the peak of the decoder's own control flow
    run on the meta device under `LiveTensorBytes` (exact shapes and lifetimes, no compute) on three
    latent frames, less those frames' output: at full resolution, or on one tile when tiling.
    The decoded video (`video_bytes`, in the VAE's dtype) then counts once untiled (the output
    grows as chunks are concatenated; checked against full simulations: tests/test_memory.py)
    and `overlap + 2` times tiled (every tile's output, overlaps included, then the blended rows
    and their concatenation), which is an upper bound at few frames. The pipeline's
    post-processing adds one fp32 copy of the video (`postprocess_bytes`).
    """

    chunk_peak_bytes: int
    video_bytes: int
    postprocess_bytes: int
    tile_overlap: float = 0.0  # sum of tile areas / frame area; 0 when not tiling

    def activation_bytes(self) -> int:
        copies = 1 if not self.tile_overlap else self.tile_overlap + 2
        return int(self.chunk_peak_bytes + copies * self.video_bytes + self.postprocess_bytes)


def _attention_like_flash(query, key, value, *args, **kwargs):
    """SDPA as flash/memory-efficient kernels allocate it: the output only. On the meta device
    PyTorch would take the math path and form the seq x seq matrix no GPU run forms."""
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def simulate_decode(vae: torch.nn.Module, latent_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Peak bytes of live tensors while a meta-device `vae.decode` runs on latents of `latent_shape`."""
    return _simulate(vae.decode, vae, latent_shape, dtype)


def simulate_encode(vae: torch.nn.Module, pixel_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Peak bytes of live tensors while a meta-device `vae.encode` runs on pixels of `pixel_shape`."""
    return _simulate(vae.encode, vae, pixel_shape, dtype)


def _simulate(method, vae: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    from unittest import mock

    x = torch.zeros(shape, device="meta", dtype=dtype)
    tracker = LiveTensorBytes(ignore=[*vae.parameters(), *vae.buffers(), x])
    with torch.no_grad(), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _attention_like_flash), \
            tracker:
        method(x)
    return tracker.peak


def _vae_encode_anchor(vae_config: dict, height: int, width: int, tiling: bool) -> int:
    """Activation bytes of encoding the anchor (one frame, float32, tiled where the decode is) with the video VAE."""
    vae = meta_model(vae_config, torch.float32).eval()
    if tiling:
        vae.enable_tiling()
    return simulate_encode(vae, (1, 3, 1, height, width), torch.float32)


def _tile_overlap(size: int, tile: int, stride: int) -> float:
    """Covered length / size along one axis for diffusers' tiling loop (`range(0, size, stride)`)."""
    return sum(min(tile, size - start) for start in range(0, size, stride)) / size


# -- stages ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    """One model at work inside a stage, and the activations of its forward pass."""

    model: str  # a ModelSize.name of the stage
    what: str
    activation_bytes: int
    # models that `model-offload` still holds on the device during this phase: diffusers offloads a model when
    # the next one in `model_cpu_offload_seq` starts, and the anchor's VAE encode comes after the text encoder
    # but before the transformer, so the text encoder is still there (measured on an H200, BENCHMARKS.md)
    left_over: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageEstimate:
    name: str  # "plan", "anchor", "animate", "decode"
    models: tuple[ModelSize, ...]
    phases: tuple[Phase, ...]
    note: str = ""

    def model(self, name: str) -> ModelSize:
        return next(m for m in self.models if m.name == name)

    def resident_bytes(self, mode: str, phase: Phase | None = None) -> int:
        """Weights on the device: all the stage's models (`gpu`), else only the model at work."""
        if mode == "gpu":
            return sum(m.resident_bytes(mode) for m in self.models)
        phases = [phase] if phase else self.phases
        return max(self.model(p.model).resident_bytes(mode) + (sum(
            self.model(m).resident_bytes(mode) for m in p.left_over) if mode == "model-offload" else 0)
            for p in phases)

    def activation_bytes(self) -> int:
        return max(p.activation_bytes for p in self.phases)

    def working_bytes(self, phase: Phase) -> int:
        """What a phase adds to the resident weights: its activations and the one layer its model holds
        in the compute dtype while it runs (fp8 upcast, dequantized weight; 0 for native weights)."""
        return phase.activation_bytes + self.model(phase.model).transient_bytes

    def peak_bytes(self, mode: str) -> int:
        return max(self.resident_bytes(mode, p) + self.working_bytes(p) for p in self.phases)


@dataclass(frozen=True)
class MemoryEstimate:
    preset: str
    dtype: torch.dtype
    height: int
    width: int
    frames: int
    stages: tuple[StageEstimate, ...]
    storage: WeightStorage = WeightStorage()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def peak_bytes(self, mode: str) -> int:
        return max(s.peak_bytes(mode) for s in self.stages)

    @property
    def modes(self) -> tuple[str, ...]:
        """The memory modes the stored weights run under, fastest first (`WeightStorage.failing_memory_modes`)."""
        return self.storage.usable_memory_modes(MODES)

    def choose(self, budget_bytes: int) -> str | None:
        """The fastest mode whose peak over every stage fits the budget, or None."""
        return next((m for m in self.modes if self.peak_bytes(m) <= budget_bytes), None)


# FactorizedPipeline's stages and the estimate's stages they run (the video stage decodes too)
PIPELINE_STAGES = {"plan": ("plan",), "anchor": ("anchor",), "animate": ("animate", "decode")}


def stage_modes(est: MemoryEstimate, free_bytes: int) -> tuple[dict[str, str], bool]:
    """`--memory auto`: per pipeline stage, the fastest mode whose estimated peak fits `free_bytes`
    (the one that holds the least when none does), and whether every stage fits on the device at once
    in `gpu` mode (then nothing is evicted between stages or videos). Sizes are the stored ones
    (`est.storage`); the planner's LLM is never quantized, so its stage may use every mode."""
    by_name = {s.name: s for s in est.stages}
    modes = {}
    for stage, parts in PIPELINE_STAGES.items():
        present = [by_name[p] for p in parts if p in by_name]
        usable = MODES if stage == "plan" else est.modes
        if present:
            modes[stage] = next((m for m in usable if all(s.peak_bytes(m) <= free_bytes for s in present)),
                                usable[-1])
    all_weights = sum(m.resident_bytes("gpu") for s in est.stages if s.name != "decode" for m in s.models)
    working = max((s.working_bytes(p) for s in est.stages for p in s.phases), default=0)
    return modes, all_weights + working <= free_bytes


def _run_bytes(dtype: torch.dtype) -> int:
    return DTYPE_BYTES[dtype]


def _vae_decode(vae_config: dict, height: int, width: int, frames: int, dtype: torch.dtype, tiling: bool
                ) -> VaeDecodeActivation:
    """Simulate one three-latent-frame chunk (see `VaeDecodeActivation`) with the VAE's own config."""
    vae = meta_model(vae_config, dtype).eval()
    b = DTYPE_BYTES[dtype]
    cogvideox = vae_config["_class_name"] == "AutoencoderKLCogVideoX"
    if cogvideox:
        spatial, z = 2 ** (len(vae.config.block_out_channels) - 1), vae.config.latent_channels
        temporal = vae.config.temporal_compression_ratio
        tile_h, tile_w = vae.tile_sample_min_height, vae.tile_sample_min_width
        stride_h = int(tile_h * (1 - vae.tile_overlap_factor_height))
        stride_w = int(tile_w * (1 - vae.tile_overlap_factor_width))
    else:
        spatial, z = vae.config.get("scale_factor_spatial") or 8, vae.config.z_dim
        temporal = vae.config.get("scale_factor_temporal") or 4
        tile_h, tile_w = vae.tile_sample_min_height, vae.tile_sample_min_width
        stride_h, stride_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    chunk = min(latent_frames(frames, temporal), 3)
    h, w = (min(height, tile_h), min(width, tile_w)) if tiling else (height, width)
    peak = simulate_decode(vae, (1, z, chunk, h // spatial, w // spatial), dtype)
    chunk_video = 3 * ((chunk - 1) * temporal + 1) * h * w * b
    overlap = _tile_overlap(height, tile_h, stride_h) * _tile_overlap(width, tile_w, stride_w) if tiling else 0.0
    return VaeDecodeActivation(peak - chunk_video, 3 * frames * height * width * b, 3 * frames * height * width * 4,
                               overlap)


def _text_encoder_activation(config: dict, tokens: int, b: int) -> int:
    cfg = config.get("text_config", config)
    dim = cfg.get("d_model") or cfg.get("hidden_size")
    ffn = cfg.get("d_ff") or cfg.get("intermediate_size")
    return TextEncoderActivation(dim, ffn, tokens).activation_bytes(b)


def _denoiser_activation(family: str, config: dict, vae_config: dict, height: int, width: int, frames: int,
                         b: int, context_parallel: int = 1, cp_mode: str = "ulysses") -> int:
    if family == "wan":
        spatial = vae_config.get("scale_factor_spatial") or 8
        act = WanActivation(dim=config["num_attention_heads"] * config["attention_head_dim"], ffn_dim=config["ffn_dim"],
                            vae_spatial=spatial, head_dim=config["attention_head_dim"], patch=config["patch_size"][-1])
        return act.activation_bytes(height, width, frames, b, context_parallel, cp_mode)
    if context_parallel > 1:
        raise FvgError(f"--context-parallel: the {family} family has no context-parallel plan in diffusers")
    if family == "cogvideox":
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        act = CogVideoXActivation(dim=dim, ffn_dim=4 * dim, text_tokens=config.get("max_text_seq_length", 226),
                                  head_dim=config["attention_head_dim"], patch=config["patch_size"],
                                  patch_t=config.get("patch_size_t") or 1)
        return act.activation_bytes(height, width, frames, b)
    raise FvgError(f"no activation model for video family '{family}'")


def _models(model_id: str, dtype_of: dict[str, torch.dtype], built: dict | None = None,
            storage: WeightStorage | None = None) -> tuple[list[ModelSize], dict]:
    """Size every model of a diffusers pipeline as stored under `storage`; returns the sizes and each
    model's config."""
    sizes, configs = [], {}
    if built is not None:  # builtin: tiny pipelines built in code
        if storage is not None:
            refuse_for_builtin(storage, model_id)  # as loading does: only fp8 applies to a built model
        for name, module in built.items():
            sizes.append(_size_built(name, module, dtype_of[name], conversion_for(storage, name)))
            configs[name] = dict(module.config) if hasattr(module.config, "keys") else module.config.to_dict()
            configs[name].setdefault("_class_name", type(module).__name__)
        return sizes, configs
    for name in pipeline_components(model_id):
        source = find_model(model_id, name)
        sizes.append(size_model(source, name, dtype_of[name], conversion_for(storage, name)))
        configs[name] = source.config
    return sizes, configs


def _size_built(name: str, module: torch.nn.Module, dtype: torch.dtype, conversion: Conversion) -> ModelSize:
    """A tiny built model, cast whole to `dtype` (buffers too) by the loader, then converted (fp8 casts
    `module` itself: it was built for this estimate)."""
    from diffusers.models.modeling_utils import ModelMixin

    b = DTYPE_BYTES[dtype]
    tensors = [*module.named_parameters(), *module.named_buffers()]
    native = StoredTensors({t: x.numel() for t, x in tensors},
                           {t: x.numel() * (b if x.is_floating_point() else x.element_size()) for t, x in tensors})
    stored = convert(module, native, conversion, b)
    return _size_stored(name, stored, "built", not isinstance(module, ModelMixin), conversion, dtype)


def _builtin_video(family: str) -> dict:
    from fvg.families import get_family

    parts = get_family(family).tiny_components()
    return {k: parts[k] for k in ("transformer", "text_encoder", "vae")}


def _builtin_anchor() -> dict:
    from fvg.tiny import tiny_qwen_image_pipeline

    pipe = tiny_qwen_image_pipeline()
    return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}


def _lora_numel(path: str | None) -> int:
    if not path or not Path(path).is_file():
        return 0
    return sum(safetensors_numels(path).values())


def estimate(preset: Preset, dtype: torch.dtype = torch.bfloat16, storage: WeightStorage | None = None,
             vae_tiling: bool | None = None, planner: str | None = None, context_parallel: int = 1,
             cp_mode: str = "ulysses") -> MemoryEstimate:
    """Per-stage model sizes and activations for `preset` at its resolution and frame count, the
    models stored as `storage` says (fp8, quantized, GGUF transformers; validated by the caller).

    `context_parallel` N: per process of an N-way split video (`fvg.parallel`). Every rank holds all the
    weights; the video transformer's activations are split (`WanActivation`); the text encoders, the VAE
    and the anchor stage are counted whole (diffusers splits Qwen-Image's transformer too: an upper bound)."""
    if dtype not in DTYPE_BYTES:
        raise FvgError(f"unsupported dtype {dtype}")
    storage = storage or WeightStorage()
    if storage.video_transformer is not None and preset.family != "wan":
        raise FvgError(f"GGUF transformers load for the Wan family only (diffusers has no single-file "
                       f"converter for {preset.video_model})")
    b = _run_bytes(dtype)
    h, w, f = preset.height, preset.width, preset.num_frames
    tiling = (h >= 704) if vae_tiling is None else vae_tiling  # the issue: tiling on by default at 704p and up
    stages: list[StageEstimate] = []
    notes: list[str] = []

    planner = (planner or preset.planner).strip().lower()
    from fvg.plan.base import BACKENDS

    if planner not in BACKENDS:
        raise FvgError(f"unknown planner backend {planner!r}; valid backends: {', '.join(BACKENDS)}")
    if planner == "transformers":  # the other backends run off the accelerator (rules) or on a server
        if not preset.planner_model:
            raise FvgError(f"preset '{preset.name}' names no planner model")
        source = find_model(preset.planner_model)
        llm = size_model(source, "planner", dtype)
        c = source.config
        act = PlannerActivation(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"],
                                c.get("num_key_value_heads", c["num_attention_heads"]),
                                c["hidden_size"] // c["num_attention_heads"], c["vocab_size"])
        stages.append(StageEstimate("plan", (llm,), (Phase("planner", "generate", act.activation_bytes(b)),)))

    if preset.anchor_model:
        from fvg.anchor import generation_size

        gh, gw = generation_size(h, w, preset.anchor_area)
        builtin = preset.anchor_model == "builtin:tiny-qwen-image"
        anchor_dtype = torch.float32 if builtin else dtype  # the tiny anchor pipeline is built in float32, not cast
        anchor_b = DTYPE_BYTES[anchor_dtype]
        sizes, configs = _models(preset.anchor_model, {k: anchor_dtype for k in ("transformer", "text_encoder", "vae")},
                                 _builtin_anchor() if builtin else None, storage.for_anchor())
        tconf, vconf = configs["transformer"], configs["vae"]
        if tconf["_class_name"] == "QwenImageTransformer2DModel":
            dim = tconf["num_attention_heads"] * tconf["attention_head_dim"]
            denoise = QwenImageActivation(dim, 4 * dim, head_dim=tconf["attention_head_dim"],
                                          patch=tconf["patch_size"]).activation_bytes(gh, gw, anchor_b)
        else:  # a one-frame Wan model (MiniWorld's anchor)
            denoise = _denoiser_activation("wan", tconf, vconf, gh, gw, 1, anchor_b)
        decode = _vae_decode(vconf, gh, gw, 1, anchor_dtype, tiling=False).activation_bytes()
        phases = (Phase("text_encoder", "encode", _text_encoder_activation(configs["text_encoder"], 512, anchor_b)),
                  Phase("transformer", f"denoise {gh}x{gw}", denoise),
                  Phase("vae", "decode", decode))
        stages.append(StageEstimate("anchor", tuple(sizes), phases, note=f"generation size {gh}x{gw}"))

    video_dtypes = {"transformer": dtype, "transformer_2": dtype, "text_encoder": dtype, "vae": torch.float32}
    builtin = preset.video_model.startswith("builtin:")
    sizes, configs = _models(preset.video_model, video_dtypes, _builtin_video(preset.family) if builtin else None,
                             storage)
    lora = _lora_numel(preset.lora)
    if lora:  # the anchor LoRA is added to the transformer (and to transformer_2 for A14B)
        lora_2 = _lora_numel(preset.lora_2) or lora
        sizes = [_with_lora(s, lora if s.name == "transformer" else lora_2, b) if s.name.startswith("transformer")
                 else s for s in sizes]
        notes.append(f"anchor LoRA: {lora:,} parameters per expert")
    tconf, vconf = configs["transformer"], configs["vae"]
    denoise = _denoiser_activation(preset.family, tconf, vconf, h, w, f, b, context_parallel, cp_mode)
    if context_parallel > 1:
        notes.append(f"context parallel {context_parallel} ({cp_mode}): per process; the video transformer's "
                     f"activations split, every weight on every process")
    text = _text_encoder_activation(configs["text_encoder"], 512 if preset.family == "wan" else 226, b)
    experts = [s.name for s in sizes if s.name.startswith("transformer")]
    phases = (Phase("text_encoder", "encode", text),
              Phase("vae", "encode anchor", _vae_encode_anchor(vconf, h, w, tiling), left_over=("text_encoder",)),
              *(Phase(e, "denoise", denoise) for e in experts))
    stages.append(StageEstimate("animate", tuple(sizes), phases, note=f"{h}x{w}x{f}"))
    decode = _vae_decode(vconf, h, w, f, torch.float32, tiling)
    stages.append(StageEstimate("decode", tuple(sizes), (Phase("vae", "decode" + (" (tiled)" if tiling else ""),
                                                                 decode.activation_bytes()),),
                                note="VAE tiling on" if tiling else "VAE tiling off"))
    return MemoryEstimate(preset.name, dtype, h, w, f, tuple(stages), storage, tuple(notes))


def _with_lora(size: ModelSize, lora_numel: int, bytes_per_element: int) -> ModelSize:
    """The anchor LoRA's A/B matrices live inside the blocks; spread evenly, they are counted
    outside them here (a few MB: the group-offload figure is a slight overestimate)."""
    from dataclasses import replace

    extra = lora_numel * bytes_per_element
    return replace(size, numel=size.numel + lora_numel, bytes=size.bytes + extra,
                   non_block_bytes=size.non_block_bytes + extra)


def device_budget_bytes(gpu_gib: float | None) -> int:
    """The budget: --gpu-gib, else the free memory of the present CUDA device."""
    if gpu_gib is not None:
        if not gpu_gib > 0:
            raise FvgError(f"--gpu-gib must be positive, got {gpu_gib}")
        return int(gpu_gib * GIB)
    if not torch.cuda.is_available():
        raise FvgError("no CUDA device here: pass --gpu-gib G (the GPU memory to plan for, in GiB)")
    free, _total = torch.cuda.mem_get_info()
    return int(free)
