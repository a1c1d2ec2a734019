"""The anchor-LoRA objective: Wan flow matching, frame 0 clean at timestep 0 and out of the loss."""

import math

import torch

from fvg.tiny import tiny_wan_components
from fvg.families.flow_matching import (SigmaSampler, draw_batch, masked_flow_loss, noise_batch, shift_sigma,
                                        unshift_sigma)
from fvg.train.seeds import step_generator

TOKENS_PER_FRAME = 4  # a 4x4 latent with patch (1, 2, 2)


def latents(batch=2, frames=3):
    return torch.randn(batch, 16, frames, 4, 4, generator=torch.Generator().manual_seed(0))


def test_flow_matching_as_diffusers_samples_wan():
    x0 = latents()
    noise = torch.randn_like(x0)
    sigma = torch.tensor([0.25, 0.8])
    nb = noise_batch(x0, sigma, noise, anchored=torch.tensor([False, False]))
    s = sigma.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(nb.model_input, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(nb.target, noise - x0)
    assert nb.timestep.shape == (2,) and torch.allclose(nb.timestep, torch.tensor([250.0, 800.0]))
    assert torch.equal(nb.frame_weight, torch.ones(2, 3))


def test_anchored_sample_has_clean_frame0_at_timestep_zero():
    x0 = latents()
    noise = torch.randn_like(x0)
    nb = noise_batch(x0, torch.tensor([0.6, 0.6]), noise, anchored=torch.tensor([True, False]))
    assert torch.equal(nb.model_input[0, :, 0], x0[0, :, 0])  # clean anchor latent
    assert not torch.equal(nb.model_input[1, :, 0], x0[1, :, 0])  # the plain sample stays noisy
    torch.testing.assert_close(nb.model_input[:, :, 1:], (0.4 * x0 + 0.6 * noise)[:, :, 1:])
    assert nb.timestep.shape == (2, 3 * TOKENS_PER_FRAME)  # per-token, as the transformer accepts
    assert torch.all(nb.timestep[0, :TOKENS_PER_FRAME] == 0)
    assert torch.allclose(nb.timestep[0, TOKENS_PER_FRAME:], torch.tensor(600.0))
    assert torch.allclose(nb.timestep[1], torch.tensor(600.0))  # plain sample: t on every token
    assert nb.frame_weight.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]


def test_frame0_prediction_gets_exactly_zero_gradient():
    x0 = latents()
    nb = noise_batch(x0, torch.tensor([0.5, 0.9]), torch.randn_like(x0), anchored=torch.tensor([True, True]))
    pred = torch.randn_like(x0, requires_grad=True)
    masked_flow_loss(pred, nb.target, nb.frame_weight).backward()
    assert torch.count_nonzero(pred.grad[:, :, 0]) == 0
    assert torch.count_nonzero(pred.grad[:, :, 1:]) == pred.grad[:, :, 1:].numel()
    # the loss is the mean over the other frames only
    expected = (pred.detach() - nb.target)[:, :, 1:].pow(2).mean()
    torch.testing.assert_close(masked_flow_loss(pred.detach(), nb.target, nb.frame_weight), expected)


def test_frame0_tokens_reach_the_transformer_at_timestep_zero():
    transformer = tiny_wan_components()["transformer"]
    seen = []
    handle = transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    x0 = latents()
    nb = draw_batch(x0, SigmaSampler(shift=3.0), p_anchor=1.0, generator=step_generator(0, 1))
    out = transformer(hidden_states=nb.model_input, timestep=nb.timestep,
                      encoder_hidden_states=torch.randn(2, 8, 32), return_dict=False)[0]
    handle.remove()
    assert out.shape == x0.shape
    (ts,) = seen
    assert ts.shape == (2, 3 * TOKENS_PER_FRAME)
    assert torch.all(ts[:, :TOKENS_PER_FRAME] == 0) and torch.all(ts[:, TOKENS_PER_FRAME:] > 0)
    plain = draw_batch(x0, SigmaSampler(shift=3.0), p_anchor=0.0, generator=step_generator(0, 1))
    assert plain.timestep.ndim == 1 and not plain.anchored.any()


def test_sigma_shift_and_expert_ranges():
    assert shift_sigma(0.5, 3.0) == 0.75 and math.isclose(unshift_sigma(0.75, 3.0), 0.5)
    full = SigmaSampler(shift=12.0)
    high, low = full.restrict(0.875, 1.0), full.restrict(0.0, 0.875)
    g = torch.Generator().manual_seed(0)
    assert torch.all(high.sample(2000, g) >= 0.875) and torch.all(low.sample(2000, g) < 0.875)
    assert math.isclose(high.mass() + low.mass(), 1.0)
    # the uniform-then-shift density: P(sigma >= b) = 1 - u(b)
    s = full.sample(20000, g)
    assert abs((s >= 0.875).float().mean().item() - high.mass()) < 0.02
    ln = SigmaSampler(shift=3.0, sampling="logit_normal")
    s = ln.restrict(0.5, 0.9).sample(2000, g)
    assert torch.all((s >= 0.5) & (s <= 0.9))


def test_step_randomness_depends_only_on_seed_and_counters():
    a = torch.rand(3, generator=step_generator(7, 10, 0))
    assert torch.equal(a, torch.rand(3, generator=step_generator(7, 10, 0)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(7, 10, 1)))
