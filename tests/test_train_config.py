"""`fvg train` settings: TOML (flat or grouped), CLI overrides, and one-line errors for mistakes."""

import pytest

from fvg.io import FvgError
from fvg.train.config import TrainConfig, load_config, parse_set


def write(tmp_path, text):
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def test_defaults_follow_the_paper():
    cfg = TrainConfig()
    assert (cfg.rank, cfg.max_steps, cfg.p_anchor, cfg.boundary_ratio) == (256, 6000, 1.0, 0.875)
    assert cfg.target_modules == ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def test_toml_tables_are_labels_and_cli_overrides_win(tmp_path):
    path = write(tmp_path, 'data = "clips"\nflow_shift = 5\n[lora]\nrank = 8\nalpha = 16\n'
                           '[optim]\nlearning_rate = 1e-3\nmax_steps = 10\n')
    cfg = load_config(path, {"max_steps": 20, "rank": None})
    assert (cfg.data, cfg.rank, cfg.alpha, cfg.learning_rate, cfg.max_steps) == ("clips", 8, 16.0, 1e-3, 20)
    assert cfg.flow_shift == 5.0 and isinstance(cfg.alpha, float)


def test_unknown_keys_are_named(tmp_path):
    path = write(tmp_path, 'data = "x"\nlearning_rte = 1\n[lora]\nrnak = 4\n')
    with pytest.raises(FvgError, match="learning_rte, rnak"):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ('data = "x"\nnum_frames = 16\n', "4n\\+1"),
    ('data = "x"\nrank = "big"\n', "'rank'.*wrong type"),
    ('data = "x"\nmixed_precision = "fp16"\n', "mixed_precision"),
    ('data = "x"\nexpert = "both_experts"\n', "expert must be"),
    ('data = "x"\np_anchor = 1.5\n', "p_anchor"),
    ('rank = 4\n', "no training data"),
    ('data = "x"\nrank = [\n', "cannot parse"),
    ('data = "x"\nlr_scheduler = "warmup_stable_decay"\n', "lr_decay_steps <= max_steps - lr_warmup_steps"),
    ('data = "x"\nlr_scheduler = "warmup_stable_decay"\nmax_steps = 100\nlr_decay_steps = 1\n', "<= max_steps"),
    ('data = "x"\nlr_decay_steps = 100\n', "read by warmup_stable_decay only"),
])
def test_mistakes_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(FvgError, match=message):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(FvgError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_set_flags_use_toml_values():
    assert parse_set(["rank=8", "lr_scheduler=cosine", 'target_modules=["to_q"]', "flow_shift=3.5"]) == {
        "rank": 8, "lr_scheduler": "cosine", "target_modules": ["to_q"], "flow_shift": 3.5}
    with pytest.raises(FvgError, match="key=value"):
        parse_set(["rank"])
    cfg = load_config(None, {"data": "d", **parse_set(["validation_prompts=['a red square']"])})
    assert cfg.validation_prompts == ["a red square"]


@pytest.mark.parametrize("name", ["tiny", "wan2.1-1.3b", "wan2.2-a14b"])
def test_shipped_training_configs_parse(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "train" / f"{name}.toml")
    if name != "tiny":
        assert (cfg.rank, cfg.max_steps, cfg.p_anchor, cfg.num_frames) == (256, 6000, 1.0, 81)
    assert cfg.expert == ("both" if name == "wan2.2-a14b" else "transformer")


def _lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _optimizer():
    import torch

    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)


def test_warmup_stable_decay_continues_a_constant_run():
    """A constant_with_warmup run resumed into warmup_stable_decay anneals as if planned from the start."""
    from fvg.train.trainer import make_lr_scheduler

    constant = TrainConfig(data="x", lr_scheduler="constant_with_warmup", lr_warmup_steps=5, max_steps=20)
    annealed = TrainConfig(data="x", lr_scheduler="warmup_stable_decay", lr_warmup_steps=5, lr_decay_steps=10,
                           max_steps=30).validate()
    planned = _lrs(make_lr_scheduler(annealed, _optimizer()), 30)
    first = make_lr_scheduler(constant, _optimizer())
    assert _lrs(first, 20) == planned[:20]
    assert planned[:5] == pytest.approx([i * 1e-4 * 2 for i in range(5)]) and planned[5:20] == [1e-3] * 15
    decay = planned[20:]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[0] == pytest.approx(1e-3) and decay[-1] < 3e-5

    continued = make_lr_scheduler(annealed, first.optimizer)  # what a resume builds, then loads the state into
    continued.load_state_dict(first.state_dict())
    continued.optimizer.param_groups[0]["lr"] = first.get_last_lr()[0]  # restored with the optimiser's state
    assert _lrs(continued, 10) == pytest.approx(decay)
