"""Anchor-LoRA training (`fvg train`, docs/training.md).

    from fvg.train import load_config, train
    result = train(load_config("configs/train/tiny.toml"))

Modules: `config` (TrainConfig, TOML + overrides), `data` (clips, decoding, latent cache),
`seeds` (every random draw from (seed, step, rank)), `trainer` (the accelerate loop, checkpoints,
resume), `validation`, `export` (diffusers keys and the family's other key formats),
`synthetic` (a tiny test data set), `cli`. What differs per model family (loading, encoding,
the objective: Wan's flow matching, CogVideoX's v-prediction) comes from `fvg.families`.
"""

from fvg.train.config import TrainConfig, load_config


def train(cfg: TrainConfig, resume: str | None = None, pipe=None):
    """Run training (imports torch, diffusers and accelerate on first use); see `fvg.train.trainer`."""
    from fvg.train.trainer import train as _train

    return _train(cfg, resume=resume, pipe=pipe)


__all__ = ["TrainConfig", "load_config", "train"]
