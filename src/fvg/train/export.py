"""Writing the trained anchor LoRA: diffusers keys, plus the key layouts its family adds.

* `anchor_lora.safetensors`: diffusers/PEFT keys with a `transformer.` prefix, the layout of
  `WanLoraLoaderMixin.save_lora_weights`, including its `lora_adapter_metadata` header
  (the LoraConfig, prefixed `transformer.`). diffusers builds the adapter from that header, so
  `lora_alpha` is honoured; without it diffusers would assume alpha = rank.
* `anchor_lora_<format>.safetensors` for each of the family's `lora_converters` (`fvg.families`):
  Wan's `anchor_lora_wan.safetensors` has `diffusion_model.blocks.N.self_attn.q.lora_A.weight` ...
  with one `.alpha` per layer, for ComfyUI and other Wan tools; CogVideoX has no other layout.

The low-noise expert of Wan2.2-A14B gets `anchor_lora_2*.safetensors`; its keys are also
`transformer.`-prefixed, as `load_lora_weights(..., load_into_transformer_2=True)` expects.
Both files carry rank, alpha, base model, steps and data hash in their header.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from fvg.animate.lora import to_diffusers
from fvg.families import DEFAULT_FAMILY, LoraConverter, get_family
from fvg.io import FvgError, atomic_path

log = logging.getLogger("fvg.train")

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def lora_stem(expert: str) -> str:
    return "anchor_lora" if expert == "transformer" else "anchor_lora_2"


def adapter_metadata(lora_config: dict) -> str:
    """diffusers' header: the LoraConfig dict, keys prefixed with the component name, sets as lists."""
    clean = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in lora_config.items()}
    return json.dumps(clean, indent=2, sort_keys=True, default=str)


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_lora(state_dict: dict[str, torch.Tensor], directory: str | Path, expert: str, lora_config: dict,
               info: dict, converters: dict[str, LoraConverter] | None = None) -> dict[str, Path]:
    """Write a PEFT state dict (`blocks.0.attn1.to_q.lora_A.weight` ...) with diffusers keys, and with each
    of `converters`' key layouts (a family's `lora_converters`); returns the paths by format name."""
    directory, stem = Path(directory), lora_stem(expert)
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FvgError(f"refusing to write the {expert} LoRA: {key} holds NaN or inf (the training diverged)")
    header = {"format": "pt", "fvg": json.dumps(info, sort_keys=True, default=str),
              **{k: str(info[k]) for k in ("rank", "alpha", "base_model", "steps", "data_hash") if k in info}}
    paths = {"diffusers": directory / f"{stem}.safetensors"}
    _save(to_diffusers(state_dict), paths["diffusers"], {**header, LORA_ADAPTER_METADATA_KEY: adapter_metadata(lora_config)})
    for name, convert in (converters or {}).items():
        try:
            converted = convert(state_dict, float(lora_config["lora_alpha"]))
        except ValueError as exc:  # e.g. a target module outside the Wan blocks has no original name
            log.warning("no '%s' key-format export: %s", name, exc)
        else:
            paths[name] = directory / f"{stem}_{name}.safetensors"
            _save(converted, paths[name], header)
    return paths


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """PEFT state dict, LoraConfig dict and fvg info from a diffusers-format file written by `write_lora`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    adapter = json.loads(header.get(LORA_ADAPTER_METADATA_KEY, "{}"))
    config = {k.removeprefix("transformer."): v for k, v in adapter.items()}
    return tensors, config, json.loads(header.get("fvg", "{}"))


def start_from_lora(model, path: str | Path, alpha: float) -> int:
    """Set `model`'s freshly added adapter (PEFT's init: A random, B zero) to the LoRA in `path`; returns its rank.

    A file of rank r0 at most the run's rank r fills ranks 0..r0-1, its B rescaled from the file's scale
    alpha0 / r0 to the run's alpha / r, so the adapted model computes exactly what the file's does. The other
    ranks keep PEFT's init: with B zero they change nothing, and the gradient reaches them through B, as it
    reaches a new adapter. Modules the file lacks start at PEFT's init too. A file module that this run does
    not adapt, or a rank above the run's, is refused: it would silently drop part of the file."""
    try:
        tensors, config, _ = read_lora(path)
    except Exception as exc:  # safetensors raises its own error types for a file that is not one
        raise FvgError(f"init_lora {path}: not a safetensors file ({str(exc).splitlines()[0]})") from None
    if not tensors or any(".lora_A." not in k and ".lora_B." not in k for k in tensors):
        raise FvgError(f"init_lora {path}: not a LoRA in diffusers keys (`transformer.blocks.0.attn1.to_q.lora_A."
                       f"weight` ...), as fvg train writes anchor_lora.safetensors")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise FvgError(f"init_lora {path}: per-module ranks or alphas are not supported")
    params = dict(model.named_parameters())
    file_rank = 0
    for key, tensor in tensors.items():
        side = "A" if ".lora_A." in key else "B"
        name = key.replace(f".lora_{side}.weight", f".lora_{side}.default.weight")
        param = params.get(name)
        if param is None:
            raise FvgError(f"init_lora {path}: {key} is not adapted in this run (target_modules, or another model)")
        rank_dim, other_dim = (0, 1) if side == "A" else (1, 0)
        file_rank = tensor.shape[rank_dim]
        if tensor.shape[other_dim] != param.shape[other_dim] or file_rank > param.shape[rank_dim]:
            raise FvgError(f"init_lora {path}: {key} has shape {tuple(tensor.shape)}, this run's is "
                           f"{tuple(param.shape)} (a larger rank, or another model)")
        file_alpha = float(config.get("lora_alpha") or file_rank)  # diffusers assumes alpha = rank without a header
        value = tensor if side == "A" else tensor * (file_alpha / file_rank) / (alpha / param.shape[1])
        with torch.no_grad():
            target = param[:file_rank] if side == "A" else param[:, :file_rank]
            target.copy_(value.to(param.device, param.dtype))
    return file_rank


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Export the LoRA(s) of a training checkpoint (`checkpoints/step_XXXXXX`) in its family's key formats."""
    checkpoint = Path(checkpoint)
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        raise FvgError(f"{checkpoint} is not a training checkpoint (no trainer_state.json)")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    family = get_family(state.get("family", DEFAULT_FAMILY))
    paths = {}
    for expert in state["experts"]:
        source = checkpoint / f"{lora_stem(expert)}.safetensors"
        if not source.is_file():
            raise FvgError(f"checkpoint {checkpoint} has no {source.name}")
        tensors, config, info = read_lora(source)
        for fmt, path in write_lora(tensors, out_dir, expert, config, info, family.lora_converters).items():
            paths[f"{expert}.{fmt}"] = path
    return paths
