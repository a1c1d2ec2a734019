"""The anchor-LoRA objective of flow-matching families (Wan): flow matching with latent frame 0 pinned clean at timestep 0.

Flow matching as diffusers samples Wan (FlowMatch / UniPC with flow sigmas):
    x_t = (1 - sigma) * x0 + sigma * noise,  target = noise - x0,  timestep = 1000 * sigma.
Sigma is drawn like the sampler's grid: u ~ U(0, 1) (or logit-normal, opt-in), then Wan's
shift sigma = shift * u / (1 + (shift - 1) * u). Uniform u makes the training timesteps follow
the same shifted density the scheduler visits at inference, which is what the LoRA must serve.

An anchored sample (probability p_anchor) gets its clean latent frame 0 in place of the noisy
one, timestep 0 on frame 0's tokens ([B, seq] per-token timestep, as the transformer takes
for Wan2.2-TI2V) and no loss on frame 0: the model only learns to generate the rest of the
clip *from* that frame. If any sample in a batch is anchored the whole batch uses a per-token
timestep (plain samples carry t on every token, the same modulation as a 1-D timestep);
otherwise the batch uses the ordinary 1-D timestep.

Wan2.2-A14B has two experts: the high-noise `transformer` serves t >= boundary * 1000 and the
low-noise `transformer_2` the rest, so each expert's LoRA trains only on its own sigma range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def shift_sigma(u: torch.Tensor | float, shift: float):
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma: float, shift: float) -> float:
    return sigma / (shift - (shift - 1) * sigma)


@dataclass(frozen=True)
class SigmaSampler:
    """Draws shifted sigmas, optionally restricted to an expert's range [lo, hi) of sigma."""

    shift: float
    sampling: str = "uniform"  # or "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    lo: float = 0.0
    hi: float = 1.0

    def _cdf(self, u: float) -> float:
        """CDF of the unshifted u; sampling by inverse CDF restricted to [cdf(lo), cdf(hi)) gives the
        exact conditional distribution on an expert's range, with no rejection loop."""
        if self.sampling == "uniform" or u <= 0.0 or u >= 1.0:
            return min(max(u, 0.0), 1.0)
        z = (math.log(u / (1 - u)) - self.logit_mean) / self.logit_std
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    def _quantile(self, v: torch.Tensor) -> torch.Tensor:
        if self.sampling == "uniform":
            return v
        v = v.clamp(1e-7, 1 - 1e-7)
        return torch.sigmoid(self.logit_mean + self.logit_std * math.sqrt(2) * torch.erfinv(2 * v - 1))

    def mass(self) -> float:
        """Probability of the range [lo, hi) under the full distribution."""
        return self._cdf(unshift_sigma(self.hi, self.shift)) - self._cdf(unshift_sigma(self.lo, self.shift))

    def restrict(self, lo: float, hi: float) -> "SigmaSampler":
        return SigmaSampler(self.shift, self.sampling, self.logit_mean, self.logit_std, lo, hi)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        a = self._cdf(unshift_sigma(self.lo, self.shift))
        b = self._cdf(unshift_sigma(self.hi, self.shift))
        v = a + (b - a) * torch.rand(n, generator=generator, dtype=torch.float64)
        sigma = shift_sigma(self._quantile(v), self.shift)
        return sigma.clamp(self.lo, self.hi).float()


@dataclass
class NoisedBatch:
    model_input: torch.Tensor  # [B, C, F, H, W]
    timestep: torch.Tensor  # [B] or [B, seq]
    target: torch.Tensor  # noise - x0
    frame_weight: torch.Tensor  # [B, F]: 0 on frame 0 of anchored samples, 1 elsewhere
    anchored: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B]


def frame_tokens(latents: torch.Tensor, patch_size) -> int:
    _, _, _, height, width = latents.shape
    return (height // patch_size[1]) * (width // patch_size[2])


def noise_batch(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, anchored: torch.Tensor,
                patch_size=(1, 2, 2)) -> NoisedBatch:
    """Flow-matching inputs and target for clean latents `x0` [B, C, F, H, W] (float32)."""
    if anchored.any() and patch_size[0] != 1:
        raise ValueError("anchoring needs a temporal patch size of 1 (one latent frame per token row)")
    batch, _, frames = x0.shape[:3]
    s = sigma.view(-1, 1, 1, 1, 1).to(x0)
    x_t = (1 - s) * x0 + s * noise
    pin = anchored.view(-1, 1, 1, 1, 1).to(x0.device)
    x_t = torch.cat([torch.where(pin, x0[:, :, :1], x_t[:, :, :1]), x_t[:, :, 1:]], dim=2)
    t = sigma.to(x0.device, torch.float32) * 1000.0
    weight = torch.ones(batch, frames, device=x0.device)
    weight[:, 0] = (~anchored).float().to(x0.device)
    if anchored.any():
        per_frame = t.view(-1, 1) * weight  # timestep 0 exactly where frame 0 is clean
        timestep = per_frame.repeat_interleave(frame_tokens(x0, patch_size), dim=1)
    else:
        timestep = t
    return NoisedBatch(x_t, timestep, noise - x0, weight, anchored.to(x0.device), sigma)


def masked_flow_loss(pred: torch.Tensor, target: torch.Tensor, frame_weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample over its weighted frames, then the mean over the batch.

    Frame 0 of an anchored sample has weight 0, so the prediction there gets exactly zero gradient
    (the model is never asked to "denoise" the clean anchor)."""
    err = (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    per_sample = (err * frame_weight).sum(dim=1) / frame_weight.sum(dim=1)
    return per_sample.mean()


def draw_batch(x0: torch.Tensor, sampler: SigmaSampler, p_anchor: float, generator: torch.Generator,
               patch_size=(1, 2, 2)) -> NoisedBatch:
    """Draw sigma, noise and the anchoring coin for a batch (on the CPU generator, then moved)."""
    batch = x0.shape[0]
    sigma = sampler.sample(batch, generator)
    anchored = torch.rand(batch, generator=generator) < p_anchor
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    return noise_batch(x0.float(), sigma, noise, anchored, patch_size)
