"""The CogVideoX family (CogVideoX1.5, docs/cogvideox.md): `AnchoredCogVideoXPipeline`
(`fvg.animate.cogvideox`), trained with v-prediction with the first temporal patch pinned clean at t = 0.

Its LoRAs have one key format: CogVideoX's loader (`CogVideoXLoraLoaderMixin`) reads diffusers
keys and diffusers has no converter for another layout.

The objective. CogVideoX is a DDPM-style v-prediction model (`CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler`,
zero terminal SNR, `snr_shift_scale`), so the objective follows its scheduler exactly as diffusers'
`examples/cogvideo/train_cogvideox_lora.py` does:

    t ~ U{0, ..., 999},  x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps     (scheduler.add_noise)
    v = sqrt(a_t) eps - sqrt(1 - a_t) x0                             (scheduler.get_velocity)
    loss = || v_pred - v ||^2

(That script compares the implied x0 = sqrt(a) x_t - sqrt(1 - a) v_pred with x0 under the weight
1 / (1 - a_t): algebraically the same loss.)

Layout along time (the same as `AnchoredCogVideoXPipeline`, see `fvg.animate.cogvideox`): a clip of
F latent frames (F odd for CogVideoX1.5) gets `patch_size_t - F % patch_size_t` padding frames in front.

* anchored sample: `[anchor, anchor, z1, ..., z_{F-1}]`: the whole first temporal patch is the clean
  anchor latent (the clip's first frame encoded alone as at inference), its token row gets timestep 0
  (per-row timesteps `[B, 1 + T]`, text at t), and its frames get no loss;
* plain sample: `[z0, z0, z1, ..., z_{F-1}]` noised at t everywhere: the padding repeats the first latent
  frame as CogVideoX1.5 was trained; the padding frame, dropped at inference, gets no loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fvg.animate.cogvideox import anchor_layout, frame_timesteps, temporal_rows
from fvg.families.base import ModelFamily, TrainingObjective, load_components_onto, place_built
from fvg.io import FvgError, load_or_explain

log = logging.getLogger("fvg.train")


@dataclass(frozen=True)
class TimestepSampler:
    """Uniform integer training timesteps, as the scheduler's DDPM training grid."""

    num_train_timesteps: int = 1000

    def mass(self) -> float:
        return 1.0

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)


@dataclass
class VBatch:
    model_input: torch.Tensor  # [B, F', C, H, W] (F' = padded frame count)
    timestep: torch.Tensor  # [B] or [B, 1 + T] (text, then one per temporal token row)
    target: torch.Tensor  # v
    frame_weight: torch.Tensor  # [B, F']: 0 on pinned / padding frames
    anchored: torch.Tensor  # [B] bool
    t: torch.Tensor  # [B] long


def lay_out(latents: torch.Tensor, anchors: torch.Tensor, anchored: torch.Tensor,
            patch_size_t: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Clean padded latents [B, F', C, H, W], frame weights [B, F'] and the number of pinned frames.

    `latents` [B, F, C, H, W] are the clip's scaled latents, `anchors` [B, C, H, W] its first frame
    encoded alone."""
    batch, frames = latents.shape[:2]
    pad, pinned = anchor_layout(frames, patch_size_t) if anchored.any() else ((-frames) % (patch_size_t or 1), 0)
    plain = torch.cat([latents[:, :1].expand(-1, pad, -1, -1, -1), latents], dim=1)
    weight = torch.ones(batch, frames + pad, device=latents.device)
    weight[:, :pad] = 0.0
    if pinned:
        pin = anchors[:, None].expand(-1, pinned, -1, -1, -1).to(latents)
        with_anchor = torch.cat([pin, latents[:, pinned - pad:]], dim=1)
        sel = anchored.view(-1, 1, 1, 1, 1).to(latents.device)
        plain = torch.where(sel, with_anchor, plain)
        weight[anchored.to(latents.device), :pinned] = 0.0
    return plain, weight, pinned


def noise_batch(scheduler, x0: torch.Tensor, anchors: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                anchored: torch.Tensor, patch_size_t: int | None) -> VBatch:
    """v-prediction inputs and target; `noise` has the padded shape of the layout."""
    x0, weight, pinned = lay_out(x0.float(), anchors.float(), anchored, patch_size_t)
    t = t.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    target = scheduler.get_velocity(x0, noise, t)
    if pinned:
        sel = anchored.view(-1, 1, 1, 1, 1).to(x0.device)
        x_t = torch.cat([torch.where(sel, x0[:, :pinned], x_t[:, :pinned]), x_t[:, pinned:]], dim=1)
        timestep = frame_timesteps(t, temporal_rows(x0.shape[1], patch_size_t), anchored.to(x0.device))
    else:
        timestep = t
    return VBatch(x_t, timestep, target, weight, anchored.to(x0.device), t)


def padded_frames(frames: int, patch_size_t: int | None) -> int:
    return frames + (-frames) % (patch_size_t or 1)


def draw_batch(scheduler, latents: torch.Tensor, anchors: torch.Tensor, sampler: TimestepSampler, p_anchor: float,
               generator: torch.Generator, patch_size_t: int | None) -> VBatch:
    """Draw t, the anchoring coin and noise for a batch (on the CPU generator, then moved)."""
    batch, frames = latents.shape[:2]
    t = sampler.sample(batch, generator)
    anchored = torch.rand(batch, generator=generator) < p_anchor
    shape = (batch, padded_frames(frames, patch_size_t), *latents.shape[2:])
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(latents.device)
    return noise_batch(scheduler, latents, anchors, t, noise, anchored, patch_size_t)


def masked_v_loss(pred: torch.Tensor, target: torch.Tensor, frame_weight: torch.Tensor) -> torch.Tensor:
    """Mean squared v error per sample over its weighted frames ([B, F, C, H, W] layout), then the batch mean.
    Pinned and padding frames have weight 0: the prediction there gets exactly zero gradient."""
    err = (pred.float() - target.float()).pow(2).mean(dim=(2, 3, 4))  # [B, F]
    return ((err * frame_weight).sum(dim=1) / frame_weight.sum(dim=1)).mean()


# -- loading ---------------------------------------------------------------------------------------

def load_cogvideox_pipeline(model_id: str, dtype: torch.dtype, vae_tiling: bool | None = None,
                            devices: dict | None = None):
    """An `AnchoredCogVideoXPipeline` from a diffusers CogVideoX text-to-video checkpoint (e.g. THUDM/CogVideoX1.5-5B).

    The VAE stays in float32, as for Wan. Real checkpoints get VAE tiling by default (diffusers'
    CogVideoX1.5 recipe: a 81 x 768 x 1360 decode does not fit otherwise); `vae_tiling=False` turns it off.
    Components named in `devices` are loaded straight onto their device (`load_components_onto`).
    """
    from diffusers import AutoencoderKLCogVideoX

    from fvg.animate.cogvideox import AnchoredCogVideoXPipeline

    if model_id == CogVideoXFamily.tiny_model_id:
        from fvg.tiny import tiny_cogvideox_components

        pipe = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())  # built in float32
        place_built(pipe, dtype, devices)
        return pipe
    vae = load_or_explain(AutoencoderKLCogVideoX.from_pretrained, model_id, subfolder="vae", dtype=torch.float32)
    placed = load_components_onto(model_id, dtype, devices)
    pipe = load_or_explain(AnchoredCogVideoXPipeline.from_pretrained, model_id, vae=vae, dtype=dtype, **placed)
    if vae_tiling is not False:
        pipe.vae.enable_tiling()
    return pipe


# -- the family ------------------------------------------------------------------------------------

class CogVideoXFamily(ModelFamily):
    name = "cogvideox"
    label = "CogVideoX"
    keywords = ("cogvideox",)
    tiny_model_id = "builtin:tiny-cogvideox"
    lora_method = ("anchor LoRA: clean first temporal patch (anchor latent twice) at timestep 0, "
                   "v-prediction (Factorized Video Generation)")

    def load_pipeline(self, model_id: str, dtype, flow_shift: float | None = None, devices: dict | None = None):
        return load_cogvideox_pipeline(model_id, dtype, devices=devices)  # v-prediction: no flow shift

    def tiny_components(self, seed: int = 0) -> dict:
        from fvg.tiny import tiny_cogvideox_components

        return tiny_cogvideox_components(seed)

    def call_arguments(self, pipe, preset, anchored: bool) -> dict:
        if anchored and pipe.patch_size_t == 2 and (preset.num_frames - 1) % 8:
            raise FvgError(f"anchored CogVideoX1.5 needs 8n+1 frames (e.g. 81, 49, 17), got {preset.num_frames}: "
                           "the anchor fills the first temporal patch (docs/cogvideox.md)")
        return {"max_sequence_length": pipe.transformer.config.max_text_seq_length}

    def encode_clip(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents [F, C, h, w], as `AnchoredCogVideoXPipeline.encode_video`."""
        return pipe.encode_video(pixels)[0].cpu()

    def encode_clip_anchor(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """The first frame encoded alone, the anchor as inference encodes it."""
        return pipe.encode_video(pixels[:, :, :1])[0, 0].cpu()

    @torch.no_grad()
    def encode_captions(self, pipe, captions: list[str], max_sequence_length: int, device) -> list[torch.Tensor]:
        """CogVideoX attends to all `max_sequence_length` T5 outputs (its padding tokens are not zero):
        they are stored whole."""
        embeds, _ = pipe.encode_prompt(prompt=captions, do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length, device=device)
        return [emb.clone() for emb in embeds.cpu()]

    def adapt_train_config(self, cfg, pipe) -> dict:
        changes = {}
        text_len = min(cfg.max_sequence_length, pipe.transformer.config.max_text_seq_length)
        if text_len != cfg.max_sequence_length:
            changes["max_sequence_length"] = text_len  # CogVideoX was trained on 226 T5 tokens
        targets = [t.replace("ffn.net.", "ff.net.") if t.startswith("ffn.net.") else t for t in cfg.target_modules]
        if targets != list(cfg.target_modules):
            changes["target_modules"] = targets  # CogVideoX's feed-forward is `ff`, Wan's `ffn`
        return changes

    def training_objective(self, pipe, cfg, experts: list[str], device, autocast, weight_dtype) -> TrainingObjective:
        scheduler = pipe.scheduler
        if scheduler.config.get("prediction_type") != "v_prediction":
            raise FvgError(f"CogVideoX training expects a v-prediction scheduler, got "
                           f"{scheduler.config.get('prediction_type')}")
        patch_t = pipe.transformer.config.patch_size_t
        latent_frames = (cfg.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        if cfg.p_anchor > 0:
            try:
                anchor_layout(latent_frames, patch_t)
            except ValueError as exc:
                raise FvgError(f"num_frames = {cfg.num_frames}: {exc}") from None
        rotary = None
        if pipe.transformer.config.use_rotary_positional_embeddings:
            rotary = pipe._prepare_rotary_positional_embeddings(
                cfg.height, cfg.width, padded_frames(latent_frames, patch_t), device)

        def step_loss(model, sampler, batch, generator):
            nb = draw_batch(scheduler, batch["latent"].to(device), batch["anchor"].to(device), sampler,
                            cfg.p_anchor, generator, patch_t)
            with autocast():
                pred = model(hidden_states=nb.model_input.to(weight_dtype), timestep=nb.timestep,
                             encoder_hidden_states=batch["text"].to(device, weight_dtype),
                             image_rotary_emb=rotary, return_dict=False)[0]
            return masked_v_loss(pred, nb.target, nb.frame_weight)

        return TrainingObjective([TimestepSampler(scheduler.config.num_train_timesteps)], step_loss, None)

    def lora_info(self, info: dict) -> dict:
        return {**super().lora_info(info), "family": self.name}


FAMILY = CogVideoXFamily()
