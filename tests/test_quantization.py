"""Weight storage (fvg.weight_storage): fp8 layerwise casting, quantization while loading, GGUF transformers.

Everything runs on tiny real models (the real classes, random weights). torchao and bitsandbytes
are the optional `quant` extra: the torchao run skips where it is not installed; bitsandbytes needs
CUDA, so only the configuration `from_pretrained` receives is checked here.
"""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from PIL import Image

import fvg.families.wan
from fvg.animate.cogvideox import AnchoredCogVideoXPipeline
from fvg.anchor import DiffusersAnchorSource
from fvg.animate.wan import AnchoredWanPipeline
from fvg.cli import _BatchItemSpec, main
from fvg.families.wan import load_wan_pipeline, original_wan_key, save_wan_gguf
from fvg.io import FvgError
from fvg.pipeline import FactorizedPipeline
from fvg.residency import apply_mode
from fvg.tiny import tiny_cogvideox_components, tiny_qwen_image_pipeline, tiny_wan_components
from fvg.weight_storage import (QUANTIZERS, WeightStorage, denoisers, pipeline_quantization, quantized_components,
                                store_denoisers_in_fp8)
from test_anchor import qwen_image_dir  # noqa: F401 (a fixture: a saved tiny Qwen-Image)
from test_lora_experts import write_lora

FP8 = torch.float8_e4m3fn
ANCHOR = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))


def wan(dtype=torch.float32, **extra):
    pipe = AnchoredWanPipeline(**tiny_wan_components(), **extra)
    for name in ("transformer", "transformer_2", "text_encoder"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(dtype)
    return pipe


def sample(pipe, anchor=ANCHOR, frames=9):
    return pipe(prompt="a red circle moves right", num_frames=frames, height=32, width=32, num_inference_steps=2,
                output_type="latent", anchor=anchor, generator=torch.Generator().manual_seed(0)).frames.float()


def rel_err(a, b):
    return ((a - b).norm() / a.norm()).item()


def cast_layers(model):
    """The leaf modules whose weights layerwise casting stores in fp8 (those it hooked)."""
    return {name: m for name, m in model.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook("layerwise_casting")}


# -- fp8 layerwise casting ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, ratio", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_fp8_stores_the_transformer_layers_in_a_quarter_or_half_the_bytes(dtype, ratio):
    reference, pipe = wan(dtype), wan(dtype)
    before = {n: p.numel() * p.element_size() for n, p in pipe.transformer.named_parameters()}
    assert store_denoisers_in_fp8(pipe, dtype) == ["transformer"]
    after = {n: p.numel() * p.element_size() for n, p in pipe.transformer.named_parameters()}
    layers = cast_layers(pipe.transformer)
    cast = {f"{layer}.{p}" for layer, m in layers.items() for p, _ in m.named_parameters()}
    assert any(".attn1.to_q" in n for n in layers) and any(".ffn.net.2" in n for n in layers)
    # every block linear is fp8, at exactly 1/ratio of its bytes; norms and embeddings keep the run dtype
    for name in before:
        if name in cast:
            assert after[name] * ratio == before[name], name
        else:
            assert after[name] == before[name], name
            assert re.search(r"norm|patch_embedding|condition_embedder|scale_shift_table|^proj_out", name), name
    assert all(p.dtype == FP8 for n, p in pipe.transformer.named_parameters() if n in cast)
    assert sum(before[n] for n in cast) == ratio * sum(after[n] for n in cast)
    plain, stored = sample(reference), sample(pipe)
    assert torch.isfinite(stored).all() and rel_err(plain, stored) < 0.05
    assert all(p.dtype == FP8 for n, p in pipe.transformer.named_parameters() if n in cast)  # back in storage


def test_fp8_halves_a_real_size_wan_transformer():
    """Wan2.1-1.3B from its published config on the meta device (benchmarks/bench_fp8_bytes.py): the
    skipped layers (embeddings, norms, proj_out) are under 2% of the weights, so fp8 is about half of bf16."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fp8_bytes.py"
    spec = importlib.util.spec_from_file_location("bench_fp8_bytes", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bf16, fp8 = bench.fp8_bytes(*bench.DENOISERS["Wan2.1-T2V-1.3B"])
    assert 2.6 * 2**30 < bf16 < 2.7 * 2**30  # 1.42 B parameters
    assert 0.5 < fp8 / bf16 < 0.51


def test_fp8_reaches_both_a14b_experts_and_the_cogvideox_transformer():
    torch.manual_seed(5)
    low_noise = WanTransformer3DModel(**tiny_wan_components()["transformer"].config).eval()
    reference = wan(transformer_2=low_noise, boundary_ratio=0.875)
    pipe = AnchoredWanPipeline(**tiny_wan_components(), transformer_2=low_noise, boundary_ratio=0.875)
    reference.transformer_2 = WanTransformer3DModel(**low_noise.config).eval()
    reference.transformer_2.load_state_dict(low_noise.state_dict())
    assert store_denoisers_in_fp8(pipe, torch.float32) == ["transformer", "transformer_2"]
    assert cast_layers(pipe.transformer) and cast_layers(pipe.transformer_2)
    plain, stored = sample(reference), sample(pipe)
    assert torch.isfinite(stored).all() and rel_err(plain, stored) < 0.05

    cog_ref = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())
    cog = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())
    assert store_denoisers_in_fp8(cog) == ["transformer"]
    plain, stored = sample(cog_ref, frames=9), sample(cog, frames=9)
    assert torch.isfinite(stored).all() and rel_err(plain, stored) < 0.05


def test_fp8_on_the_anchor_text_to_image_transformer():
    reference, pipe = tiny_qwen_image_pipeline(), tiny_qwen_image_pipeline()
    assert list(denoisers(pipe)) == ["transformer"]
    store_denoisers_in_fp8(pipe)
    assert cast_layers(pipe.transformer)

    def image(p):
        return p(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images.float()

    plain, stored = image(reference), image(pipe)
    assert torch.isfinite(stored).all() and rel_err(plain, stored) < 0.05


def test_fp8_keeps_the_lora_in_the_compute_dtype_and_its_effect(tmp_path):
    lora = write_lora(tmp_path / "anchor_lora.safetensors", seed=3)
    base, with_lora, fp8_lora = wan(), wan(), wan()
    for pipe in (with_lora, fp8_lora):
        pipe.load_lora_weights(str(lora), adapter_name="anchor")
    store_denoisers_in_fp8(fp8_lora, torch.float32)  # the pipeline's order: LoRA first, then fp8
    lora_params = {n: p for n, p in fp8_lora.transformer.named_parameters() if "lora_" in n}
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params.values())
    assert fp8_lora.transformer.blocks[0].attn1.to_q.base_layer.weight.dtype == FP8
    plain, lora_out, stored = sample(base), sample(with_lora), sample(fp8_lora)
    assert rel_err(lora_out, stored) < 0.05
    assert rel_err(lora_out, stored) < rel_err(lora_out, plain) / 2  # the LoRA still acts under fp8


@pytest.mark.parametrize("mode", ["model-offload", "group-offload"])
def test_fp8_composes_with_offload_hooks(mode):
    """The offload hooks go on after the casting (at stage entry): the arithmetic is unchanged."""
    cast, offloaded = wan(), wan()
    store_denoisers_in_fp8(cast, torch.float32)
    store_denoisers_in_fp8(offloaded, torch.float32)
    apply_mode(offloaded, mode, "cpu")  # on CPU the hooks run with the CPU as "device"
    assert torch.equal(sample(cast), sample(offloaded))
    assert torch.equal(sample(cast, anchor=None), sample(offloaded, anchor=None))


def test_factorized_pipeline_stores_both_stages_in_fp8_and_records_it(tmp_path):
    lora = write_lora(tmp_path / "anchor_lora.safetensors", seed=3)
    pipe = FactorizedPipeline.from_preset("tiny", device="cpu", lora=str(lora), planner="rules",
                                          storage=WeightStorage(weights="fp8"))
    out = pipe("a red ball rolls left", seed=0, steps=2)
    assert np.isfinite(out.frames).all() and out.frames.std() > 0
    assert cast_layers(pipe.video_pipe.transformer) and cast_layers(pipe.anchor_source.pipe.transformer)
    assert all(p.dtype == torch.float32 for n, p in pipe.video_pipe.transformer.named_parameters() if "lora_" in n)
    assert out.run_record()["settings"]["weights"] == {"weights": "fp8", "quantize": None,
                                                        "video_transformer": None, "video_transformer_2": None}


def anchor_image(source):
    return np.asarray(source("a red circle", height=32, width=32, seed=0).image, dtype=np.float32)


def test_anchor_from_pretrained_in_fp8(qwen_image_dir):
    reference = DiffusersAnchorSource.from_pretrained(str(qwen_image_dir), dtype=torch.float32, steps=2)
    source = DiffusersAnchorSource.from_pretrained(str(qwen_image_dir), dtype=torch.float32, steps=2,
                                                   storage=WeightStorage(weights="fp8"))
    assert cast_layers(source.pipe.transformer) and not cast_layers(source.pipe.text_encoder)
    assert np.abs(anchor_image(reference) - anchor_image(source)).mean() < 4  # of 255


def test_anchor_command_in_fp8_records_it(tmp_path, capsys):
    code = main(["anchor", "a red ball", "--caption", "--preset", "tiny", "-n", "1", "--weights", "fp8",
                 "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run.json").read_text())["weights"]["weights"] == "fp8"
    assert Image.open(tmp_path / "anchor.png").size == (32, 32)


def test_batch_reruns_redo_videos_made_with_other_weights(tmp_path):
    native = FactorizedPipeline.from_preset("tiny", device="cpu")
    fp8 = FactorizedPipeline.from_preset("tiny", device="cpu", storage=WeightStorage(weights="fp8"))
    spec_native = _BatchItemSpec.of(native, "t2v", 0, 2, None, 1, 0)
    spec_fp8 = _BatchItemSpec.of(fp8, "t2v", 0, 2, None, 1, 0)
    assert "weights" not in spec_native.settings  # records written before weight options stay valid
    assert spec_fp8.settings["weights"]["weights"] == "fp8"


# -- quantization while loading -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan")
    AnchoredWanPipeline(**tiny_wan_components()).save_pretrained(path)
    return path


def test_torchao_int8_weight_only_runs_on_cpu(wan_dir):
    pytest.importorskip("torchao", reason="torchao is the optional quant extra: pip install 'fvg[quant]'")
    from torchao.quantization import Int8Tensor

    reference = load_wan_pipeline(str(wan_dir), torch.float32)
    storage = WeightStorage(quantize="torchao-int8wo").validate("cpu")
    pipe = load_wan_pipeline(str(wan_dir), torch.float32, storage=storage)
    weight = pipe.transformer.blocks[0].attn1.to_q.weight
    assert isinstance(weight, Int8Tensor) and weight.qdata.dtype == torch.int8
    assert weight.qdata.nbytes + weight.scale.nbytes < reference.transformer.blocks[0].attn1.to_q.weight.nbytes / 3
    assert isinstance(pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight, Int8Tensor)
    plain, quantized = sample(reference), sample(pipe)
    assert torch.isfinite(quantized).all() and rel_err(plain, quantized) < 0.05


def test_torchao_quantizes_the_anchor_transformer_and_text_encoder(qwen_image_dir):
    pytest.importorskip("torchao", reason="torchao is the optional quant extra: pip install 'fvg[quant]'")
    from torchao.quantization import Int8Tensor

    reference = DiffusersAnchorSource.from_pretrained(str(qwen_image_dir), dtype=torch.float32, steps=2)
    source = DiffusersAnchorSource.from_pretrained(str(qwen_image_dir), dtype=torch.float32, steps=2,
                                                   storage=WeightStorage(quantize="torchao-int8wo"))
    assert isinstance(source.pipe.transformer.transformer_blocks[0].attn.to_q.weight, Int8Tensor)
    assert any(isinstance(p, Int8Tensor) for p in source.pipe.text_encoder.parameters())
    assert np.abs(anchor_image(reference) - anchor_image(source)).mean() < 4


def test_bitsandbytes_configs_are_what_from_pretrained_receives(wan_dir, monkeypatch):
    """bitsandbytes quantizes on CUDA only: check the per-component configs the loader is given (building
    them reads the installed bitsandbytes version, so the package must be there; its CPU build is enough)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is the optional quant extra: pip install 'fvg[quant]'")
    from diffusers import BitsAndBytesConfig as DiffusersBnb
    from transformers import BitsAndBytesConfig as TransformersBnb

    config = pipeline_quantization("bnb-4bit", torch.bfloat16, ["transformer", "transformer_2", "text_encoder"])
    mapping = config.quant_mapping
    assert set(mapping) == {"transformer", "transformer_2", "text_encoder"}
    assert isinstance(mapping["transformer"], DiffusersBnb) and isinstance(mapping["text_encoder"], TransformersBnb)
    for c in mapping.values():
        assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant
        assert c.bnb_4bit_compute_dtype == torch.bfloat16
    eight = pipeline_quantization("bnb-8bit", torch.bfloat16, ["transformer"]).quant_mapping["transformer"]
    assert eight.load_in_8bit and not eight.load_in_4bit

    seen = {}

    def fake_from_pretrained(model_id, **kwargs):
        seen.update(kwargs)
        return AnchoredWanPipeline(**tiny_wan_components())

    monkeypatch.setattr(AnchoredWanPipeline, "from_pretrained", fake_from_pretrained)
    load_wan_pipeline(str(wan_dir), torch.bfloat16, storage=WeightStorage(quantize="bnb-4bit"))
    received = seen["quantization_config"].quant_mapping
    assert set(received) == {"transformer", "text_encoder"}  # the denoiser and text encoder this checkpoint has
    assert received["transformer"].load_in_4bit and received["transformer"].bnb_4bit_compute_dtype == torch.bfloat16


def test_quantized_components_follow_the_checkpoint(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "vae": ["diffusers", "AutoencoderKLWan"]}))
    assert quantized_components(str(tmp_path)) == ["transformer", "text_encoder"]
    assert quantized_components(str(tmp_path), skip=("transformer",)) == ["text_encoder"]
    assert pipeline_quantization(None, torch.bfloat16, ["transformer"]) is None


@pytest.mark.parametrize("storage, device, message", [
    (WeightStorage(weights="fp9"), "cpu", "unknown --weights 'fp9'"),
    (WeightStorage(quantize="int3"), "cpu", "unknown --quantize 'int3'"),
    (WeightStorage(quantize="bnb-4bit"), "cpu", "--quantize bnb-4bit needs a CUDA device"),
    (WeightStorage(weights="fp8", quantize="torchao-int8wo"), "cpu", "exclude each other"),
    (WeightStorage(video_transformer="model.safetensors"), "cpu", "takes a .gguf file"),
    (WeightStorage(video_transformer="/nonexistent/wan.gguf"), "cpu", "file not found"),
])
def test_bad_weight_options_are_one_line(storage, device, message):
    with pytest.raises(FvgError, match=re.escape(message)) as info:
        storage.validate(device)
    assert "\n" not in str(info.value)


def test_missing_quant_package_names_the_extra(monkeypatch):
    monkeypatch.setattr("fvg.weight_storage.package_available", lambda name: False)
    with pytest.raises(FvgError, match=re.escape("needs the 'torchao' package: pip install 'fvg[quant]'")):
        WeightStorage(quantize="torchao-int8wo").validate("cpu")
    with pytest.raises(FvgError, match=re.escape("needs the 'bitsandbytes' package")):
        WeightStorage(quantize="bnb-8bit").validate("cuda:0")
    assert set(QUANTIZERS) == {"torchao-int8wo", "bnb-8bit", "bnb-4bit"}


def test_builtin_models_cannot_be_quantized_or_replaced(monkeypatch):
    with pytest.raises(FvgError, match="apply to checkpoints on disk, not builtin:tiny-wan"):
        fvg.families.wan.load_wan_pipeline("builtin:tiny-wan", torch.float32,
                                           storage=WeightStorage(quantize="torchao-int8wo"))
    monkeypatch.setattr("fvg.weight_storage.package_available", lambda name: True)
    pipe = FactorizedPipeline.from_preset("tiny", device="cpu", storage=WeightStorage(quantize="torchao-int8wo"))
    with pytest.raises(FvgError, match="not builtin:tiny-qwen-image"):
        pipe.anchor_source


def test_cli_rejects_bad_weight_options_in_one_line(tmp_path, capsys):
    code = main(["generate", "a ball", "--preset", "tiny", "--out", str(tmp_path / "o"), "--quantize", "bnb-4bit",
                 "--device", "cpu"])  # explicit: on a GPU machine the default device is CUDA
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "needs a CUDA device" in err
    assert not (tmp_path / "o" / "video.mp4").exists()


# -- GGUF single-file transformers -------------------------------------------------------------------
# fvg writes GGUF files the way community quantizations of Wan are laid out (`fvg.families.wan.save_wan_gguf`):
# the original Wan key names, Q8_0 where the row length allows (blocks of 32), F32 elsewhere.


def test_original_wan_keys_are_what_diffusers_converts_back():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = tiny_wan_components()["transformer"].state_dict()
    original = {original_wan_key(k): v for k, v in state.items()}
    assert "head.modulation" in original and "blocks.0.self_attn.q.weight" in original
    assert set(convert_wan_transformer_to_diffusers(original)) == set(state)


def test_gguf_transformer_round_trip(wan_dir, tmp_path):
    pytest.importorskip("gguf", reason="gguf is the optional quant extra: pip install 'fvg[quant]'")
    from diffusers.quantizers.gguf.utils import GGUFParameter

    reference = load_wan_pipeline(str(wan_dir), torch.float32)
    quantized = save_wan_gguf(reference.transformer, tmp_path / "tiny-wan-Q8_0.gguf")
    assert "blocks.0.ffn.net.2.weight" in quantized
    storage = WeightStorage(video_transformer=str(tmp_path / "tiny-wan-Q8_0.gguf")).validate("cpu")
    pipe = load_wan_pipeline(str(wan_dir), torch.float32, storage=storage)
    weight = pipe.transformer.blocks[0].ffn.net[2].weight
    assert isinstance(weight, GGUFParameter) and weight.dtype == torch.uint8  # still Q8_0 bytes in memory
    torch.testing.assert_close(pipe.transformer.blocks[0].attn1.to_q.weight,  # F32 tensors load exactly
                               reference.transformer.blocks[0].attn1.to_q.weight, rtol=0, atol=0)
    plain, from_gguf = sample(reference), sample(pipe)
    assert torch.isfinite(from_gguf).all() and rel_err(plain, from_gguf) < 0.02


def test_a_gguf_file_of_another_model_or_no_gguf_is_one_line(wan_dir, tmp_path):
    pytest.importorskip("gguf", reason="gguf is the optional quant extra: pip install 'fvg[quant]'")
    transformer = tiny_wan_components()["transformer"]
    per_block = sum(key.startswith("blocks.0.") for key in transformer.state_dict())
    deeper = WanTransformer3DModel(**{**transformer.config, "num_layers": transformer.config.num_layers + 1})
    save_wan_gguf(deeper, tmp_path / "deeper.gguf")  # one block more than the checkpoint's config
    (tmp_path / "text.gguf").write_text("not a GGUF file")
    for name, message in (("deeper.gguf", f"does not match the video model's transformer config: {per_block} "
                                          "tensors beyond the config, 0 missing"),
                          ("text.gguf", "cannot load the GGUF transformer")):
        storage = WeightStorage(video_transformer=str(tmp_path / name))
        with pytest.raises(FvgError, match=re.escape(message)) as info:
            load_wan_pipeline(str(wan_dir), torch.float32, storage=storage)
        assert "\n" not in str(info.value)


def test_gguf_files_for_both_a14b_experts(tmp_path):
    pytest.importorskip("gguf", reason="gguf is the optional quant extra: pip install 'fvg[quant]'")
    from diffusers.quantizers.gguf.utils import GGUFParameter

    components = tiny_wan_components()
    torch.manual_seed(5)
    low_noise = WanTransformer3DModel(**components["transformer"].config).eval()
    save_wan_gguf(components["transformer"], tmp_path / "high.gguf")
    save_wan_gguf(low_noise, tmp_path / "low.gguf")
    AnchoredWanPipeline(**components, transformer_2=low_noise, boundary_ratio=0.875).save_pretrained(tmp_path / "a14b")
    reference = load_wan_pipeline(str(tmp_path / "a14b"), torch.float32)
    storage = WeightStorage(video_transformer=str(tmp_path / "high.gguf"),
                            video_transformer_2=str(tmp_path / "low.gguf")).validate("cpu")
    pipe = load_wan_pipeline(str(tmp_path / "a14b"), torch.float32, storage=storage)
    for name in ("transformer", "transformer_2"):
        assert isinstance(getattr(pipe, name).blocks[0].ffn.net[2].weight, GGUFParameter)
        torch.testing.assert_close(getattr(pipe, name).blocks[1].attn2.to_k.weight,
                                   getattr(reference, name).blocks[1].attn2.to_k.weight, rtol=0, atol=0)
    plain, from_gguf = sample(reference), sample(pipe)
    assert torch.isfinite(from_gguf).all() and rel_err(plain, from_gguf) < 0.02


@pytest.mark.parametrize("kind", ["gguf", "torchao-int8wo"])
def test_anchor_lora_on_a_quantized_or_gguf_transformer(wan_dir, tmp_path, kind):
    """The anchor LoRA loads onto quantized weights (PEFT wraps GGUF and torchao layers) and still acts."""
    pytest.importorskip("gguf" if kind == "gguf" else "torchao", reason="the optional quant extra")
    lora = write_lora(tmp_path / "anchor_lora.safetensors", seed=3)
    if kind == "gguf":
        save_wan_gguf(load_wan_pipeline(str(wan_dir), torch.float32).transformer, tmp_path / "t.gguf")
        storage = WeightStorage(video_transformer=str(tmp_path / "t.gguf"))
    else:
        storage = WeightStorage(quantize=kind)

    def video(storage, lora):
        pipe = FactorizedPipeline.from_preset("tiny", device="cpu", dtype="float32", video_model=str(wan_dir),
                                              lora=lora, storage=storage)
        return torch.from_numpy(pipe.animate("a ball", ANCHOR, seed=0, steps=2).astype(np.float32)), pipe

    with_lora, _ = video(None, str(lora))
    without, _ = video(None, None)
    stored, pipe = video(storage, str(lora))
    assert any("lora_" in n for n, _ in pipe.video_pipe.transformer.named_parameters())
    assert rel_err(with_lora, stored) < rel_err(with_lora, without) / 2


def test_gguf_through_the_cli(wan_dir, tmp_path, capsys):
    pytest.importorskip("gguf", reason="gguf is the optional quant extra: pip install 'fvg[quant]'")
    save_wan_gguf(load_wan_pipeline(str(wan_dir), torch.float32).transformer, tmp_path / "t.gguf")
    out = tmp_path / "run"
    # factorized: the builtin anchor model is not refused for the video transformer's GGUF file
    code = main(["generate", "a ball", "--preset", "tiny", "--steps", "2", "--video-model", str(wan_dir),
                 "--video-transformer", str(tmp_path / "t.gguf"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["weights"]["video_transformer"] == str(tmp_path / "t.gguf")
    assert (out / "video.mp4").stat().st_size > 0 and (out / "anchor.png").is_file()


def test_a_failed_gguf_write_leaves_no_file(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf", reason="gguf is the optional quant extra: pip install 'fvg[quant]'")

    def broken(array, kind):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.quants, "quantize", broken)
    with pytest.raises(OSError, match="disk full"):
        save_wan_gguf(tiny_wan_components()["transformer"], tmp_path / "t.gguf")
    assert list(tmp_path.iterdir()) == []
