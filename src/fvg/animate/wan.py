"""Stage 3 for the Wan family: anchored sampling on diffusers' `WanPipeline`.

`AnchoredWanPipeline` is `WanPipeline` with one addition, the method's inference: given an
anchor, latent frame 0 is replaced by the anchor's clean, normalised VAE latent before
every transformer call, and its tokens get timestep 0 while every other token gets the
scheduler's t. Without an anchor it is exactly `WanPipeline` (plain text-to-video), so
the `t2v`, `upsampled` and `factorized` modes share one code path and, for one seed, one
initial noise: comparisons between modes are paired.

It equals diffusers' `WanImageToVideoPipeline(expand_timesteps=True)` (Wan2.2-TI2V-5B's
native mode, which diffusers also runs on 16-channel T2V transformers) for patch
(1, 2, 2), and unlike that pipeline it works for any spatial patch size and keeps the
two-expert switch of Wan2.2-A14B.

**Per-frame modulation.** Stock diffusers runs an anchored Wan forward with a per-token
timestep `[B, seq]`, so it builds a `[B, seq, 6, dim]` modulation tensor and, in every block,
fp32 copies of it (for Wan2.2-A14B at 720x1280x81: about 3x the plain forward's activations).
Yet only one timestep per latent frame exists. The pipeline therefore passes a per-frame
timestep `[B, F]` (F latent frames after the temporal patch) and runs the transformer(s) as
`FrameWanTransformer3DModel`, a subclass that changes only how modulation is broadcast: each
frame's `[6, dim]` shift/scale/gate row is applied to that frame's tokens through a
`[B, F, tokens, dim]` view, never materialised per token. Weights, state dict and outputs are
the stock model's (equal to the per-token path within fp32 rounding; bit for bit with a 1-D
timestep). Decisions:

- The swap happens once, when the pipeline is built, so that hooks added later (diffusers'
  caches and group offloading, accelerate's CPU offload) wrap the subclass's `forward`.
  Build the pipeline first, then enable caches or offloading.
- The block subclass is registered in diffusers' `TransformerBlockRegistry` with
  `WanTransformerBlock`'s metadata and listed in `_repeated_blocks`, so FirstBlockCache,
  MagCache, layer skipping and regional compilation accept it.
- Context parallelism (`fvg.parallel`) keeps diffusers' Wan `_cp_plan`: its `timestep` entry splits any
  2-D timestep along dim 1 into the same N chunks as the tokens, so a per-frame [B, F] timestep gives
  each rank the rows of exactly its frames when N divides F (`frames_shard_evenly`; otherwise the
  pipeline passes per-token timesteps), and the forward reads the local frame count from it.
- `modulation="token"` keeps diffusers' per-token path (it is what the bitwise-equality test
  against `WanImageToVideoPipeline(expand_timesteps=True)` checks).
"""

from __future__ import annotations

from typing import Any, Callable

import dataclasses

import torch
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
from diffusers.utils import apply_lora_scale
from diffusers.utils.torch_utils import get_module_execution_device
from PIL import Image

from fvg.parallel import context_parallel_degree

# -- per-frame modulation: subclasses swapped into an existing transformer -------------------------


def _per_frame(temb: torch.Tensor, hidden_states: torch.Tensor) -> bool:
    """A modulation with one row per latent frame (F rows for F x tokens_per_frame tokens)."""
    return temb.shape[1] != hidden_states.shape[1]


class FrameWanTransformerBlock(WanTransformerBlock):
    """`WanTransformerBlock` that also takes `temb` [B, F, 6, dim] (one row per latent frame).

    Stock code for [B, 6, dim] and per-token [B, seq, 6, dim]. Changes from diffusers' forward
    are marked `# fvg:`; the arithmetic (fp32 modulation, dtype casts) is the stock one, only
    broadcast over a [B, F, tokens, dim] view instead of a materialised per-token tensor.
    """

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        if temb.ndim != 4 or not _per_frame(temb, hidden_states):
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        frames = temb.shape[1]

        def by_frame(x: torch.Tensor) -> torch.Tensor:  # fvg: [B, seq, dim] -> [B, F, tokens, dim] view
            return x.unflatten(1, (frames, -1))

        # fvg: [B, F, 1, dim] rows, fp32 as in diffusers (the table is kept in fp32)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table.unsqueeze(0) + temb.float()
        ).unsqueeze(2).unbind(dim=3)

        # 1. Self-attention
        norm_hidden_states = (by_frame(self.norm1(hidden_states.float())) * (1 + scale_msa) + shift_msa
                              ).flatten(1, 2).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
        hidden_states = (by_frame(hidden_states.float()) + by_frame(attn_output) * gate_msa
                         ).flatten(1, 2).type_as(hidden_states)

        # 2. Cross-attention (no modulation)
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        hidden_states = hidden_states + attn_output

        # 3. Feed-forward
        norm_hidden_states = (by_frame(self.norm3(hidden_states.float())) * (1 + c_scale_msa) + c_shift_msa
                              ).flatten(1, 2).type_as(hidden_states)
        ff_output = self.ffn(norm_hidden_states)
        hidden_states = (by_frame(hidden_states.float()) + by_frame(ff_output.float()) * c_gate_msa
                         ).flatten(1, 2).type_as(hidden_states)
        return hidden_states


class FrameWanTransformer3DModel(WanTransformer3DModel):
    """`WanTransformer3DModel` whose `timestep` may also be [B, F]: one timestep per latent frame.

    Only the output modulation differs from diffusers' forward (marked `# fvg:`); the blocks are
    `FrameWanTransformerBlock`s. A [B, seq] timestep still runs diffusers' per-token path.
    """

    _repeated_blocks = ["WanTransformerBlock", "FrameWanTransformerBlock"]

    def to_json_string(self) -> str:
        # fvg: the subclass changes no weight or setting: saved configs name the stock class.
        return super().to_json_string().replace(f'"_class_name": "{type(self).__name__}"',
                                                f'"_class_name": "{WanTransformer3DModel.__name__}"')

    @apply_lora_scale("attention_kwargs")
    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict: bool = True, attention_kwargs: dict[str, Any] | None = None):
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        post_patch_num_frames, post_patch_height, post_patch_width = num_frames // p_t, height // p_h, width // p_w
        tokens = post_patch_num_frames * post_patch_height * post_patch_width
        # fvg: under context parallelism the plan's "" entry has already split a 2-D timestep along dim 1 into
        # `shards` chunks (hidden_states are split at blocks.0): this rank's chunk covers 1/shards of the frames
        # or tokens, the same stretch of the sequence as its hidden-state chunk.
        shards = context_parallel_degree(self) if timestep.ndim == 2 else 1
        if timestep.ndim == 2 and timestep.shape[1] * shards not in (post_patch_num_frames, tokens):
            raise ValueError(f"timestep {tuple(timestep.shape)} is neither per frame ({post_patch_num_frames}) "
                             f"nor per token ({tokens})" + (f" over {shards} ranks" if shards > 1 else ""))
        if timestep.ndim != 2 or timestep.shape[1] * shards == tokens:
            # the undecorated stock forward: this one's decorator already applied the LoRA scale
            return WanTransformer3DModel.forward.__wrapped__(
                self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                return_dict=return_dict, attention_kwargs=attention_kwargs)

        rotary_emb = self.rope(hidden_states)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        # fvg: [B, F] -> temb [B, F, dim], timestep_proj [B, F, 6, dim]: one row per latent frame
        temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, encoder_hidden_states_image,
            timestep_seq_len=timestep.shape[1])
        timestep_proj = timestep_proj.unflatten(2, (6, -1))
        if encoder_hidden_states_image is not None:
            encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

        if torch.is_grad_enabled() and self.gradient_checkpointing:
            for block in self.blocks:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
        else:
            for block in self.blocks:
                hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)

        # fvg: output modulation per frame: shift, scale [B, F, 1, dim] over a [B, F, tokens, dim] view
        shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
        shift, scale = shift.to(hidden_states.device), scale.to(hidden_states.device)
        normed = self.norm_out(hidden_states.float()).unflatten(1, (timestep.shape[1], -1))  # fvg: this rank's frames
        hidden_states = (normed * (1 + scale) + shift).flatten(1, 2).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)

        hidden_states = hidden_states.reshape(
            batch_size, post_patch_num_frames, post_patch_height, post_patch_width, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        output = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


# Caches and layer skipping look blocks up by class: the subclass returns what the stock block does.
TransformerBlockRegistry.register(
    FrameWanTransformerBlock, dataclasses.replace(TransformerBlockRegistry.get(WanTransformerBlock), _cls=None,
                                             _cached_parameter_indices=None))


def use_frame_modulation(transformer: WanTransformer3DModel | None) -> None:
    """Swap `transformer` (and its blocks) to the per-frame-capable subclasses, in place.

    No new weights, the same state dict; safe to call twice. Call it before adding hooks. Other
    classes (a user's own subclass) are left alone: the pipeline then uses per-token timesteps."""
    if type(transformer) is not WanTransformer3DModel:
        return
    transformer.__class__ = FrameWanTransformer3DModel
    for block in transformer.blocks:
        if type(block) is WanTransformerBlock:
            block.__class__ = FrameWanTransformerBlock


class AnchoredWanPipeline(WanPipeline):
    """`WanPipeline` whose first latent frame can be pinned to an anchor image at timestep 0."""

    def __init__(self, tokenizer, text_encoder, vae, scheduler, transformer=None, transformer_2=None,
                 boundary_ratio: float | None = None, expand_timesteps: bool = False):
        super().__init__(tokenizer, text_encoder, vae, scheduler, transformer, transformer_2, boundary_ratio,
                         expand_timesteps)
        use_frame_modulation(self.transformer)
        use_frame_modulation(self.transformer_2)

    @property
    def supports_frame_modulation(self) -> bool:
        models = [m for m in (self.transformer, self.transformer_2) if m is not None]
        return all(isinstance(m, FrameWanTransformer3DModel) for m in models)

    def _latent_stats(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        z_dim = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(device, dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(device, dtype)
        return mean, inv_std

    @torch.no_grad()
    def encode_anchor(self, image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The anchor's clean latent [1, C, 1, h, w], normalised as the transformer sees latents.

        Encoded as a one-frame video (Wan's causal VAE maps the first frame to latent frame 0
        on its own) and taken at the posterior mode, as `WanImageToVideoPipeline` does.
        """
        return self.encode_still(image, height, width, num_frames=1)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised fp32 latents [B, C, f, h, w] of pixels [B, 3, F, H, W] in [-1, 1], at the posterior
        mode (deterministic: training caches it). The anchor is this for a one-frame video."""
        vae_device = get_module_execution_device(self.vae)
        latent = retrieve_latents(self.vae.encode(pixels.to(vae_device, self.vae.dtype)), sample_mode="argmax")
        mean, inv_std = self._latent_stats(latent.device, torch.float32)
        return (latent.float() - mean) * inv_std

    @torch.no_grad()
    def encode_still(self, image: Image.Image | torch.Tensor, height: int, width: int, num_frames: int) -> torch.Tensor:
        """The latent [1, C, f, h, w] of `image` held still for `num_frames` frames (its frame 0 is the
        anchor's latent: the causal VAE encodes the first frame alone)."""
        pixels = self.video_processor.preprocess(image, height=height, width=width)
        return self.encode_video(pixels.unsqueeze(2).expand(-1, -1, num_frames, -1, -1)).to(self._execution_device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "np"):
        latents = latents.to(get_module_execution_device(self.vae), dtype=self.vae.dtype)
        mean, inv_std = self._latent_stats(latents.device, latents.dtype)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    def frame_timesteps(self, t: torch.Tensor, latents: torch.Tensor, anchored: bool) -> torch.Tensor:
        """Per-frame timesteps [B, F]: t on every latent frame, 0 on frame 0 when anchored."""
        p_t = self.transformer_config.patch_size[0]
        frame_mask = torch.ones(latents.shape[2] // p_t, device=latents.device, dtype=torch.float32)
        if anchored:
            frame_mask[0] = 0.0
        return (frame_mask * t).unsqueeze(0).expand(latents.shape[0], -1)

    def token_timesteps(self, t: torch.Tensor, latents: torch.Tensor, anchored: bool) -> torch.Tensor:
        """Per-token timesteps [B, seq] (diffusers' layout): each frame's timestep on all its tokens."""
        _, p_h, p_w = self.transformer_config.patch_size
        tokens_per_frame = (latents.shape[3] // p_h) * (latents.shape[4] // p_w)
        return self.frame_timesteps(t, latents, anchored).repeat_interleave(tokens_per_frame, dim=1)

    def frames_shard_evenly(self, latents: torch.Tensor) -> bool:
        """Whether per-frame timesteps split like the hidden states under context parallelism: the plan cuts the
        sequence into N equal chunks, which are whole latent frames only when N divides the frame count. Where
        it does not, the timesteps go per token (split token by token like the hidden states; each rank's
        [B, seq/N, 6, dim] modulation is then 1/N of the one-process tensor). Always true without parallelism."""
        models = [m for m in (self.transformer, self.transformer_2) if m is not None]
        shards = max(context_parallel_degree(m) for m in models)
        return (latents.shape[2] // self.transformer_config.patch_size[0]) % shards == 0

    @property
    def transformer_config(self):
        return (self.transformer or self.transformer_2).config

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        anchor: Image.Image | torch.Tensor | None = None,
        anchor_latents: torch.Tensor | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        modulation: str = "frame",
        still_strength: float | None = None,
        batch_guidance: bool = False,
    ):
        """Generate a video; with `anchor` (an image) or `anchor_latents` (from `encode_anchor`),
        latent frame 0 is pinned to it at timestep 0 throughout sampling. `modulation`: "frame"
        (one timestep row per latent frame, the default) or "token" (diffusers' per-token layout).

        `still_strength` (an option, not the paper's method, which starts every frame from noise): start from
        the anchor held still for `num_frames` frames, VAE-encoded and noised to where the last
        `int(num_inference_steps * still_strength)` steps begin, as diffusers' video-to-video `strength`.
        The later latent frames are chunk codes of the VAE, so a still scene's are right from the first step;
        the model only has to move what the prompt moves. Needs `anchor` (the image: the still is encoded
        from pixels).

        `batch_guidance`: run the conditional and unconditional predictions of classifier-free guidance as one
        transformer call on a batch of two (context "cond_uncond", as diffusers' CogVideoX pipeline does)
        instead of WanPipeline's two calls. The same prediction to float rounding. WanPipeline calls them apart
        so that peak activations stay those of one batch, which is what large models need; a small model on a
        CPU is bound by per-call overhead instead (`mini`: 1.4x per step for the one-frame anchor model, 1.1x
        for the video model; BENCHMARKS.md). Off by default: the stock path, bitwise."""
        # Mirrors WanPipeline.__call__ step by step; the differences are marked "anchor:".
        if modulation not in ("frame", "token"):
            raise ValueError(f"modulation must be 'frame' or 'token', got {modulation!r}")
        self.check_inputs(prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs, guidance_scale_2)
        if num_frames % self.vae_scale_factor_temporal != 1:
            raise ValueError(f"num_frames must be {self.vae_scale_factor_temporal}n+1, got {num_frames}")
        patch = self.transformer_config.patch_size
        multiple = self.vae_scale_factor_spatial * patch[1]
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")
        anchored = anchor is not None or anchor_latents is not None  # anchor: the method's input
        if batch_guidance and prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"batch_guidance stacks the prompt and negative prompt embeddings: their shapes "
                             f"{tuple(prompt_embeds.shape)} and {tuple(negative_prompt_embeds.shape)} differ")
        if still_strength is not None:
            if anchor is None:
                raise ValueError("still_strength needs `anchor`, the image: the still video is encoded from pixels")
            if not 0.0 < still_strength <= 1.0:
                raise ValueError(f"still_strength must be in (0, 1], got {still_strength}")
            if int(num_inference_steps * still_strength) == 0:
                raise ValueError(f"still_strength {still_strength} leaves no step of {num_inference_steps} to run")
        if anchored and patch[0] != 1:
            raise ValueError("anchoring needs a temporal patch size of 1 (one latent frame per token row)")
        if self.config.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale

        self._guidance_scale = guidance_scale
        self._guidance_scale_2 = guidance_scale_2
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        transformer_dtype = (self.transformer or self.transformer_2).dtype
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # still start: only the last int(steps * still_strength) steps run, as diffusers' video-to-video
        first_step = 0 if still_strength is None else num_inference_steps - int(num_inference_steps * still_strength)
        timesteps = self.scheduler.timesteps[first_step:]
        self.scheduler.set_begin_index(first_step)
        latents = self.prepare_latents(
            batch_size * num_videos_per_prompt, self.transformer_config.in_channels, height, width, num_frames,
            torch.float32, device, generator, latents,
        )
        if anchored:  # anchor: the clean, normalised anchor latent, one per video
            if anchor_latents is None:
                anchor_latents = self.encode_anchor(anchor, height, width)
            anchor_latents = anchor_latents.to(device, torch.float32).expand(latents.shape[0], -1, -1, -1, -1)
            if anchor_latents.shape[2:] != (1, *latents.shape[3:]) or anchor_latents.shape[1] != latents.shape[1]:
                raise ValueError(f"anchor latent {tuple(anchor_latents.shape)} does not fit latents {tuple(latents.shape)}")
        if still_strength is not None:  # still start: the noise drawn above is the noise added to the still
            still = self.encode_still(anchor, height, width, num_frames).expand(latents.shape[0], -1, -1, -1, -1)
            latents = self.scheduler.add_noise(still.to(latents.device), latents, timesteps[:1])
        # 2-D timesteps only where needed; per frame where the model allows it (no [B, seq, 6, dim] tensor).
        two_d = anchored or self.config.expand_timesteps
        per_frame = modulation == "frame" and self.supports_frame_modulation
        per_frame = per_frame and self.frames_shard_evenly(latents)
        expand = self.frame_timesteps if per_frame else self.token_timesteps

        self._num_timesteps = len(timesteps)
        boundary = None
        if self.config.boundary_ratio is not None:
            boundary = self.config.boundary_ratio * self.scheduler.config.num_train_timesteps

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                if boundary is None or t >= boundary:
                    model, scale = self.transformer, guidance_scale
                else:
                    model, scale = self.transformer_2, guidance_scale_2
                if anchored:
                    # anchor: frame 0 is the clean anchor at every step, never noise (the method)
                    latents = torch.cat([anchor_latents, latents[:, :, 1:]], dim=2)
                model_input = latents.to(transformer_dtype)
                # anchor: timestep 0 on latent frame 0, t on the other frames (per frame or per token)
                timestep = expand(t, latents, anchored) if two_d else t.expand(latents.shape[0])
                cache_kwargs = {"step_index": i, "sigma": float(self.scheduler.sigmas[first_step + i]),
                                "num_inference_steps": self._num_timesteps}
                if batch_guidance and self.do_classifier_free_guidance:
                    with model.cache_context("cond_uncond", **cache_kwargs):
                        both = model(hidden_states=torch.cat([model_input, model_input]),
                                     timestep=torch.cat([timestep, timestep]),
                                     encoder_hidden_states=torch.cat([prompt_embeds, negative_prompt_embeds]),
                                     attention_kwargs=attention_kwargs, return_dict=False)[0]
                    noise_pred, noise_uncond = both.chunk(2)
                    noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
                else:
                    with model.cache_context("cond", **cache_kwargs):
                        noise_pred = model(hidden_states=model_input, timestep=timestep,
                                           encoder_hidden_states=prompt_embeds, attention_kwargs=attention_kwargs,
                                           return_dict=False)[0]
                if self.do_classifier_free_guidance and not batch_guidance:
                    with model.cache_context("uncond", **cache_kwargs):
                        noise_uncond = model(hidden_states=model_input, timestep=timestep,
                                             encoder_hidden_states=negative_prompt_embeds,
                                             attention_kwargs=attention_kwargs, return_dict=False)[0]
                    noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local_vars = {"latents": latents, "prompt_embeds": prompt_embeds,
                                  "negative_prompt_embeds": negative_prompt_embeds}
                    callback_kwargs = {k: local_vars[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()

        self._current_timestep = None
        if anchored:  # anchor: frame 0 is exactly the clean latent in the output
            latents = torch.cat([anchor_latents, latents[:, :, 1:]], dim=2)
        video = latents if output_type == "latent" else self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)
