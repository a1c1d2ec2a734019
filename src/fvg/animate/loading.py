"""Loading helpers shared by every family: dtype and device, the anchor LoRA, memory knobs.

Each family loads its own checkpoints (`ModelFamily.load_pipeline`, `fvg.families`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fvg.io import DTYPE_NAMES, FvgError

ANCHOR_ADAPTER = "anchor"


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


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.endswith(".safetensors")
