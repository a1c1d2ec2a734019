"""Wan's VAE on a CPU: two of PyTorch's CPU kernels swapped for faster equivalents, same output to float rounding.

Measured on `mini`'s VAE (64x64x17, base_dim 8; one torch thread, 2026-11-28), two CPU kernels take most of
a decode, neither of them for a reason of the model's:

- **Convolutions.** For a batch of one, PyTorch's CPU dispatcher sends a float32 convolution whose
  N*C*D*H (N*C*H in 2-D) is at most 20480 elements to its im2col path (`slow_conv3d_forward`), not to oneDNN:
  a heuristic for tiny inputs. Wan's VAE decodes chunk by chunk with a batch of one, so every 3-D convolution
  of a small model lands there: on its shapes (8 to 32 channels, 2 to 6 frames of 16 to 64 pixels) oneDNN
  (`torch.mkldnn_convolution`) is 2.5-6x faster. Large inputs already go to oneDNN; this only removes the
  small-input exception.
- **`WanRMS_norm`** normalises with `F.normalize(x, dim=1)`, whose `linalg.vector_norm` over the channel
  dimension of a contiguous [B, C, T, H, W] tensor runs 15-25x slower on a CPU than the same norm written as
  `x.square().sum(1).sqrt()` (0.08 against 1.7 ms for [1, 16, 4, 64, 64]). The replacement computes the same
  quantity, x / max(||x||, eps), in the same dtype rules (fp32 for half inputs, as diffusers does).

Together they take a `mini` video decode from about 0.20 s to 0.045 s on 2 threads (BENCHMARKS.md, "The VAE's
CPU kernels and batched guidance"), the same in every mode: a fixed cost of every video, baseline and method alike. Outputs move
by float rounding only (decoded pixels by at most one 8-bit level; tested). Both swaps act only on CPU
float32 inputs and fall back to the stock code otherwise, so a VAE moved to a GPU runs diffusers' own path.
Opt-in per preset (`Preset.cpu_vae_kernels`): outputs that must stay bitwise equal to stock diffusers keep
the stock kernels.
"""

from __future__ import annotations

import types

import torch


def _onednn_applies(x: torch.Tensor, conv: torch.nn.Module) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _onednn_conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if not _onednn_applies(input, self):
        return type(self)._conv_forward(self, input, weight, bias)
    return torch.mkldnn_convolution(input.contiguous(), weight.contiguous(), bias, self.padding, self.stride,
                                    self.dilation, self.groups)


def _rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        return type(self).forward(self, x)
    dim = 1 if self.channel_first else -1
    xf = x.float() if x.dtype != torch.float32 else x
    # F.normalize's definition: x / max(||x||_2, eps), eps 1e-12
    normalized = (xf / xf.square().sum(dim, keepdim=True).sqrt().clamp_min(1e-12)).to(x.dtype)
    return normalized * self.scale * self.gamma + self.bias


class CpuVaeKernels:
    """Installs the two swaps on every convolution and `WanRMS_norm` of `vae` (instance attributes, so other
    instances of the classes are untouched); `remove()` restores the stock methods."""

    def __init__(self, vae: torch.nn.Module):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

        self.convs = [m for m in vae.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        self.norms = [m for m in vae.modules() if isinstance(m, WanRMS_norm)]
        for conv in self.convs:
            conv._conv_forward = types.MethodType(_onednn_conv_forward, conv)
        for norm in self.norms:
            norm.forward = types.MethodType(_rms_norm_forward, norm)

    def remove(self) -> None:
        for conv in self.convs:
            conv.__dict__.pop("_conv_forward", None)
        for norm in self.norms:
            norm.__dict__.pop("forward", None)

