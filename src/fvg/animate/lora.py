"""Anchor-LoRA key formats: diffusers (`transformer.` prefix) and original Wan / ComfyUI (`diffusion_model.`).

diffusers' loader reads both; this module writes the original layout (the inverse of
diffusers' `_convert_non_diffusers_wan_lora_to_diffusers`) so hobbyist tools can use our
LoRAs. Original-format files carry one `.alpha` scalar per layer, as those tools expect.
"""

from __future__ import annotations

import re

import torch

# diffusers module path inside a Wan block -> original Wan module path
_WAN_MODULES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_KEY = re.compile(r"^(?:transformer\.)?blocks\.(\d+)\.(.+)\.(lora_[AB])\.weight$")


def to_original_wan(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers/PEFT Wan LoRA keys -> `diffusion_model.blocks.N.self_attn.q.lora_A.weight` etc."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _KEY.match(key)
        if not match or match.group(2) not in _WAN_MODULES:
            raise ValueError(f"LoRA key {key} has no original Wan equivalent")
        block, module, part = match.groups()
        prefix = f"diffusion_model.blocks.{block}.{_WAN_MODULES[module]}"
        out[f"{prefix}.{part}.weight"] = value
        out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out


def to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys (as `get_peft_model_state_dict` returns them) -> diffusers' `transformer.` keys."""
    return {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in state_dict.items()}
