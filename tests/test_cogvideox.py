"""CogVideoX: anchored sampling with per-row timesteps, anchor-LoRA training, LoRA, presets (tiny random models)."""

import json

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline
from diffusers.models.normalization import CogVideoXLayerNormZero
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from fvg.animate.cogvideox import AnchoredCogVideoXPipeline, anchor_layout, frame_timesteps, use_frame_timesteps
from fvg.animate.loading import load_anchor_lora
from fvg.animate.lora import to_diffusers
from fvg.io import FvgError
from fvg.tiny import tiny_cogvideox_components
from fvg.families import cogvideox as cog
from fvg.families import family_of, resolve_family
from fvg.families.cogvideox import load_cogvideox_pipeline
from fvg.train.export import export_checkpoint, read_lora
from fvg.train.trainer import train

CALL = dict(prompt="a red circle moves right", num_frames=9, height=32, width=32, num_inference_steps=3,
            output_type="latent", max_sequence_length=16)
ROW = 4  # tokens per temporal row: 4x4 latent, patch 2
ROWS = 2  # 3 latent frames + 1 padding frame = 4, patch_size_t 2


# accelerate keeps process-wide singletons; every test here starts from a fresh one.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def pipe():
    return AnchoredCogVideoXPipeline(**tiny_cogvideox_components())


@pytest.fixture(scope="module")
def anchor_image():
    return Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))


def run(p, seed=1, **kwargs):
    return p(**{**CALL, **kwargs}, generator=torch.Generator().manual_seed(seed)).frames


# -- inference ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_without_anchor_equals_stock_pipeline(pipe, output_type):
    stock = CogVideoXPipeline(**tiny_cogvideox_components())  # fresh, unpatched modules
    ours, theirs = run(pipe, output_type=output_type), run(stock, output_type=output_type)
    assert type(stock.transformer.transformer_blocks[0].norm1) is CogVideoXLayerNormZero
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_without_anchor_equals_stock_with_dpm_and_guidance(pipe):
    components = tiny_cogvideox_components()
    dpm = CogVideoXDPMScheduler.from_config(components["scheduler"].config)
    ours = AnchoredCogVideoXPipeline(**{**tiny_cogvideox_components(), "scheduler": dpm})
    stock = CogVideoXPipeline(**{**components, "scheduler": dpm})
    assert torch.equal(run(ours, guidance_scale=6.0, use_dynamic_cfg=True),
                       run(stock, guidance_scale=6.0, use_dynamic_cfg=True))


def test_first_temporal_patch_is_the_anchor_latent(pipe, anchor_image):
    latents = run(pipe, anchor=anchor_image)
    anchor = pipe.encode_anchor(anchor_image, 32, 32)
    assert latents.shape == (1, 4, 4, 4, 4) and anchor.shape == (1, 1, 4, 4, 4)
    assert torch.equal(latents[:, 0], anchor[:, 0]) and torch.equal(latents[:, 1], anchor[:, 0])
    # scaled posterior mode of the image encoded as a one-frame video
    pixels = pipe.video_processor.preprocess(anchor_image, height=32, width=32).unsqueeze(2)
    mode = pipe.vae.encode(pixels).latent_dist.mode().permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(anchor, mode * pipe.vae.config.scaling_factor)
    assert not torch.allclose(latents[:, 2], anchor[:, 0])  # the rest is generated
    # same seed, same initial noise as t2v: precomputed anchor latents give the same video
    assert torch.equal(run(pipe, anchor_latents=anchor), latents)
    video = run(pipe, anchor=anchor_image, output_type="np")
    assert video.shape == (1, 9, 32, 32, 3)


def test_anchored_with_dpm_and_guidance(anchor_image):
    components = tiny_cogvideox_components()
    components["scheduler"] = CogVideoXDPMScheduler.from_config(components["scheduler"].config)
    p = AnchoredCogVideoXPipeline(**components)
    latents = run(p, anchor=anchor_image, guidance_scale=6.0, num_inference_steps=4)
    anchor = p.encode_anchor(anchor_image, 32, 32)
    assert torch.equal(latents[:, :2], anchor.expand(-1, 2, -1, -1, -1)) and torch.isfinite(latents).all()


def test_anchor_tokens_get_timestep_zero(pipe, anchor_image):
    transformer = pipe.transformer
    seen, mods = [], []

    def on_time_proj(_m, args):
        seen.append(args[0].detach().clone())

    def on_norm(module, args, output):
        hidden, text, temb = args
        mods.append((temb.detach().clone(), output[0].detach().clone(), output[1].detach().clone(),
                     hidden.detach().clone(), text.detach().clone()))

    h1 = transformer.time_proj.register_forward_pre_hook(on_time_proj)
    h2 = transformer.transformer_blocks[0].norm1.register_forward_hook(on_norm)
    run(pipe, anchor=anchor_image, guidance_scale=6.0)
    h1.remove(), h2.remove()
    timesteps = pipe.scheduler.timesteps
    assert len(seen) == len(timesteps) == 3
    for ts, t in zip(seen, timesteps):
        assert ts.shape == (2, 1 + ROWS)  # CFG batch; text, then the two temporal rows
        assert torch.all(ts[:, 1] == 0) and torch.all(ts[:, 0] == t) and torch.all(ts[:, 2:] == t)
    # the modulation: anchor tokens as the stock norm does it at t = 0, the rest and the text at t
    stock = CogVideoXLayerNormZero(*[transformer.transformer_blocks[0].norm1.linear.in_features,
                                     transformer.transformer_blocks[0].norm1.norm.normalized_shape[0]])
    stock.load_state_dict(transformer.transformer_blocks[0].norm1.state_dict())
    temb, video, text, hidden, text_in = mods[0]
    assert temb.shape[:2] == (2, 1 + ROWS)
    at_zero = stock(hidden, text_in, temb[:, 1])
    at_t = stock(hidden, text_in, temb[:, 2])
    torch.testing.assert_close(video[:, :ROW], at_zero[0][:, :ROW])
    torch.testing.assert_close(video[:, ROW:], at_t[0][:, ROW:])
    torch.testing.assert_close(text, at_t[1])
    t_zero = transformer.time_embedding(transformer.time_proj(torch.zeros(1)))
    torch.testing.assert_close(temb[:1, 1], t_zero)


def test_plain_t2v_uses_one_timestep_per_sample(pipe):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].detach().clone()), with_kwargs=True)
    run(pipe, guidance_scale=1.0)
    handle.remove()
    assert seen and all(ts.ndim == 1 for ts in seen)


def test_row_timesteps_all_equal_match_the_1d_forward():
    patched = tiny_cogvideox_components()["transformer"]
    use_frame_timesteps(patched)
    use_frame_timesteps(patched)  # idempotent
    stock = tiny_cogvideox_components()["transformer"]
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 4, 4, 4, generator=g), torch.randn(2, 16, 32, generator=g)
    rotary = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())._prepare_rotary_positional_embeddings(
        32, 32, 4, "cpu")
    t = torch.tensor([700, 300])
    with torch.no_grad():
        one_d = patched(x, text, t, image_rotary_emb=rotary).sample
        assert torch.equal(one_d, stock(x, text, t, image_rotary_emb=rotary).sample)  # 1-D: stock code
        rows = patched(x, text, frame_timesteps(t, ROWS, False), image_rotary_emb=rotary).sample
        anchored = patched(x, text, frame_timesteps(t, ROWS, True), image_rotary_emb=rotary).sample
    torch.testing.assert_close(rows, one_d, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(anchored, one_d)
    assert patched.state_dict().keys() == stock.state_dict().keys()


def test_layout_needs_an_odd_latent_frame_count(pipe, anchor_image):
    assert anchor_layout(21, 2) == (1, 2) and anchor_layout(13, 2) == (1, 2) and anchor_layout(13, None) == (0, 1)
    with pytest.raises(ValueError, match="8n\\+1"):
        anchor_layout(22, 2)
    with pytest.raises(ValueError, match="8n\\+1"):
        run(pipe, anchor=anchor_image, num_frames=13)  # 4 latent frames


# -- training objective ----------------------------------------------------------------------------------

def test_training_layout_matches_inference_and_masks_the_anchor(pipe):
    g = torch.Generator().manual_seed(0)
    x0, anchors = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    anchored = torch.tensor([True, False])
    noise = torch.randn(2, 4, 4, 4, 4, generator=g)
    nb = cog.noise_batch(pipe.scheduler, x0, anchors, torch.tensor([600, 600]), noise, anchored, 2)
    # anchored: [a, a, z1, z2] with the anchor clean; plain: [z0, z0, z1, z2] noised
    assert torch.equal(nb.model_input[0, 0], anchors[0]) and torch.equal(nb.model_input[0, 1], anchors[0])
    assert not torch.allclose(nb.model_input[1, :2], x0[1, :1].expand(2, -1, -1, -1))
    assert nb.frame_weight.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert nb.timestep.tolist() == [[600, 0, 600], [600, 600, 600]]
    a = pipe.scheduler.alphas_cumprod[600]
    torch.testing.assert_close(nb.target[1, 2], a.sqrt() * noise[1, 2] - (1 - a).sqrt() * x0[1, 1])
    pred = torch.randn_like(nb.target, requires_grad=True)
    cog.masked_v_loss(pred, nb.target, nb.frame_weight).backward()
    assert torch.all(pred.grad[0, :2] == 0) and torch.all(pred.grad[1, :1] == 0)
    assert torch.all(pred.grad[0, 2:] != 0) and torch.all(pred.grad[1, 1:] != 0)


def test_no_loss_gradient_reaches_the_anchor_tokens(pipe):
    """Through the real transformer: the anchor row's outputs do not touch the loss."""
    transformer = tiny_cogvideox_components()["transformer"]
    use_frame_timesteps(transformer)
    g = torch.Generator().manual_seed(1)
    x0, anchors = torch.randn(1, 3, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    nb = cog.noise_batch(pipe.scheduler, x0, anchors, torch.tensor([500]), torch.randn(1, 4, 4, 4, 4, generator=g),
                         torch.tensor([True]), 2)
    rotary = pipe._prepare_rotary_positional_embeddings(32, 32, 4, "cpu")
    outputs = []

    def keep(_module, _args, out):
        out.retain_grad()
        outputs.append(out)

    handle = transformer.proj_out.register_forward_hook(keep)
    pred = transformer(nb.model_input, torch.randn(1, 16, 32, generator=g), nb.timestep,
                       image_rotary_emb=rotary).sample
    handle.remove()
    cog.masked_v_loss(pred, nb.target, nb.frame_weight).backward()
    token_grad = outputs[0].grad  # [1, tokens, p_t * p * p * C]
    assert torch.all(token_grad[:, :ROW] == 0) and torch.any(token_grad[:, ROW:] != 0)


# -- fvg train end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_defaults() -> dict:  # for conftest's `config`
    return dict(model="builtin:tiny-cogvideox", max_sequence_length=512, rank=8, alpha=16.0, learning_rate=4e-3,
                max_steps=30, checkpoint_every=15, validation_every=15, validation_holdout=1, validation_steps=2)


@pytest.fixture(scope="module")
def trained(workdir, config):
    p = load_cogvideox_pipeline("builtin:tiny-cogvideox", torch.float32)
    seen = []
    p.transformer.time_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().clone()) if torch.is_grad_enabled() else None)
    result = train(config("run", p_anchor=0.5), pipe=p)
    p.transformer.eval()
    return result, p, seen


def transformer_output(transformer, anchored=True):
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 4, 4, 4, generator=g), torch.randn(2, 16, 32, generator=g)
    rotary = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())._prepare_rotary_positional_embeddings(
        32, 32, 4, "cpu")
    t = frame_timesteps(torch.tensor([600, 300]), ROWS, anchored)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, image_rotary_emb=rotary,
                           return_dict=False)[0]


def test_training_loss_falls_and_feeds_anchor_rows_timestep_zero(trained, workdir):
    result, _, seen = trained
    losses = result.losses
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < 0.9 * np.mean(losses[:6])
    rows = [row for ts in seen if ts.ndim == 2 for row in ts]
    anchored = [r for r in rows if r[1] == 0 and r[0] > 0]
    assert len(seen) == 30 and anchored and all(torch.all(r[2:] == r[0]) for r in anchored)
    assert len(anchored) < len(rows) or any(ts.ndim == 1 for ts in seen)  # p_anchor 0.5 keeps plain samples
    record = json.loads((workdir / "run" / "run.json").read_text())
    assert record["resolved"]["family"] == "cogvideox" and record["resolved"]["flow_shift"] is None
    # text length capped at the transformer's (226 for CogVideoX1.5, 16 here); CogVideoX's FFN names
    assert record["config"]["max_sequence_length"] == 16
    assert "ff.net.0.proj" in record["config"]["target_modules"]
    assert (workdir / "run" / "validation" / "step_000030" / "00.mp4").is_file()


def test_cache_holds_the_first_frame_encoded_alone(trained, workdir):
    from safetensors import safe_open

    index = json.loads(next((workdir / "cache").glob("*/index.json")).read_text())
    entry = index["entries"][0]
    with safe_open(str(workdir / "cache" / index["key"] / entry["shard"]), framework="pt") as f:
        latent, anchor, text = (f.get_tensor(f"{entry['index']}.{k}") for k in ("latent", "anchor", "text"))
    assert latent.shape == (3, 4, 4, 4) and anchor.shape == (4, 4, 4) and text.shape == (16, 32)
    from fvg.train.data import load_clip

    frame = load_clip(__import__("pathlib").Path(entry["video"]), 1, 8, 32, 32)[0]
    fresh = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())
    torch.testing.assert_close(anchor, fresh.encode_anchor(Image.fromarray(frame), 32, 32)[0, 0],
                               rtol=1e-4, atol=1e-4)


def test_exported_lora_round_trip(trained, workdir, tmp_path):
    result, p, _ = trained
    assert set(result.lora_files) == {"transformer.diffusers"}  # diffusers has no other CogVideoX format
    path = result.lora_files["transformer.diffusers"]
    _, lora_config, info = read_lora(path)
    assert (lora_config["r"], lora_config["lora_alpha"]) == (8, 16.0) and info["family"] == "cogvideox"
    fresh = load_cogvideox_pipeline("builtin:tiny-cogvideox", torch.float32)
    load_anchor_lora(fresh, str(path))
    assert fresh.get_list_adapters() == {"transformer": ["anchor"]}
    base = transformer_output(load_cogvideox_pipeline("builtin:tiny-cogvideox", torch.float32).transformer)
    assert not torch.allclose(transformer_output(p.transformer), base)
    torch.testing.assert_close(transformer_output(fresh.transformer), transformer_output(p.transformer))
    exported = export_checkpoint(workdir / "run" / "checkpoints" / "step_000030", tmp_path)
    assert set(exported) == {"transformer.diffusers"}
    a, b = load_file(exported["transformer.diffusers"]), load_file(path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_lora_weights_round_trip_and_unmatched_keys(tmp_path):
    transformer = tiny_cogvideox_components()["transformer"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = get_peft_model_state_dict(transformer)
    AnchoredCogVideoXPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=state,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    p = load_cogvideox_pipeline("builtin:tiny-cogvideox", torch.float32)
    load_anchor_lora(p, str(tmp_path / "pytorch_lora_weights.safetensors"))
    use_frame_timesteps(transformer)
    torch.testing.assert_close(transformer_output(p.transformer), transformer_output(transformer))
    save_file(to_diffusers(state), tmp_path / "prefixed.safetensors")
    load_anchor_lora(load_cogvideox_pipeline("builtin:tiny-cogvideox", torch.float32),
                     str(tmp_path / "prefixed.safetensors"))
    save_file(state, tmp_path / "bare.safetensors")
    with pytest.raises(FvgError, match="matched no weights"):
        load_anchor_lora(load_cogvideox_pipeline("builtin:tiny-cogvideox", torch.float32),
                         str(tmp_path / "bare.safetensors"))


def test_resume_reproduces_the_uninterrupted_run(workdir, config):
    import shutil

    kwargs = dict(max_steps=4, checkpoint_every=2, validation_every=0, gradient_accumulation_steps=2,
                  mixed_precision="bf16", gradient_checkpointing=True)
    full = train(config("full", **kwargs))
    shutil.copytree(workdir / "full" / "checkpoints" / "step_000002",
                    workdir / "resumed" / "checkpoints" / "step_000002")
    resumed = train(config("resumed", **kwargs), resume="latest")
    assert resumed.record["steps"]["start"] == 2 and resumed.losses == full.losses[2:]
    assert all(np.isfinite(full.losses))
    state = json.loads((workdir / "full" / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["family"] == "cogvideox"


def test_load_a_saved_checkpoint_folder(pipe, tmp_path, anchor_image):
    CogVideoXPipeline(**tiny_cogvideox_components()).save_pretrained(tmp_path / "ckpt")
    assert family_of(str(tmp_path / "ckpt")).name == "cogvideox" and family_of(pipe).name == "cogvideox"
    loaded = load_cogvideox_pipeline(str(tmp_path / "ckpt"), torch.float32)
    assert isinstance(loaded, AnchoredCogVideoXPipeline) and loaded.vae.use_tiling
    assert loaded.transformer._fvg_frame_timesteps and loaded.vae.dtype == torch.float32
    assert torch.equal(run(loaded, anchor=anchor_image), run(pipe, anchor=anchor_image))


def test_family_resolution_and_even_frames_rejected(workdir, config):
    assert family_of("THUDM/CogVideoX1.5-5B").name == "cogvideox" and family_of("builtin:tiny-wan").name == "wan"
    assert resolve_family("x/y", "cogvideox").name == "cogvideox" and resolve_family("x/y").name == "wan"
    with pytest.raises(FvgError, match="num_frames = 13"):
        train(config("even", num_frames=13, max_steps=1))


# -- FactorizedPipeline and presets ----------------------------------------------------------------------

def test_factorized_pipeline_runs_all_modes_on_tiny_cogvideox():
    from fvg.pipeline import FactorizedPipeline
    from fvg.presets import get_preset

    assert get_preset("cogvideox1.5-5b").family == "cogvideox"
    fp = FactorizedPipeline.from_preset("tiny-cogvideox", device="cpu")
    outs = {m: fp("a red circle moves right", mode=m, seed=0, steps=2) for m in ("t2v", "upsampled", "factorized")}
    for mode, out in outs.items():
        assert out.frames.shape == (9, 32, 32, 3) and out.frames.dtype == np.uint8 and out.mode == mode
    assert outs["factorized"].anchor is not None
    assert isinstance(fp.video_pipe, AnchoredCogVideoXPipeline)
    with pytest.raises(FvgError, match="8n\\+1"):
        FactorizedPipeline.from_preset("tiny-cogvideox", device="cpu", num_frames=13)(
            "a red circle", mode="factorized", seed=0, steps=1)
