"""Stage 3 for the CogVideoX family: anchored sampling on diffusers' `CogVideoXPipeline`.

The method pins the video's first latent frame(s) to the anchor image's clean latent at
timestep 0 in every denoising step. CogVideoX needs two things diffusers does not have:

1. **Per-frame timesteps.** `CogVideoXTransformer3DModel` takes one timestep per sample and
   its adaptive norms (`CogVideoXLayerNormZero` in every block, `AdaLayerNorm` at the output)
   modulate every token alike. `use_frame_timesteps(transformer)` swaps the classes of four
   kinds of submodules for subclasses (no new weights, same state dict): the time projection,
   the blocks, their two norms and the output norm. They accept a 2-D timestep
   `[B, 1 + T]`: column 0 is the text tokens' timestep (the sample's t), columns 1..T the
   timesteps of the T temporal token rows of the video (one row = `patch_size_t` latent
   frames, `(H/p) * (W/p)` tokens). The modulation is computed once per row, never per token:
   the cost over a plain forward is a `[B, 1 + T, 6 * dim]` tensor per norm instead of
   `[B, 6 * dim]` (see BENCHMARKS.md). With a 1-D timestep every patched module runs its
   stock diffusers code: the output is bit-for-bit the stock transformer's.
2. **The temporal patch.** CogVideoX1.5 has `patch_size_t = 2`: one token row spans two latent
   frames, and `CogVideoXPipeline` pads an odd latent frame count with one extra latent frame
   at the *front*, which it drops after sampling (the reference code repeats the first latent
   frame in front; `CogVideoXImageToVideoPipeline` also puts the image latent in front).
   Decision: the anchor fills the whole first temporal patch, i.e. **latent frames 0 and 1 are
   both the anchor latent** (the padding frame and the video's first frame). After sampling the
   padding frame is dropped as usual, so the decoded video starts with exactly the anchor
   latent. This needs an odd number of latent frames (`num_frames = 8n + 1`, e.g. 81, 49,
   17, 9); otherwise the first patch would hold a frame that must be generated. Training
   (`fvg.families.cogvideox`) lays out clips the same way. CogVideoX 1.0 (`patch_size_t=None`)
   pins latent frame 0 only.

The anchor latent is the VAE posterior mode of the anchor encoded as a one-frame video,
times `vae.config.scaling_factor`: the space `CogVideoXPipeline.decode_latents` divides back.
(`invert_scale_latents`, set on CogVideoX1.5's VAE, concerns the image-conditioning channels of
the I2V model only; T2V latents are always scaled by `scaling_factor`.)

Without an anchor, `AnchoredCogVideoXPipeline.__call__` is `CogVideoXPipeline.__call__`, so the
`t2v`, `upsampled` and `factorized` modes share the seed's initial noise (paired comparisons).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline
from diffusers.models.embeddings import Timesteps
from diffusers.models.normalization import AdaLayerNorm, CogVideoXLayerNormZero
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from diffusers.pipelines.cogvideo.pipeline_output import CogVideoXPipelineOutput
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
from diffusers.utils.torch_utils import get_module_execution_device
from PIL import Image

# -- per-frame modulation: subclasses swapped into an existing transformer -------------------------


class FrameTimesteps(Timesteps):
    """`Timesteps` that also embeds a 2-D timestep [B, K] (-> [B, K, C]); 1-D input: stock."""

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.ndim != 2:
            return super().forward(timesteps)
        return super().forward(timesteps.flatten()).unflatten(0, timesteps.shape)


def _rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """[B, N, D] video tokens -> [B, T, N / T, D] (tokens are ordered frame row by frame row)."""
    return x.unflatten(1, (rows, x.shape[1] // rows))


class FrameCogVideoXLayerNormZero(CogVideoXLayerNormZero):
    """`CogVideoXLayerNormZero` with per-row modulation when `temb` is [B, 1 + T, D].

    Row 0 modulates the text tokens, rows 1..T the T temporal token rows of the video. Returns
    the video gate as [B, T, 1, dim] (applied by `FrameCogVideoXBlock`); with a 2-D `temb` it is
    the stock module.
    """

    def forward(self, hidden_states, encoder_hidden_states, temb):
        if temb.ndim != 3:
            return super().forward(hidden_states, encoder_hidden_states, temb)
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb)).chunk(6, dim=-1)
        rows = temb.shape[1] - 1
        hidden_states = _rows(self.norm(hidden_states), rows) * (1 + scale[:, 1:, None]) + shift[:, 1:, None]
        encoder_hidden_states = (self.norm(encoder_hidden_states) * (1 + enc_scale[:, 0])[:, None, :]
                                 + enc_shift[:, 0][:, None, :])
        return hidden_states.flatten(1, 2), encoder_hidden_states, gate[:, 1:, None], enc_gate[:, 0][:, None, :]


class FrameAdaLayerNorm(AdaLayerNorm):
    """The transformer's output `AdaLayerNorm` (video tokens only) with per-row modulation."""

    def forward(self, x, timestep=None, temb=None):
        if temb is None or temb.ndim != 3 or self.chunk_dim != 1:
            return super().forward(x, timestep, temb)
        shift, scale = self.linear(self.silu(temb[:, 1:])).chunk(2, dim=-1)
        rows = temb.shape[1] - 1
        return (_rows(self.norm(x), rows) * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


class FrameCogVideoXBlock(CogVideoXBlock):
    """`CogVideoXBlock` that applies per-row gates; with a 2-D `temb` it is the stock block."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        if temb.ndim != 3:
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)
        rows = temb.shape[1] - 1
        text_seq_length = encoder_hidden_states.size(1)
        attention_kwargs = attention_kwargs or {}

        norm_hidden_states, norm_encoder_hidden_states, gate_msa, enc_gate_msa = self.norm1(
            hidden_states, encoder_hidden_states, temb)
        attn_hidden_states, attn_encoder_hidden_states = self.attn1(
            hidden_states=norm_hidden_states, encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb, **attention_kwargs)
        hidden_states = hidden_states + (gate_msa * _rows(attn_hidden_states, rows)).flatten(1, 2)
        encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_encoder_hidden_states

        norm_hidden_states, norm_encoder_hidden_states, gate_ff, enc_gate_ff = self.norm2(
            hidden_states, encoder_hidden_states, temb)
        norm_hidden_states = torch.cat([norm_encoder_hidden_states, norm_hidden_states], dim=1)
        ff_output = self.ff(norm_hidden_states)
        hidden_states = hidden_states + (gate_ff * _rows(ff_output[:, text_seq_length:], rows)).flatten(1, 2)
        encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff_output[:, :text_seq_length]
        return hidden_states, encoder_hidden_states


_SWAPS = ((Timesteps, FrameTimesteps), (CogVideoXLayerNormZero, FrameCogVideoXLayerNormZero),
          (AdaLayerNorm, FrameAdaLayerNorm), (CogVideoXBlock, FrameCogVideoXBlock))


def _swap(module: torch.nn.Module) -> None:
    for base, frame in _SWAPS:
        if type(module) is base:
            module.__class__ = frame
            return
        if isinstance(module, frame):
            return
    raise TypeError(f"cannot add per-frame timesteps to {type(module).__name__}: not the diffusers class")


def register_block_for_caches() -> None:
    """Give `FrameCogVideoXBlock` the block metadata diffusers keeps for `CogVideoXBlock`.

    diffusers' FirstBlockCache, MagCache and layer skipping look every block's class up, by exact
    class, in `TransformerBlockRegistry` (which output is the hidden states, which the text
    states); an unregistered subclass makes `enable_cache` refuse the whole transformer. The
    subclass has the stock block's signature and outputs, so it gets a copy of the stock entry.

    Decision: register the subclass rather than swap classes only while anchored. The hooks
    bind each block's forward when the cache is enabled, so a class swapped per call would run
    under hooks bound to the other class (silently wrong), and `torch.compile` guards on the
    class; one class for the model's life keeps both working, and the 1-D path is the stock code.
    Idempotent.
    """
    from diffusers.hooks._helpers import TransformerBlockRegistry

    if FrameCogVideoXBlock in TransformerBlockRegistry._registry:
        return
    stock = TransformerBlockRegistry.get(CogVideoXBlock)
    TransformerBlockRegistry.register(FrameCogVideoXBlock, dataclasses.replace(
        stock, _cls=None, _cached_parameter_indices=None))


def use_frame_timesteps(transformer) -> None:
    """Let a `CogVideoXTransformer3DModel` take per-frame timesteps [B, 1 + T] (see the module docstring).

    Swaps the class of `time_proj`, every block, its `norm1`/`norm2` and `norm_out` in place; the
    weights, state dict keys, LoRA adapters and 1-D behaviour are unchanged, and diffusers' cache
    hooks accept the swapped blocks (`register_block_for_caches`). Idempotent.
    """
    register_block_for_caches()
    if getattr(transformer, "_fvg_frame_timesteps", False):
        return
    _swap(transformer.time_proj)
    for block in transformer.transformer_blocks:
        _swap(block)
        _swap(block.norm1)
        _swap(block.norm2)
    _swap(transformer.norm_out)
    transformer._fvg_frame_timesteps = True


def temporal_rows(num_latent_frames: int, patch_size_t: int | None) -> int:
    """Token rows along time for a (padded) latent frame count."""
    return num_latent_frames if patch_size_t is None else num_latent_frames // patch_size_t


def frame_timesteps(t: torch.Tensor, rows: int, anchored: torch.Tensor | bool) -> torch.Tensor:
    """[B, 1 + rows] timesteps: t for the text and every row, 0 for row 0 of anchored samples."""
    t = t.reshape(-1)
    out = t[:, None].expand(-1, rows + 1).clone()
    anchored = torch.as_tensor(anchored, device=t.device).expand(t.shape[0])
    out[:, 1] = torch.where(anchored, torch.zeros_like(t), t)
    return out


def anchor_layout(latent_frames: int, patch_size_t: int | None) -> tuple[int, int]:
    """(padding frames in front, pinned frames) for a video of `latent_frames` latent frames.

    The pinned frames are the first temporal patch: the padding frame(s) and latent frame 0.
    """
    if patch_size_t is None:
        return 0, 1
    pad = (-latent_frames) % patch_size_t
    if pad + 1 != patch_size_t:
        raise ValueError(
            f"with an anchor, the first temporal patch ({patch_size_t} latent frames) must be the anchor alone: "
            f"the video needs {patch_size_t}m+{patch_size_t - 1} latent frames, got {latent_frames} "
            f"(for CogVideoX1.5 num_frames must be 8n+1, e.g. 81, 49, 17, 9)")
    return pad, patch_size_t


# -- the pipeline ---------------------------------------------------------------------------------


class AnchoredCogVideoXPipeline(CogVideoXPipeline):
    """`CogVideoXPipeline` whose first temporal patch can be pinned to an anchor image at timestep 0."""

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                         scheduler=scheduler)
        if transformer is not None:
            use_frame_timesteps(transformer)

    @property
    def patch_size_t(self) -> int | None:
        return self.transformer.config.patch_size_t

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> scaled latents [B, f, C, h, w] (posterior mode)."""
        vae = self.vae
        device = get_module_execution_device(vae)
        latent = retrieve_latents(vae.encode(pixels.to(device, vae.dtype)), sample_mode="argmax")
        return latent.float().permute(0, 2, 1, 3, 4) * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """`CogVideoXPipeline.decode_latents` on latents cast to the VAE's device and dtype first.

        The VAE stays in float32 while the transformer samples in bf16/fp16 (`load_cogvideox_pipeline`):
        the stock method hands the sampler's dtype to the VAE's convolutions, which refuse it.
        """
        return super().decode_latents(latents.to(get_module_execution_device(self.vae), self.vae.dtype))

    @torch.no_grad()
    def encode_anchor(self, image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The anchor's clean latent [1, 1, C, h, w]: the image encoded as a one-frame video."""
        pixels = self.video_processor.preprocess(image, height=height, width=width).to(torch.float32)
        return self.encode_video(pixels.unsqueeze(2)).to(self._execution_device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        anchor: Image.Image | torch.Tensor | None = None,
        anchor_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 6,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 226,
    ):
        """`CogVideoXPipeline.__call__`; with `anchor` (an image) or `anchor_latents` (from `encode_anchor`)
        the first temporal patch is pinned to the anchor at timestep 0 throughout sampling."""
        stock = dict(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                     num_frames=num_frames, num_inference_steps=num_inference_steps, timesteps=timesteps,
                     guidance_scale=guidance_scale, use_dynamic_cfg=use_dynamic_cfg,
                     num_videos_per_prompt=num_videos_per_prompt, eta=eta, generator=generator, latents=latents,
                     prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                     output_type=output_type, return_dict=return_dict, attention_kwargs=attention_kwargs,
                     callback_on_step_end=callback_on_step_end,
                     callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                     max_sequence_length=max_sequence_length)
        if anchor is None and anchor_latents is None:
            return super().__call__(**stock)
        return self._anchored_call(anchor=anchor, anchor_latents=anchor_latents, **stock)

    def _anchored_call(self, prompt, negative_prompt, anchor, anchor_latents, height, width, num_frames,
                       num_inference_steps, timesteps, guidance_scale, use_dynamic_cfg, num_videos_per_prompt, eta,
                       generator, latents, prompt_embeds, negative_prompt_embeds, output_type, return_dict,
                       attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
                       max_sequence_length):
        # Mirrors CogVideoXPipeline.__call__ step by step; the differences are marked "anchor:".
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps

        if callback_on_step_end is not None and hasattr(callback_on_step_end, "tensor_inputs"):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if self.transformer.config.in_channels != self.transformer.config.out_channels:
            raise ValueError("anchoring needs a text-to-video transformer (the I2V models condition by channels)")
        height = height or self.transformer.config.sample_height * self.vae_scale_factor_spatial
        width = width or self.transformer.config.sample_width * self.vae_scale_factor_spatial
        num_frames = num_frames or self.transformer.config.sample_frames
        num_videos_per_prompt = 1
        self.check_inputs(prompt, height, width, negative_prompt, callback_on_step_end_tensor_inputs,
                          prompt_embeds, negative_prompt_embeds)
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1.0

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, do_classifier_free_guidance, num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length, device=device)
        if do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps)
        self._num_timesteps = len(timesteps)

        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        patch_size_t = self.patch_size_t
        additional_frames, pinned = anchor_layout(latent_frames, patch_size_t)  # anchor: layout check
        num_frames += additional_frames * self.vae_scale_factor_temporal
        latents = self.prepare_latents(batch_size * num_videos_per_prompt, self.transformer.config.in_channels,
                                       num_frames, height, width, prompt_embeds.dtype, device, generator, latents)
        # anchor: the clean anchor latent, repeated over the first temporal patch
        if anchor_latents is None:
            anchor_latents = self.encode_anchor(anchor, height, width)
        anchor_latents = anchor_latents.to(device, latents.dtype)
        if anchor_latents.ndim == 4:
            anchor_latents = anchor_latents.unsqueeze(1)
        if anchor_latents.shape[1] != 1 or anchor_latents.shape[2:] != latents.shape[2:]:
            raise ValueError(f"anchor latent {tuple(anchor_latents.shape)} does not fit latents "
                             f"{tuple(latents.shape)}: expected [B, 1, C, h, w]")
        pin = anchor_latents.expand(latents.shape[0], pinned, -1, -1, -1)
        rows = temporal_rows(latents.shape[1], patch_size_t)

        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        image_rotary_emb = (self._prepare_rotary_positional_embeddings(height, width, latents.size(1), device)
                            if self.transformer.config.use_rotary_positional_embeddings else None)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            old_pred_original_sample = None
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                latents = torch.cat([pin, latents[:, pinned:]], dim=1)  # anchor: clean at every step
                latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                # anchor: timestep 0 on the first token row, t on the text and the other rows
                timestep = frame_timesteps(t.expand(latent_model_input.shape[0]), rows, True)
                with self.transformer.cache_context("cond_uncond"):
                    noise_pred = self.transformer(
                        hidden_states=latent_model_input, encoder_hidden_states=prompt_embeds, timestep=timestep,
                        image_rotary_emb=image_rotary_emb, attention_kwargs=attention_kwargs, return_dict=False,
                    )[0]
                noise_pred = noise_pred.float()
                if use_dynamic_cfg:
                    self._guidance_scale = 1 + guidance_scale * (
                        (1 - math.cos(math.pi * ((num_inference_steps - t.item()) / num_inference_steps) ** 5.0)) / 2)
                if do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                if not isinstance(self.scheduler, CogVideoXDPMScheduler):
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                else:
                    latents, old_pred_original_sample = self.scheduler.step(
                        noise_pred, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, latents,
                        **extra_step_kwargs, return_dict=False)
                latents = latents.to(prompt_embeds.dtype)
                if callback_on_step_end is not None:
                    local_vars = {"latents": latents, "prompt_embeds": prompt_embeds,
                                  "negative_prompt_embeds": negative_prompt_embeds}
                    callback_kwargs = {k: local_vars[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        self._current_timestep = None
        latents = torch.cat([pin, latents[:, pinned:]], dim=1)  # anchor: exactly the clean latent
        if output_type != "latent":
            latents = latents[:, additional_frames:]  # drop the padding frame, as CogVideoXPipeline does
            video = self.decode_latents(latents)
            video = self.video_processor.postprocess_video(video=video, output_type=output_type)
        else:
            video = latents
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return CogVideoXPipelineOutput(frames=video)
