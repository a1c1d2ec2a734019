"""One stage on the accelerator at a time, in one memory mode (fvg.residency)."""

import numpy as np
import pytest
import torch
from PIL import Image

from fvg.animate.wan import AnchoredWanPipeline
from fvg.io import FvgError
from fvg.pipeline import FactorizedPipeline
from fvg.residency import StageResidency, apply_mode, choose_mode
from fvg.tiny import tiny_wan_components

GIB = 2**30


def _sample(pipe, anchor=None):
    return pipe(prompt="a red circle moves right", num_frames=9, height=32, width=32, num_inference_steps=2,
                output_type="latent", anchor=anchor, generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.parametrize("mode", ["model-offload", "group-offload"])
def test_offload_modes_give_the_same_video_as_plain_placement(mode):
    anchor = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    plain = AnchoredWanPipeline(**tiny_wan_components())
    offloaded = AnchoredWanPipeline(**tiny_wan_components())
    apply_mode(offloaded, mode, "cpu")  # on CPU the hooks run with the CPU as "device": same arithmetic
    assert torch.equal(_sample(plain), _sample(offloaded))
    assert torch.equal(_sample(plain, anchor), _sample(offloaded, anchor))


class FakePipe:
    """Records what the residency does to a pipeline (no CUDA here)."""

    def __init__(self):
        self.components = {"transformer": torch.nn.Linear(1, 1)}
        self.calls: list[str] = []

    def to(self, device):
        self.calls.append(f"to:{device}")
        return self

    def enable_model_cpu_offload(self, device=None):
        self.calls.append(f"model-offload:{device}")


class FakePlanner:
    def __init__(self):
        self.calls, self.loaded_model = [], torch.nn.Linear(1, 1)

    def load(self):
        self.calls.append("load")

    def to(self, device):
        self.calls.append(f"to:{device}")
        return self


def test_gpu_mode_keeps_only_the_running_stage_on_the_device():
    residency = StageResidency("cuda:0", "gpu")
    planner, anchor, video = FakePlanner(), FakePipe(), FakePipe()
    residency.enter("plan", planner)
    assert residency.placed() == ["plan"] and planner.calls == ["load", "to:cuda:0"]
    residency.enter("anchor", anchor)
    assert residency.placed() == ["anchor"] and planner.calls[-1] == "to:cpu" and anchor.calls == ["to:cuda:0"]
    residency.enter("animate", video)
    assert residency.placed() == ["animate"] and anchor.calls[-1] == "to:cpu" and video.calls == ["to:cuda:0"]
    residency.enter("anchor", anchor)  # the next video of a batch: the host copy goes back
    assert video.calls[-1] == "to:cpu" and anchor.calls[-1] == "to:cuda:0"
    assert residency.modes == {"plan": "gpu", "anchor": "gpu", "animate": "gpu"}


def test_offload_hooks_are_installed_once_and_pipelines_never_moved_whole():
    residency = StageResidency("cuda:0", "model-offload")
    anchor, video = FakePipe(), FakePipe()
    for _ in range(3):
        residency.enter("anchor", anchor)
        residency.enter("animate", video)
    assert anchor.calls == ["model-offload:cuda:0"] and video.calls == ["model-offload:cuda:0"]


def test_keep_resident_evicts_nothing():
    residency = StageResidency("cuda:0", "gpu", keep_resident=True)
    anchor, video = FakePipe(), FakePipe()
    residency.enter("anchor", anchor)
    residency.enter("animate", video)
    assert residency.placed() == ["anchor", "animate"] and anchor.calls == ["to:cuda:0"]


def test_auto_picks_the_fastest_mode_that_fits():
    sizes = {"transformer": 10 * GIB, "text_encoder": 6 * GIB, "vae": 1 * GIB}
    assert choose_mode(sizes, 24 * GIB, 2 * GIB) == "gpu"
    assert choose_mode(sizes, 14 * GIB, 2 * GIB) == "model-offload"
    assert choose_mode(sizes, 8 * GIB, 2 * GIB) == "group-offload"
    assert choose_mode(sizes, 2 * GIB, 2 * GIB) == "sequential"
    # modes the weights' storage cannot run under are skipped (bitsandbytes NF4: no group or sequential offload)
    nf4 = ("group-offload", "sequential")
    assert choose_mode(sizes, 14 * GIB, 2 * GIB, nf4) == "model-offload"
    assert choose_mode(sizes, 2 * GIB, 2 * GIB, nf4) == "model-offload"  # nothing fits: the least it can hold
    assert choose_mode(sizes, 8 * GIB, 2 * GIB, ("group-offload",)) == "sequential"


def test_cpu_runs_everything_in_place_and_records_it():
    pipe = FactorizedPipeline.from_preset("tiny", device="cpu")
    out = pipe("a red circle moves right", mode="factorized", seed=0, steps=2)
    assert pipe.residency.modes == {"anchor": "gpu", "animate": "gpu"}
    assert out.settings["memory"] == "auto" and out.settings["memory_modes"] == pipe.residency.modes


@pytest.mark.parametrize("memory", ["model-offload", "group-offload", "sequential"])
def test_offload_modes_need_an_accelerator(memory):
    with pytest.raises(FvgError, match=f"--memory {memory} needs a CUDA device"):
        FactorizedPipeline.from_preset("tiny", device="cpu", memory=memory)


def test_unknown_memory_mode_is_one_line():
    with pytest.raises(FvgError, match="unknown memory mode 'lots'"):
        FactorizedPipeline.from_preset("tiny", device="cpu", memory="lots")


def test_load_places_nothing_and_vae_tiling_defaults_on_at_704p():
    pipe = FactorizedPipeline.from_preset("tiny", device="cpu").load("factorized")
    assert pipe.residency.placed() == []
    assert FactorizedPipeline.from_preset("tiny", height=704, width=1280).vae_tiling
    assert not FactorizedPipeline.from_preset("tiny").vae_tiling


def test_auto_modes_from_the_estimate_follow_the_free_memory():
    import torch

    from fvg.memory import estimate, stage_modes
    from fvg.presets import get_preset

    est = estimate(get_preset("wan2.2-5b"), torch.bfloat16)
    modes, together = stage_modes(est, 80 * GIB)
    assert modes == {"anchor": "gpu", "animate": "gpu"} and not together  # 54 + 22 GiB of weights
    modes, together = stage_modes(est, 24 * GIB)
    assert modes["animate"] in ("model-offload", "group-offload") and modes["anchor"] == "group-offload"
    assert not together
    modes, _ = stage_modes(est, 1 * GIB)
    assert set(modes.values()) == {"sequential"}
    # the decode counts for the video stage: it must fit in the chosen mode too
    by_name = {s.name: s for s in est.stages}
    animate_mode = stage_modes(est, 30 * GIB)[0]["animate"]
    assert by_name["decode"].peak_bytes(animate_mode) <= 30 * GIB
    assert by_name["animate"].peak_bytes(animate_mode) <= 30 * GIB


def test_group_offload_pins_per_transfer_only_where_the_host_cannot_hold_a_second_copy(monkeypatch):
    from fvg import residency

    assert residency.pin_per_transfer(14 * GIB, 97 * GIB) is False  # wan2.1-1.3b on the H200 host
    assert residency.pin_per_transfer(54 * GIB, 70 * GIB) is True  # Qwen-Image there: killed while pinning
    assert residency.pin_per_transfer(54 * GIB, 86 * GIB) is False  # 1.5x the weights and the margin fit

    pipe = AnchoredWanPipeline(**tiny_wan_components())
    seen: list[dict] = []
    monkeypatch.setattr(type(pipe.transformer), "enable_group_offload", lambda self, **kw: seen.append(kw))
    monkeypatch.setattr("diffusers.hooks.apply_group_offloading", lambda module, **kw: seen.append(kw))
    weights = sum(residency.module_bytes(m) for m in residency.pipeline_modules(pipe).values())
    for available, pinned_per_transfer in ((weights * 3 // 2 + residency.HOST_MARGIN, False), (weights * 3 // 2, True)):
        seen.clear()
        monkeypatch.setattr(residency, "host_bytes_available", lambda: available)
        residency.apply_group_offload(pipe, "cuda:0")
        assert len(seen) == len(residency.pipeline_modules(pipe))
        assert all(kw["use_stream"] and kw["low_cpu_mem_usage"] is pinned_per_transfer for kw in seen)
    seen.clear()
    residency.apply_group_offload(pipe, "cpu")  # no stream, nothing pinned
    assert all(not kw["use_stream"] and not kw["low_cpu_mem_usage"] for kw in seen)


@pytest.mark.parametrize("family", ["wan", "cogvideox", "qwen-image"])
def test_group_offload_onloads_every_vae_weight_from_encode_and_decode(family):
    """No weight may wait for the VAE's own forward: pipelines call `encode`/`decode`, never `forward`
    (CogVideoX's anchor encode found its encoder on the host on an H200)."""
    from diffusers.hooks import HookRegistry

    from fvg.residency import apply_group_offload
    from fvg.tiny import tiny_cogvideox_components, tiny_qwen_image_pipeline

    if family == "qwen-image":
        pipe = tiny_qwen_image_pipeline()
    else:
        from fvg.animate.cogvideox import AnchoredCogVideoXPipeline

        pipe = (AnchoredCogVideoXPipeline(**tiny_cogvideox_components()) if family == "cogvideox"
                else AnchoredWanPipeline(**tiny_wan_components()))
    apply_group_offload(pipe, "cpu")
    hook = HookRegistry.check_if_exists_or_initialize(pipe.vae).get_hook("group_offloading")
    top = hook.group if hook is not None else None
    assert top is None or (not top.modules and not top.parameters and not top.buffers)


def test_group_offload_moves_a_torchao_text_encoder_whole_and_samples_the_same(tmp_path):
    """Leaf-level group offloading of transformers' torchao weights failed on an H200; such an encoder is
    moved whole for its forward instead (`onload_for_forward`), while the torchao video transformer keeps
    diffusers' block-level groups."""
    pytest.importorskip("torchao", reason="torchao is the optional quant extra: pip install 'fvg[quant]'")
    from diffusers.hooks import HookRegistry

    from fvg.families.wan import load_wan_pipeline
    from fvg.residency import ONLOAD_HOOK, apply_group_offload, holds_torchao_weights
    from fvg.weight_storage import WeightStorage

    AnchoredWanPipeline(**tiny_wan_components()).save_pretrained(tmp_path)
    storage = WeightStorage(quantize="torchao-int8wo").validate("cpu")
    plain, offloaded = (load_wan_pipeline(str(tmp_path), torch.bfloat16, storage=storage) for _ in range(2))
    assert holds_torchao_weights(offloaded.text_encoder) and holds_torchao_weights(offloaded.transformer)
    assert not holds_torchao_weights(offloaded.vae)
    apply_group_offload(offloaded, "cpu")
    encoder_hooks = HookRegistry.check_if_exists_or_initialize(offloaded.text_encoder)
    assert encoder_hooks.get_hook(ONLOAD_HOOK) is not None
    assert not any(HookRegistry.check_if_exists_or_initialize(m).get_hook("group_offloading")
                   for m in offloaded.text_encoder.modules())
    assert HookRegistry.check_if_exists_or_initialize(offloaded.transformer.blocks[0]).get_hook(
        "group_offloading") is not None
    assert torch.equal(_sample(plain), _sample(offloaded))


def test_module_bytes_counts_quantized_weights_by_what_they_hold():
    pytest.importorskip("torchao", reason="torchao is the optional quant extra: pip install 'fvg[quant]'")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from fvg.residency import holds_torchao_weights, module_bytes

    layer = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    assert module_bytes(layer) == 64 * 32 * 2 and not holds_torchao_weights(layer)
    quantize_(layer, Int8WeightOnlyConfig(version=2))
    assert holds_torchao_weights(layer)
    # int8 weights and one bf16 scale per output row (not 2 bytes a weight, as the wrapper's dtype would say)
    assert 64 * 32 <= module_bytes(layer) <= 64 * 32 + 32 * 8


def test_onload_for_forward_moves_torchao_weights_and_the_inputs_under_inference_mode():
    """Pipelines call the text encoder under `torch.inference_mode()`, where torchao's `Int8Tensor.to(device)`
    raises a storage error (an H100 run of tests/test_cuda_quantization.py; here with the meta device), and
    send its inputs to the device the encoder sits on before the hook runs: the host."""
    pytest.importorskip("torchao", reason="torchao is the optional quant extra: pip install 'fvg[quant]'")
    from diffusers.hooks import HookRegistry
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from fvg.residency import ONLOAD_HOOK, onload_for_forward

    layer = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    quantize_(layer, Int8WeightOnlyConfig(version=2))
    onload_for_forward(layer, torch.device("meta"))
    hook = HookRegistry.check_if_exists_or_initialize(layer).get_hook(ONLOAD_HOOK)
    with torch.inference_mode():
        args, kwargs = hook.pre_forward(layer, torch.ones(2, 64, dtype=torch.bfloat16), scale=torch.ones(1))
    assert layer.weight.device.type == "meta" and args[0].device.type == "meta"
    assert kwargs["scale"].device.type == "meta"
