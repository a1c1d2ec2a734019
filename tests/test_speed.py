"""Speed flags (`fvg.speed`) on both anchored pipelines: tiny Wan (one and two experts) and CogVideoX.

Every cache goes on every transformer, skips work there, keeps latent frame 0 exactly the anchor,
and starts each video afresh (the same seed twice gives the same output); the attention backend
and regional compilation reach every expert; bad values are one line and exit 2.
"""

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from PIL import Image

import fvg.speed as speed
from fvg.animate.cogvideox import AnchoredCogVideoXPipeline
from fvg.animate.wan import AnchoredWanPipeline
from fvg.cli import main
from fvg.speed import MagCacheKey, MagRatioStore, SpeedOptions, apply_speed, transformers
from fvg.tiny import tiny_cogvideox_components, tiny_wan_components
from test_caches import anchor_latent, pinned_frames as pinned  # the anchored frames of a result

STEPS = 8
CALL = dict(prompt="a red circle moves right", num_frames=9, height=32, width=32, num_inference_steps=STEPS,
            guidance_scale=5.0, output_type="latent")
KINDS = ["wan", "wan-two-experts", "cogvideox"]


def build(kind):
    if kind == "cogvideox":
        return AnchoredCogVideoXPipeline(**tiny_cogvideox_components())
    components = tiny_wan_components()
    if kind == "wan-two-experts":
        torch.manual_seed(5)
        low_noise = WanTransformer3DModel(**components["transformer"].config).eval()
        return AnchoredWanPipeline(**components, transformer_2=low_noise, boundary_ratio=0.875)
    return AnchoredWanPipeline(**components)


@pytest.fixture(scope="module")
def anchor_image():
    return Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))


def run(pipe, anchor):
    extra = {"max_sequence_length": 16} if isinstance(pipe, AnchoredCogVideoXPipeline) else {}
    return pipe(**CALL, **extra, anchor=anchor, generator=torch.Generator().manual_seed(3)).frames


def count_calls(pipe):
    """Per transformer, a list that grows by one each time its last block's self-attention really computes."""
    counts, handles = {}, []
    for name, model in transformers(pipe).items():
        counts[name] = []
        block = speed.blocks(model)[-1]
        handles.append(block.attn1.to_q.register_forward_hook(lambda *_, c=counts[name]: c.append(1)))
    return counts, handles


@pytest.fixture
def aggressive(monkeypatch, tmp_path):
    """Thresholds that let every cache skip on random tiny models; MagCache ratios in a fresh folder."""
    monkeypatch.setattr(speed, "FBC_THRESHOLD", 1e9)
    monkeypatch.setattr(speed, "MAG_THRESHOLD", 1e9)
    monkeypatch.setenv("FVG_MAGCACHE_DIR", str(tmp_path / "magcache"))


@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored"])
@pytest.mark.parametrize("cache", ["fbc", "taylorseer", "magcache"])
@pytest.mark.parametrize("kind", KINDS)
def test_cache_on_every_transformer_keeps_the_anchor_and_resets(kind, cache, anchored, anchor_image, aggressive):
    pipe = build(kind)
    anchor = anchor_image if anchored else None
    uncached, handles = count_calls(pipe)
    reference = run(pipe, anchor)
    for handle in handles:
        handle.remove()
    session = apply_speed(pipe, SpeedOptions(cache=cache))
    key = MagCacheKey("tiny", (None,), anchored, STEPS)
    if cache == "magcache":  # the first video of a key measures the ratios: it runs uncached
        with session.sampling(key):
            assert torch.equal(run(pipe, anchor), reference)
        assert session.last_calibration == "measured"
        assert set(MagRatioStore().get(key)) == set(transformers(pipe))
    cached, handles = count_calls(pipe)
    with session.sampling(key):
        first = run(pipe, anchor)
    for handle in handles:
        handle.remove()
    with session.sampling(key):
        second = run(pipe, anchor)
    assert all(model.is_cache_enabled for model in transformers(pipe).values())
    # every expert runs, and skips some of its own steps
    assert all(0 < len(cached[name]) < len(uncached[name]) for name in uncached)
    assert not torch.equal(first, reference)  # the skipped work shows
    assert torch.equal(first, second)  # no state carried from one video to the next
    if anchored:
        assert torch.equal(pinned(pipe, first), anchor_latent(pipe, anchor_image).expand_as(pinned(pipe, first)))


def test_a_failed_video_leaves_no_cache_state(anchor_image, aggressive):
    pipe = build("wan")
    session = apply_speed(pipe, SpeedOptions(cache="fbc"))
    key = MagCacheKey("tiny", (None,), True, STEPS)
    with session.sampling(key):
        expected = run(pipe, anchor_image)

    def stop(_pipe, i, _t, _kwargs):
        if i == 3:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt), session.sampling(key):
        pipe(**CALL, anchor=anchor_image, generator=torch.Generator().manual_seed(3), callback_on_step_end=stop)
    with session.sampling(key):
        assert torch.equal(run(pipe, anchor_image), expected)


@pytest.mark.parametrize("kind", ["wan", "wan-two-experts"])
def test_attention_backend_reaches_every_expert(kind, anchor_image):
    pipe = build(kind)
    reference = run(pipe, anchor_image)
    apply_speed(pipe, SpeedOptions(attention_backend="_native_math"))
    for model in transformers(pipe).values():
        backends = {m.processor._attention_backend for m in model.modules() if hasattr(m, "processor")}
        assert {getattr(b, "value", b) for b in backends} == {"_native_math"}
    latents = run(pipe, anchor_image)
    torch.testing.assert_close(latents, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(pinned(pipe, latents), anchor_latent(pipe, anchor_image).expand_as(pinned(pipe, latents)))


def test_attention_backend_is_refused_where_the_dispatcher_is_not_used():
    from fvg.io import FvgError

    pipe = build("cogvideox")  # CogVideoXAttnProcessor2_0 calls torch's SDPA itself
    with pytest.raises(FvgError, match="does not apply to CogVideoXTransformer3DModel"):
        apply_speed(pipe, SpeedOptions(attention_backend="native"))


@pytest.mark.parametrize("cache", ["none", "fbc"])
@pytest.mark.parametrize("kind", ["wan-two-experts", "cogvideox"])
def test_regional_compile_covers_every_block_of_every_expert(kind, cache, anchor_image, aggressive, monkeypatch):
    # Dynamo traces each block (a graph break fails under fullgraph); inductor's code generation is left
    # out (minutes on a CPU), so the result equals eager.
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "eager")
    pipe = build(kind)
    reference = run(pipe, anchor_image)
    session = apply_speed(pipe, SpeedOptions(compile=True, cache=cache))
    for model in transformers(pipe).values():
        names = {type(b).__name__ for b in speed.blocks(model)}
        assert names <= set(model._repeated_blocks)
        assert all(b._compiled_call_impl is not None for b in speed.blocks(model))
    if kind == "wan-two-experts":
        assert "FrameWanTransformerBlock" in names
    with session.sampling(MagCacheKey("tiny", (None,), True, STEPS)):
        latents = run(pipe, anchor_image)
    if cache == "none":
        torch.testing.assert_close(latents, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(pinned(pipe, latents), anchor_latent(pipe, anchor_image).expand_as(pinned(pipe, latents)))


@pytest.mark.parametrize("preset, backend", [("tiny", "native"), ("tiny-cogvideox", None)])
def test_factorized_pipeline_records_the_flags_and_repeats_a_seed(preset, backend, tmp_path, monkeypatch):
    from fvg.pipeline import FactorizedPipeline

    monkeypatch.setenv("FVG_MAGCACHE_DIR", str(tmp_path))
    pipe = FactorizedPipeline.from_preset(preset, device="cpu", cache="magcache", attention_backend=backend)
    outputs = [pipe("a red ball rolls", mode=mode, seed=1, steps=4) for mode in ("factorized", "t2v", "factorized",
                                                                                 "factorized")]
    assert [o.settings["cache_calibration"] == "measured" for o in outputs] == [True, True, False, False]
    assert outputs[0].settings["cache"] == "magcache" and outputs[0].settings["attention_backend"] == backend
    assert outputs[0].settings["compile"] is False
    assert np.array_equal(outputs[2].frames, outputs[3].frames)  # reset between videos
    assert outputs[2].run_record()["settings"]["cache"] == "magcache"


@pytest.mark.parametrize("args, message", [
    (["--cache", "fast"], "error: unknown cache 'fast': use one of none, fbc, magcache, taylorseer"),
    (["--attention-backend", "warp"], "error: unknown attention backend 'warp': use one of"),
    (["--attention-backend", "flash"], "error: attention backend 'flash' cannot run here:"),
])
@pytest.mark.parametrize("command", ["generate", "animate", "eval"])
def test_bad_speed_flags_are_one_line_and_exit_2(command, args, message, tmp_path, capsys):
    if args[1] == "flash":
        try:
            import flash_attn  # noqa: F401
            pytest.skip("flash-attn is installed here")
        except ImportError:
            pass
    Image.new("RGB", (32, 32)).save(tmp_path / "anchor.png")
    base = {"generate": ["generate", "a red ball", "--preset", "tiny"],
            "animate": ["animate", "a red ball", "--preset", "tiny", "--anchor", str(tmp_path / "anchor.png")],
            "eval": ["eval", "generate", "--suite", "minicompbench"]}[command] + ["--out", str(tmp_path / "out")]
    code = main(base + args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(message) and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_eval_folders_do_not_mix_cached_and_uncached_videos(tmp_path):
    from fvg.eval.generate import CONFIG, GenerateSettings, check_config
    from fvg.eval.suites import load_suite
    from fvg.io import FvgError, write_json

    suite = load_suite("minicompbench", None, None).select(None, 1)
    cached = GenerateSettings(suite, ["factorized"], [0], tmp_path, "tiny", cache="fbc")
    write_json(tmp_path / CONFIG, check_config(cached))
    with pytest.raises(FvgError, match=r"other settings \(cache: fbc\)"):
        check_config(GenerateSettings(suite, ["factorized"], [0], tmp_path, "tiny"))
    assert check_config(cached)["cache"] == "fbc"
