"""Exact, cheap cross-attention training over WanPipeline's zero-padded text (see PaddingSink; the identity lives in fvg.families.text_padding)."""

from __future__ import annotations

import torch

from fvg.families.text_padding import BiasedCrossAttention, padding_bias


class PaddingSink:
    """Exact, cheap training of cross-attention over zero-padded text.

    WanPipeline pads each prompt's n token embeddings with zeros to `length` (512) tokens. The
    padded rows are identical, so their keys and values are identical, and attention over them
    equals attention over fewer copies whose logits are raised by log(copies at inference /
    copies here). Training therefore feeds each batch padded only to its longest prompt + 1 and
    passes that additive bias to every cross-attention (a wrapper around the model's own
    processor): the same function the 512-token model computes, at a fraction of the cost (the
    anchor model spends about half its compute on padding otherwise). Weights are untouched, so
    the saved model samples with the ordinary 512-token padding."""

    def __init__(self, model, length: int, device: torch.device | str = "cpu"):
        self.length, self.device = length, torch.device(device)
        self.bias: torch.Tensor | None = None
        for block in model.blocks:
            block.attn2.processor = BiasedCrossAttention(block.attn2.processor, self)

    def pack(self, embeds: list[torch.Tensor], text_dim: int) -> torch.Tensor:
        """Text [B, L, D] with L = longest + 1 (at least one padding row each), on the sink's device; sets
        the bias [B, 1, 1, L] there too (once per batch, not once per block)."""
        counts = [e.shape[0] for e in embeds]
        width = min(self.length, max(counts) + 1)
        text = torch.zeros(len(embeds), width, text_dim)
        for row, e in enumerate(embeds):
            text[row, :e.shape[0]] = e
        self.bias = padding_bias(counts, self.length, width).to(self.device)
        return text.to(self.device)
