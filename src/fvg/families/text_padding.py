"""Wan's zero text padding, attended exactly at a fraction of the cost.

WanPipeline pads each prompt's n token embeddings with zero rows to `max_sequence_length` (512).
The zero rows are identical, so after the text projection their keys and values in every
cross-attention (`attn2`) are identical too, and attention over L - n such rows equals attention
over width - n of them whose logits are raised by log((L - n) / (width - n)). Two users:
`fvg.miniworld.sink.PaddingSink` trains over text packed to its longest prompt + 1, and
`CompactTextPadding` drops the surplus rows of each forward at sampling time. The weights are
untouched either way: the model computes what it computes over the full padding, to float rounding.

The text encoder's side of the same padding: WanPipeline tokenizes to 512 positions, runs UMT5 over all
of them, then keeps each row's n real outputs and replaces the rest with zeros. Its attention masks the
pad positions as keys and its position bias is relative, so the real outputs do not depend on how many
pads follow; `TrimmedTextEncoding` runs the encoder over the longest row's real tokens only and pads
the output back (with zeros, which WanPipeline discards anyway). On `mini`'s encoder the kept rows are
bit for bit the full run's, at a seventeenth of the cost.
"""

from __future__ import annotations

import math

import torch

from fvg.io import FvgError

# Backends whose dispatcher takes an additive float `attn_mask` (torch's SDPA). Flash-style kernels
# take none or only a boolean one, so compaction refuses them rather than drop the bias.
FLOAT_MASK_BACKENDS = {"native", "_native_math"}


def padding_bias(counts: list[int], length: int, width: int) -> torch.Tensor:
    """Additive cross-attention bias [B, 1, 1, width] for rows with `counts[b]` real tokens followed by
    zero rows: 0 on real rows, log((length - n) / (width - n)) on each of the width - n kept zero rows."""
    bias = torch.zeros(len(counts), 1, 1, width)
    for row, n in enumerate(counts):
        if n < width:
            bias[row, 0, 0, n:] = math.log((length - n) / (width - n))
    return bias


def real_token_counts(text: torch.Tensor) -> list[int]:
    """Per batch row of text [B, L, D]: the number of rows before its trailing all-zero rows."""
    nonzero = text.ne(0).any(dim=-1)  # [B, L]
    positions = torch.arange(1, text.shape[1] + 1, device=text.device)
    return (nonzero * positions).amax(dim=1).tolist()


class BiasedCrossAttention:
    """Wraps an attn2 processor: passes `owner.bias` (when set) as the additive attention mask."""

    def __init__(self, base, owner):
        self.base, self.owner = base, owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        if encoder_hidden_states is not None and self.owner.bias is not None:
            attention_mask = self.owner.bias.to(hidden_states.device, hidden_states.dtype)
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


def attention_backend(model) -> str:
    """The backend the model's attn2 dispatches to: the processor's own, else diffusers' active one."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    processor = model.blocks[0].attn2.processor
    processor = getattr(processor, "base", processor)
    backend = getattr(processor, "_attention_backend", None) or _AttentionBackendRegistry.get_active_backend()[0]
    return getattr(backend, "value", str(backend))


class CompactTextPadding:
    """Sampling-time compaction of a Wan transformer's zero-padded text (any `WanTransformer3DModel`,
    fvg's anchored subclasses included).

    A forward pre-hook finds each row's n real tokens, keeps width = min(L, max n + 1) rows of
    `encoder_hidden_states` and sets the bias that makes the one-or-more kept zero rows stand for
    all L - n; the attn2 processors are wrapped to pass it. `remove()` restores the processors and the
    hook. A forward whose attention backend cannot take a float mask runs uncompacted."""

    def __init__(self, model):
        backend = attention_backend(model)
        if backend not in FLOAT_MASK_BACKENDS:
            raise FvgError(f"text compaction needs an attention backend that takes a float mask "
                           f"({', '.join(sorted(FLOAT_MASK_BACKENDS))}), not '{backend}'")
        self.model = model
        self.bias: torch.Tensor | None = None
        self.originals = [block.attn2.processor for block in model.blocks]
        for block in model.blocks:
            block.attn2.processor = BiasedCrossAttention(block.attn2.processor, self)
        self.handle = model.register_forward_pre_hook(self._compact, with_kwargs=True)

    def _compact(self, _module, args, kwargs):
        self.bias = None
        positional = "encoder_hidden_states" not in kwargs
        text = args[2] if positional else kwargs["encoder_hidden_states"]
        if text is None or attention_backend(self.model) not in FLOAT_MASK_BACKENDS:
            return None
        length = text.shape[1]
        counts = real_token_counts(text)
        width = min(length, max(counts) + 1)
        if width == length:
            return None  # a row without padding: every zero row is kept and the bias is 0
        self.bias = padding_bias(counts, length, width)
        text = text[:, :width]
        if positional:
            return (*args[:2], text, *args[3:]), kwargs
        return args, {**kwargs, "encoder_hidden_states": text}

    def remove(self) -> None:
        self.handle.remove()
        for block, original in zip(self.model.blocks, self.originals):
            block.attn2.processor = original
        self.bias = None


class TrimmedTextEncoding:
    """Runs a text encoder over the batch's longest real prefix (`attention_mask`'s ones) instead of its
    full padded length, and pads `last_hidden_state` back to that length with zero rows.

    Only for callers that discard the outputs at pad positions (WanPipeline's `_get_t5_prompt_embeds`)
    and encoders whose real outputs do not see masked pads (UMT5, T5: masked keys, relative positions).
    A second instance on the same encoder is a no-op; `remove()` undoes it."""

    def __init__(self, encoder):
        self.encoder, self.handles, self.length = encoder, [], None
        if getattr(encoder, "_fvg_trimmed", False):
            return
        encoder._fvg_trimmed = True
        self.handles = [encoder.register_forward_pre_hook(self._trim, with_kwargs=True),
                        encoder.register_forward_hook(self._pad)]

    def _trim(self, _module, args, kwargs):
        names = ("input_ids", "attention_mask")
        given = {name: (args[i] if i < len(args) else kwargs.get(name)) for i, name in enumerate(names)}
        ids, mask = given["input_ids"], given["attention_mask"]
        self.length = None
        if len(args) > len(names) or ids is None or mask is None or ids.ndim != 2:
            return None
        keep = max(int(mask.sum(dim=1).max()), 1)
        if keep >= ids.shape[1] or bool(mask[:, keep:].any()):  # nothing to trim, or not a right-padded mask
            return None
        self.length = ids.shape[1]
        trimmed = {name: given[name][:, :keep] for name in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return (), {**rest, **trimmed}

    def _pad(self, _module, _args, output):
        if self.length is None:
            return None
        hidden = output["last_hidden_state"]
        output["last_hidden_state"] = torch.nn.functional.pad(hidden, (0, 0, 0, self.length - hidden.shape[1]))
        self.length = None
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.handles:
            self.encoder._fvg_trimmed = False
        self.handles = []
