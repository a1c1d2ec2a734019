"""Exact, cheap cross-attention training over WanPipeline's zero-padded text (see PaddingSink)."""

from __future__ import annotations

import math

import torch


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

    def __init__(self, model, length: int):
        self.length = length
        self.bias: torch.Tensor | None = None
        for block in model.blocks:
            block.attn2.processor = _SinkProcessor(block.attn2.processor, self)

    def pack(self, embeds: list[torch.Tensor], text_dim: int) -> torch.Tensor:
        """Text [B, L, D] with L = longest + 1 (at least one padding row each); sets the bias [B, 1, 1, L]."""
        width = min(self.length, max(e.shape[0] for e in embeds) + 1)
        text = torch.zeros(len(embeds), width, text_dim)
        bias = torch.zeros(len(embeds), 1, 1, width)
        for row, e in enumerate(embeds):
            n = e.shape[0]
            text[row, :n] = e
            if n < width:
                bias[row, 0, 0, n:] = math.log((self.length - n) / (width - n))
        self.bias = bias
        return text


class _SinkProcessor:
    def __init__(self, base, sink: PaddingSink):
        self.base, self.sink = base, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        if encoder_hidden_states is not None and self.sink.bias is not None:
            attention_mask = self.sink.bias.to(hidden_states.device, hidden_states.dtype)
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
