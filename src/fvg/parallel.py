"""Context parallelism: one video's denoising split over N processes (diffusers' Ulysses / ring attention).

    torchrun --nproc-per-node 2 -m fvg generate "a leaf turns red" --context-parallel 2

Every process holds the whole video transformer and the whole latent; inside each transformer call
diffusers' context-parallel hooks (`ModelMixin.enable_parallelism` with the model's `_cp_plan`) split
the token sequence into N equal chunks, attention exchanges them (Ulysses: an all-to-all of heads,
so N must divide the heads; ring: an all-gather of keys and values, which needs an attention backend
that returns the log-sum-exp), and the output projection gathers the sequence back on every rank.
So every rank steps the scheduler on the same full latent; the text encoder, VAE and planner run
replicated, the anchor model split where diffusers can split it (`split_anchor_model`). Decisions:

- torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) is the only launcher: N must equal
  WORLD_SIZE; each rank takes `cuda:LOCAL_RANK` (nccl) or the CPU (gloo).
- Rank 0 is the main process: only it writes outputs and run records; what the ranks must agree on
  and could compute differently (the video prompt an LLM planned, the anchor a text-to-image model
  rendered, a batch's list of prompts still to do) is taken from rank 0 (`broadcast_from_main`).
- diffusers 0.42's `_resolve_parallel_config` computes the rank's device as
  `rank % torch.accelerator.device_count()`, which divides by zero on a machine without an
  accelerator; that device is recorded and never used by context parallelism, so on such a machine
  `enable_context_parallel` lets diffusers see one device while it sets up (CPU/gloo runs and tests).
  The device mesh is built by fvg on the process group's device type (nccl: cuda, gloo: cpu), not on
  the machine's accelerator type that diffusers would take.
- On the CPU only Ulysses runs: ring attention asks the backend for the log-sum-exp, which diffusers'
  `native` backend refuses ("Native attention does not support return_lse=True"), and the backends
  that give it (`flash`, `_native_flash`, `_native_cudnn`, `sage`) are CUDA kernels.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import torch

from fvg.io import FvgError

CP_MODES = ("ulysses", "ring")
# Backends diffusers lists as context-parallel capable whose ring step cannot run (no log-sum-exp).
NO_LSE_BACKENDS = ("native",)


@dataclass(frozen=True)
class TorchrunWorld:
    rank: int
    local_rank: int
    world_size: int


def torchrun_world() -> TorchrunWorld | None:
    """This process's place in a torchrun launch, from the environment torchrun sets; None outside one."""
    try:
        return TorchrunWorld(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    except (KeyError, ValueError):
        return None


def check_context_parallel_options(degree: int, mode: str = "ulysses") -> None:
    """One-line FvgError for a degree or mode that does not exist (`fvg memory` plans with these too)."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise FvgError(f"--context-parallel must be a whole number >= 1, got {degree}")
    if mode not in CP_MODES:
        raise FvgError(f"unknown context-parallel mode '{mode}': use one of {', '.join(CP_MODES)}")


def validate_context_parallel(degree: int, mode: str = "ulysses") -> None:
    """One-line FvgError for a degree or mode that cannot run in this process (before any model loads)."""
    check_context_parallel_options(degree, mode)
    if degree == 1:
        return
    world = torchrun_world()
    if world is None:
        raise FvgError(f"--context-parallel {degree} runs under torchrun, one process per part: torchrun "
                       f"--nproc-per-node {degree} -m fvg COMMAND ... --context-parallel {degree} (COMMAND: this one, "
                       "e.g. generate, animate, eval generate)")
    if world.world_size != degree:
        raise FvgError(f"--context-parallel {degree} does not match torchrun's {world.world_size} process(es) "
                       f"(WORLD_SIZE): launch with --nproc-per-node {degree}")


def init_context_parallel(degree: int, device: str) -> str:
    """Join torchrun's process group (nccl for CUDA, gloo otherwise); return this rank's device
    (`cuda:LOCAL_RANK` for a CUDA device, else `device`)."""
    world = torchrun_world()
    if not device.startswith(("cuda", "cpu")):
        raise FvgError(f"--context-parallel runs on CUDA GPUs (nccl) or the CPU (gloo), not on '{device}'")
    if device.startswith("cuda"):
        count = torch.cuda.device_count()
        if world.local_rank >= count:
            raise FvgError(f"--context-parallel {degree}: local rank {world.local_rank} has no GPU "
                           f"({count} visible on this machine)")
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(torch.device(device))
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if world.rank != 0:  # rank 0 says what every rank would say
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    return device


class _OneDimensionalTimestep(logging.Filter):
    """The plan's timestep entry splits 2-D (per-token or per-frame) timesteps; a plain video's 1-D timestep
    needs no split, and diffusers' notice that it skipped one is not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "but got 1 dimensions, split will not be applied" not in record.getMessage()


_ONE_DIMENSIONAL_TIMESTEP = _OneDimensionalTimestep()  # one instance: adding it again is a no-op


def leave_process_group() -> None:
    """Wait for every rank, free what still holds the process group, and leave it (nothing outside one).

    Why: diffusers keeps the group in the split model (its parallel config, on the model and on every
    attention processor). A gloo group that outlives `destroy_process_group` is torn down at interpreter
    exit instead, where a rank whose peer has already exited can die with "terminate called without an
    active exception" (CI saw it; about one 2-process launch in 15 here). So callers drop their split
    models first; the collection here frees the ones that only a reference cycle still keeps. Call it on
    success only: a rank that failed exits without waiting, and torchrun stops the others."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True outside a process group and on rank 0: the process that writes outputs."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def broadcast_from_main(obj):
    """`obj` as rank 0 has it, on every rank (unchanged outside a process group). Our own objects between
    our own processes (a pickle never read from a file)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def context_parallel_degree(model) -> int:
    """How many ranks split `model`'s sequence (1 without context parallelism)."""
    config = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    return 1 if config is None else config.ring_degree * config.ulysses_degree


@contextmanager
def _one_device_if_none():
    """diffusers derives an (unused) device index as rank % accelerator count: let it count one on a CPU-only host."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def enable_context_parallel(model, degree: int, mode: str, plan: dict, anything: bool = False) -> None:
    """diffusers' `enable_parallelism` on `model` with `plan`: Ulysses or ring attention over `degree` ranks.
    The attention backend must be set before (diffusers checks it supports context parallelism). `anything`:
    diffusers' "Ulysses/ring anything" (chunks of any length, `tensor_split`) instead of equal chunks."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    shape = (1, degree) if mode == "ulysses" else (degree, 1)
    # the mesh on the run's device type, read from the group's backend (the model may still be on the host, and
    # diffusers would take the machine's accelerator type, also for a CPU run on a machine with GPUs)
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("ring", "ulysses"))
    config = ContextParallelConfig(ring_degree=shape[0], ulysses_degree=shape[1], mesh=mesh,
                                   ulysses_anything=anything and mode == "ulysses",
                                   ring_anything=anything and mode == "ring")
    logging.getLogger("diffusers.hooks.context_parallel").addFilter(_ONE_DIMENSIONAL_TIMESTEP)
    # diffusers' gather calls torch's older name once per transformer call, on every rank
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor` is deprecated", category=FutureWarning)
    try:
        with _one_device_if_none():
            model.enable_parallelism(config=config, cp_plan=plan)
    except ValueError as exc:  # e.g. an attention backend without context-parallel support
        raise FvgError(f"--context-parallel {degree}: {' '.join(str(exc).split())}") from None


def split_anchor_model(pipe, degree: int) -> bool:
    """Context parallelism for a text-to-image anchor pipeline's transformer where diffusers has a plan for its
    class (Qwen-Image, FLUX, the one-frame Wan of MiniWorld) and every attention goes through diffusers'
    dispatcher. Ulysses "anything": a caption's token count varies (and the negative prompt's differs again),
    so equal chunks cannot be promised, and the anchor model keeps its default attention backend, which has no
    ring step. False where it cannot split (SDXL's UNet, a processor of its own): the anchor then runs whole
    on every rank."""
    model = getattr(pipe, "transformer", None)
    plan = getattr(model, "_cp_plan", None)
    processors = [m.processor for m in model.modules() if getattr(m, "processor", None) is not None] if plan else []
    if not processors or not all(hasattr(p, "_parallel_config") for p in processors):
        return False
    enable_context_parallel(model, degree, "ulysses", plan, anything=True)
    return True


__all__ = ["CP_MODES", "TorchrunWorld", "broadcast_from_main", "check_context_parallel_options",
           "context_parallel_degree", "enable_context_parallel", "init_context_parallel", "is_main_process",
           "leave_process_group", "split_anchor_model", "torchrun_world", "validate_context_parallel"]
