"""Weights loaded straight to their device (`fvg.families.base.load_components_onto`, `Trainer._load_devices`)."""

from types import SimpleNamespace

import pytest
from conftest import save_tiny_two_expert_wan
import torch
from diffusers import WanTransformer3DModel

from fvg.animate.wan import AnchoredWanPipeline
from fvg.families.wan import load_wan_pipeline
from fvg.tiny import tiny_wan_components
from fvg.train.config import TrainConfig
from fvg.train.trainer import Trainer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved float32 checkpoints: a two-expert Wan (as Wan2.2-A14B ships) and a one-expert Wan."""
    two = save_tiny_two_expert_wan(tmp_path_factory.mktemp("two-experts"))
    one = tmp_path_factory.mktemp("one-expert")
    AnchoredWanPipeline(**tiny_wan_components()).save_pretrained(one)
    return two, one


def spy_from_pretrained(monkeypatch, cls) -> list[dict]:
    calls = []
    original = cls.from_pretrained.__func__

    def spy(klass, *args, **kwargs):
        calls.append(kwargs)
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_named_components_load_straight_onto_their_device_in_the_run_dtype(checkpoints, monkeypatch):
    from transformers import UMT5EncoderModel

    two, _ = checkpoints
    transformer_calls = spy_from_pretrained(monkeypatch, WanTransformer3DModel)
    encoder_calls = spy_from_pretrained(monkeypatch, UMT5EncoderModel)
    pipe = load_wan_pipeline(str(two), torch.bfloat16, devices={"transformer": "cpu", "text_encoder": "cpu"})
    placed = [c for c in transformer_calls if c.get("device_map") is not None]
    host = [c for c in transformer_calls if c.get("device_map") is None]
    assert placed == [{"subfolder": "transformer", "dtype": torch.bfloat16, "device_map": "cpu"}]
    # the frozen expert is loaded by the pipeline on the host, from meta tensors too (no float32 model first)
    assert len(host) == 1 and host[0]["low_cpu_mem_usage"] is True
    assert [c.get("device_map") for c in encoder_calls] == ["cpu"]  # the pipeline did not load it again
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    assert type(pipe.transformer).__name__ == type(pipe.transformer_2).__name__  # the pipeline's own classes
    reference = load_wan_pipeline(str(two), torch.bfloat16)  # everything on the host, as inference loads
    for name in ("transformer", "transformer_2", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert {p.device.type for p in getattr(pipe, name).parameters()} == {"cpu"}
    # diffusers keeps Wan's `_keep_in_fp32_modules` (time embedding, norms, modulation table) in float32 either way
    assert pipe.transformer.scale_shift_table.dtype == torch.float32


def test_a_component_the_checkpoint_lacks_is_left_to_whoever_needs_it(checkpoints):
    _, one = checkpoints
    pipe = load_wan_pipeline(str(one), torch.float32, devices={"transformer_2": "cpu"})
    assert pipe.transformer_2 is None and pipe.transformer is not None


def test_builtin_models_are_cast_and_placed_with_one_move():
    pipe = load_wan_pipeline("builtin:tiny-wan", torch.bfloat16, devices={"transformer": "cpu"})
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}


@pytest.mark.parametrize("kind, expert, expected", [
    ("MULTI_GPU", "both", {"transformer", "transformer_2", "text_encoder"}),
    ("MULTI_GPU", "transformer_2", {"transformer_2", "text_encoder"}),
    ("NO", "transformer", {"transformer", "text_encoder"}),
    ("FSDP", "both", set()),  # sharded from the host: only each shard reaches the device
    ("DEEPSPEED", "transformer", set()),
])
def test_the_trainer_loads_what_it_trains_onto_its_device(kind, expert, expected):
    from accelerate.utils import DistributedType

    trainer = Trainer(TrainConfig(data="x", expert=expert))
    trainer.accelerator = SimpleNamespace(device=torch.device("cuda", 1), distributed_type=DistributedType[kind])
    devices = trainer._load_devices()
    assert set(devices) == expected and all(d == torch.device("cuda", 1) for d in devices.values())
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), distributed_type=DistributedType.NO)
    assert trainer._load_devices() == {}
