"""Training under FSDP2 / DeepSpeed and what it must not move or gather: `fvg.train.distributed`.

accelerate enables FSDP and DeepSpeed only on GPUs (and DeepSpeed needs its package), so the
strategy decisions are tested on accelerate's own plugin objects, and FSDP2 itself runs on two CPU
processes (gloo) through accelerate's FSDP2 preparation function (`fsdp2_experts_worker.py`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fvg.animate.wan import AnchoredWanPipeline
from fvg.io import FvgError
from fvg.tiny import tiny_wan_components
from fvg.train import distributed
from fvg.train.config import TrainConfig
from fvg.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def train_defaults() -> dict:  # for conftest's `config`
    return dict(model="builtin:tiny-wan", max_sequence_length=16, rank=4, alpha=8.0, learning_rate=2e-3,
                checkpoint_every=0, validation_every=0)


def two_expert_pipeline():
    components = tiny_wan_components()
    torch.manual_seed(5)
    low_noise = type(components["transformer"])(**components["transformer"].config)
    return AnchoredWanPipeline(**components, transformer_2=low_noise.eval(), boundary_ratio=0.875)


# -- FSDP2 with both experts ------------------------------------------------------------------------------

def test_only_two_experts_under_fsdp2_become_one_pair():
    from accelerate.utils import DistributedType

    assert distributed.needs_expert_pair(DistributedType.FSDP, 2, 2)
    assert not distributed.needs_expert_pair(DistributedType.FSDP, 2, 1)
    assert not distributed.needs_expert_pair(DistributedType.FSDP, 1, 2)  # FSDP1 prepares several models
    assert not distributed.needs_expert_pair(DistributedType.MULTI_GPU, None, 2)  # DDP: two models (unused params)


def test_each_expert_is_its_own_fsdp_unit_in_the_wrap_policy():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    cfg = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(fsdp_version=cfg["fsdp_version"], auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=cfg["fsdp_transformer_layer_cls_to_wrap"])
    pipe = two_expert_pipeline()
    experts = [pipe.transformer, pipe.transformer_2]
    # the YAML names diffusers' block; the anchored pipeline runs fvg's subclasses of it, under their own names
    names = distributed.resolve_wrap_classes(plugin, experts, separately=True)
    assert names == [type(pipe.transformer.blocks[0]).__name__, type(pipe.transformer).__name__]
    assert names == plugin.transformer_cls_names_to_wrap and "WanTransformerBlock" not in names
    pair = distributed.ExpertPair(experts)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, pair)
    assert policy(pipe.transformer) and policy(pipe.transformer_2) and policy(pipe.transformer.blocks[0])
    assert not policy(pair) and not policy(pipe.transformer.patch_embedding)
    # the pair's forward is the expert's: same output, names kept under experts.N.
    x, t, text = torch.randn(1, 16, 3, 4, 4), torch.tensor([500.0]), torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(distributed.ExpertCall(pair, 1)(hidden_states=x, timestep=t, encoder_hidden_states=text),
                                   pipe.transformer_2(hidden_states=x, timestep=t, encoder_hidden_states=text))
    assert "experts.1.blocks.0.attn1.to_q.weight" in dict(pair.named_parameters())
    one = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                         transformer_cls_names_to_wrap="WanTransformerBlock")
    assert distributed.resolve_wrap_classes(one, [pipe.transformer], separately=False) == [names[0]]
    wrong = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                           transformer_cls_names_to_wrap="CogVideoXBlock")
    with pytest.raises(FvgError, match="CogVideoXBlock not found"):
        distributed.resolve_wrap_classes(wrong, experts, separately=True)


def test_fsdp2_trains_two_experts_as_one_model(tmp_path, free_port):
    """Two gloo processes: accelerate's FSDP2 preparation of the pair, four steps alternating experts,
    a direct expert call, and the LoRA extracted by gathering LoRA tensors only."""
    out = tmp_path / "findings.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "fsdp2_experts_worker.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["experts_are_fsdp_units"] == [True, True] and found["blocks_are_fsdp_units"]
    # each step gives gradients to the LoRA of the expert it ran, and only to it (2 modules x 2 blocks x A, B)
    assert found["grads_per_step"] == [[16, 0], [0, 16], [16, 0], [0, 16]]
    assert found["direct_call_finite"]
    assert found["equal_to_full_gather"] and found["lora_tensors"] == 32
    assert found["gathered_shapes"] == found["lora_shapes"]  # nothing but LoRA tensors was gathered
    assert found["digests"][0] == found["digests"][1]


# -- DeepSpeed: concrete batch numbers without a DataLoader ------------------------------------------------

@pytest.mark.parametrize("name", ["deepspeed-zero2.yaml", "deepspeed-zero3.yaml"])
def test_shipped_deepspeed_configs_resolve_to_concrete_numbers(name):
    from accelerate.utils import DeepSpeedPlugin

    fields = yaml.safe_load((ROOT / "configs/accelerate" / name).read_text())["deepspeed_config"]
    plugin = DeepSpeedPlugin(**fields)  # what `accelerate launch` builds from the YAML (via the environment)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"  # what accelerate would refuse
    cfg = TrainConfig(data="x", batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.5)
    config = distributed.resolve_deepspeed_config(plugin, cfg, num_processes=8)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5 and config["train_batch_size"] == 2 * 3 * 8
    assert plugin.get_value("train_micro_batch_size_per_gpu") == 2 and not plugin.is_auto("train_batch_size")
    assert plugin.gradient_accumulation_steps == 3


def test_deepspeed_values_that_contradict_the_training_config_are_refused():
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=4)
    with pytest.raises(FvgError, match="gradient_accumulation_steps = 4.*gives 1"):
        distributed.resolve_deepspeed_config(plugin, TrainConfig(data="x"), num_processes=2)
    json_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    plugin = DeepSpeedPlugin(hf_ds_config=json_config)  # a user's DeepSpeed JSON, consistent with the TOML
    assert distributed.resolve_deepspeed_config(plugin, TrainConfig(data="x"), 4)["train_batch_size"] == 4


def test_the_trainer_builds_the_deepspeed_plugin_only_for_deepspeed_runs(monkeypatch):
    cfg = TrainConfig(data="x", batch_size=3)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert distributed.deepspeed_plugin_from_env(cfg) is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    plugin = distributed.deepspeed_plugin_from_env(cfg)
    assert plugin.zero_stage == 3
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    assert plugin.deepspeed_config["train_batch_size"] == 12


# -- the frozen expert during validation -----------------------------------------------------------------------

class MoveSpy:
    """Records every `.to` / `.cuda` / `.half`-style conversion a module receives (all go through `_apply`)."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list = []
        original = module._apply

        def spying_apply(fn, *args, **kwargs):
            self.calls.append(fn)
            return original(fn, *args, **kwargs)

        module._apply = spying_apply


def test_validation_leaves_the_frozen_expert_where_it_is(workdir, config, monkeypatch):
    pipe = two_expert_pipeline()
    frozen = pipe.transformer_2
    before = {n: (p.device, p.dtype) for n, p in frozen.named_parameters()}
    used = []
    frozen.register_forward_pre_hook(lambda m, a: used.append(torch.is_grad_enabled()))
    offered = []
    monkeypatch.setattr(distributed, "_stream_blocks", lambda model, device: offered.append((model, device)))
    import fvg.train.trainer as trainer

    def install_spy(model, device, _original=trainer.keep_on_host):
        spy_holder.append(MoveSpy(model))  # from here on (after the one `.to("cpu")` at setup) nothing may move it
        return _original(model, device)

    spy_holder: list = []
    monkeypatch.setattr(trainer, "keep_on_host", install_spy)
    anchor = workdir / "anchor-frozen.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(anchor)
    train(config("frozen", expert="transformer", max_steps=2, validation_every=1, validation_steps=2,
                 validation_prompts=["a blue square"], validation_anchors=[str(anchor)], validation_guidance=1.0),
          pipe=pipe)
    assert used and not any(used)  # validation ran the frozen expert (without gradients) ...
    assert spy_holder and spy_holder[0].calls == []  # ... and never moved or cast it
    assert {n: (p.device, p.dtype) for n, p in frozen.named_parameters()} == before
    assert not any(p.requires_grad for p in frozen.parameters())
    assert offered == []  # the accelerator here is the host: nothing to stream


def test_keep_on_host_streams_blocks_on_an_accelerator(monkeypatch):
    offered = []
    monkeypatch.setattr(distributed, "_stream_blocks", lambda model, device: offered.append(device))
    model = tiny_wan_components()["transformer"]
    assert distributed.keep_on_host(model, torch.device("cpu")) is False and offered == []
    assert distributed.keep_on_host(model, torch.device("cuda", 1)) is True
    assert offered == [torch.device("cuda", 1)]


def test_streamed_blocks_compute_the_same_and_stay_on_the_host():
    """The group-offload hooks installed for the frozen expert (onloading to the host here, the only
    device at hand): same output, weights still on the host afterwards."""
    model = tiny_wan_components()["transformer"].eval()
    x, t, text = torch.randn(1, 16, 3, 4, 4), torch.tensor([400.0]), torch.randn(1, 16, 32)
    with torch.no_grad():
        expected = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        distributed._stream_blocks(model, torch.device("cpu"))
        got = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(got, expected)
    assert all(p.device.type == "cpu" for p in model.parameters())


# -- LoRA extraction -------------------------------------------------------------------------------------------

def test_checkpoints_extract_the_lora_without_a_full_state_dict(workdir, config, monkeypatch):
    """accelerate's `get_state_dict` gathers every weight under FSDP / ZeRO-3: fvg never calls it (accelerate's
    own `save_state` does for DDP models, where it is the weights themselves, no gather); the extracted
    LoRA equals the LoRA part of the full state dict."""
    import inspect

    from accelerate import Accelerator
    from peft import get_peft_model_state_dict

    import fvg
    from fvg.families.wan import load_wan_pipeline
    from fvg.train.export import read_lora

    callers = []
    original = Accelerator.get_state_dict

    def spy(self, *args, **kwargs):
        callers.append(inspect.stack()[1].filename)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "get_state_dict", spy)
    pipe = load_wan_pipeline("builtin:tiny-wan", torch.float32)
    result = train(config("extract", max_steps=2, checkpoint_every=1), pipe=pipe)
    fvg_dir = str(Path(fvg.__file__).parent)
    assert callers and not [c for c in callers if c.startswith(fvg_dir)]  # two checkpoints: accelerate's only
    full = get_peft_model_state_dict(pipe.transformer, state_dict=pipe.transformer.state_dict())
    extracted = distributed.lora_state_dict(pipe.transformer)
    assert full.keys() == extracted.keys() and all(torch.equal(full[k], extracted[k]) for k in full)
    written, _, _ = read_lora(result.lora_files["transformer.diffusers"])
    assert written.keys() == full.keys() and all(torch.equal(written[k], full[k]) for k in full)
    assert (workdir / "extract" / "checkpoints" / "step_000001" / "anchor_lora.safetensors").is_file()
