"""Wan2.2-A14B's two experts each get their own anchor LoRA (`--lora`, `--lora-2`), on a tiny two-expert model."""

import logging

import pytest
from conftest import save_tiny_two_expert_wan
import torch
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

import fvg.families.wan
import fvg.pipeline
from fvg.animate.loading import count_experts, resolve_lora_2
from fvg.animate.lora import to_diffusers
from fvg.cli import main
from fvg.io import FvgError
from fvg.pipeline import FactorizedPipeline
from fvg.presets import MINI_WEIGHTS
from fvg.tiny import tiny_wan_components

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def two_expert_dir(tmp_path_factory):
    return save_tiny_two_expert_wan(tmp_path_factory.mktemp("a14b"))


def write_lora(path, seed):
    """A random non-zero LoRA for the tiny Wan transformer, in diffusers keys; returns the path."""
    transformer = tiny_wan_components()["transformer"]
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TARGETS))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_diffusers(get_peft_model_state_dict(transformer)), path)
    return path


def loaded_lora(model, adapter):
    """The LoRA tensors an expert holds for `adapter`, keyed as in a diffusers file."""
    return {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def assert_holds(model, adapter, path):
    held, expected = loaded_lora(model, adapter), load_file(path)
    assert held.keys() == expected.keys()
    assert all(torch.equal(held[k], expected[k]) for k in expected)


def test_count_experts_reads_the_index_without_loading(two_expert_dir):
    assert count_experts(str(two_expert_dir)) == 2
    assert count_experts(str(MINI_WEIGHTS / "video")) == 1
    assert count_experts("builtin:tiny-wan") == 1
    assert count_experts("nobody/not-a-cached-model") is None  # decided once the model loads


def test_anchor_lora_2_next_to_the_first_is_picked_up_and_logged(two_expert_dir, tmp_path, caplog, monkeypatch):
    first = write_lora(tmp_path / "lora" / "anchor_lora.safetensors", seed=1)
    second = write_lora(tmp_path / "lora" / "anchor_lora_2.safetensors", seed=2)
    monkeypatch.setattr(logging.getLogger("fvg.animate"), "propagate", True)  # the CLI routes it to rich only
    with caplog.at_level(logging.INFO, logger="fvg.animate"):
        pipe = FactorizedPipeline.from_preset("tiny", video_model=str(two_expert_dir), lora=str(first))
    assert f"low-noise expert LoRA: {second}" in caplog.text
    assert pipe.preset.lora_2 == str(second)  # recorded in run.json's settings
    video = pipe.video_pipe
    assert video.get_list_adapters() == {"transformer": ["anchor"], "transformer_2": ["anchor_2"]}
    assert_holds(video.transformer, "anchor", first)
    assert_holds(video.transformer_2, "anchor_2", second)


def test_sibling_in_the_same_key_format_comes_first(tmp_path):
    for name in ("anchor_lora_wan", "anchor_lora_2", "anchor_lora_2_wan"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    assert resolve_lora_2(str(tmp_path / "anchor_lora_wan.safetensors"), None, True) == str(
        tmp_path / "anchor_lora_2_wan.safetensors")
    (tmp_path / "mine.safetensors").write_bytes(b"")
    assert resolve_lora_2(str(tmp_path / "mine.safetensors"), None, True) == str(tmp_path / "anchor_lora_2.safetensors")
    (tmp_path / "anchor_lora_2.safetensors").unlink()
    (tmp_path / "anchor_lora_2_old.safetensors").write_bytes(b"")
    with pytest.raises(FvgError, match="several low-noise expert LoRAs"):
        resolve_lora_2(str(tmp_path / "mine.safetensors"), None, True)


def test_explicit_second_lora_goes_to_the_low_noise_expert(two_expert_dir, tmp_path):
    first = write_lora(tmp_path / "high.safetensors", seed=1)
    second = write_lora(tmp_path / "low.safetensors", seed=2)
    pipe = FactorizedPipeline.from_preset("tiny", video_model=str(two_expert_dir), lora=str(first), lora_2=str(second))
    assert_holds(pipe.video_pipe.transformer, "anchor", first)
    assert_holds(pipe.video_pipe.transformer_2, "anchor_2", second)


def test_same_loads_one_lora_into_both_experts_only_when_asked(two_expert_dir, tmp_path):
    only = write_lora(tmp_path / "only.safetensors", seed=1)
    pipe = FactorizedPipeline.from_preset("tiny", video_model=str(two_expert_dir), lora=str(only), lora_2="same")
    assert pipe.preset.lora_2 == str(only)
    assert_holds(pipe.video_pipe.transformer, "anchor", only)
    assert_holds(pipe.video_pipe.transformer_2, "anchor_2", only)


def test_none_leaves_the_low_noise_expert_plain_in_every_mode(two_expert_dir, tmp_path):
    only = write_lora(tmp_path / "only.safetensors", seed=1)
    pipe = FactorizedPipeline.from_preset("tiny", video_model=str(two_expert_dir), lora=str(only), lora_2="none")
    assert pipe.video_pipe.get_list_adapters() == {"transformer": ["anchor"]}
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    anchored, plain = pipe.animate("a red circle", image, 0, 2), pipe.animate("a red circle", None, 0, 2)
    assert anchored.shape == plain.shape == (9, 32, 32, 3)


def test_one_lora_for_two_experts_is_an_error_before_any_model_loads(two_expert_dir, tmp_path, monkeypatch,
                                                                     capsys):
    only = write_lora(tmp_path / "only.safetensors", seed=1)

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the LoRA choice was checked")

    monkeypatch.setattr(fvg.families.wan, "load_wan_pipeline", no_loading)
    with pytest.raises(FvgError, match="--lora-2 FILE.*--lora-2 same.*--lora-2 none"):
        FactorizedPipeline.from_preset("tiny", video_model=str(two_expert_dir), lora=str(only))
    code = main(["generate", "a red circle", "--preset", "tiny", "--video-model", str(two_expert_dir),
                 "--lora", str(only), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "two experts" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_check_runs_at_load_time_when_the_index_is_not_readable_beforehand(two_expert_dir, tmp_path,
                                                                               monkeypatch):
    only = write_lora(tmp_path / "only.safetensors", seed=1)
    monkeypatch.setattr(fvg.pipeline, "count_experts", lambda _model: None)  # e.g. a hub id not downloaded yet
    pipe = FactorizedPipeline.from_preset("tiny", video_model=str(two_expert_dir), lora=str(only))
    with pytest.raises(FvgError, match="two experts"):
        pipe.video_pipe


def test_second_lora_misuse_is_refused(two_expert_dir, tmp_path):
    only = write_lora(tmp_path / "only.safetensors", seed=1)
    with pytest.raises(FvgError, match="one transformer"):
        FactorizedPipeline.from_preset("tiny", lora=str(only), lora_2=str(only))
    with pytest.raises(FvgError, match="pass --lora FILE too"):
        FactorizedPipeline.from_preset("tiny", video_model=str(two_expert_dir), lora_2="same")


def test_cli_reports_the_found_lora_and_records_it(two_expert_dir, tmp_path, capsys):
    import json

    first = write_lora(tmp_path / "lora" / "anchor_lora.safetensors", seed=1)
    second = write_lora(tmp_path / "lora" / "anchor_lora_2.safetensors", seed=2)
    out = tmp_path / "out"
    code = main(["generate", "a red circle", "--preset", "tiny", "--video-model", str(two_expert_dir),
                 "--lora", str(first), "--mode", "t2v", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and "low-noise expert LoRA" in err and "anchor_lora_2.safetensors" in err
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["lora"] == str(first) and settings["lora_2"] == str(second)


def test_a_fused_lora_serves_the_anchored_mode_and_the_baselines_get_the_exact_base_back(two_expert_dir, tmp_path):
    """`fuse_lora` merges each expert's LoRA while a factorized video samples; switching to a baseline
    restores the saved base weights bit for bit (PEFT's own unmerge subtracts, which leaves rounding)."""
    import numpy as np

    first, second = write_lora(tmp_path / "high.safetensors", seed=1), write_lora(tmp_path / "low.safetensors", seed=2)
    options = dict(video_model=str(two_expert_dir), lora=str(first), lora_2=str(second))
    fused = FactorizedPipeline.from_preset("tiny", fuse_lora=True, **options)
    unfused = FactorizedPipeline.from_preset("tiny", fuse_lora=False, **options)
    experts = [fused.video_pipe.transformer, fused.video_pipe.transformer_2]
    base = [{k: v.clone() for k, v in m.state_dict().items()} for m in experts]
    image = Image.new("RGB", (32, 32), (200, 40, 40))

    plain_before = fused.animate("a red circle", None, 0, 2)
    anchored = fused.animate("a red circle", image, 0, 2)
    assert all(getattr(m, "_fvg_base_weights", None) is not None for m in experts)  # merged while anchored
    changed = [k for k, v in experts[0].state_dict().items() if "base_layer" in k and not torch.equal(v, base[0][k])]
    assert changed  # the merge is real: the adapted layers' weights moved
    plain_after = fused.animate("a red circle", None, 0, 2)
    for model, saved in zip(experts, base):
        state = model.state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved)  # every tensor as before, bit for bit
    np.testing.assert_array_equal(plain_before, plain_after)
    np.testing.assert_array_equal(plain_after, unfused.animate("a red circle", None, 0, 2))
    # the anchored mode: the same video as PEFT's unmerged forward, to float rounding
    assert np.abs(anchored.astype(int) - unfused.animate("a red circle", image, 0, 2).astype(int)).max() <= 1
    result = fused("a red circle moves right", mode="factorized", seed=0, steps=2)
    assert result.settings["lora_fused"] is True and result.settings["fuse_lora"] is True


def test_no_fusing_into_stored_or_streamed_weights(two_expert_dir, tmp_path):
    from fvg.weight_storage import WeightStorage

    lora = write_lora(tmp_path / "high.safetensors", seed=1)
    pipe = FactorizedPipeline.from_preset("tiny", fuse_lora=True, lora=str(lora), storage=WeightStorage(weights="fp8"))
    result = pipe("a red circle moves right", mode="factorized", seed=0, steps=2)
    assert result.settings["lora_fused"] is False
    assert getattr(pipe.video_pipe.transformer, "_fvg_base_weights", None) is None
