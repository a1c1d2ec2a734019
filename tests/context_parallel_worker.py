"""Worker of `test_parallel.py` (run by torchrun, 2 gloo processes on the CPU).

Each rank first samples every case in one process (no parallelism), then turns context parallelism
on through fvg (`SpeedOptions(context_parallel=2)`, once with regional compilation, and the family's plan,
as the pipeline does) and
samples the same cases again, recording what the last block of each expert received (the local
hidden-state rows and modulation rows) to show how the timesteps were split. Rank 0 writes the
findings as JSON (`argv[1]`): latent differences, shapes, and whether both ranks got the same latents.
"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from PIL import Image

from fvg.animate.wan import AnchoredWanPipeline
from fvg.families import get_family
from fvg.parallel import leave_process_group
import fvg.speed
from fvg.speed import SpeedOptions, apply_speed, transformers, validate_speed
from fvg.tiny import tiny_wan_components

# name -> (pipeline, anchored, modulation, frames): 9 frames are 3 latent frames (2 does not divide them:
# per-token timesteps), 13 frames are 4 (per-frame timesteps, 2 frames a rank)
CASES = {
    "plain": ("one", False, "frame", 13),
    "anchored-frame": ("one", True, "frame", 13),
    "anchored-frame-uneven": ("one", True, "frame", 9),
    "anchored-token": ("one", True, "token", 13),
    "two-experts-anchored-frame": ("two-experts", True, "frame", 13),
    "compiled-anchored-frame": ("compiled", True, "frame", 13),
}
PIPES = {"one": SpeedOptions(context_parallel=2), "two-experts": SpeedOptions(context_parallel=2),
         "compiled": SpeedOptions(context_parallel=2, compile=True)}


def build(two_experts: bool) -> AnchoredWanPipeline:
    components = tiny_wan_components()
    if not two_experts:
        return AnchoredWanPipeline(**components)
    torch.manual_seed(5)
    low_noise = WanTransformer3DModel(**components["transformer"].config).eval()
    return AnchoredWanPipeline(**components, transformer_2=low_noise, boundary_ratio=0.875)


def sample(pipe, anchored: bool, modulation: str, frames: int) -> torch.Tensor:
    anchor = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    return pipe(prompt="a red circle moves right", anchor=anchor if anchored else None, modulation=modulation,
                num_frames=frames, height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(3), output_type="latent").frames


def record_last_block(pipe) -> tuple[list, list]:
    """(rows seen, handles): per call of each expert's last block (its input is this rank's chunk: the plan
    splits at the first block), [hidden-state rows, modulation rows or None for a 1-D timestep]."""
    seen, handles = [], []
    for model in transformers(pipe).values():
        def hook(_module, args, _seen=seen):
            hidden, temb = args[0], args[2]
            _seen.append([hidden.shape[1], temb.shape[1] if temb.ndim == 4 else None])
        handles.append(model.blocks[-1].register_forward_pre_hook(hook))
    return seen, handles


def animate_with_rank_anchors(rank: int) -> dict:
    """`FactorizedPipeline.animate` with `context_parallel=2`, each rank handed its own anchor: every rank must
    animate rank 0's (it is broadcast), and the video must be the one-process video of rank 0's anchor."""
    from fvg.pipeline import FactorizedPipeline

    anchors = [Image.fromarray((np.random.RandomState(r).rand(32, 32, 3) * 255).astype(np.uint8)) for r in (0, 1)]
    call = dict(prompt="a red circle moves right", seed=0, steps=3)
    one = FactorizedPipeline.from_preset("tiny", device="cpu", num_frames=13)
    whole = one.animate(anchor=anchors[0], **call)
    pipe = FactorizedPipeline.from_preset("tiny", device="cpu", num_frames=13, context_parallel=2)
    split = torch.from_numpy(pipe.animate(anchor=anchors[rank], **call))
    gathered = [torch.empty_like(split) for _ in range(2)]
    dist.all_gather(gathered, split)
    # the anchor model (tiny Qwen-Image) split too: Ulysses "anything", captions of any token count
    anchor_diffs = []
    for caption in ("a red circle", "a small blue square above a large red circle"):
        split_anchor = np.asarray(pipe.make_anchor(caption, seed=0, num_candidates=2).image, dtype=int)
        anchor_diffs.append(int(np.abs(split_anchor - np.asarray(one.make_anchor(caption, seed=0, num_candidates=2)
                                                                  .image, dtype=int)).max()))
    return {"ranks_equal": bool(torch.equal(gathered[0], gathered[1])),
            "max_uint8_diff": int((split.int() - torch.from_numpy(whole).int()).abs().max()),
            "recorded": pipe.speed.settings().get("context_parallel"), "anchor_split": pipe._anchor_split,
            "anchor_uint8_diffs": anchor_diffs}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    family = get_family("wan")
    fvg.speed.COMPILE_BACKEND = "eager"  # the graph as inductor would get it, traced in seconds
    findings = {}
    pipes = {name: build(name == "two-experts") for name in PIPES}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    single = {name: sample(pipes[pipe], anchored, modulation, frames)
              for name, (pipe, anchored, modulation, frames) in CASES.items()}
    for name, pipe in pipes.items():
        apply_speed(pipe, validate_speed(PIPES[name]), family)
    for name, (pipe, anchored, modulation, frames) in CASES.items():
        seen, handles = record_last_block(pipes[pipe])
        split = sample(pipes[pipe], anchored, modulation, frames)
        for handle in handles:
            handle.remove()
        gathered = [torch.empty_like(split) for _ in range(2)]
        dist.all_gather(gathered, split.contiguous())
        findings[name] = {
            "max_abs_diff": (split - single[name]).abs().max().item(),
            "scale": single[name].abs().max().item(),
            "ranks_equal": bool(torch.equal(gathered[0], gathered[1])),
            "local_rows": sorted({tuple(s) for s in seen}),
            "latent_frames": single[name].shape[2],
        }
    findings["api-animate"] = animate_with_rank_anchors(rank)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(findings, f)
    del pipes  # the split models hold the process group (see leave_process_group)
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
