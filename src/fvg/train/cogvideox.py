"""The anchor-LoRA objective for CogVideoX: v-prediction with the first temporal patch pinned clean at t = 0.

CogVideoX is a DDPM-style v-prediction model (`CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler`,
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

from dataclasses import dataclass

import torch

from fvg.animate.cogvideox import anchor_layout, frame_timesteps, temporal_rows


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
