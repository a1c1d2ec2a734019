"""Non-finite numbers stop training with one clear line, and no NaN LoRA is ever written."""

import pytest
import torch

from fvg.io import FvgError
from fvg.train.config import TrainConfig
from fvg.train.export import write_lora
from fvg.train.synthetic import write_synthetic_dataset
from fvg.train.trainer import train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def config(root, **overrides) -> TrainConfig:
    base = dict(model="builtin:tiny-wan", data=str(root / "data"), output_dir=str(root / "run"),
                cache_dir=str(root / "cache"), height=32, width=32, num_frames=9, fps=8, max_sequence_length=16,
                num_workers=0, rank=4, alpha=8.0, learning_rate=2e-3, lr_warmup_steps=0, max_steps=4, batch_size=2,
                mixed_precision="no", gradient_checkpointing=False, checkpoint_every=0, validation_every=0,
                log_with="none", seed=0)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("setting", ["learning_rate", "weight_decay", "max_grad_norm", "alpha"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_settings_are_refused(tmp_path, setting, value):
    with pytest.raises(FvgError, match=f"training setting '{setting}' must be a finite number"):
        config(tmp_path, **{setting: value}).validate()


def test_diverging_training_stops_and_exports_no_lora(tmp_path):
    write_synthetic_dataset(tmp_path / "data", num_clips=4, num_frames=9, size=32, fps=8, seed=0)
    with pytest.raises(FvgError, match=r"training diverged at step \d+: the loss is (nan|inf)"):
        train(config(tmp_path, learning_rate=1e30, max_grad_norm=0.0, max_steps=6))
    assert not list((tmp_path / "run").rglob("*.safetensors"))


def test_a_nan_lora_is_never_written(tmp_path):
    state = {"blocks.0.attn1.to_q.lora_A.weight": torch.tensor([[float("nan")]])}
    config_ = {"r": 1, "lora_alpha": 1, "target_modules": ["to_q"]}
    with pytest.raises(FvgError, match="holds NaN or inf"):
        write_lora(state, tmp_path, "transformer", config_, {"rank": 1})
    assert not list(tmp_path.iterdir())
