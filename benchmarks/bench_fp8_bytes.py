"""`--weights fp8`: the resident bytes of every real denoiser, bf16 vs fp8 layerwise casting.

Each transformer is built on the meta device from its published config (`src/fvg/model_configs/`,
no weights, no download), cast to bf16, and then given exactly the casting `--weights fp8` applies
(`fvg.weight_storage.store_denoisers_in_fp8`): the bytes are counted, not estimated. What stays in
bf16 is what diffusers skips (patch embedding, condition embedders, norms, `proj_out`).

    python benchmarks/bench_fp8_bytes.py
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import init_empty_weights
from diffusers import CogVideoXTransformer3DModel, QwenImageTransformer2DModel, WanTransformer3DModel

from fvg.weight_storage import store_denoisers_in_fp8

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "fvg" / "model_configs"
DENOISERS = {
    "Wan2.1-T2V-1.3B": (WanTransformer3DModel, "Wan-AI--Wan2.1-T2V-1.3B-Diffusers/transformer"),
    "Wan2.2-TI2V-5B": (WanTransformer3DModel, "Wan-AI--Wan2.2-TI2V-5B-Diffusers/transformer"),
    "Wan2.2-T2V-A14B, one expert": (WanTransformer3DModel, "Wan-AI--Wan2.2-T2V-A14B-Diffusers/transformer"),
    "CogVideoX1.5-5B": (CogVideoXTransformer3DModel, "THUDM--CogVideoX1.5-5B/transformer"),
    "Qwen-Image": (QwenImageTransformer2DModel, "Qwen--Qwen-Image/transformer"),
}


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fp8_bytes(model_class, config_dir: str) -> tuple[int, int]:
    """(bf16 bytes, fp8 bytes) of one denoiser, built on the meta device."""
    with init_empty_weights():
        model = model_class.from_config(json.loads((CONFIGS / config_dir / "config.json").read_text()))
    model.to(torch.bfloat16)
    bf16 = parameter_bytes(model)
    store_denoisers_in_fp8(SimpleNamespace(components={"transformer": model}), torch.bfloat16)
    return bf16, parameter_bytes(model)


def main() -> None:
    print("| denoiser | bf16 GiB | fp8 GiB | fp8 / bf16 |")
    print("|---|---|---|---|")
    for name, (model_class, config_dir) in DENOISERS.items():
        bf16, fp8 = fp8_bytes(model_class, config_dir)
        print(f"| {name} | {bf16 / 2**30:.2f} | {fp8 / 2**30:.2f} | {fp8 / bf16:.3f} |")


if __name__ == "__main__":
    main()
