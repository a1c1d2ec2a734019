"""Stage 3: anchored sampling on the real diffusers Wan classes (tiny random instances)."""

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from fvg.animate.loading import load_anchor_lora
from fvg.animate.lora import to_diffusers
from fvg.animate.wan import AnchoredWanPipeline
from fvg.families.wan import load_wan_pipeline, to_original_wan
from fvg.io import FvgError
from fvg.tiny import tiny_wan_components

CALL = dict(prompt="a red circle moves right", num_frames=9, height=32, width=32, num_inference_steps=3,
            output_type="latent")


@pytest.fixture(scope="module")
def components():
    return tiny_wan_components()


@pytest.fixture(scope="module")
def anchor_image():
    return Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))


def run(pipe, seed=1, **kwargs):
    return pipe(**{**CALL, **kwargs}, generator=torch.Generator().manual_seed(seed)).frames


def test_without_anchor_equals_stock_wan_pipeline(components):
    ours = AnchoredWanPipeline(**components)
    stock = WanPipeline(**components)
    assert torch.equal(run(ours), run(stock))


def test_anchored_equals_diffusers_expand_timesteps_i2v(components, anchor_image):
    ours = AnchoredWanPipeline(**components)
    i2v = WanImageToVideoPipeline(**components, image_encoder=None, image_processor=None, expand_timesteps=True)
    assert torch.equal(run(ours, anchor=anchor_image, modulation="token"), run(i2v, image=anchor_image))


def test_per_frame_modulation_equals_the_per_token_path(components, anchor_image):
    pipe = AnchoredWanPipeline(**components)
    assert type(pipe.transformer).__name__ == "FrameWanTransformer3DModel"
    per_frame = run(pipe, anchor=anchor_image)
    per_token = run(pipe, anchor=anchor_image, modulation="token")
    assert not torch.equal(per_frame[:, :, 1:], pipe.encode_anchor(anchor_image, 32, 32).expand(-1, -1, 2, -1, -1))
    torch.testing.assert_close(per_frame, per_token, rtol=1e-5, atol=1e-5)


def test_per_frame_transformer_forward_matches_per_token_and_stock(components):
    from fvg.animate.wan import FrameWanTransformer3DModel

    transformer = AnchoredWanPipeline(**components).transformer
    assert isinstance(transformer, FrameWanTransformer3DModel)
    torch.manual_seed(3)
    latents, text = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 7, 32)
    frame_t = torch.tensor([[0.0, 700.0, 700.0], [0.0, 300.0, 300.0]])
    token_t = frame_t.repeat_interleave(4, dim=1)  # 2x2 tokens per latent frame
    with torch.no_grad():
        per_frame = transformer(latents, frame_t, text, return_dict=False)[0]
        per_token = transformer(latents, token_t, text, return_dict=False)[0]
        one_d = transformer(latents, torch.tensor([700.0, 300.0]), text, return_dict=False)[0]
        stock_one_d = WanTransformer3DModel.forward(transformer, latents, torch.tensor([700.0, 300.0]), text,
                                                    return_dict=False)[0]
    torch.testing.assert_close(per_frame, per_token, rtol=1e-5, atol=1e-6)
    assert torch.equal(one_d, stock_one_d)
    with pytest.raises(ValueError, match="neither per frame"):
        transformer(latents, frame_t[:, :2], text)


def test_saved_config_names_the_stock_class(components, tmp_path):
    transformer = AnchoredWanPipeline(**components).transformer
    transformer.save_pretrained(tmp_path)
    assert '"_class_name": "WanTransformer3DModel"' in (tmp_path / "config.json").read_text()
    assert type(WanTransformer3DModel.from_pretrained(tmp_path)) is WanTransformer3DModel


def test_first_latent_frame_is_the_normalised_anchor_latent(components, anchor_image):
    pipe = AnchoredWanPipeline(**components)
    latents = run(pipe, anchor=anchor_image)
    anchor_latent = pipe.encode_anchor(anchor_image, 32, 32)
    assert latents.shape == (1, 16, 3, 4, 4)
    assert torch.equal(latents[:, :, :1], anchor_latent)
    # normalised: (posterior mode - latents_mean) / latents_std
    vae = pipe.vae
    pixels = pipe.video_processor.preprocess(anchor_image, height=32, width=32).unsqueeze(2)
    mode = vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(anchor_latent, (mode - mean) / std, rtol=1e-5, atol=1e-6)
    # the rest of the video is generated, not copied
    assert not torch.allclose(latents[:, :, 1], anchor_latent[:, :, 0])


def _record_timesteps(transformer):
    seen = []

    def hook(_module, args, kwargs):
        seen.append(kwargs["timestep"].detach().clone())

    return seen, transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("modulation", ["frame", "token"])
def test_frame0_tokens_get_timestep_zero_and_the_rest_t(components, anchor_image, modulation):
    pipe = AnchoredWanPipeline(**components)
    seen, handle = _record_timesteps(pipe.transformer)
    run(pipe, anchor=anchor_image, guidance_scale=1.0, modulation=modulation)
    handle.remove()
    timesteps = pipe.scheduler.timesteps
    assert len(seen) == len(timesteps) == 3
    per_row = 1 if modulation == "frame" else (4 // 2) * (4 // 2)  # 4x4 latent, patch (1, 2, 2)
    for ts, t in zip(seen, timesteps):
        assert ts.shape == (1, 3 * per_row)
        assert torch.all(ts[:, :per_row] == 0)
        assert torch.all(ts[:, per_row:] == t)


def test_plain_t2v_uses_one_timestep_per_sample(components):
    pipe = AnchoredWanPipeline(**components)
    seen, handle = _record_timesteps(pipe.transformer)
    run(pipe, guidance_scale=1.0)
    handle.remove()
    assert all(ts.ndim == 1 and ts.shape == (1,) for ts in seen)


def test_anchoring_works_with_patch_1x1x1(components, anchor_image):
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    pipe = AnchoredWanPipeline(**{**components, "transformer": transformer})
    seen, handle = _record_timesteps(transformer)
    latents = run(pipe, anchor=anchor_image, guidance_scale=1.0, modulation="token")
    handle.remove()
    assert torch.equal(latents[:, :, :1], pipe.encode_anchor(anchor_image, 32, 32))
    assert seen[0].shape == (1, 3 * 16) and torch.all(seen[0][:, :16] == 0)
    torch.testing.assert_close(run(pipe, anchor=anchor_image, guidance_scale=1.0), latents, rtol=1e-5, atol=1e-5)


def test_two_experts_switch_at_the_boundary_with_anchor(components, anchor_image):
    torch.manual_seed(5)
    low_noise = WanTransformer3DModel(**components["transformer"].config)
    pipe = AnchoredWanPipeline(**components, transformer_2=low_noise, boundary_ratio=0.875)
    high_seen, h1 = _record_timesteps(pipe.transformer)
    low_seen, h2 = _record_timesteps(low_noise)
    latents = run(pipe, anchor=anchor_image, num_inference_steps=6, guidance_scale=2.0, guidance_scale_2=1.5)
    h1.remove(), h2.remove()
    assert high_seen and low_seen
    assert all(ts.max() >= 875 for ts in high_seen) and all(ts.max() < 875 for ts in low_seen)
    assert torch.equal(latents[:, :, :1], pipe.encode_anchor(anchor_image, 32, 32))


def _record_inputs(transformer):
    seen = []

    def hook(_module, args, kwargs):
        seen.append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone()))

    return seen, transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_still_start_noises_the_still_anchor_as_stock_video_to_video(components, anchor_image, strength):
    """The still start's first model input is diffusers' video-to-video start for the anchor held still, with
    frame 0 pinned to the clean anchor; it runs the same later timesteps."""
    from diffusers import WanVideoToVideoPipeline

    ours = AnchoredWanPipeline(**components)
    seen, handle = _record_inputs(ours.transformer)
    latents = run(ours, anchor=anchor_image, guidance_scale=1.0, num_inference_steps=10, still_strength=strength)
    handle.remove()
    stock = WanVideoToVideoPipeline(**components)
    stock_seen, handle = _record_inputs(stock.transformer)
    call = {k: v for k, v in CALL.items() if k not in ("num_frames", "num_inference_steps")}  # v2v: frames given
    stock(**call, num_inference_steps=10, video=[anchor_image] * 9, strength=strength, guidance_scale=1.0,
          generator=torch.Generator().manual_seed(1))
    handle.remove()
    assert len(seen) == len(stock_seen) == int(10 * strength)
    first, stock_first = seen[0][0], stock_seen[0][0]
    assert torch.equal(first[:, :, 1:], stock_first[:, :, 1:])
    assert torch.equal(first[:, :, :1], ours.encode_anchor(anchor_image, 32, 32))
    for (_, ts), (_, stock_ts) in zip(seen, stock_seen):
        assert torch.all(ts[:, 0] == 0) and torch.all(ts[:, 1:] == stock_ts)
    assert torch.equal(latents[:, :, :1], ours.encode_anchor(anchor_image, 32, 32))


def test_still_latent_starts_with_the_anchor_latent(components, anchor_image):
    pipe = AnchoredWanPipeline(**components)
    still = pipe.encode_still(anchor_image, 32, 32, 9)
    assert still.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(still[:, :, :1], pipe.encode_anchor(anchor_image, 32, 32), rtol=1e-5, atol=1e-5)


def test_still_start_rejects_what_it_cannot_run(components, anchor_image):
    pipe = AnchoredWanPipeline(**components)
    anchor_latents = pipe.encode_anchor(anchor_image, 32, 32)
    with pytest.raises(ValueError, match="needs `anchor`"):
        run(pipe, anchor_latents=anchor_latents, still_strength=0.5)
    with pytest.raises(ValueError, match="needs `anchor`"):
        run(pipe, still_strength=0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="in \\(0, 1\\]"):
            run(pipe, anchor=anchor_image, still_strength=bad)
    with pytest.raises(ValueError, match="leaves no step"):
        run(pipe, anchor=anchor_image, still_strength=0.2)  # int(3 * 0.2) = 0 steps


def test_bad_shapes_are_rejected(components):
    pipe = AnchoredWanPipeline(**components)
    with pytest.raises(ValueError, match="4n\\+1"):
        run(pipe, num_frames=10)
    with pytest.raises(ValueError, match="divisible by 16"):
        run(pipe, height=40)


# -- LoRA formats --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_lora():
    """A tiny transformer with a random (non-zero) LoRA, as training would leave it."""
    transformer = tiny_wan_components()["transformer"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]))
    return transformer, get_peft_model_state_dict(transformer)


def _outputs(transformer):
    torch.manual_seed(0)
    x, text = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 6, 32)
    with torch.no_grad():
        return transformer(x, torch.tensor([700.0]), text).sample


@pytest.mark.parametrize("key_format", ["diffusers", "original_wan"])
def test_lora_round_trip_in_both_key_formats(tmp_path, trained_lora, key_format):
    transformer, state_dict = trained_lora
    if key_format == "diffusers":
        AnchoredWanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=state_dict,
                                              transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
        path = tmp_path / "pytorch_lora_weights.safetensors"
    else:
        path = tmp_path / "anchor_lora_wan.safetensors"
        save_file(to_original_wan(state_dict, alpha=8), path)
    pipe = load_wan_pipeline("builtin:tiny-wan", torch.float32)
    load_anchor_lora(pipe, str(path))
    assert pipe.get_list_adapters() == {"transformer": ["anchor"]}
    torch.testing.assert_close(_outputs(pipe.transformer), _outputs(transformer))


def test_lora_into_both_experts(tmp_path, trained_lora):
    _, state_dict = trained_lora
    path = tmp_path / "lora.safetensors"
    save_file(to_diffusers(state_dict), path)
    components = tiny_wan_components()
    pipe = AnchoredWanPipeline(**components, transformer_2=WanTransformer3DModel(**components["transformer"].config),
                               boundary_ratio=0.875)
    load_anchor_lora(pipe, str(path), "transformer")
    load_anchor_lora(pipe, str(path), "transformer_2")
    assert pipe.get_list_adapters() == {"transformer": ["anchor"], "transformer_2": ["anchor_2"]}


def test_lora_whose_keys_match_nothing_is_an_error(tmp_path, trained_lora):
    _, state_dict = trained_lora
    path = tmp_path / "unprefixed.safetensors"
    save_file(state_dict, path)  # bare PEFT keys: diffusers would only warn and load nothing
    pipe = load_wan_pipeline("builtin:tiny-wan", torch.float32)
    with pytest.raises(FvgError, match="matched no weights"):
        load_anchor_lora(pipe, str(path))
    with pytest.raises(FvgError, match="not found"):
        load_anchor_lora(pipe, str(tmp_path / "missing.safetensors"))


def test_anchor_lora_is_active_only_in_the_anchored_mode(tmp_path, trained_lora):
    from fvg.pipeline import FactorizedPipeline

    _, state_dict = trained_lora
    path = tmp_path / "lora.safetensors"
    save_file(to_diffusers(state_dict), path)
    plain = FactorizedPipeline.from_preset("tiny")
    with_lora = FactorizedPipeline.from_preset("tiny", lora=str(path))
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    # the baselines run the base model: the LoRA changes nothing there
    np.testing.assert_array_equal(plain.animate("a red circle", None, 0, 2), with_lora.animate("a red circle", None, 0, 2))
    # the anchored mode runs with the LoRA
    assert not np.array_equal(plain.animate("a red circle", image, 0, 2), with_lora.animate("a red circle", image, 0, 2))


# -- the still start through FactorizedPipeline ----------------------------------------------------

def test_still_start_runs_the_later_steps_of_factorized_videos_only():
    from fvg.pipeline import FactorizedPipeline

    pipe = FactorizedPipeline.from_preset("tiny", device="cpu", still_strength=0.6)
    for mode, expected in (("factorized", [1, 2, 3]), ("t2v", [1, 2, 3, 4, 5])):
        calls = []
        out = pipe("a red circle moves right", mode=mode, steps=5,
                   progress=lambda stage, i, n: calls.append((i, n)) if stage == "animate" else None)
        assert [i for i, _ in calls] == expected and {n for _, n in calls} == {len(expected)}
        assert out.frames.shape == (9, 32, 32, 3) and out.settings["still_strength"] == 0.6


@pytest.mark.parametrize("preset, strength, message", [
    ("tiny-cogvideox", 0.5, "applies to Wan-family pipelines, not CogVideoX"),
    ("tiny", 0.0, "must be in \\(0, 1\\], got 0.0"),
    ("tiny", 1.5, "must be in \\(0, 1\\], got 1.5"),
])
def test_still_start_settings_are_refused_before_models_load(preset, strength, message):
    from fvg.pipeline import FactorizedPipeline

    with pytest.raises(FvgError, match=message):
        FactorizedPipeline.from_preset(preset, device="cpu", still_strength=strength)


def test_still_start_that_leaves_no_step_is_refused_before_sampling():
    from fvg.pipeline import FactorizedPipeline

    pipe = FactorizedPipeline.from_preset("tiny", device="cpu", still_strength=0.5)
    with pytest.raises(FvgError, match="still_strength 0.5 leaves none of 1 steps to run"):
        pipe("a red circle moves right", steps=1)
    assert pipe._video_pipe is None  # nothing loaded
