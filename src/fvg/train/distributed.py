"""What the training loop needs to run the same under DDP, FSDP2 and DeepSpeed.

* `ExpertPair`: Wan2.2-A14B's two experts as one module, for FSDP2 (below).
* `resolve_deepspeed_config`: the batch-size numbers DeepSpeed needs before `prepare`.
* `lora_state_dict`: a trained expert's LoRA, gathering only the LoRA tensors.
* `keep_on_host`: the frozen expert stays on the host and streams block by block when validation runs it.

**FSDP2 and two experts.** accelerate prepares exactly one model per `prepare` call under FSDP2
("Only one model is supported when using FSDP2"): it swaps the optimiser's parameters for the
sharded ones of that one model. `expert = "both"` trains two. We wrap both experts in `ExpertPair`
and let FSDP2 prepare that once, rather than training the experts one after the other, because

* the loop stays the one that DDP runs: each optimiser step picks an expert by its share of the
  sigma distribution (`Trainer._pick_expert`), one optimiser and one LR schedule cover both, and a
  checkpoint holds both: sequential training would change what `expert = "both"` learns and need a
  second resume position;
* each expert is its own FSDP unit (its class is added to the wrap policy, `resolve_wrap_classes`),
  so only the expert that runs is gathered, and validation can call `pipe.transformer` and
  `pipe.transformer_2` directly, as the pipeline does.

The other expert's LoRA gets no gradient on a step that does not run it; AdamW skips parameters
without a gradient, exactly as with two separately prepared DDP models. DDP keeps two models:
under DDP a container would hold parameters unused on every step, which DDP rejects unless it
searches for them on every step (`find_unused_parameters`).
"""

from __future__ import annotations

import logging
import os

import torch

from fvg.io import FvgError

log = logging.getLogger("fvg.train")


# -- FSDP2: both experts in one prepared model -------------------------------------------------------

class ExpertPair(torch.nn.Module):
    """Two experts behind one forward: `pair(expert_index, **transformer_kwargs)`.

    The index goes through the container's own forward so that FSDP2's root hooks run before the
    expert's (lazy initialisation, stream waits); the experts keep their own names under `experts.N.`."""

    def __init__(self, experts: list[torch.nn.Module]):
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)

    def forward(self, expert: int, *args, **kwargs):
        return self.experts[expert](*args, **kwargs)


class ExpertCall:
    """One expert of a prepared `ExpertPair`, callable as the expert itself (what a family's `step_loss` calls)."""

    def __init__(self, pair, index: int):
        self.pair, self.index = pair, index

    def __call__(self, *args, **kwargs):
        return self.pair(self.index, *args, **kwargs)


def needs_expert_pair(distributed_type, fsdp_version: int | None, num_experts: int) -> bool:
    """Whether the trained experts must be prepared as one `ExpertPair`: two experts under FSDP2."""
    from accelerate.utils import DistributedType

    return num_experts > 1 and distributed_type == DistributedType.FSDP and fsdp_version == 2


def resolve_wrap_classes(fsdp_plugin, experts: list[torch.nn.Module], separately: bool) -> list[str]:
    """Set the FSDP plugin's transformer wrap list to the class names present in `experts`; returns it.

    accelerate matches wrap classes by exact class name, but fvg's anchored pipelines run subclasses of
    diffusers' blocks (`FrameWanTransformerBlock` for `WanTransformerBlock`, `fvg.animate.wan`): a
    configured name therefore stands for every module with a class of that name in its MRO. With
    `separately` (two experts in one `ExpertPair`) the experts' own classes are added, so each expert
    becomes its own FSDP unit (bottom-up: blocks, then each expert, then the pair)."""
    wanted = list(fsdp_plugin.transformer_cls_names_to_wrap or [])
    if not wanted:  # accelerate would fall back to the model's _no_split_modules
        wanted = [n for e in experts for n in (getattr(e, "_no_split_modules", None) or [])]
    names: list[str] = []
    found: set[str] = set()
    for module in (m for e in experts for m in e.modules()):
        lineage = {c.__name__ for c in type(module).__mro__} & set(wanted)
        if lineage:
            found |= lineage
            if type(module).__name__ not in names:
                names.append(type(module).__name__)
    missing = [w for w in wanted if w not in found]
    if missing:
        raise FvgError(f"FSDP wrap class(es) {', '.join(missing)} not found in the model "
                       f"({type(experts[0]).__name__}): fix fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    if separately:
        names += [n for n in dict.fromkeys(type(e).__name__ for e in experts) if n not in names]
    fsdp_plugin.transformer_cls_names_to_wrap = names
    return names


# -- DeepSpeed: the numbers it needs without a DataLoader ----------------------------------------------

def resolve_deepspeed_config(plugin, cfg, num_processes: int) -> dict:
    """Fill DeepSpeed's batch settings from the training config, in the plugin's config dict (returned).

    accelerate fills `train_micro_batch_size_per_gpu = "auto"` from a DataLoader passed to `prepare`;
    fvg's loop builds its own per-epoch loaders (seeded order, resumable position) and passes none, so
    accelerate would refuse the config. The values come from the TOML: `batch_size` per process,
    `gradient_accumulation_steps` and `max_grad_norm` (DeepSpeed accumulates and clips itself, so they
    must equal what the loop does). A concrete value that disagrees is a one-line error, not a silent
    change of the run."""
    config = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": float(cfg.max_grad_norm),
        "train_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * num_processes,
    }
    names = {"train_micro_batch_size_per_gpu": "batch_size", "gradient_accumulation_steps":
             "gradient_accumulation_steps", "gradient_clipping": "max_grad_norm",
             "train_batch_size": "batch_size x gradient_accumulation_steps x processes"}
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif float(current) != float(value):
            raise FvgError(f"the DeepSpeed config sets {key} = {current}, but the training config gives {value} "
                           f"({names[key]}): remove it from the DeepSpeed config or make them equal")
    plugin.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    plugin.gradient_clipping = float(cfg.max_grad_norm)
    return config


def deepspeed_plugin_from_env(cfg):
    """accelerate's DeepSpeed plugin as `accelerate launch` configured it (environment), with the batch
    settings filled in; None when the run is not a DeepSpeed run."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    resolve_deepspeed_config(plugin, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return plugin


# -- LoRA extraction without a full gather ---------------------------------------------------------------

def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whole on this process: an FSDP2 shard (DTensor) is all-gathered, alone."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def lora_state_dict(model: torch.nn.Module, zero3: bool = False) -> dict[str, torch.Tensor]:
    """The PEFT LoRA state dict of an (unwrapped) expert, gathering the LoRA tensors only.

    `model.state_dict()` costs nothing under every strategy (DDP: the weights themselves; FSDP2: the
    local shards as DTensors); peft keeps its LoRA entries and each is then gathered alone, so the
    14B frozen weights are never materialised (accelerate's `get_state_dict` would gather all of them
    on every checkpoint). A collective call under FSDP2 and ZeRO-3: every process runs it, in the
    same key order. Under ZeRO-3 the LoRA parameters are gathered with DeepSpeed's `GatheredParameters`."""
    from peft import get_peft_model_state_dict

    if zero3:
        import deepspeed

        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(lora, modifier_rank=None):
            return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {k: _full(v).detach() for k, v in get_peft_model_state_dict(model).items()}


# -- the frozen expert during validation ---------------------------------------------------------------------

def keep_on_host(model: torch.nn.Module, device: torch.device) -> bool:
    """Let a frozen expert that lives on the host run on `device` without moving there: diffusers' group
    offloading streams one transformer block at a time (prefetched on a side stream on CUDA) and puts it
    back after. Validation of a one-expert run then costs a block of device memory instead of a 14B
    expert (26.6 GiB in bf16) next to the trained one. Nothing to do when the device is the host.
    Returns whether hooks were installed."""
    device = torch.device(device)
    if device.type == "cpu":
        return False
    _stream_blocks(model, device)
    return True


def _stream_blocks(model: torch.nn.Module, device: torch.device) -> None:
    model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=device.type == "cuda")
