"""The Wan family (Wan2.1 T2V, Wan2.2 TI2V and the two-expert A14B): `AnchoredWanPipeline`
(`fvg.animate.wan`), trained with flow matching (`fvg.families.flow_matching`).

Wan is fvg's first family: model ids and checkpoints that name no family are Wan, its latent
caches carry no family in their key, and its LoRAs are also written in the original
Wan / ComfyUI key layout.
"""

from __future__ import annotations

import logging
import re

import torch

from fvg.families.base import ModelFamily, TrainingObjective, load_components_onto, place_built
from fvg.families.flow_matching import SigmaSampler, draw_batch, masked_flow_loss
from fvg.io import FvgError, load_or_explain

log = logging.getLogger("fvg.train")


# -- loading ---------------------------------------------------------------------------------------

def load_wan_pipeline(model_id: str, dtype: torch.dtype, flow_shift: float | None = None, devices: dict | None = None,
                      storage=None):
    """An `AnchoredWanPipeline` from a diffusers Wan checkpoint (T2V, TI2V or the A14B pair).

    The VAE stays in float32 as Wan's reference code keeps it: bf16 decoding shows banding.
    Components named in `devices` are loaded straight onto their device (`load_components_onto`).
    `storage` (a `fvg.weight_storage.WeightStorage`) quantizes while loading or takes the
    transformer(s) from GGUF files; fp8 casting comes later, after the LoRA (`fvg.pipeline`).
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from fvg.animate.wan import AnchoredWanPipeline
    from fvg.weight_storage import from_pretrained_arguments, refuse_for_builtin

    if model_id == WanFamily.tiny_model_id:
        from fvg.tiny import tiny_wan_components

        if storage is not None:
            refuse_for_builtin(storage, model_id)

        pipe = AnchoredWanPipeline(**tiny_wan_components())  # built in float32
        place_built(pipe, dtype, devices)
    else:
        vae = load_or_explain(AutoencoderKLWan.from_pretrained, model_id, subfolder="vae", dtype=torch.float32)
        placed = load_components_onto(model_id, dtype, devices)
        storage_kwargs = from_pretrained_arguments(storage, model_id, dtype, WanTransformer3DModel, tuple(placed))
        pipe = load_or_explain(AnchoredWanPipeline.from_pretrained, model_id, vae=vae, dtype=dtype, **placed,
                               **storage_kwargs)
    if flow_shift is not None and "flow_shift" in pipe.scheduler.config:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=flow_shift)
    elif flow_shift is not None and "shift" in pipe.scheduler.config:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=flow_shift)
    return pipe


# -- LoRA key layout -------------------------------------------------------------------------------
# diffusers' loader reads both layouts; writing the original one (the inverse of diffusers'
# `_convert_non_diffusers_wan_lora_to_diffusers`) lets hobbyist tools use our LoRAs. Original-format
# files carry one `.alpha` scalar per layer, as those tools expect.

# diffusers module path inside a Wan block -> original Wan module path
_WAN_MODULES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_KEY = re.compile(r"^(?:transformer\.)?blocks\.(\d+)\.(.+)\.(lora_[AB])\.weight$")


def to_original_wan(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers/PEFT Wan LoRA keys -> `diffusion_model.blocks.N.self_attn.q.lora_A.weight` etc."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _KEY.match(key)
        if not match or match.group(2) not in _WAN_MODULES:
            raise ValueError(f"LoRA key {key} has no original Wan equivalent")
        block, module, part = match.groups()
        prefix = f"diffusion_model.blocks.{block}.{_WAN_MODULES[module]}"
        out[f"{prefix}.{part}.weight"] = value
        out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out


# -- GGUF single files ------------------------------------------------------------------------------
# Community quantizations of Wan (and ComfyUI) use the original key layout; diffusers converts it back
# on load (`convert_wan_transformer_to_diffusers`). Writing that layout lets `--video-transformer` read
# fvg's own files and lets hobbyist tools read a transformer fvg trained.

_GGUF_TOP = {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
             "condition_embedder.time_embedder.linear_2": "time_embedding.2",
             "condition_embedder.text_embedder.linear_1": "text_embedding.0",
             "condition_embedder.text_embedder.linear_2": "text_embedding.2",
             "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head",
             "scale_shift_table": "head.modulation", "patch_embedding": "patch_embedding"}
_GGUF_BLOCK = {**_WAN_MODULES, "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
               "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k", "norm2": "norm3",
               "scale_shift_table": "modulation"}
_GGUF_KEY = re.compile(r"^blocks\.(\d+)\.(.+?)(\.weight|\.bias|)$")


def original_wan_key(key: str) -> str:
    """A diffusers `WanTransformer3DModel` state-dict key in the original Wan layout."""
    block = _GGUF_KEY.match(key)
    if block:
        return f"blocks.{block.group(1)}.{_GGUF_BLOCK[block.group(2)]}{block.group(3)}"
    top = re.match(r"^(.+?)(\.weight|\.bias|)$", key)
    return _GGUF_TOP[top.group(1)] + top.group(2)


def save_wan_gguf(transformer, path) -> list[str]:
    """Write `transformer` as a GGUF single file: Q8_0 (blocks of 32 int8 with one fp16 scale, 8.5 bits a
    weight) for every 2-D weight whose rows split into blocks of 32, F32 for the rest, as the community's
    Q8_0 files are laid out. Written to a temporary file and renamed. Returns the quantized keys."""
    import os
    from pathlib import Path

    import gguf

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    q8 = gguf.GGMLQuantizationType.Q8_0
    quantized = []
    try:
        writer = gguf.GGUFWriter(str(partial), "wan")
        for key, value in transformer.state_dict().items():
            array = value.detach().float().cpu().numpy()
            if array.ndim == 2 and array.shape[-1] % 32 == 0:
                writer.add_tensor(original_wan_key(key), gguf.quants.quantize(array, q8), raw_dtype=q8)
                quantized.append(key)
            else:
                writer.add_tensor(original_wan_key(key), array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # only a failed write leaves one
    return quantized


# -- training --------------------------------------------------------------------------------------

def flow_samplers(pipe, cfg, experts: list[str]) -> tuple[list[SigmaSampler], float]:
    """One sigma sampler per trained expert, and the flow shift they use.

    Wan2.2-A14B: each expert's sampler is restricted to its side of `cfg.boundary_ratio`, which is
    also written into the pipeline's config so that validation switches experts there too."""
    sched = pipe.scheduler.config
    shift = float(cfg.flow_shift or sched.get("flow_shift") or sched.get("shift") or 1.0)
    base = SigmaSampler(shift, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std)
    if getattr(pipe, "transformer_2", None) is None:
        return [base], shift
    if pipe.config.boundary_ratio not in (None, cfg.boundary_ratio):
        log.warning("model's boundary_ratio %s overridden by the config's %s", pipe.config.boundary_ratio,
                    cfg.boundary_ratio)
    pipe.register_to_config(boundary_ratio=cfg.boundary_ratio)
    ranges = {"transformer": (cfg.boundary_ratio, 1.0), "transformer_2": (0.0, cfg.boundary_ratio)}
    return [base.restrict(*ranges[name]) for name in experts], shift


class WanFamily(ModelFamily):
    name = "wan"
    label = "Wan"
    keywords = ("wan",)
    tiny_model_id = "builtin:tiny-wan"
    lora_converters = {"wan": to_original_wan}
    still_start = True

    def compact_text_padding(self, pipe) -> list:
        """Attend WanPipeline's 512-token zero padding exactly through one kept row (fvg.families.text_padding)
        in every expert of `pipe` (any Wan pipeline: `mini`'s one-frame anchor model too), and run its text
        encoder over the real tokens only; `.remove()` on each undoes it. An attention backend without
        float masks skips the attention side, with the reason logged: sampling is then as before, only not
        faster."""
        from fvg.families.text_padding import CompactTextPadding, TrimmedTextEncoding

        encoder = [TrimmedTextEncoding(pipe.text_encoder)] if getattr(pipe, "text_encoder", None) is not None else []

        experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
        hooks = []
        try:
            for model in experts:
                hooks.append(CompactTextPadding(model))
        except FvgError as error:
            for hook in hooks:
                hook.remove()
            logging.getLogger("fvg").warning("text padding not compacted: %s", error)
            return encoder
        return hooks + encoder

    def load_pipeline(self, model_id: str, dtype, flow_shift: float | None = None, devices: dict | None = None,
                      storage=None):
        return load_wan_pipeline(model_id, dtype, flow_shift, devices, storage)

    def tiny_components(self, seed: int = 0) -> dict:
        from fvg.tiny import tiny_wan_components

        return tiny_wan_components(seed)

    def guidance_batching(self, pipe) -> tuple[object, dict]:
        """WanPipeline runs the two predictions apart; `AnchoredWanPipeline` (which without an anchor is WanPipeline)
        batches them on request. A plain WanPipeline, e.g. `mini`'s one-frame anchor model as loaded, is rebuilt
        over the same components."""
        from fvg.animate.wan import AnchoredWanPipeline

        if not isinstance(pipe, AnchoredWanPipeline):
            pipe = AnchoredWanPipeline(**pipe.components, boundary_ratio=pipe.config.boundary_ratio,
                                       expand_timesteps=pipe.config.expand_timesteps)
        return pipe, {"batch_guidance": True}

    def call_arguments(self, pipe, preset, anchored: bool) -> dict:
        kwargs = {}
        if preset.batch_guidance:  # the video pipeline is an AnchoredWanPipeline already (load_wan_pipeline)
            kwargs["batch_guidance"] = True
        if pipe.config.boundary_ratio is not None:  # Wan2.2-A14B's low-noise expert
            kwargs["guidance_scale_2"] = preset.guidance_scale_2
        if anchored and preset.still_strength is not None:  # the baselines have no anchor to hold still
            kwargs["still_strength"] = preset.still_strength
        return kwargs

    def check_context_parallel(self, pipe, height: int, width: int, num_frames: int, degree: int, mode: str) -> None:
        """diffusers' Wan plan splits the video tokens (not the text) into `degree` equal chunks; Ulysses also
        splits each expert's attention heads. fvg's `FrameWanTransformer3DModel` keeps the stock plan: its
        timestep entry splits a per-token [B, seq] or per-frame [B, F] timestep along dim 1 like the tokens
        (the pipeline goes per token where `degree` does not divide F, `AnchoredWanPipeline.frames_shard_evenly`)."""
        super().check_context_parallel(pipe, height, width, num_frames, degree, mode)
        for model in (m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None):
            p_t, p_h, p_w = model.config.patch_size
            frames = ((num_frames - 1) // pipe.vae_scale_factor_temporal + 1) // p_t
            pixels = pipe.vae_scale_factor_spatial
            per_frame = (height // pixels // p_h) * (width // pixels // p_w)
            if (frames * per_frame) % degree:
                raise FvgError(f"--context-parallel {degree}: {height}x{width}x{num_frames} gives {frames * per_frame} "
                               f"video tokens ({frames} latent frames x {per_frame}), which do not split into "
                               f"{degree} equal parts; choose a size or frame count whose token count {degree} divides")
            heads = model.config.num_attention_heads
            if mode == "ulysses" and heads % degree:
                raise FvgError(f"--context-parallel {degree}: Ulysses attention splits the {heads} attention heads "
                               f"of the video transformer and {degree} does not divide them; use a degree that "
                               f"divides {heads} or --context-parallel-mode ring")

    @torch.no_grad()
    def encode_clip(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latent [C, F, h, w]: `AnchoredWanPipeline.encode_video`, as the anchor is encoded."""
        return pipe.encode_video(pixels)[0].cpu()

    @torch.no_grad()
    def encode_captions(self, pipe, captions: list[str], max_sequence_length: int, device) -> list[torch.Tensor]:
        """WanPipeline zero-pads the embeddings to `max_sequence_length`; storing only the real tokens
        and padding again on load (`fvg.train.data.pad_text`) is exact and saves most of the space."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        embeds, _ = pipe.encode_prompt(prompt=captions, do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length, device=device)
        mask = pipe.tokenizer([prompt_clean(c) for c in captions], padding="max_length",
                              max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                              return_attention_mask=True, return_tensors="pt").attention_mask
        out = []
        for emb, n in zip(embeds.cpu(), mask.sum(dim=1).tolist()):
            n = n if not emb[n:].any() else emb.shape[0]  # keep everything should padding ever be non-zero
            out.append(emb[:n].clone())
        return out

    def cache_key_parts(self) -> dict:
        return {}  # Wan keys stay as they were before families existed, so existing Wan caches remain valid

    def training_objective(self, pipe, cfg, experts: list[str], device, autocast, weight_dtype) -> TrainingObjective:
        samplers, shift = flow_samplers(pipe, cfg, experts)
        patch = getattr(pipe, experts[0]).config.patch_size

        def step_loss(model, sampler, batch, generator):
            nb = draw_batch(batch["latent"].to(device), sampler, cfg.p_anchor, generator, patch)
            with autocast():
                pred = model(hidden_states=nb.model_input.to(weight_dtype), timestep=nb.timestep,
                             encoder_hidden_states=batch["text"].to(device, weight_dtype), return_dict=False)[0]
            return masked_flow_loss(pred, nb.target, nb.frame_weight)

        return TrainingObjective(samplers, step_loss, shift)


FAMILY = WanFamily()
