"""The diffusers LoRA key layout (`transformer.` prefix), which every family's loader reads.

Other key layouts a family also writes (e.g. original Wan / ComfyUI keys) are that family's
`lora_converters` (`fvg.families`).
"""

from __future__ import annotations

import torch


def to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys (as `get_peft_model_state_dict` returns them) -> diffusers' `transformer.` keys."""
    return {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in state_dict.items()}
