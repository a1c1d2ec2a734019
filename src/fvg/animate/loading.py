"""Loading helpers shared by every family: dtype and device, the anchor LoRA, memory knobs.

Each family loads its own checkpoints (`ModelFamily.load_pipeline`, `fvg.families`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fvg.io import DTYPE_NAMES, FvgError

ANCHOR_ADAPTER = "anchor"
log = logging.getLogger("fvg.animate")


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPE_NAMES:
        raise FvgError(f"unknown dtype '{dtype}' (choose from: float32, bfloat16, float16)")
    return getattr(torch, DTYPE_NAMES[dtype])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_anchor_lora(pipe, path: str, expert: str = "transformer", adapter_name: str = ANCHOR_ADAPTER) -> None:
    """Load an anchor LoRA (diffusers `transformer.` keys, original Wan/ComfyUI `diffusion_model.` keys, or
    musubi `lora_unet_` keys) and check it really attached: diffusers only logs a warning when no key matches.

    CogVideoX pipelines (`CogVideoXLoraLoaderMixin`) read the diffusers format only: diffusers has no
    converter for another CogVideoX LoRA key format."""
    if not Path(path).exists() and not _looks_like_hub_id(path):
        raise FvgError(f"LoRA file not found: {path}")
    kwargs = {"load_into_transformer_2": True} if expert == "transformer_2" else {}
    before = set(pipe.get_list_adapters().get(expert, []))
    name = adapter_name if expert == "transformer" else f"{adapter_name}_2"
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # the "no LoRA keys" warning is replaced by our error below
    try:
        pipe.load_lora_weights(path, adapter_name=name, **kwargs)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise FvgError(f"cannot load LoRA {path}: {str(exc).splitlines()[0]}") from None
    except OSError:
        raise FvgError(f"LoRA '{path}' is not available offline: download it or pass a local file") from None
    finally:
        diffusers_logger.setLevel(level)
    after = set(pipe.get_list_adapters().get(expert, []))
    if name not in after - before:
        raise FvgError(f"LoRA {path} matched no weights of the {expert}: wrong model or key format")


# `lora_2` values that are not files: the first LoRA again, or the low-noise expert left plain.
SAME_LORA, NO_LORA = "same", "none"


def count_experts(model_id: str) -> int | None:
    """1 or 2 (Wan2.2-A14B's pair): the transformers a checkpoint holds, read from its model_index.json
    without loading anything. None when the index cannot be read here (a hub id not in the local cache)."""
    import json

    if model_id.startswith("builtin:"):
        return 1
    index = Path(model_id) / "model_index.json"
    if not index.is_file() and _looks_like_hub_id(model_id):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "model_index.json")
        index = Path(cached) if isinstance(cached, str) else index
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    second = components.get("transformer_2")
    return 2 if isinstance(second, list) and second[0] is not None else 1


def _sibling_lora_2(lora: str) -> Path | None:
    """An `anchor_lora_2*.safetensors` written by `fvg train` next to the high-noise expert's LoRA.

    The same key format first (`anchor_lora_wan.safetensors` -> `anchor_lora_2_wan.safetensors`), then
    the diffusers file `anchor_lora_2.safetensors`, then the only candidate; several others: an error.
    """
    first = Path(lora)
    candidates = sorted(p for p in first.parent.glob("anchor_lora_2*.safetensors") if p != first)
    if not first.is_file() or not candidates:
        return None
    preferred = [first.parent / "anchor_lora_2.safetensors"]
    if first.name.startswith("anchor_lora"):
        preferred.insert(0, first.parent / ("anchor_lora_2" + first.name.removeprefix("anchor_lora")))
    for path in preferred:
        if path in candidates:
            return path
    if len(candidates) == 1:
        return candidates[0]
    raise FvgError(f"several low-noise expert LoRAs next to {lora} ({', '.join(p.name for p in candidates)}): "
                   "choose one with --lora-2 FILE")


def resolve_lora_2(lora: str | None, lora_2: str | None, two_experts: bool) -> str | None:
    """What the low-noise expert (`transformer_2`) of a two-expert Wan2.2-A14B loads.

    Returns a LoRA path, `NO_LORA` (the expert runs without one, asked for by `lora_2="none"`), or
    None (a one-expert model, or no LoRA at all). `lora_2="same"` loads `lora` into both experts.
    With `lora` alone, an `anchor_lora_2*` file next to it is taken (and logged).

    Decision: a two-expert model given one LoRA and no second is an error, not a warning. The
    experts are separate networks trained on separate noise ranges; loading the high-noise LoRA
    into the low-noise expert (what fvg did silently before) or leaving that expert plain are
    both choices the user must make (`--lora-2 same`, `--lora-2 none`), and a warning would
    scroll past while the wrong video renders for minutes.
    """
    if not two_experts:
        if lora_2 is not None:
            raise FvgError("--lora-2 is for two-expert models (Wan2.2-A14B's low-noise expert): this model has one "
                           "transformer, pass its LoRA with --lora")
        return None
    if lora_2 == SAME_LORA:
        if lora is None:
            raise FvgError("--lora-2 same loads the --lora file into both experts: pass --lora FILE too")
        return lora
    if lora_2 is not None:
        return lora_2
    if lora is None:
        return None
    sibling = None if _looks_like_hub_id(lora) else _sibling_lora_2(lora)
    if sibling is None:
        raise FvgError(f"this model has two experts and --lora {lora} is the high-noise expert's: pass the low-noise "
                       "expert's with --lora-2 FILE (fvg train writes anchor_lora_2.safetensors), or --lora-2 same "
                       "(this LoRA in both) or --lora-2 none (low-noise expert without a LoRA)")
    log.info("low-noise expert LoRA: %s (found next to %s; --lora-2 chooses another)", sibling, lora)
    return str(sibling)


def load_expert_loras(pipe, lora: str | None, lora_2: str | None) -> None:
    """Load the anchor LoRA into `transformer` and `lora_2` (from `resolve_lora_2`) into `transformer_2`."""
    if lora:
        load_anchor_lora(pipe, lora, "transformer")
    if lora_2 not in (None, NO_LORA):
        load_anchor_lora(pipe, lora_2, "transformer_2")


def set_anchor_lora(pipe, enabled: bool, fuse: bool = False) -> None:
    """Switch the anchor LoRA on or off in each expert that has one (a no-op without any).

    Per expert because `pipe.enable_lora()` / `disable_lora()` raise on an expert without adapters,
    which is the case for A14B run with `--lora-2 none`.

    `fuse`: while on, the LoRA is merged into the weights (diffusers' `fuse_lora`), so each adapted layer
    costs one matmul instead of PEFT's three. Switching off restores the base weights saved before the
    merge, bit for bit: PEFT's own unmerge subtracts the delta again, which leaves rounding behind, and
    the baselines must run the exact base model."""
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is None or not getattr(model, "_hf_peft_config_loaded", False):
            continue
        if not (enabled and fuse):
            _restore_base_weights(model)
        if enabled:
            model.enable_lora()
            if fuse and getattr(model, "_fvg_base_weights", None) is None:
                model._fvg_base_weights = {key: t.detach().clone() for key, t in _adapted_base_tensors(model)}
                model.fuse_lora()
        else:
            model.disable_lora()


def _adapted_base_tensors(model):
    """(key, tensor) for the weight and bias of every layer a LoRA adapts: what merging changes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module_name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            for attr in ("weight", "bias"):
                if getattr(base, attr, None) is not None:
                    yield (module_name, attr), getattr(base, attr)


def _restore_base_weights(model) -> None:
    saved = getattr(model, "_fvg_base_weights", None)
    if saved is None:
        return
    model.unfuse_lora()  # PEFT's bookkeeping: the layers count as unmerged again
    with torch.no_grad():
        for key, tensor in _adapted_base_tensors(model):
            tensor.copy_(saved[key])
    model._fvg_base_weights = None


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.endswith(".safetensors")
