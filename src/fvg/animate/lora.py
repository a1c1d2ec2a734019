"""The diffusers LoRA key layout (`transformer.` prefix), which every family's loader reads.

Other key layouts a family also writes (e.g. original Wan / ComfyUI keys) are that family's
`lora_converters` (`fvg.families`).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from fvg.io import FvgError


def to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys (as `get_peft_model_state_dict` returns them) -> diffusers' `transformer.` keys."""
    return {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in state_dict.items()}


_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


def check_lora_file(path: str | Path) -> None:
    """FvgError (one line, naming the problem) unless `path` is a complete safetensors LoRA of finite numbers.

    Runs before any model loads. Without it diffusers answered a text file, an empty file, a
    pickle, a `.pt` or a truncated file alike with an OSError that read as "not available offline",
    and a LoRA holding NaN made a black video with exit 0. A folder is checked file by file;
    a name that is neither a file nor a folder (a hub id) is left to the loader.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FvgError(f"LoRA folder {path} has no .safetensors file")
        for file in files:
            check_lora_file(file)
        return
    if not path.is_file():
        return
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if size == 0:
            raise FvgError(f"LoRA {path} is an empty file")
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            raise FvgError(f"LoRA {path} is a PyTorch pickle (.pt/.bin/.ckpt): fvg loads only .safetensors "
                           "(pickles can run code); convert it with safetensors.torch.save_file")
        if len(head) < 8:
            raise FvgError(f"LoRA {path} is not a safetensors file ({size} bytes)")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise FvgError(f"LoRA {path} is not a safetensors file (no valid header; text or another format?)")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise FvgError(f"LoRA {path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise FvgError(f"LoRA {path} is not a safetensors file (its header is not a JSON object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise FvgError(f"LoRA {path} holds no tensors")
    try:
        end = max(int(v["data_offsets"][1]) for v in tensors.values())
    except (TypeError, KeyError, IndexError, ValueError):
        raise FvgError(f"LoRA {path} is not a safetensors file (malformed tensor entries)") from None
    if 8 + header_len + end > size:
        raise FvgError(f"LoRA {path} is truncated: {size} bytes, its header describes {8 + header_len + end}")
    _check_finite(path)


def _check_finite(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise FvgError(f"LoRA {path} has non-finite weights (NaN or inf) in {key}: "
                                   "it would make a black video; retrain or re-export it")
    except SafetensorError as exc:
        raise FvgError(f"LoRA {path} is not a valid safetensors file: {' '.join(str(exc).split())}") from None


_MISMATCH = re.compile(r"size mismatch for (?P<key>\S+?)(?:\.\w+)?\.weight: copying a param with shape "
                       r"torch\.Size\((?P<got>\[[^\]]*\])\) from checkpoint, the shape in current model is "
                       r"torch\.Size\((?P<want>\[[^\]]*\])\)")


def explain_shape_mismatch(path: str | Path, model: str, error_text: str) -> str | None:
    """One line for diffusers' multi-line "size mismatch" error, or None if `error_text` is not one."""
    found = list(_MISMATCH.finditer(error_text))
    if not found:
        return None
    first = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return (f"LoRA {path} does not fit {model}: {first.group('key')} is {first.group('got')}, the model needs "
            f"{first.group('want')}{more}; it was trained for another model or size")
