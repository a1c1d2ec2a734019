"""Sampling over Wan's zero text padding through one kept row equals sampling over all 512 rows."""

import dataclasses

import pytest
import torch

from fvg.animate.wan import FrameWanTransformerBlock, FrameWanTransformer3DModel, use_frame_modulation
from fvg.families.text_padding import BiasedCrossAttention, CompactTextPadding, real_token_counts
from fvg.families import get_family
from fvg.io import FvgError
from fvg.miniworld import models
from fvg.presets import PRESETS

LENGTH = models.MAX_SEQUENCE_LENGTH


def padded(lengths: list[int], dim: int = 16) -> torch.Tensor:
    text = torch.zeros(len(lengths), LENGTH, dim)
    for row, n in enumerate(lengths):
        text[row, :n] = torch.randn(n, dim)
    return text


class Recorder:
    """Records the text width each attn2 sees."""

    def __init__(self, model):
        self.widths = []
        model.blocks[0].attn2.register_forward_pre_hook(
            lambda _m, args, kwargs: self.widths.append(args[1].shape[1]), with_kwargs=True)


def tiny_model(anchored: bool):
    torch.manual_seed(0)
    # diffusers' initialisation: a zero-initialised model (the v3 recipe's) outputs 0 whatever its text
    model = models.build_transformer(dataclasses.replace(models.tiny_config().t2v, init="torch"), 4, 16).eval()
    if anchored:
        use_frame_modulation(model)
        assert type(model) is FrameWanTransformer3DModel and type(model.blocks[0]) is FrameWanTransformerBlock
    return model


@pytest.mark.parametrize("anchored", [False, True])
def test_compaction_matches_full_padding(anchored):
    model = tiny_model(anchored)
    # a CFG-style batch: different prompt lengths, one empty (negative) prompt
    text = padded([5, 9, 0])
    x = torch.randn(3, 4, 3, 8, 8)
    t = torch.tensor([100.0, 500.0, 900.0])
    if anchored:  # one timestep per latent frame: the anchor frame clean
        t = torch.tensor([[0.0, 700.0, 700.0]] * 3)
    recorder = Recorder(model)
    with torch.no_grad():
        want = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        compaction = CompactTextPadding(model)
        got = model(x, t, text, return_dict=False)[0]  # positional text too
        got_kw = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert recorder.widths == [LENGTH, 10, 10]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_kw, want, atol=1e-5, rtol=1e-4)
    compaction.remove()


def test_a_row_without_padding_keeps_everything():
    model = tiny_model(False)
    text = padded([LENGTH, 3])
    recorder = Recorder(model)
    x, t = torch.randn(2, 4, 1, 8, 8), torch.tensor([300.0, 300.0])
    with torch.no_grad():
        want = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        with_hook = CompactTextPadding(model)
        got = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert real_token_counts(text) == [LENGTH, 3] and recorder.widths == [LENGTH, LENGTH]
    assert with_hook.bias is None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_compaction_is_not_a_no_op_and_removes_cleanly():
    model = tiny_model(False)
    originals = [block.attn2.processor for block in model.blocks]
    text = padded([4])
    x, t = torch.randn(1, 4, 1, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        want = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        truncated = model(hidden_states=x, timestep=t, encoder_hidden_states=text[:, :5], return_dict=False)[0]
        compaction = CompactTextPadding(model)
        assert all(isinstance(block.attn2.processor, BiasedCrossAttention) for block in model.blocks)
        compaction.remove()
        recorder = Recorder(model)
        after = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    # dropping rows without the bias changes the output: the bias is what makes compaction exact
    assert (truncated - want).abs().max() > 1e-3
    assert [block.attn2.processor for block in model.blocks] == originals and not model._forward_pre_hooks
    assert recorder.widths == [LENGTH] and torch.equal(after, want)


def test_both_experts_and_backend_refusal(caplog):
    class TwoExperts:
        transformer, transformer_2 = tiny_model(False), tiny_model(True)

    pipe = TwoExperts()
    hooks = get_family("wan").compact_text_padding(pipe)
    assert [h.model for h in hooks] == [pipe.transformer, pipe.transformer_2]
    for hook in hooks:
        hook.remove()
    for block in pipe.transformer.blocks:
        block.attn2.processor._attention_backend = "flash"
    with pytest.raises(FvgError, match="float mask.*not 'flash'"):
        CompactTextPadding(pipe.transformer)
    assert get_family("wan").compact_text_padding(pipe) == [] and "text padding not compacted" in caplog.text
    assert not isinstance(pipe.transformer_2.blocks[0].attn2.processor, BiasedCrossAttention)


def test_only_mini_compacts():
    assert [name for name, preset in PRESETS.items() if preset.compact_text] == ["mini"]


def test_a_family_without_zero_padded_text_refuses_compaction():
    from fvg.animate.cogvideox import AnchoredCogVideoXPipeline
    from fvg.tiny import tiny_cogvideox_components

    pipe = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())
    with pytest.raises(FvgError, match="text compaction applies to Wan-family pipelines, not CogVideoX"):
        get_family("cogvideox").compact_text_padding(pipe)


def test_the_text_encoder_runs_over_the_real_tokens_only():
    """WanPipeline's prompt embeddings with the encoder trimmed to the longest real prompt equal the full
    512-position run's (the pad outputs are zeros either way), and the encoder really saw the short batch."""
    from diffusers import WanPipeline

    from fvg.families.text_padding import TrimmedTextEncoding
    from fvg.tiny import tiny_wan_components

    pipe = WanPipeline(**tiny_wan_components())
    prompts = ["a red circle", "a small blue square above a large red circle moves left", ""]
    seen = []
    with torch.no_grad():
        want = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=LENGTH)[0]
        trim = TrimmedTextEncoding(pipe.text_encoder)
        again = TrimmedTextEncoding(pipe.text_encoder)  # a second instance (a shared encoder) does nothing
        pipe.text_encoder.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
        got = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=LENGTH)[0]
    longest = max(len(pipe.tokenizer(p).input_ids) for p in prompts)
    assert seen == [torch.Size([3, longest])] and longest < 20
    assert got.shape == want.shape == (3, LENGTH, want.shape[2])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert got[:, longest:].abs().max() == 0 and want[:, :longest].abs().max() > 0
    again.remove()
    assert pipe.text_encoder._fvg_trimmed  # the first instance still holds
    trim.remove()
    assert not pipe.text_encoder._fvg_trimmed and len(pipe.text_encoder._forward_pre_hooks) == 1


def test_compaction_covers_the_encoder_of_a_whole_pipeline():
    from diffusers import WanPipeline

    from fvg.families.text_padding import TrimmedTextEncoding
    from fvg.tiny import tiny_wan_components

    pipe = WanPipeline(**tiny_wan_components())
    hooks = get_family("wan").compact_text_padding(pipe)
    assert [type(h) for h in hooks] == [CompactTextPadding, TrimmedTextEncoding]
    for hook in hooks:
        hook.remove()
    assert not pipe.text_encoder._forward_pre_hooks and not pipe.transformer._forward_pre_hooks
