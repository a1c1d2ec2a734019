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
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
from diffusers.utils.torch_utils import get_module_execution_device
from PIL import Image


class AnchoredWanPipeline(WanPipeline):
    """`WanPipeline` whose first latent frame can be pinned to an anchor image at timestep 0."""

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
        device = self._execution_device
        pixels = self.video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
        vae_device = get_module_execution_device(self.vae)
        pixels = pixels.unsqueeze(2).to(vae_device, self.vae.dtype)
        latent = retrieve_latents(self.vae.encode(pixels), sample_mode="argmax").to(device, torch.float32)
        mean, inv_std = self._latent_stats(device, torch.float32)
        return (latent - mean) * inv_std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "np"):
        latents = latents.to(get_module_execution_device(self.vae), dtype=self.vae.dtype)
        mean, inv_std = self._latent_stats(latents.device, latents.dtype)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    def token_timesteps(self, t: torch.Tensor, latents: torch.Tensor, anchored: bool) -> torch.Tensor:
        """Per-token timesteps [B, seq]: t everywhere, 0 on latent frame 0's tokens when anchored."""
        p_t, p_h, p_w = self.transformer_config.patch_size
        _, _, frames, height, width = latents.shape
        frame_mask = torch.ones(frames // p_t, device=latents.device, dtype=torch.float32)
        if anchored:
            frame_mask[0] = 0.0
        token_mask = frame_mask.repeat_interleave((height // p_h) * (width // p_w))
        return (token_mask * t).unsqueeze(0).expand(latents.shape[0], -1)

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
    ):
        """Generate a video; with `anchor` (an image) or `anchor_latents` (from `encode_anchor`),
        latent frame 0 is pinned to it at timestep 0 throughout sampling."""
        self.check_inputs(prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs, guidance_scale_2)
        if num_frames % self.vae_scale_factor_temporal != 1:
            raise ValueError(f"num_frames must be {self.vae_scale_factor_temporal}n+1, got {num_frames}")
        patch = self.transformer_config.patch_size
        multiple = self.vae_scale_factor_spatial * patch[1]
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")
        anchored = anchor is not None or anchor_latents is not None
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
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(
            batch_size * num_videos_per_prompt, self.transformer_config.in_channels, height, width, num_frames,
            torch.float32, device, generator, latents,
        )
        if anchored:
            if anchor_latents is None:
                anchor_latents = self.encode_anchor(anchor, height, width)
            anchor_latents = anchor_latents.to(device, torch.float32).expand(latents.shape[0], -1, -1, -1, -1)
            if anchor_latents.shape[2:] != (1, *latents.shape[3:]) or anchor_latents.shape[1] != latents.shape[1]:
                raise ValueError(f"anchor latent {tuple(anchor_latents.shape)} does not fit latents {tuple(latents.shape)}")
        # Per-token timesteps only where needed: a 2-D timestep costs a [B, seq, 6, dim] modulation tensor.
        per_token = anchored or self.config.expand_timesteps

        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
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
                    # The method: frame 0 is the clean anchor at every step, never noise.
                    latents = torch.cat([anchor_latents, latents[:, :, 1:]], dim=2)
                model_input = latents.to(transformer_dtype)
                timestep = self.token_timesteps(t, latents, anchored) if per_token else t.expand(latents.shape[0])
                cache_kwargs = {"step_index": i, "sigma": float(self.scheduler.sigmas[i]),
                                "num_inference_steps": self._num_timesteps}
                with model.cache_context("cond", **cache_kwargs):
                    noise_pred = model(hidden_states=model_input, timestep=timestep,
                                       encoder_hidden_states=prompt_embeds, attention_kwargs=attention_kwargs,
                                       return_dict=False)[0]
                if self.do_classifier_free_guidance:
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
        if anchored:
            latents = torch.cat([anchor_latents, latents[:, :, 1:]], dim=2)
        video = latents if output_type == "latent" else self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)
