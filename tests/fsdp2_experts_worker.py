"""Worker of `test_train_distributed.py::test_fsdp2_trains_two_experts_as_one_model` (run by torchrun, 2 gloo processes).

accelerate turns FSDP on only for GPU process groups, so this drives accelerate's own FSDP2
preparation (`fsdp2_prepare_model`, the function `Accelerator.prepare` calls) directly, on CPU:
the two tiny Wan experts with LoRA as one `ExpertPair`, each expert its own FSDP unit. It trains a
few steps alternating experts, runs an expert directly as validation does, extracts the LoRA with
`lora_state_dict` while counting what is gathered, and compares it with a full-state-dict gather.
Rank 0 writes the findings to the JSON file named by argv[1].
"""

import json
import sys
import types

import torch
import torch.distributed as dist


def main(out_path: str) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from peft import LoraConfig, get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from fvg.animate.wan import AnchoredWanPipeline
    from fvg.tiny import tiny_wan_components
    from fvg.train.distributed import ExpertCall, ExpertPair, lora_state_dict, resolve_wrap_classes

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    components = tiny_wan_components()
    torch.manual_seed(5)
    low = type(components["transformer"])(**components["transformer"].config)
    pipe = AnchoredWanPipeline(**components, transformer_2=low, boundary_ratio=0.875)  # fvg's anchored block classes
    experts = [pipe.transformer, pipe.transformer_2]
    torch.manual_seed(0)
    for expert in experts:
        expert.requires_grad_(False)
        expert.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, target_modules=["to_q", "to_v"]))
        for name, p in expert.named_parameters():
            if "lora_B" in name:  # non-zero B, so that the LoRA changes outputs and gradients reach A
                torch.nn.init.normal_(p, std=0.02)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap="WanTransformerBlock")
    wrapped = resolve_wrap_classes(plugin, experts, separately=True)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                        is_main_process=rank == 0, device=torch.device("cpu"))
    pair = fsdp2_prepare_model(accelerator, ExpertPair(experts))
    lora = [p for p in pair.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=1e-2)

    g = torch.Generator().manual_seed(100 + rank)
    grads_seen = []
    for step in range(4):
        e = step % 2
        x, text = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 16, 32, generator=g)
        out = ExpertCall(pair, e)(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                                  return_dict=False)[0]
        out.pow(2).mean().backward()
        grads_seen.append([sum(p.grad is not None for p in ex.parameters() if p.requires_grad) for ex in experts])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with torch.no_grad():  # validation calls the experts directly, as the pipeline does
        direct = low(hidden_states=torch.ones(1, 16, 3, 4, 4), timestep=torch.tensor([300.0]),
                     encoder_hidden_states=torch.ones(1, 16, 32), return_dict=False)[0]

    gathered = []
    original_full_tensor = DTensor.full_tensor

    def counting_full_tensor(self, *args, **kwargs):
        gathered.append(tuple(self.shape))
        return original_full_tensor(self, *args, **kwargs)

    DTensor.full_tensor = counting_full_tensor
    try:
        extracted = [lora_state_dict(expert) for expert in experts]
    finally:
        DTensor.full_tensor = original_full_tensor
    full = get_model_state_dict(pair, options=StateDictOptions(full_state_dict=True))
    reference = [get_peft_model_state_dict(expert, state_dict={k.removeprefix(f"experts.{i}."): v
                                                               for k, v in full.items()
                                                               if k.startswith(f"experts.{i}.")})
                 for i, expert in enumerate(experts)]
    lora_shapes = sorted(tuple(v.shape) for state in extracted for v in state.values())
    same = all(ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
               for ref, got in zip(reference, extracted))
    digest = float(sum(v.double().sum() for state in extracted for v in state.values()))
    digests = [None, None]
    dist.all_gather_object(digests, digest)
    findings = {
        "wrapped_classes": wrapped,
        "experts_are_fsdp_units": [isinstance(e, FSDPModule) for e in experts],
        "blocks_are_fsdp_units": all(isinstance(b, FSDPModule) for e in experts for b in e.blocks),
        "grads_per_step": grads_seen,
        "direct_call_finite": bool(torch.isfinite(direct).all()),
        "lora_tensors": sum(len(s) for s in extracted),
        "gathered_shapes": sorted(gathered),
        "lora_shapes": lora_shapes,
        "equal_to_full_gather": same,
        "digests": digests,
    }
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(findings, f)
    # Both ranks done with gloo before either tears it down: without this, a rank that exits while the
    # other's last collective is in flight aborted now and then ("terminate called without an active
    # exception", exit -6) after every finding was already written.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
