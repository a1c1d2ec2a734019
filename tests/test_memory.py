"""`fvg memory` and fvg.memory: exact model sizes without loading weights, and the fits line.

The shipped configs must count to the published parameter numbers (issue 12's table); the
estimator's weight figures must equal the bytes of the models fvg actually builds for `tiny` and
`mini`; safetensors sizes come from the header alone.
"""

import json
import re

import pytest
import torch

from fvg.cli import main
from fvg.io import FvgError
from fvg.memory import (GIB, MODEL_CONFIGS, MODES, checkpoint_numels, estimate, meta_numels, safetensors_numels,
                        size_from_numels)
from fvg.presets import get_preset
from fvg.residency import module_bytes
from fvg.weight_storage import WeightStorage

# issue 12: parameters counted on the meta device from the published configs, in billions
PUBLISHED = [
    ("Qwen--Qwen-Image/transformer", 20.43),
    ("Qwen--Qwen-Image/text_encoder", 8.29),
    ("Wan-AI--Wan2.2-TI2V-5B-Diffusers/transformer", 5.00),
    ("Wan-AI--Wan2.2-T2V-A14B-Diffusers/transformer", 14.29),
    ("Wan-AI--Wan2.2-T2V-A14B-Diffusers/transformer_2", 14.29),
    ("Wan-AI--Wan2.1-T2V-1.3B-Diffusers/transformer", 1.42),
    ("Wan-AI--Wan2.1-T2V-1.3B-Diffusers/text_encoder", 5.68),
    ("Wan-AI--Wan2.2-TI2V-5B-Diffusers/vae", 0.70),
    ("Wan-AI--Wan2.1-T2V-1.3B-Diffusers/vae", 0.13),
    ("THUDM--CogVideoX1.5-5B/transformer", 5.57),
    ("THUDM--CogVideoX1.5-5B/text_encoder", 4.76),
    ("Qwen--Qwen2.5-7B-Instruct", 7.62),
]


@pytest.mark.parametrize("component,billions", PUBLISHED)
def test_shipped_configs_count_to_the_published_sizes(component, billions):
    config = json.loads((MODEL_CONFIGS / component / "config.json").read_text())
    assert round(sum(meta_numels(config).values()) / 1e9, 2) == billions


def test_every_real_preset_is_sized_from_shipped_configs():
    for name in ("wan2.1-1.3b", "wan2.2-5b", "wan2.2-a14b", "cogvideox1.5-5b"):
        est = estimate(get_preset(name))
        assert [s.name for s in est.stages] == ["anchor", "animate", "decode"]
        anchor = est.stages[0]
        assert anchor.model("transformer").numel == 20_430_401_088
        assert anchor.model("transformer").bytes == 20_430_401_088 * 2  # bf16
        vae = est.stages[1].model("vae")
        assert vae.bytes == vae.numel * 4  # the video VAE stays fp32
    a14b = estimate(get_preset("wan2.2-a14b")).stages[1]
    rope = 2 * 1024 * 128  # the rotary cos/sin tables, non-persistent fp32 buffers: counted with the parameters
    assert a14b.model("transformer_2").numel == a14b.model("transformer").numel == 14_288_491_584 + rope
    assert a14b.model("transformer").bytes == a14b.model("transformer").numel * 2 + rope * 2 + _wan_fp32_extra()


def _wan_fp32_extra() -> int:
    """Bytes Wan's fp32-kept modules (norms, time embedder, modulation tables) add over bf16."""
    from fvg.memory import find_model, meta_model

    model = meta_model(find_model("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "transformer").config)
    keep = model._keep_in_fp32_modules
    return 2 * sum(p.numel() for n, p in model.named_parameters() if any(k in n.split(".") for k in keep))




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_weights_equal_the_built_models(dtype):
    from fvg.families import get_family
    from fvg.tiny import tiny_qwen_image_pipeline

    est = estimate(get_preset("tiny"), dtype)
    video = get_family("wan").load_pipeline("builtin:tiny-wan", dtype)
    animate = est.stages[1]
    for name in ("transformer", "text_encoder", "vae"):
        assert animate.model(name).bytes == module_bytes(getattr(video, name)), name
    anchor_pipe = tiny_qwen_image_pipeline()  # built in float32 whatever the run dtype
    for name in ("transformer", "text_encoder", "vae"):
        assert est.stages[0].model(name).bytes == module_bytes(getattr(anchor_pipe, name)), name
    assert est.stages[1].resident_bytes("gpu") == sum(module_bytes(getattr(video, n)) for n in ("transformer", "text_encoder", "vae"))


def test_mini_weights_equal_the_loaded_models():
    from fvg.pipeline import FactorizedPipeline

    pipe = FactorizedPipeline.from_preset("mini", device="cpu", dtype="bfloat16")
    est = estimate(pipe.preset, torch.bfloat16)
    anchor, animate = est.stages[0], est.stages[1]
    for name in ("transformer", "text_encoder", "vae"):
        assert anchor.model(name).source == "safetensors"
        assert anchor.model(name).bytes == module_bytes(getattr(pipe.anchor_source.pipe, name)), name
    for name in ("text_encoder", "vae"):
        assert animate.model(name).bytes == module_bytes(getattr(pipe.video_pipe, name)), name
    # the transformer carries the anchor LoRA: its parameters are counted with it (and its rotary buffers)
    transformer = pipe.video_pipe.transformer
    assert animate.model("transformer").numel == sum(t.numel() for t in [*transformer.parameters(),
                                                                           *transformer.buffers()])


def test_safetensors_sizes_come_from_the_header(tmp_path):
    from fvg.tiny import tiny_wan_components

    transformer = tiny_wan_components()["transformer"].to(torch.bfloat16)
    transformer.save_pretrained(tmp_path / "transformer")
    numels = checkpoint_numels(tmp_path / "transformer")
    assert numels == {k: v.numel() for k, v in transformer.state_dict().items()}
    size = size_from_numels("transformer", numels, 2, "safetensors")
    assert size.bytes == sum(p.numel() * p.element_size() for p in transformer.parameters())  # the file's tensors
    # blocks are found by name: two Wan blocks, the rest (embeddings, head) outside them
    block0 = sum(p.numel() for p in transformer.blocks[0].parameters())
    assert size.largest_block_bytes == block0 * 2
    assert size.non_block_bytes == (size.numel - 2 * block0) * 2
    assert size.resident_bytes("group-offload") == (size.numel - 2 * block0 + 2 * block0) * 2
    assert size.resident_bytes("sequential") == max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in transformer.modules()) * 2


def test_variants_beside_the_weights_are_not_counted_twice(tmp_path):
    from safetensors.torch import save_file

    from fvg.memory import checkpoint_files

    save_file({"w": torch.zeros(4, 4)}, tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({"w": torch.zeros(4, 4, dtype=torch.float16)}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert checkpoint_numels(tmp_path) == {"w": 16}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.zeros(3)}, sharded / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(5)}, sharded / "model-00002-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert [f.name for f in checkpoint_files(sharded)] == ["model-00001-of-00002.safetensors",
                                                           "model-00002-of-00002.safetensors"]
    assert checkpoint_numels(sharded) == {"a": 3, "b": 5}


def test_text_encoders_group_offload_leaf_by_leaf():
    """fvg.residency offloads transformers models at leaf level: the two biggest leaves in flight."""
    est = estimate(get_preset("wan2.2-5b"))
    umt5 = est.stages[1].model("text_encoder")
    embedding = 256384 * 4096 * 2  # UMT5-XXL's shared token embedding, bf16: the biggest leaf
    assert umt5.leaf_level_groups and umt5.largest_leaf_bytes == embedding
    assert umt5.resident_bytes("group-offload") == embedding + umt5.second_leaf_bytes < 1.1 * embedding
    wan = est.stages[1].model("transformer")
    assert not wan.leaf_level_groups
    assert wan.resident_bytes("group-offload") == wan.non_block_bytes + 2 * wan.largest_block_bytes


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(FvgError, match="not a safetensors file"):
        safetensors_numels(bad)


def test_modes_order_and_auto_choice():
    est = estimate(get_preset("wan2.2-5b"))
    peaks = [est.peak_bytes(m) for m in MODES]
    assert peaks[0] > peaks[1] > peaks[2]  # each offload mode keeps less resident
    assert est.choose(int(80 * GIB)) == "gpu"  # one stage at a time: the anchor stage, 56 GiB, is the largest
    assert est.choose(int(48 * GIB)) == "model-offload"  # Qwen-Image's transformer alone is 38 GiB
    assert est.choose(int(24 * GIB)) == "group-offload"
    assert est.choose(int(0.5 * GIB)) is None
    fp8 = estimate(get_preset("wan2.2-5b"), storage=WeightStorage(weights="fp8"))
    assert fp8.stages[1].model("transformer").resident_bytes("gpu") < 0.52 * est.stages[1].model("transformer").bytes


def test_anchored_wan_activation_is_plain_plus_per_frame_modulation():
    from fvg.memory import WanActivation

    act = WanActivation(dim=3072, ffn_dim=14336, vae_spatial=16)
    assert act.tokens(704, 1280, 121) == 31 * 22 * 40
    # doubling the frames roughly doubles the tokens and the activation (no seq^2 term)
    one, two = act.activation_bytes(704, 1280, 61, 2), act.activation_bytes(704, 1280, 121, 2)
    assert 1.9 < two / one < 2.1


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


FITS = re.compile(r"^fits: (yes \(peak [\d.]+ GiB, memory [a-z-]+\)|no \(peak [\d.]+ GiB > [\d.]+ GiB in .+\))$")


def test_fvg_memory_tiny_ends_with_one_fits_line(capsys):
    code, out, err = run_cli(capsys, "memory", "--preset", "tiny", "--gpu-gib", "1")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("fits:")]
    assert len(lines) == 1 and FITS.match(lines[0]) and out.rstrip().endswith(lines[0])
    assert lines[0].endswith("memory gpu)")
    est = estimate(get_preset("tiny"))
    for model in est.stages[1].models:  # exact parameter counts are printed
        assert f"{model.numel:,}" in out


@pytest.mark.parametrize("preset,gib", [("wan2.2-5b", 24), ("wan2.1-1.3b", 24), ("wan2.2-a14b", 48)])
def test_issue_targets_fit_in_some_mode(capsys, preset, gib):
    code, out, err = run_cli(capsys, "memory", "--preset", preset, "--gpu-gib", gib)
    assert code == 0, err
    assert out.splitlines()[-1].startswith("fits: yes")


def test_fvg_memory_says_no_with_exit_1(capsys):
    code, out, _ = run_cli(capsys, "memory", "--preset", "wan2.2-a14b", "--gpu-gib", "2")
    assert code == 1
    assert FITS.match(out.splitlines()[-1]) and "in every mode" in out.splitlines()[-1]
    code, out, _ = run_cli(capsys, "memory", "--preset", "wan2.2-a14b", "--gpu-gib", "48", "--memory", "gpu")
    assert code == 1 and out.splitlines()[-1].endswith("in mode gpu)")


@pytest.mark.parametrize("args,message", [
    (["--preset", "nope", "--gpu-gib", "24"], "unknown preset 'nope'"),
    (["--preset", "tiny", "--gpu-gib", "-3"], "--gpu-gib must be positive"),
    (["--preset", "tiny", "--gpu-gib", "24", "--memory", "fast"], "unknown memory mode 'fast'"),
    (["--preset", "tiny", "--gpu-gib", "24", "--frames", "10"], "frames must be 4n+1"),
    (["--preset", "tiny", "--gpu-gib", "24", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["--preset", "tiny", "--gpu-gib", "24", "--planner", "oracle"], "unknown planner backend 'oracle'"),
    (["--preset", "tiny", "--gpu-gib", "24", "--planner", "transformers"], "names no planner model"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    code, out, err = run_cli(capsys, "memory", *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_without_gpu_gib_on_a_cpu_machine_asks_for_it(capsys):
    code, _, err = run_cli(capsys, "memory", "--preset", "tiny")
    assert code == 2 and "--gpu-gib" in err and len(err.strip().splitlines()) == 1


# -- activation estimates against measured peaks (CPU, reduced models of the real classes) ---------

def _measured_peak(model, call, inputs_outside):
    """Peak bytes of tensors created during `call()` (weights and inputs made before are not counted)."""
    from fvg.memory import LiveTensorBytes

    with torch.no_grad():
        call()  # warm-up: lazily built caches are not activations
        tracker = LiveTensorBytes(ignore=[*model.parameters(), *model.buffers(), *inputs_outside])
        with tracker:
            call()
    return tracker.peak


def _keep_fp32_like_from_pretrained(model):
    """`.to(bf16)` casts everything; from_pretrained(dtype=bf16) keeps these modules in fp32."""
    for keep in model._keep_in_fp32_modules or ():
        for name, module in model.named_modules():
            if keep in name.split("."):
                module.float()
    return model


def test_the_tracker_counts_what_is_alive():
    from fvg.memory import LiveTensorBytes

    with LiveTensorBytes() as tracker:
        a = torch.ones(1000)
        b = a * 2
        view = b.view(-1)
        del a, b
        assert tracker.now == 4000  # the view keeps b's storage alive
        del view
    assert tracker.now == 0 and tracker.peak == 8000


@pytest.mark.parametrize("frames,height,width,heads,head_dim,ffn", [(5, 64, 64, 4, 32, 512), (5, 64, 64, 4, 32, 128),
                                                                     (9, 48, 80, 2, 128, 1024)])
def test_wan_activation_estimate_matches_the_measured_peak(frames, height, width, heads, head_dim, ffn):
    from diffusers import WanTransformer3DModel

    from fvg.memory import WanActivation

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=16, out_channels=16, text_dim=64, freq_dim=256, ffn_dim=ffn, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads").eval().to(torch.bfloat16)
    _keep_fp32_like_from_pretrained(model)
    x = torch.randn(1, 16, frames, height, width, dtype=torch.bfloat16)
    text = torch.randn(1, 512, 64, dtype=torch.bfloat16)
    t = torch.tensor([500.0])
    measured = _measured_peak(model, lambda: model(x, t, text), [x, text, t])
    estimate = WanActivation(dim=heads * head_dim, ffn_dim=ffn, vae_spatial=8, head_dim=head_dim).activation_bytes(
        height * 8, width * 8, (frames - 1) * 4 + 1, 2)
    assert abs(estimate / measured - 1) < 0.05, (estimate, measured)


def test_qwen_image_activation_estimate_matches_the_measured_peak():
    from diffusers import QwenImageTransformer2DModel

    from fvg.memory import QwenImageActivation

    heads, head_dim, h, w, text_tokens = 2, 64, 32, 48, 64
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=64,
                                        axes_dims_rope=(8, 28, 28)).eval().to(torch.bfloat16)
    inputs = dict(hidden_states=torch.randn(1, h * w, 64, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, text_tokens, 64, dtype=torch.bfloat16),
                  encoder_hidden_states_mask=torch.ones(1, text_tokens, dtype=torch.long),
                  timestep=torch.tensor([0.5], dtype=torch.bfloat16), img_shapes=[[(1, h, w)]], return_dict=False)
    measured = _measured_peak(model, lambda: model(**inputs), [v for v in inputs.values() if torch.is_tensor(v)])
    estimate = QwenImageActivation(heads * head_dim, 4 * heads * head_dim, head_dim=head_dim,
                                   text_tokens=text_tokens).activation_bytes(h * 16, w * 16, 2)
    assert abs(estimate / measured - 1) < 0.05, (estimate, measured)


def test_cogvideox_activation_estimate_matches_the_measured_peak():
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    from fvg.memory import CogVideoXActivation

    heads, head_dim, latent_frames, h, w, text_tokens = 2, 32, 5, 48, 32, 32
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=2, sample_width=w, sample_height=h, sample_frames=(latent_frames - 1) * 4 + 1,
        patch_size=2, patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=text_tokens,
        use_rotary_positional_embeddings=True).eval().to(torch.bfloat16)
    padded = latent_frames + latent_frames % 2  # the pipeline pads latent frames to patch_size_t
    x = torch.randn(2, padded, 4, h, w, dtype=torch.bfloat16)  # CFG batched
    text = torch.randn(2, text_tokens, 32, dtype=torch.bfloat16)
    t = torch.tensor([500, 500])

    def call():  # the pipeline builds the rotary tables every step
        rope = get_3d_rotary_pos_embed(embed_dim=head_dim, crops_coords=None, grid_size=(h // 2, w // 2),
                                       temporal_size=padded // 2, grid_type="slice", max_size=(h // 2, w // 2))
        return model(hidden_states=x, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope, return_dict=False)

    measured = _measured_peak(model, call, [x, text, t])
    estimate = CogVideoXActivation(heads * head_dim, 4 * heads * head_dim, text_tokens=text_tokens,
                                   head_dim=head_dim).activation_bytes(h * 8, w * 8, (latent_frames - 1) * 4 + 1, 2)
    assert abs(estimate / measured - 1) < 0.05, (estimate, measured)


SMALL_WAN_VAE = {"_class_name": "AutoencoderKLWan", "base_dim": 16, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
                 "num_res_blocks": 2, "temperal_downsample": [False, True, True]}


@pytest.mark.parametrize("method,shape", [("decode", (1, 16, 3, 8, 8)), ("encode", (1, 3, 1, 64, 80))])
def test_the_meta_vae_simulation_equals_the_cpu_measurement(method, shape):
    from diffusers import AutoencoderKLWan

    from fvg import memory

    config = {k: v for k, v in SMALL_WAN_VAE.items() if k != "_class_name"}
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**config).eval()
    x = torch.randn(shape)
    measured = _measured_peak(vae, lambda: getattr(vae, method)(x), [x])
    simulate = getattr(memory, f"simulate_{method}")
    assert simulate(memory.meta_model(SMALL_WAN_VAE).eval(), shape, torch.float32) == measured


def test_model_offload_keeps_the_text_encoder_on_the_device_while_the_anchor_is_encoded():
    """diffusers offloads the text encoder only when the transformer starts; the anchor's VAE encode comes
    between them (on an H200, wan2.1-1.3b's model-offload stage peaked at 12.67 GiB there)."""
    est = estimate(get_preset("wan2.1-1.3b"), torch.bfloat16)
    animate = est.stages[1]
    encode = next(p for p in animate.phases if p.what == "encode anchor")
    both = animate.model("text_encoder").bytes + animate.model("vae").bytes
    assert animate.resident_bytes("model-offload", encode) == both
    assert animate.resident_bytes("group-offload", encode) == animate.model("vae").resident_bytes("group-offload")
    assert 0 < encode.activation_bytes < 3 * GIB  # one 480x832 frame through the fp32 encoder


@pytest.mark.parametrize("tiling,latent_frames,tolerance", [(False, 9, 0.01), (False, 21, 0.01), (True, 21, 0.15)])
def test_vae_decode_estimate_against_a_full_simulation(tiling, latent_frames, tolerance):
    """The estimate simulates 3 latent frames and extrapolates; the full simulation decodes them all."""
    from fvg.memory import _vae_decode, meta_model, simulate_decode

    h, w = 40, 48
    vae = meta_model(SMALL_WAN_VAE).eval()
    if tiling:
        vae.enable_tiling()
    full = simulate_decode(vae, (1, 16, latent_frames, h, w), torch.float32)
    est = _vae_decode(SMALL_WAN_VAE, h * 8, w * 8, (latent_frames - 1) * 4 + 1, torch.float32, tiling)
    assert abs((est.activation_bytes() - est.postprocess_bytes) / full - 1) < tolerance


def test_the_llm_planner_is_a_stage_of_its_own():
    est = estimate(get_preset("wan2.2-5b"), planner="transformers")
    plan = est.stages[0]
    assert plan.name == "plan" and plan.model("planner").numel == 7_615_616_512 + 2 * 64  # + the rotary buffers
    assert plan.resident_bytes("gpu") == 7_615_616_512 * 2 + 2 * 64 * 4  # + inv_freq, original_inv_freq (fp32)
    assert est.peak_bytes("gpu") == estimate(get_preset("wan2.2-5b")).peak_bytes("gpu")  # the anchor stage is larger
    assert [s.name for s in estimate(get_preset("wan2.2-5b"), planner="rules").stages][0] == "anchor"


# -- weight storage: fp8 layerwise casting, quantization, GGUF (fvg.storage_sizes) ---------------------
# The estimate is checked against the bytes the models hold after the real conversion (`module_bytes`).

FP8 = WeightStorage(weights="fp8")


def _video_only(video_model: str):
    """The tiny preset with a video checkpoint on disk and no anchor stage (stage 0 is then "animate")."""
    from dataclasses import replace

    return replace(get_preset("tiny"), video_model=video_model, anchor_model=None)


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    from fvg.animate.wan import AnchoredWanPipeline
    from fvg.tiny import tiny_wan_components

    path = tmp_path_factory.mktemp("tiny-wan")
    AnchoredWanPipeline(**tiny_wan_components()).save_pretrained(path)
    return path


def test_fp8_estimate_equals_the_bytes_after_layerwise_casting():
    from fvg.pipeline import FactorizedPipeline

    est = estimate(get_preset("tiny"), torch.bfloat16, storage=FP8)
    pipe = FactorizedPipeline.from_preset("tiny", device="cpu", dtype="bfloat16", storage=FP8)
    video, anchor = pipe.video_pipe, pipe.anchor_source.pipe  # both cast by the pipeline, as a run does
    animate = est.stages[1]
    for name in ("transformer", "text_encoder", "vae"):
        assert animate.model(name).bytes == module_bytes(getattr(video, name)), name
    assert est.stages[0].model("transformer").bytes == module_bytes(anchor.transformer)
    wan = animate.model("transformer")
    assert wan.stored_as == "fp8" and animate.model("text_encoder").stored_as == "bfloat16"
    # not a uniform 1 byte: norms, embeddings, the modulation tables and the rotary buffers keep their dtype
    assert wan.numel < wan.bytes < estimate(get_preset("tiny"), torch.bfloat16).stages[1].model("transformer").bytes
    fp8_tensors = [t for t in [*video.transformer.parameters()] if t.dtype == torch.float8_e4m3fn]
    assert 0 < len(fp8_tensors) < len(list(video.transformer.parameters()))
    # while a layer runs it is in bf16: the largest cast layer, weight and bias
    layers = [m for m in video.transformer.modules() if any(p.dtype == torch.float8_e4m3fn for p in m.parameters(False))]
    assert wan.transient_bytes == max(sum(p.numel() for p in m.parameters(False)) for m in layers) * 2
    assert animate.peak_bytes("gpu") == max(animate.resident_bytes("gpu", p) + p.activation_bytes
                                            + animate.model(p.model).transient_bytes for p in animate.phases)


def test_fp8_estimate_of_a_two_expert_checkpoint_on_disk(tmp_path):
    from conftest import save_tiny_two_expert_wan
    from fvg.families.wan import load_wan_pipeline
    from fvg.weight_storage import store_denoisers_in_fp8

    path = save_tiny_two_expert_wan(tmp_path / "a14b-like")
    preset = _video_only(str(path))
    animate = estimate(preset, torch.bfloat16, storage=FP8).stages[0]
    pipe = load_wan_pipeline(str(path), torch.bfloat16)
    assert store_denoisers_in_fp8(pipe, torch.bfloat16) == ["transformer", "transformer_2"]
    for name in ("transformer", "transformer_2", "text_encoder", "vae"):
        assert animate.model(name).bytes == module_bytes(getattr(pipe, name)), name
    native = estimate(preset, torch.bfloat16).stages[0]
    assert native.model("transformer").bytes == module_bytes(load_wan_pipeline(str(path), torch.bfloat16).transformer)


def test_torchao_estimate_equals_the_quantized_bytes(tiny_wan_dir):
    pytest.importorskip("torchao", reason="torchao is the optional quant extra: pip install 'fvg[quant]'")
    from fvg.families.wan import load_wan_pipeline

    storage = WeightStorage(quantize="torchao-int8wo").validate("cpu")
    preset = _video_only(str(tiny_wan_dir))
    animate = estimate(preset, torch.bfloat16, storage=storage).stages[0]
    pipe = load_wan_pipeline(str(tiny_wan_dir), torch.bfloat16, storage=storage)
    for name in ("transformer", "text_encoder", "vae"):
        assert animate.model(name).bytes == module_bytes(getattr(pipe, name)), name
    assert animate.model("transformer").stored_as == "torchao-int8wo" and animate.model("vae").stored_as == "float32"


def test_quantized_layer_bytes_follow_the_documented_layouts():
    from fvg.storage_sizes import quantized_weight_bytes

    # a 3072 x 3072 Linear (Wan2.2-5B's attention projections), N = 9,437,184 weights
    n = 3072 * 3072
    assert quantized_weight_bytes("torchao-int8wo", 3072, 3072) == n + 3072 * 4 + 3072  # int8, fp32 scale, int8 zero
    assert quantized_weight_bytes("bnb-8bit", 3072, 3072) == n + 3072 * 4  # int8 CB, fp32 SCB per row
    # NF4 + double quantization: 4,718,592 packed bytes; 147,456 blocks of 64 -> 147,456 uint8 absmax;
    # 576 blocks of 256 of those -> 576 fp32; an fp32 offset; the 16-entry fp32 NF4 code
    assert quantized_weight_bytes("bnb-4bit", 3072, 3072) == 4_718_592 + 147_456 + 576 * 4 + 4 + 64 == 4_868_420
    # about 4.127 bits a weight (QLoRA: 4 + 8/64 + 32/(64*256))
    assert abs(quantized_weight_bytes("bnb-4bit", 3072, 3072) * 8 / n - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3
    # an odd count: the last block is partial, the packed half-byte rounds up
    assert quantized_weight_bytes("bnb-4bit", 3, 43) == 65 + 3 + 4 + 4 + 64


def test_which_layers_each_quantizer_converts():
    """diffusers keeps `_keep_in_fp32_modules` unconverted; transformers' bitsandbytes matches module names
    by suffix (UMT5's `wo` stays bf16) while its torchao matches the weight's name (`wo` is converted)."""
    from fvg.memory import find_model, meta_model
    from fvg.storage_sizes import quantized_linears

    wan = meta_model(find_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "transformer").config)
    converted = quantized_linears(wan, "bnb-4bit")
    assert "blocks.0.attn1.to_q" in converted and "proj_out" in converted
    assert not any("time_embedder" in name for name in converted)
    umt5 = meta_model(find_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "text_encoder").config)
    assert "encoder.block.0.layer.1.DenseReluDense.wo" not in quantized_linears(umt5, "bnb-4bit")
    assert "encoder.block.0.layer.1.DenseReluDense.wo" in quantized_linears(umt5, "torchao-int8wo")
    assert "encoder.block.0.layer.1.DenseReluDense.wi_0" in quantized_linears(umt5, "bnb-4bit")
    qwen_vl = meta_model(find_model("Qwen/Qwen-Image", "text_encoder").config)
    assert "lm_head" not in quantized_linears(qwen_vl, "bnb-8bit")  # the output embedding stays


def test_gguf_estimate_equals_the_loaded_bytes(tiny_wan_dir, tmp_path):
    pytest.importorskip("gguf", reason="gguf is the optional quant extra: pip install 'fvg[quant]'")
    from gguf import GGUFReader

    from fvg.families.wan import load_wan_pipeline
    from fvg.families.wan import save_wan_gguf

    reference = load_wan_pipeline(str(tiny_wan_dir), torch.float32)
    path = tmp_path / "tiny-wan-Q8_0.gguf"
    quantized = save_wan_gguf(reference.transformer, path)
    storage = WeightStorage(video_transformer=str(path)).validate("cpu")
    preset = _video_only(str(tiny_wan_dir))
    for dtype in (torch.bfloat16, torch.float32):
        transformer = estimate(preset, dtype, storage=storage).stages[0].model("transformer")
        loaded = load_wan_pipeline(str(tiny_wan_dir), dtype, storage=storage).transformer
        assert transformer.bytes == module_bytes(loaded) and transformer.source == "gguf"
    # the Q8_0 tensors count their bytes in the file: 34 bytes per block of 32
    q8 = [t for t in GGUFReader(str(path)).tensors if t.tensor_type.name == "Q8_0"]
    assert len(q8) == len(quantized) > 0 and all(int(t.n_bytes) == int(t.n_elements) // 32 * 34 for t in q8)
    # the largest Q8_0 layer is dequantized to the compute dtype for its matmul (fp32 above); the time
    # embedder's (`time_embedding.0`) is not one: diffusers keeps that module in fp32, dequantized at load
    running = [int(t.n_elements) for t in q8 if not t.name.startswith("time_embedding.")]
    assert transformer.transient_bytes == max(running) * 4 and len(running) < len(q8)


def test_auto_chooses_from_the_stored_sizes(monkeypatch):
    from fvg.pipeline import FactorizedPipeline

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * GIB, 80 * GIB))
    chosen = {}
    for storage in (None, FP8):
        pipe = FactorizedPipeline.from_preset("wan2.1-1.3b", device="cpu", dtype="bfloat16", storage=storage)
        pipe._plan_auto_modes()  # what __init__ runs on a CUDA device
        chosen[storage] = dict(pipe.residency.modes)
    # Qwen-Image's transformer is 38 GiB in bf16 and 19 GiB in fp8: one-model offload fits 24 GiB only in fp8
    assert chosen[None]["anchor"] == "group-offload" and chosen[FP8]["anchor"] == "model-offload"


def test_fvg_memory_takes_the_weight_options_of_generate(capsys):
    code, out, err = run_cli(capsys, "memory", "--preset", "wan2.1-1.3b", "--gpu-gib", "24")
    assert code == 0 and out.splitlines()[-1] == "fits: yes (peak 8.43 GiB, memory group-offload)", err
    code, out, err = run_cli(capsys, "memory", "--preset", "wan2.1-1.3b", "--gpu-gib", "24", "--weights", "fp8")
    assert code == 0 and FITS.match(out.splitlines()[-1]) and out.splitlines()[-1].endswith("memory model-offload)")
    assert "weights fp8" in out and "fp8" in out
    # bitsandbytes is not installed here: planning for a GPU does not need it
    code, out, err = run_cli(capsys, "memory", "--preset", "wan2.2-a14b", "--gpu-gib", "48", "--quantize", "bnb-4bit",
                             "--memory", "gpu")
    assert code == 0 and out.splitlines()[-1].startswith("fits: yes"), err
    assert "bnb-4bit" in out


def test_bitsandbytes_weights_are_planned_only_in_the_modes_they_run_under(capsys, monkeypatch):
    """Group offloading fails for both bitsandbytes formats and sequential offload for NF4, and LLM.int8's
    matrices stay on the device under every offload mode (measured on an H100, tests/test_cuda_quantization.py
    and BENCHMARKS.md): `auto` and `fvg memory` never choose those modes."""
    from fvg.memory import stage_modes

    nf4 = estimate(get_preset("wan2.2-a14b"), storage=WeightStorage(quantize="bnb-4bit"))
    assert nf4.modes == ("gpu", "model-offload")
    assert estimate(get_preset("wan2.2-a14b"), storage=WeightStorage(quantize="bnb-8bit")).modes == ("gpu",)
    assert nf4.choose(int(2 * GIB)) is None  # group offloading would fit; NF4 cannot use it
    modes, together = stage_modes(nf4, int(2 * GIB))
    assert modes["anchor"] == modes["animate"] == "model-offload" and not together  # the least NF4 can hold
    code, out, err = run_cli(capsys, "memory", "--preset", "wan2.2-a14b", "--gpu-gib", "2", "--quantize", "bnb-4bit")
    assert code == 1 and out.splitlines()[-1].startswith("fits: no") and "group-offload" not in out, err


def test_fvg_memory_per_process_of_a_context_parallel_split(capsys):
    """Every weight on every process; the video transformer's activations split (per frame where N divides
    A14B's 21 latent frames, per token where it does not)."""
    whole = estimate(get_preset("wan2.2-a14b"), torch.bfloat16).stages[1]
    split = {n: estimate(get_preset("wan2.2-a14b"), torch.bfloat16, context_parallel=n).stages[1] for n in (3, 4)}
    denoise = lambda stage: next(p for p in stage.phases if p.what == "denoise").activation_bytes  # noqa: E731
    assert all(s.resident_bytes("gpu") == whole.resident_bytes("gpu") for s in split.values())
    assert denoise(split[3]) < 0.5 * denoise(whole)  # 3 divides 21: per frame, a third of the tokens (+ all-to-all)
    assert denoise(split[3]) < denoise(split[4]) < denoise(whole)  # 4 does not: per-token modulation costs more
    code, out, err = run_cli(capsys, "memory", "--preset", "wan2.2-a14b", "--gpu-gib", "80", "--context-parallel", "3")
    assert code == 0 and "context parallel 3 (ulysses): per process" in out + err, err
    code, out, err = run_cli(capsys, "memory", "--preset", "cogvideox1.5-5b", "--gpu-gib", "80", "--context-parallel", "2")
    assert code == 2 and err.strip().count("\n") == 0 and "no context-parallel plan" in err, err


@pytest.mark.parametrize("args,message", [
    (["--weights", "fp8", "--quantize", "torchao-int8wo"], "exclude each other"),
    (["--weights", "fp9"], "unknown --weights 'fp9'"),
    (["--quantize", "int3"], "unknown --quantize 'int3'"),
    (["--video-transformer", "model.safetensors"], "takes a .gguf file"),
    (["--video-transformer", "/nonexistent/wan.gguf"], "file not found"),
    (["--quantize", "torchao-int8wo", "--preset", "tiny"], "apply to checkpoints on disk, not builtin:tiny-qwen-image"),
    (["--quantize", "bnb-4bit", "--memory", "group-offload"], "--memory group-offload does not work with --quantize bnb-4bit"),
    (["--quantize", "bnb-4bit", "--memory", "sequential"], "--memory sequential does not work with --quantize bnb-4bit"),
    (["--quantize", "bnb-8bit", "--memory", "group-offload"], "--memory group-offload does not work with --quantize bnb-8bit"),
    (["--quantize", "bnb-8bit", "--memory", "model-offload"], "use --memory gpu, or --quantize torchao-int8wo"),
])
def test_bad_weight_options_are_one_line_and_exit_2(capsys, args, message):
    code, _, err = run_cli(capsys, "memory", "--preset", "wan2.1-1.3b", "--gpu-gib", "24", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_refusal_names_the_option_the_user_gave():
    storage = WeightStorage(quantize="bnb-8bit")
    with pytest.raises(FvgError, match=r"^--cpu-offload does not work with --quantize bnb-8bit: .* use --memory gpu"):
        storage.check_memory_mode("model-offload", "--cpu-offload")
    with pytest.raises(FvgError, match=r"^--memory model-offload does not work"):
        storage.check_memory_mode("model-offload")
