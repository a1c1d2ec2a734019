"""Loading the video model for a preset: checkpoints, scheduler shift, anchor LoRA, memory knobs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fvg.io import FvgError, load_or_explain

ANCHOR_ADAPTER = "anchor"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise FvgError(f"unknown dtype '{dtype}' (choose from: float32, bfloat16, float16)")
    return names[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_wan_pipeline(model_id: str, dtype: torch.dtype, flow_shift: float | None = None):
    """An `AnchoredWanPipeline` from a diffusers Wan checkpoint (T2V, TI2V or the A14B pair).

    The VAE stays in float32 as Wan's reference code keeps it: bf16 decoding shows banding.
    """
    from diffusers import AutoencoderKLWan

    from fvg.animate.wan import AnchoredWanPipeline

    if model_id == "builtin:tiny-wan":
        from fvg.tiny import tiny_wan_components

        pipe = AnchoredWanPipeline(**tiny_wan_components())  # built in float32
        if dtype != torch.float32:
            for module in (pipe.transformer, pipe.text_encoder):
                module.to(dtype)
    else:
        vae = load_or_explain(AutoencoderKLWan.from_pretrained, model_id, subfolder="vae", dtype=torch.float32)
        pipe = load_or_explain(AnchoredWanPipeline.from_pretrained, model_id, vae=vae, dtype=dtype)
    if flow_shift is not None and "flow_shift" in pipe.scheduler.config:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=flow_shift)
    elif flow_shift is not None and "shift" in pipe.scheduler.config:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=flow_shift)
    return pipe


def load_cogvideox_pipeline(model_id: str, dtype: torch.dtype, vae_tiling: bool | None = None):
    """An `AnchoredCogVideoXPipeline` from a diffusers CogVideoX text-to-video checkpoint (e.g. THUDM/CogVideoX1.5-5B).

    The VAE stays in float32, as for Wan. Real checkpoints get VAE tiling by default (diffusers'
    CogVideoX1.5 recipe: a 81 x 768 x 1360 decode does not fit otherwise); `vae_tiling=False` turns it off.
    """
    from diffusers import AutoencoderKLCogVideoX

    from fvg.animate.cogvideox import AnchoredCogVideoXPipeline

    if model_id == "builtin:tiny-cogvideox":
        from fvg.tiny import tiny_cogvideox_components

        pipe = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())  # built in float32
        if dtype != torch.float32:
            for module in (pipe.transformer, pipe.text_encoder):
                module.to(dtype)
        return pipe
    vae = load_or_explain(AutoencoderKLCogVideoX.from_pretrained, model_id, subfolder="vae", dtype=torch.float32)
    pipe = load_or_explain(AnchoredCogVideoXPipeline.from_pretrained, model_id, vae=vae, dtype=dtype)
    if vae_tiling is not False:
        pipe.vae.enable_tiling()
    return pipe


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
