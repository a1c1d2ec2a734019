"""Where each stage's models live: one stage on the accelerator at a time, in one memory mode.

The three stages never need their models at the same moment: the planner LLM is done before
the anchor is rendered, and the text-to-image model before the video model runs. Real presets
do not fit one card otherwise (Qwen-Image alone is 38 GiB in bf16, Wan2.2-A14B 53 GiB). So
`StageResidency` places a stage's pipeline on the device when the stage starts and evicts the
other stages' models first (back to the host, where batches keep them loaded), then empties the
device cache.

Memory modes, one for every stage (`--memory`):

| mode | what sits on the device during a stage | cost |
|---|---|---|
| `gpu` | every component of the stage | fastest |
| `model-offload` | one component at a time (diffusers' `enable_model_cpu_offload`) | a host->device copy per component per call |
| `group-offload` | one transformer block at a time, prefetched on a CUDA stream (diffusers' group offloading) | about the weights' size in transfers per step, overlapped |
| `sequential` | one leaf module at a time (`enable_sequential_cpu_offload`) | slowest; the least memory |

`auto` picks the first of these whose estimate fits the free device memory (`fvg.memory`).
On a CPU device every mode is `gpu`: there is nothing to offload to.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

import torch

from fvg.io import FvgError

MEMORY_MODES = ("auto", "gpu", "model-offload", "group-offload", "sequential")
OFFLOAD_MODES = ("model-offload", "group-offload", "sequential")
STAGES = ("plan", "anchor", "animate")

log = logging.getLogger("fvg")


def validate_memory_mode(mode: str, device: str) -> None:
    if mode not in MEMORY_MODES:
        raise FvgError(f"unknown memory mode '{mode}' (choose from: {', '.join(MEMORY_MODES)})")
    if mode in OFFLOAD_MODES and not device.startswith("cuda"):
        raise FvgError(f"--memory {mode} needs a CUDA device (it moves weights between the host and the GPU)")


def empty_device_cache(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes a module's parameters and buffers hold, wherever they are; a tensor subclass (torchao's
    quantized weights) by the plain tensors it is made of, not by the dtype it computes in."""
    return sum(_tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def _tensor_bytes(t: torch.Tensor) -> int:
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def holds_torchao_weights(module: torch.nn.Module) -> bool:
    """Whether `--quantize torchao-*` converted some of the module's weights (checked by type, so torchao
    need not be importable)."""
    return any(type(p).__module__.startswith("torchao.") for p in module.parameters())


def pipeline_modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def device_of(module: torch.nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    return None


def apply_mode(pipe, mode: str, device: str) -> None:
    """Install a diffusers pipeline's offload hooks for `mode` (an offload mode), once."""
    if mode == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "group-offload":
        apply_group_offload(pipe, device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise FvgError(f"unknown memory mode '{mode}'")


def choose_mode(component_bytes: dict[str, int], free_bytes: int, activation_bytes: int,
                failing: tuple[str, ...] = ()) -> str:
    """The fastest mode whose resident weights plus `activation_bytes` fit in `free_bytes`, skipping the
    `failing` modes (those the weights' storage does not run under, `WeightStorage.failing_memory_modes`).

    Resident weights per mode: `gpu` all components; `model-offload` the largest one; `group-offload`
    the largest one's non-block part plus two blocks in flight, taken as a tenth of it (blocks
    hold over 90% of every diffusion transformer's and text encoder's weights here); `sequential`
    one layer. When none fits, the mode that holds the least. `fvg memory` prints the same decision
    with exact block sizes."""
    largest = max(component_bytes.values(), default=0)
    resident = {"gpu": sum(component_bytes.values()), "model-offload": largest, "group-offload": largest // 10,
                "sequential": 0}
    usable = [mode for mode in resident if mode not in failing]
    return next((m for m in usable if resident[m] + activation_bytes <= free_bytes), usable[-1])


HOST_MARGIN = 4 * 2**30  # what the process and the OS keep besides the weights


def host_bytes_available() -> int:
    import psutil  # accelerate's dependency

    return psutil.virtual_memory().available


def pin_per_transfer(weight_bytes: int, available_bytes: int) -> bool:
    """Whether group offloading must pin each group as it moves (diffusers' `low_cpu_mem_usage`).

    With a stream, diffusers pins a host copy of every group up front, beside the module's own
    tensors, which the first offload of each group replaces: until then the host holds the weights
    twice. On an H200 host (125 GiB), Qwen-Image's pipeline (54 GiB in bf16, 70 GiB left) was killed
    while pinning even though 54 GiB + 4 GiB fit (BENCHMARKS.md): pinned memory costs more than its
    bytes (torch's pinned-memory allocator caches and rounds its blocks; by how much was not
    measured). So the pinned copy is counted at 1.5x its bytes. Pinning per transfer costs speed,
    so it is used only where that does not fit."""
    return weight_bytes * 3 // 2 + HOST_MARGIN > available_bytes


def group_offload_pins_per_transfer(pipe, device: str) -> bool:
    """`pin_per_transfer` for `pipe`'s weights on this host; never without a CUDA stream (nothing is pinned)."""
    if torch.device(device).type != "cuda":
        return False
    return pin_per_transfer(sum(module_bytes(m) for m in pipeline_modules(pipe).values()), host_bytes_available())


def entry_point_blocks(model: torch.nn.Module) -> list[str] | None:
    """The children of an autoencoder to offload as blocks of their own, where its class lists none.

    diffusers onloads a model's children outside its block lists when the model's own `forward`
    runs, but pipelines call an autoencoder through `encode` and `decode`, which never run it.
    Wan's VAE lists its encoder and decoder (`_group_offload_block_modules`); CogVideoX's and
    Qwen-Image's do not, and the CogVideoX anchor encode failed on an H200 with the encoder's
    weights left on the host. None: the class's own list (or a model called through `forward`)."""
    if getattr(model, "_group_offload_block_modules", None) or not hasattr(model, "decode"):
        return None
    return [name for name, child in model.named_children() if next(child.parameters(), None) is not None]


def apply_group_offload(pipe, device: str) -> None:
    """Group offloading for every component, prefetched on a side stream while the previous group computes.

    diffusers models go block by block (one transformer block per group). transformers text encoders
    go layer by layer (leaf level): block-level offloading finds no top-level block list in them
    (UMT5's blocks sit under `encoder.block`) and onloads the whole encoder at once, which on an
    H100 made the 10.6 GiB UMT5-XXL the stage's peak (BENCHMARKS.md)."""
    from diffusers.hooks import apply_group_offloading
    from diffusers.models.modeling_utils import ModelMixin

    onload = torch.device(device)
    stream = onload.type == "cuda"
    low_cpu = group_offload_pins_per_transfer(pipe, device)
    if low_cpu:
        log.info("group offloading pins each group when it moves: the host cannot hold a pinned copy of every "
                 "weight beside the weights")
    common = dict(onload_device=onload, offload_device=torch.device("cpu"), use_stream=stream,
                  low_cpu_mem_usage=low_cpu)
    for component in pipeline_modules(pipe).values():
        if isinstance(component, ModelMixin):
            component.enable_group_offload(offload_type="block_level", num_blocks_per_group=1,
                                           block_modules=entry_point_blocks(component), **common)
        elif holds_torchao_weights(component):
            onload_for_forward(component, onload)
        else:
            apply_group_offloading(component, offload_type="leaf_level", **common)


ONLOAD_HOOK = "fvg_onload_for_forward"


def onload_for_forward(module: torch.nn.Module, device: torch.device) -> None:
    """Keep `module` on the host and move it whole onto `device` for each forward, with its inputs, and back
    after (a diffusers hook).

    For a transformers text encoder with torchao weights under group offloading. Leaf-level group
    offloading of such an encoder failed on an H200 (torch 2.11, torchao 0.17, diffusers 0.42.1): moving
    the pinned copy of an `Int8Tensor` onto the GPU inside diffusers' stream transfer raised "Attempted to
    set the storage of a tensor on device cuda:0 to a storage on different device cpu". The encoder runs
    once per prompt and int8 halves its bytes: one transfer per prompt, and its weights (UMT5-XXL:
    6.3 GiB) on the device while it runs.

    The move runs outside inference mode: a pipeline calls the encoder under `torch.inference_mode()`, and
    there torchao's `Int8Tensor.to(device)` raises that same storage error (seen on an H100, and on the CPU
    with `.to("meta")`, torch 2.13 and torchao 0.18), while outside it the copy is plain. The inputs are
    moved too: a pipeline sends them to the encoder's device, which is the host until this hook runs."""
    from accelerate.utils import send_to_device
    from diffusers.hooks import HookRegistry, ModelHook

    class OnloadForForward(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            with torch.inference_mode(False):
                module.to(device)
            return send_to_device(args, device), send_to_device(kwargs, device)

        def post_forward(self, module, output):
            with torch.inference_mode(False):
                module.to("cpu")
            return output

    module.to("cpu")
    HookRegistry.check_if_exists_or_initialize(module).register_hook(OnloadForForward(), ONLOAD_HOOK)


@dataclass
class StageResidency:
    """Moves stage pipelines on and off the device so that only the running stage's models are there.

    `memory` is the mode for every stage. Under `auto`, `FactorizedPipeline` fills `modes` from
    `fvg memory`'s estimate (`fvg.memory.stage_modes`); a stage it could not estimate resolves when it
    first runs, from the exact bytes of its loaded (host) components and the free device memory. Offload
    modes keep weights on the host and move them per call (their hooks are installed once);
    `gpu`-mode stages are moved here. With `keep_resident` (every stage fits at once) nothing is
    evicted, so batches pay no transfers.
    """

    device: str
    memory: str = "auto"
    activation_bytes: dict[str, int] = field(default_factory=dict)  # stage -> estimate, for `auto`
    keep_resident: bool = False
    failing_modes: tuple[str, ...] = ()  # modes the weights' storage does not run under: `auto` skips them
    modes: dict[str, str] = field(default_factory=dict)  # stage -> resolved mode
    _placed: dict[str, object] = field(default_factory=dict)  # stage -> what sits on the device
    _hooked: set[int] = field(default_factory=set)  # ids of pipelines whose offload hooks are installed

    def __post_init__(self):
        validate_memory_mode(self.memory, self.device)
        if self.device == "cpu":
            self.keep_resident = True

    def mode_for(self, stage: str, pipe) -> str:
        if stage not in self.modes:
            mode = self.memory
            if not self.device.startswith("cuda"):
                mode = "gpu"  # the compute device holds everything; there is nowhere to offload to
            elif mode == "auto":
                free, _total = torch.cuda.mem_get_info(torch.device(self.device))
                sizes = {n: module_bytes(m) for n, m in pipeline_modules(pipe).items()} if hasattr(
                    pipe, "components") else {"model": module_bytes(pipe.loaded_model)}
                mode = choose_mode(sizes, free, self.activation_bytes.get(stage, 0), self.failing_modes)
                log.info("memory mode for the %s stage: %s (%.1f GiB of weights, %.1f GiB free)", stage, mode,
                         sum(sizes.values()) / 2**30, free / 2**30)
            self.modes[stage] = mode
        return self.modes[stage]

    def enter(self, stage: str, pipe) -> None:
        """Make `stage` the one on the device: evict the others' models, then place this one's."""
        if not self.keep_resident:
            for other in [s for s in self._placed if s != stage]:
                self.evict(other)
        if not hasattr(pipe, "components"):  # the planner LLM: weights must be on the host to be counted
            pipe.load()
        mode = self.mode_for(stage, pipe)
        if mode == "gpu" or (mode == "model-offload" and not hasattr(pipe, "components")):
            pipe.to(self.device)  # one model: offloading it whole is moving it in and out per stage
        elif id(pipe) not in self._hooked:
            if hasattr(pipe, "components"):
                apply_mode(pipe, mode, self.device)
            else:  # accelerate's hooks stream the LLM's layers in from the host
                from accelerate import cpu_offload

                cpu_offload(pipe.loaded_model, execution_device=torch.device(self.device))
            self._hooked.add(id(pipe))
        self._placed[stage] = pipe

    def evict(self, stage: str) -> None:
        """Take `stage`'s models off the device (kept on the host), then empty the device cache."""
        pipe = self._placed.pop(stage, None)
        if pipe is None or self.device == "cpu":
            return
        if self.modes.get(stage) == "gpu" or not hasattr(pipe, "components"):
            pipe.to("cpu")
        empty_device_cache(self.device)
        log.debug("released the %s stage's models from %s", stage, self.device)

    def placed(self) -> list[str]:
        return list(self._placed)
