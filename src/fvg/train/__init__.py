"""Anchor-LoRA training (`fvg train`, docs/training.md).

    from fvg.train import load_config, train
    result = train(load_config("configs/train/tiny.toml"))

Modules: `config` (TrainConfig, TOML + overrides), `data` (clips, decoding, latent cache),
`objective` (flow matching with the clean frame-0 anchor), `cogvideox` (the v-prediction
objective for CogVideoX), `trainer` (the accelerate loop,
checkpoints, resume), `validation`, `export` (diffusers and original Wan key formats),
`synthetic` (a tiny test data set), `cli`.
"""

from fvg.train.config import TrainConfig, load_config


def train(cfg: TrainConfig, resume: str | None = None, pipe=None):
    """Run training (imports torch, diffusers and accelerate on first use); see `fvg.train.trainer`."""
    from fvg.train.trainer import train as _train

    return _train(cfg, resume=resume, pipe=pipe)


__all__ = ["TrainConfig", "load_config", "train"]
