"""The `mini` preset's models and their training recipe, end to end on a handful of clips.

The `tiny` profile runs every stage of `fvg miniworld train` (data -> vae -> latents -> anchor
-> t2v -> lora -> export) with few-thousand-parameter models for a few steps each: the real
classes, files and loaders, in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fvg.io import FvgError
from fvg.miniworld import CATEGORIES, VOCABULARY, first_frame_caption, load_suite
from fvg.miniworld import models
from fvg.miniworld import curves, loop, settings, sink, stages
from fvg.miniworld import train as mt


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    out, weights = root / "run", root / "weights"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # `all` then trains the anchor model in a child process beside the T2V model
    try:
        mt.run(out, stage="all", profile="tiny", weights_dir=weights)
    finally:
        torch.set_num_threads(threads)
    return out, weights


def run_beside(tiny_out: Path, folder: Path, overrides: dict) -> Path:
    """A new run folder that shares the tiny run's data stage, with the tiny profile and `overrides`."""
    folder.mkdir()
    (folder / "data").symlink_to(tiny_out / "data")
    settings.load_settings(folder, "tiny", overrides)
    return folder


# -- tokenizer and text encoder ---------------------------------------------------------------------

def test_tokenizer_covers_vocabulary_prompts_and_captions(tmp_path):
    from transformers import AutoTokenizer

    tok = models.build_tokenizer()
    unk = tok.unk_token_id
    for word in VOCABULARY:
        ids = tok(word, add_special_tokens=False).input_ids
        assert ids != [unk] and len(ids) == 1, word
    for item in load_suite():
        for text in (item.prompt, first_frame_caption(item.prompt)):
            ids = tok(text).input_ids
            assert unk not in ids and ids[-1] == tok.eos_token_id, text
    assert tok("a zebra moves left").input_ids[1] == unk  # unknown words map to <unk>
    assert tok("A Red circle.").input_ids[:3] == tok("a red circle").input_ids[:3]  # lower-cased, split
    tok.save_pretrained(str(tmp_path / "tok"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "a red circle moves right while a blue square moves up"
    assert again(text).input_ids == tok(text).input_ids
    padded = again(text, padding="max_length", max_length=models.MAX_SEQUENCE_LENGTH, return_tensors="pt")
    assert padded.input_ids.shape == (1, models.MAX_SEQUENCE_LENGTH) and int(padded.attention_mask.sum()) == 12


def test_frozen_text_encoder_separates_prompts():
    tok = models.build_tokenizer()
    enc = models.build_text_encoder(models.TextConfig(), len(tok))
    again = models.build_text_encoder(models.TextConfig(), len(tok))
    prompts = ["a red circle moves right while a blue square moves up",
               "a blue circle moves right while a red square moves up",
               "a red circle moves up while a blue square moves right"]
    with torch.no_grad():
        embs = [enc(**tok(p, return_tensors="pt")).last_hidden_state[0] for p in prompts]
        same = again(**tok(prompts[0], return_tensors="pt")).last_hidden_state[0]
    assert torch.equal(embs[0], same)  # the seed fixes the encoder: rebuilding gives the same weights
    for i in range(3):
        for j in range(i + 1, 3):
            assert (embs[i] - embs[j]).abs().max() > 1e-2
    assert not any(p.requires_grad for p in enc.parameters())


def _pooled(enc, tok, text):
    with torch.no_grad():
        return enc(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0)


def test_v2_text_encoder_tells_swapped_roles_apart():
    """The DiT's cross-attention has no positions over text tokens, so "A left of B" and "B left of A"
    (the same words) differ only through the encoder's context. v1's encoder (UMT5's own bias scale)
    put them 10x closer than a one-word change; v2's scaled relative biases make them about as far."""
    tok = models.build_tokenizer()
    a = "a red circle is to the left of a blue square"
    swapped, one_word = "a blue square is to the left of a red circle", "a green circle is to the left of a blue square"
    ratios = {}
    for name, cfg in (("v1", models.v1_config().text), ("v2", models.TextConfig())):
        enc = models.build_text_encoder(cfg, len(tok))
        base = _pooled(enc, tok, a)
        ratios[name] = float((base - _pooled(enc, tok, swapped)).norm() / (base - _pooled(enc, tok, one_word)).norm())
    assert ratios["v1"] < 0.25 and ratios["v2"] > 0.5, ratios
    # v1's encoder is exactly the one the shipped weights were built with: the scale 1.0 changes nothing.
    assert models.v1_config().text.relative_bias_scale == 1.0


# -- model shapes ------------------------------------------------------------------------------------

def test_full_config_compresses_a_clip_to_5x16x16():
    cfg = models.MiniConfig()
    vae = models.build_vae(cfg.vae).eval()
    assert (vae.config.scale_factor_spatial, vae.config.scale_factor_temporal) == (4, 4)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 17, 64, 64)).latent_dist.mode()
        one = vae.encode(torch.zeros(1, 3, 1, 64, 64)).latent_dist.mode()
    assert tuple(z.shape) == (1, cfg.vae.z_dim, 5, 16, 16) and tuple(one.shape) == (1, cfg.vae.z_dim, 1, 16, 16)
    t2v = models.build_transformer(cfg.t2v, cfg.vae.z_dim, cfg.text.d_model)
    anchor = models.build_transformer(cfg.anchor, cfg.vae.z_dim, cfg.text.d_model)
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in (("t2v", t2v), ("anchor", anchor),
                                                                         ("vae", vae))}
    assert 0.5e6 < sizes["t2v"] < 6e6
    # Float32, the VAE once per pipeline: the two transformers leave room for the text encoders and the
    # LoRA under the shipped cap (test_mini_weights checks the real files).
    assert 4 * (sizes["t2v"] + sizes["anchor"] + 2 * sizes["vae"]) < 0.9 * models.MAX_SHIPPED_BYTES


def test_zero_init_makes_every_block_the_identity_and_still_learns():
    """adaLN-Zero on the real Wan class: the blocks pass the residual stream through unchanged, the
    model predicts exactly 0, and one step of gradient reaches the head and the gates."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(models.tiny_config().t2v, init="zero")
    model = models.build_transformer(cfg, 4, 16)
    x, t, text = torch.randn(2, 4, 2, 8, 8), torch.tensor([100.0, 900.0]), torch.randn(2, 7, 16)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append(torch.equal(out, args[0])))
    pred = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert seen == [True] * len(model.blocks)
    assert torch.count_nonzero(pred) == 0
    pred.sub(torch.randn_like(pred)).pow(2).mean().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0
    stock = models.build_transformer(dataclasses.replace(cfg, init="torch"), 4, 16)
    assert torch.count_nonzero(stock.proj_out.weight) > 0  # "torch" (v1, v2) keeps diffusers' init
    with pytest.raises(FvgError, match="init"):
        models.build_transformer(dataclasses.replace(cfg, init="xavier"), 4, 16)


def test_settings_overrides_persist_and_reject_unknown_keys(tmp_path):
    s = settings.load_settings(tmp_path, "tiny", {"t2v_steps": 7, "model.flow_shift": 3})
    assert s.t2v_steps == 7 and s.model.flow_shift == 3.0
    assert settings.load_settings(tmp_path).t2v_steps == 7  # saved with the run
    with pytest.raises(FvgError, match="unknown"):
        settings.load_settings(tmp_path, None, {"t2v_stpes": 1})
    with pytest.raises(FvgError, match="sigma_sampling"):
        settings.load_settings(tmp_path, None, {"sigma_sampling": "cosine"})
    with pytest.raises(FvgError, match="profile"):
        settings.load_settings(tmp_path, "full")


# -- the recipe end to end ----------------------------------------------------------------------------

def test_all_stages_complete_and_write_curves(tiny_run, capsys):
    from fvg.cli import main

    out, weights = tiny_run
    for name in ("data", "vae", "latents", "anchor", "t2v", "lora"):
        assert (out / name / "DONE.json").is_file(), name
    export = loop.done_info(out / "export")  # where the weights went, though --weights-dir put them elsewhere
    assert export["weights_dir"] == str(weights) and export["bytes"] == models.shipped_size(weights)
    capsys.readouterr()
    assert main(["miniworld", "status", "--out", str(out)]) == 0
    assert f"'weights_dir': '{weights}'" in capsys.readouterr().out.splitlines()[-1]
    assert "stage anchor:" in (out / "anchor.stage.log").read_text()  # the anchor stage ran beside t2v
    for name in ("vae", "anchor", "t2v"):
        rows = loop.read_log(out / name / "log.jsonl")
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and all(np.isfinite(r["loss"]) for r in rows)
    stats = json.loads((out / "latents" / "stats.json").read_text())
    assert stats["shape"][1:] == [4, 5, 16, 16]  # tiny VAE: z 4, 17 -> 5 frames, 64 -> 16 px
    assert len(json.loads((out / "data" / "metadata.jsonl").read_text().splitlines()[0])) >= 5
    lora_rows = (out / "data" / "lora_metadata.jsonl").read_text().splitlines()
    assert len(lora_rows) == settings.tiny_settings().lora_clips


def test_latents_are_normalised_with_the_vae_config(tiny_run):
    out, weights = tiny_run
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(models.video_dir(weights) / "vae"))
    stats = json.loads((out / "latents" / "stats.json").read_text())
    assert vae.config.latents_mean == stats["latents_mean"] and vae.config.latents_std == stats["latents_std"]
    assert vae.config.latents_std != [1.0] * 4
    data = stages.LatentSet(out)
    assert abs(float(data.latents.mean())) < 0.2 and abs(float(data.latents.std()) - 1) < 0.2


def test_exported_weights_load_with_the_real_classes(tiny_run):
    _, weights = tiny_run
    from diffusers import WanPipeline, WanTransformer3DModel

    from fvg.anchor import DiffusersAnchorSource
    from fvg.animate.wan import AnchoredWanPipeline

    assert models.shipped_size(weights) < models.MAX_SHIPPED_BYTES
    assert json.loads((models.video_dir(weights) / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    pipe = models.load_video_pipeline(weights)
    assert isinstance(pipe, AnchoredWanPipeline) and "anchor" in pipe.get_list_adapters()["transformer"]
    anchor = models.load_anchor_pipeline(weights)
    assert isinstance(anchor, WanPipeline) and isinstance(anchor.transformer, WanTransformer3DModel)
    source = DiffusersAnchorSource.from_pretrained(str(models.anchor_dir(weights)), dtype=torch.float32,
                                                   steps=2)
    result = source("a red circle on the left on a black background", 64, 64)
    assert result.image.size == (64, 64)
    assert models.read_manifest(weights)["settings"]["profile"] == "tiny"
    from safetensors import safe_open

    with safe_open(str(weights / models.LORA_FILE), "pt") as f:  # provenance without the trainer's paths
        metadata = f.metadata()
    assert metadata["base_model"] == "video" and json.loads(metadata["fvg"])["base_model"] == "video"


def test_a_float16_export_halves_the_t2v_base_and_loads_it_into_float32(tiny_run, tmp_path):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from fvg.miniworld.settings import RunSettings

    out, weights = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    for part in ("data", "vae", "latents", "anchor", "t2v", "lora", "pipelines"):
        (run / part).symlink_to(out / part)
    settings.load_settings(run, "tiny", {"t2v_ship_dtype": "float16"})
    half = tmp_path / "weights"
    mt.run(run, stage="export", weights_dir=half)
    assert models.read_manifest(half)["settings"]["t2v_ship_dtype"] == "float16"
    kept = WanTransformer3DModel._keep_in_fp32_modules
    name = "video/transformer/diffusion_pytorch_model.safetensors"
    full, stored = load_file(str(weights / name)), load_file(str(half / name))
    assert stored.keys() == full.keys()
    for key, value in stored.items():
        fp32 = any(m in key.split(".") for m in kept)
        assert value.dtype == (torch.float32 if fp32 else torch.float16), key
        assert torch.equal(value, full[key].to(value.dtype)), key
    assert any(v.dtype == torch.float32 for v in stored.values())  # scale_shift_table, norms, time embedder
    assert (half / name).stat().st_size < 0.75 * (weights / name).stat().st_size
    # only the T2V base is rounded: the anchor pipeline and the video pipeline's other parts are copied
    for part in ("video/vae", "video/text_encoder", "anchor/transformer", "anchor/vae"):
        for f in (weights / part).iterdir():
            assert f.read_bytes() == (half / part / f.name).read_bytes(), f
    assert (half / models.LORA_FILE).stat().st_size == (weights / models.LORA_FILE).stat().st_size
    # loaded as the preset loads it: float32, the stored values exactly
    pipe, ref = models.load_video_pipeline(half, lora=False), models.load_video_pipeline(weights, lora=False)
    reference = ref.transformer.state_dict()
    for key, value in pipe.transformer.state_dict().items():
        assert value.dtype == torch.float32, key
        fp32 = any(m in key.split(".") for m in kept)
        assert torch.equal(value, reference[key] if fp32 else reference[key].half().float()), key
    assert RunSettings.from_dict({k: v for k, v in RunSettings().to_dict().items()
                                  if k != "t2v_ship_dtype"}).t2v_ship_dtype == "float32"  # runs before v15
    with pytest.raises(FvgError, match="unknown t2v_ship_dtype 'bfloat16' \\(float32 or float16\\)"):
        RunSettings(t2v_ship_dtype="bfloat16")


def test_mini_preset_generates_from_exported_weights(tiny_run):
    from fvg.pipeline import FactorizedPipeline
    from fvg.presets import get_preset

    _, weights = tiny_run
    preset = get_preset("mini")
    assert (preset.height, preset.width, preset.num_frames, preset.fps, preset.planner) == (64, 64, 17, 8, "rules")
    assert Path(preset.video_model) == models.video_dir() and Path(preset.lora) == models.lora_path()
    pipe = FactorizedPipeline.from_preset("mini", device="cpu", video_model=str(models.video_dir(weights)),
                                          anchor_model=str(models.anchor_dir(weights)),
                                          lora=str(models.lora_path(weights)), anchor_steps=2)
    out = pipe("a red circle moves right while a blue square moves up", mode="factorized", steps=2, seed=0)
    assert out.frames.shape == (17, 64, 64, 3) and out.anchor is not None
    assert out.plan.first_frame_caption == first_frame_caption("a red circle moves right while a blue square moves up")
    t2v = pipe("a red circle moves right while a blue square moves up", mode="t2v", steps=2, seed=0)
    assert t2v.frames.shape == (17, 64, 64, 3)


def test_stage_time_limit_and_resume(tmp_path, tiny_run):
    out, _ = tiny_run
    run = run_beside(out, tmp_path / "run", {"vae_steps": 4, "checkpoint_every": 100})
    mt.run(run, stage="vae", time_limit=0.0)  # checkpoints after its first step and stops
    assert (run / "vae" / "ckpt.pt").is_file() and not (run / "vae" / "DONE.json").exists()
    assert [r["step"] for r in loop.read_log(run / "vae" / "log.jsonl")] == [1]
    with pytest.raises(FvgError, match="--resume"):
        mt.run(run, stage="vae")
    mt.run(run, stage="vae", resume=True)
    assert (run / "vae" / "DONE.json").is_file()
    assert [r["step"] for r in loop.read_log(run / "vae" / "log.jsonl")] == [1, 2, 3, 4]
    mt.run(run, stage="vae")  # complete: skipped


def test_a_finished_stage_carried_without_its_pipeline_gets_it_back(tiny_run, tmp_path):
    """runs-carry keeps a finished transformer as final/ + DONE.json; the stage assembles its pipeline again."""
    from diffusers import WanTransformer3DModel

    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True, ignore=shutil.ignore_patterns("pipelines", "lora", "ckpt.pt"))
    mt.run(run, stage="t2v")
    video = run / "pipelines" / models.VIDEO_SUBDIR
    assert models.is_pipeline_dir(video) and not (run / "pipelines" / models.ANCHOR_SUBDIR).exists()
    rebuilt = WanTransformer3DModel.from_pretrained(str(video / "transformer")).state_dict()
    original = WanTransformer3DModel.from_pretrained(str(out / "pipelines" / models.VIDEO_SUBDIR / "transformer"))
    assert all(torch.equal(rebuilt[k], v) for k, v in original.state_dict().items())
    shutil.rmtree(run / "t2v" / "final")
    shutil.rmtree(video)
    with pytest.raises(FvgError, match="marked done but .*final is missing"):
        mt.run(run, stage="t2v")
    loop.mark_done(run / "anchor", {**loop.done_info(run / "anchor"), "reused_from": "an export"})
    with pytest.raises(FvgError, match="fvg miniworld reuse --out .* --stages anchor"):
        mt.run(run, stage="anchor")


def test_missing_weights_explain_how_to_train(tmp_path):
    with pytest.raises(FvgError, match="fvg miniworld train"):
        models.require_weights(tmp_path)


def test_cli_dataset_and_unknown_stage(tmp_path, capsys):
    from fvg.cli import main

    assert main(["miniworld", "dataset", "--out", str(tmp_path / "d"), "--clips", "3", "--seed", "1"]) == 0
    rows = (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 3 and (tmp_path / "d" / json.loads(rows[0])["video"]).is_file()
    assert main(["miniworld", "train", "--out", str(tmp_path / "r"), "--stage", "nope"]) == 2
    # a later stage or the status of a folder that is no run: one line, and no folder left behind
    capsys.readouterr()
    assert main(["miniworld", "train", "--out", str(tmp_path / "r"), "--stage", "t2v", "--resume"]) == 2
    assert main(["miniworld", "status", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.count("is not a mini training run (no settings.json)") == 2
    assert not (tmp_path / "r").exists()


def test_status_reports_done_stages_loss_logs_and_lora_checkpoints(tmp_path, capsys):
    from fvg.cli import main
    from fvg.train.trainer import STATE_FILE

    run = tmp_path / "r"
    settings.load_settings(run, "tiny", {})
    loop.mark_done(run / "data", {"clips": 3})
    (run / "vae").mkdir()
    (run / "vae" / "log.jsonl").write_text(json.dumps({"step": 7, "loss": 0.25, "elapsed_s": 12.0}) + "\n")
    for step in (2, 10):  # the later one only counts once its trainer state is written
        (run / "lora" / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    (run / "lora" / "checkpoints" / "step_000002" / STATE_FILE).write_text("{}")
    capsys.readouterr()
    assert main(["miniworld", "status", "--out", str(run)]) == 0
    lines = {line.split()[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()}
    assert lines["data"].startswith("done") and "'clips': 3" in lines["data"]
    assert lines["vae"] == "step 7 loss 0.2500 after 12 s"
    assert lines["lora"].startswith("checkpoint step_000002")
    assert lines["t2v"] == "-" and lines["export"] == "-"


def test_padding_sink_matches_full_padding():
    """Training packs text to its longest prompt + 1 with a logit bias: the same outputs as 512 zeros."""
    torch.manual_seed(0)
    cfg = models.tiny_config()
    model = models.build_transformer(dataclasses.replace(cfg.t2v, init="torch"), 4, 16).eval()  # not all zeros
    embeds = [torch.randn(5, 16), torch.randn(9, 16), torch.randn(1, 16)]
    full = torch.zeros(3, models.MAX_SEQUENCE_LENGTH, 16)
    for i, e in enumerate(embeds):
        full[i, :e.shape[0]] = e
    x, t = torch.randn(3, 4, 2, 8, 8), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        want = model(hidden_states=x, timestep=t, encoder_hidden_states=full, return_dict=False)[0]
        padding = sink.PaddingSink(model, models.MAX_SEQUENCE_LENGTH)
        packed = padding.pack(embeds, 16)
        got = model(hidden_states=x, timestep=t, encoder_hidden_states=packed, return_dict=False)[0]
    assert packed.shape[1] == 10
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_vae_preview_and_curves(tiny_run, tmp_path):
    out, _ = tiny_run
    info = curves.vae_preview(out, tmp_path / "p.png", clips=2)
    assert (tmp_path / "p.png").is_file() and 0 <= info["object_pixel_agreement"] <= 1
    summary = curves.write_curves(out)
    assert set(summary) == {"vae", "anchor", "t2v", "lora"} and summary["t2v"]["steps"] == settings.tiny_settings().t2v_steps


def test_plateau_fits_the_tail_not_one_slice():
    rng = np.random.default_rng(0)
    flat = [{"step": i, "loss": 0.3 + 0.01 * rng.standard_normal()} for i in range(2000)]
    falling = [{"step": i, "loss": 1.0 - i / 1000 + 0.02 * rng.standard_normal()} for i in range(600)]
    assert curves.plateau(flat)["plateau"] and abs(curves.plateau(flat)["relative_drop"]) < 0.02
    info = curves.plateau(falling)
    assert not info["plateau"] and info["relative_drop"] == pytest.approx(0.12 / 0.46, abs=0.05)
    assert info["tail_halves"][0] > info["tail_halves"][1]
    assert curves.plateau(flat[:10])["plateau"] is None


def test_diagnose_set_distance_ignores_order_and_cli_rejects_unknown():
    from fvg.cli import main
    from fvg.miniworld.diagnose import prompt_triples, set_distance

    a = np.random.default_rng(0).normal(size=(6, 8))
    assert set_distance(a, a[::-1]) == pytest.approx(0.0)  # a set: the order of tokens does not count
    assert set_distance(a, a + 1.0) > 0.1
    for prompt, swapped, one_word in prompt_triples(6):
        assert sorted(prompt.split()) == sorted(swapped.split()) and prompt != swapped
        assert sum(x != y for x, y in zip(prompt.split(), one_word.split())) == 1
    assert main(["miniworld", "diagnose", "--what", "bogus"]) == 2
    assert main(["miniworld", "diagnose", "--what", "lost"]) == 2  # needs --bench
    assert main(["miniworld", "diagnose", "--what", "text", "--bench", "runs"]) == 2


def test_anchor_score_reads_final_weights_or_the_latest_checkpoint(tiny_run, tmp_path):
    import shutil

    out, _ = tiny_run
    final = curves.anchor_stills_score(out, limit=1, seeds=(0,), steps=2)
    assert final["step"] == settings.tiny_settings().anchor_steps
    assert set(final["per_category"]) == set(CATEGORIES) and 0.0 <= final["mean"] <= 1.0
    assert 0.0 <= final["shape_fidelity"] <= 1.0
    assert final["kinds"]["background"] >= 0.0 and set(final["kinds"]) <= {"present", "size", "count", "relation",
                                                                          "background"}
    # Mid-training: no final/, the checkpoint's EMA weights (here the same step, so the same anchors).
    mid = tmp_path / "run"
    shutil.copytree(out, mid)
    shutil.rmtree(mid / "anchor" / "final")
    assert curves.anchor_stills_score(mid, limit=1, seeds=(0,), steps=2) == final
    (mid / "anchor" / "ckpt.pt").unlink()
    with pytest.raises(FvgError, match="no anchor model"):
        curves.anchor_stills_score(mid, limit=1, seeds=(0,), steps=2)


def test_noise_restoration_spans_the_vae_round_trip_to_the_pipelines_own_sampling(tiny_run):
    from fvg.miniworld.diagnose import noise_restoration, restore_from_noise
    from fvg.miniworld.render import reference_clip

    out, _ = tiny_run
    pipe, _ = curves.run_anchor_pipeline(out)
    frame = reference_clip("a red circle moves right while a blue square moves up", 0)[0]
    caption = "a red circle on the left and a blue square at the bottom on a black background"
    # sigma 0: no denoising step, exactly the VAE's round trip.
    vae = pipe.vae
    with torch.no_grad():
        pixels = torch.from_numpy(frame).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None]
        direct = vae.decode(vae.encode(pixels).latent_dist.mode()).sample[0, :, 0].clamp(-1, 1)
    direct = ((direct + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(restore_from_noise(pipe, frame, caption, 0.0, seed=0, steps=3), direct)
    # sigma 1: the pipeline's own sampling from the same noise (CFG batched here, two calls there).
    restored = restore_from_noise(pipe, frame, caption, 1.0, seed=3, steps=3)
    shape = (1, vae.config.z_dim, 1, 64 // pipe.vae_scale_factor_spatial, 64 // pipe.vae_scale_factor_spatial)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    image = pipe(caption, negative_prompt=" ", height=64, width=64, num_frames=1, num_inference_steps=3,
                 guidance_scale=4.0, latents=noise, output_type="np").frames[0][0]
    assert np.abs(restored.astype(int) - np.round(image * 255).astype(int)).max() <= 1
    # Intermediate sigmas change the image; rows come back per sigma with scores in [0, 1].
    assert not np.array_equal(restore_from_noise(pipe, frame, caption, 0.9, seed=0, steps=3), direct)
    rows = noise_restoration(pipe, sigmas=(0.0, 1.0), limit=1, steps=2)
    assert [r.sigma for r in rows] == [0.0, 1.0] and set(rows[0].per_category) == set(CATEGORIES)
    assert all(0.0 <= r.mean <= 1.0 for r in rows)


def test_video_noise_restoration_spans_the_vae_round_trip_to_anchored_sampling(tiny_run, capsys):
    from fvg.cli import main
    from fvg.miniworld.diagnose import animate_from_noise, video_noise_restoration
    from fvg.miniworld.render import reference_clip

    _, weights = tiny_run
    pipe = models.load_video_pipeline(weights)
    prompt = "a red circle moves right while a blue square moves up"
    clip = reference_clip(prompt, 0)
    pixels = torch.from_numpy(clip).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    x0 = pipe.encode_video(pixels)
    # sigma 0: no denoising step, exactly the VAE's round trip of the whole clip.
    np.testing.assert_array_equal(animate_from_noise(pipe, clip, prompt, 0.0, seed=0, steps=3),
                                  pipe.decode_latents(x0, "np")[0])
    # sigma 1: the pipeline's own anchored sampling of the true first frame from the same noise.
    animated = animate_from_noise(pipe, clip, prompt, 1.0, seed=3, steps=3)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    video = pipe(prompt, negative_prompt="", anchor_latents=x0[:, :, :1], height=64, width=64, num_frames=17,
                 num_inference_steps=3, guidance_scale=4.0, latents=noise, output_type="np").frames[0]
    assert video.shape == animated.shape == (17, 64, 64, 3)
    assert np.abs(animated - video).max() <= 1 / 255
    rows = video_noise_restoration(pipe, sigmas=(0.0, 1.0), limit=1, seeds=(0,), steps=2)
    assert [r.sigma for r in rows] == [0.0, 1.0] and set(rows[0].per_category) == set(CATEGORIES)
    assert all(0.0 <= r.mean <= 1.0 for r in rows)
    assert main(["miniworld", "diagnose", "--what", "video-noise", "--lora", "/nowhere.safetensors"]) == 2
    assert "--lora /nowhere.safetensors: file not found" in capsys.readouterr().err


def test_fit_gap_scores_the_training_clips_against_fresh_ones(tiny_run, capsys):
    from fvg.cli import main
    from fvg.miniworld import diagnose as d
    from fvg.miniworld.dataset import clip_prompt

    out, weights = tiny_run
    s = settings.tiny_settings()
    pipe = models.load_video_pipeline(weights, lora=False)
    gaps, repeated = d.fit_gap(pipe, s.seed, s.num_clips, clips=4, sigmas=(0.5, 1.0))
    assert [g.sigma for g in gaps] == [0.5, 1.0] and all(g.train > 0 and g.fresh > 0 for g in gaps)
    assert gaps[0].ratio == pytest.approx(gaps[0].fresh / gaps[0].train)
    assert 0 <= repeated <= 4
    # The training clips are the run's own: its metadata rows, rebuilt from the data seed.
    trained = [json.loads(line) for line in (out / "data" / "metadata.jsonl").read_text().splitlines()][:4]
    z, text = d._clip_batch(pipe, trained)
    assert gaps[1].train == pytest.approx(d._flow_loss(pipe.transformer, z, text, 1.0, seed=1), rel=1e-6)
    assert [str(clip_prompt(i, s.seed)) for i in range(4)] == [r["caption"] for r in trained]
    with pytest.raises(ValueError, match="another data seed"):
        d.fit_gap(pipe, 5, s.num_clips, fresh_seed=5)
    assert main(["miniworld", "diagnose", "--what", "fit", "--weights", str(weights)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fit: sigma 0.3: flow loss ") and "of the fresh clips' captions" in lines[-1]


def test_lost_objects_of_a_bench_whose_every_object_turns_colour(tmp_path, capsys):
    """Objects that turn are left out of the by-frame shares: with nothing else, no share is reported."""
    from fvg.cli import main
    from fvg.io import write_mp4
    from fvg.miniworld.diagnose import lost_objects
    from fvg.miniworld.render import reference_clip

    prompt = "a green square turns orange"
    write_mp4(tmp_path / "ladder" / "rendered.mp4", reference_clip(prompt, 0), fps=8)
    row = {"category": "dynamic_attr", "index": 1, "prompt": prompt, "mode": "rendered", "seed": 0,
           "video": "ladder/rendered.mp4", "metrics": {"minicompbench": 1.0}}
    (tmp_path / "scores.jsonl").write_text(json.dumps(row) + "\n")
    (lost,) = lost_objects(tmp_path)
    assert (lost.label, lost.objects, lost.reasons, lost.found) == ("rendered", 1, {}, {})
    assert main(["miniworld", "diagnose", "--what", "lost", "--bench", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "lost: rendered: 0 of 1 objects missing at frame 16"


def test_still_code_compares_the_anchor_frame_code_with_the_chunk_codes(tiny_run, capsys):
    from fvg.cli import main
    from fvg.miniworld import diagnose as d
    from fvg.miniworld.dataset import clip_row
    from fvg.miniworld.stages import render_clip, to_pixels

    _, weights = tiny_run
    vae = models.load_video_pipeline(weights, lora=False).vae
    codes = d.still_code(vae, clips=4, seed=3)
    assert [c.frame for c in codes] == [1, 2, 3, 4] and all(c.linear_r2 <= 1.0 for c in codes)
    still = np.repeat(np.stack([render_clip(clip_row(i, 3)[0])[:1] for i in range(4)]), 17, axis=1)
    with torch.no_grad():
        z = vae.encode(to_pixels(still)).latent_dist.mode()
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    assert codes[0].mse == pytest.approx(float(((z[:, :, 1] - z[:, :, 0]) / std).pow(2).mean()), rel=1e-5)
    assert main(["miniworld", "diagnose", "--what", "still-code", "--weights", str(weights)]) == 0
    assert capsys.readouterr().out.count("still-code: latent frame") == 4


def test_still_consistency_measures_the_chunks_against_latent_frame_zero_per_channel():
    frame0 = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1).expand(2, 2, 1, 1, 1).clone()  # channel var 2
    frame0[:, 1] *= 2.0  # channel 1: var 8
    same = frame0.expand(2, 2, 5, 1, 1)
    assert float(stages.still_consistency(same)) == 0.0
    moved = same.clone()
    moved[:, :, 1:] += 2.0  # every later frame 2 away: 4/2 in channel 0, 4/8 in channel 1
    assert float(stages.still_consistency(moved)) == pytest.approx((2.0 + 0.5) / 2)
    moved.requires_grad_(True)
    stages.still_consistency(moved).backward()
    assert moved.grad[:, :, 0].abs().sum() == 0  # frame 0 is the target: only the chunks move


def test_a_vae_fine_tuned_on_still_scenes_moves_its_chunks_toward_the_anchor_code(tiny_run, tmp_path):
    out, weights = tiny_run
    start = weights / "video" / "vae"
    runs = {}
    for name, weight in (("plain", 0.0), ("still", 30.0)):  # the same fine-tune with and without the term
        runs[name] = run_beside(out, tmp_path / name, {"vae_source": str(start), "vae_still_steps": 12,
                                                       "vae_still_lr": 3e-3, "vae_still_weight": weight})
        mt.run(runs[name], stage="vae")
    plain, still = (json.loads((runs[n] / "vae" / "DONE.json").read_text()) for n in ("plain", "still"))
    assert still["still_code"] < plain["still_code"] and still["still_steps"] == 12
    assert [r["step"] for r in loop.read_log(runs["still"] / "vae" / "still" / "log.jsonl")][-1] == 12
    copied = models.load_video_pipeline(weights, lora=False).vae.state_dict()  # the first phase: the source
    first = stages.load_trained_vae(str(runs["still"] / "vae" / "final"), settings.tiny_settings(), "x").state_dict()
    assert all(torch.equal(first[k], v) for k, v in copied.items())
    tuned = runs["still"] / "vae" / "still" / "final"
    assert stages.trained_vae_dir(runs["still"], settings.load_settings(runs["still"])) == tuned
    assert (tuned / "config.json").is_file()

    # from random weights: the first phase trains, then the fine-tune continues it
    fresh = run_beside(out, tmp_path / "fresh", {"vae_still_steps": 2, "checkpoint_every": 100})
    mt.run(fresh, stage="vae", time_limit=0.0)  # stops after the first phase's first step
    assert not (fresh / "vae" / "final").exists() and not (fresh / "vae" / "still").exists()
    mt.run(fresh, stage="vae", resume=True)
    assert [r["step"] for r in loop.read_log(fresh / "vae" / "log.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in loop.read_log(fresh / "vae" / "still" / "log.jsonl")] == [1, 2]
    assert json.loads((fresh / "vae" / "DONE.json").read_text())["steps"] == 3

    bad = run_beside(out, tmp_path / "bad", {"vae_source": str(tmp_path), "vae_still_steps": 2})
    with pytest.raises(FvgError, match="vae_source .* is not a diffusers AutoencoderKLWan directory"):
        mt.run(bad, stage="vae")


def test_an_anchored_t2v_base_learns_no_loss_on_the_clean_first_frame(tiny_run, tmp_path):
    out, _ = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("data", "vae", "latents"):
        (run / stage).symlink_to(out / stage)
    settings.load_settings(run, "tiny", {"t2v_p_anchor": 1.0})
    mt.run(run, stage="t2v")
    anchored = loop.read_log(run / "t2v" / "log.jsonl")
    plain = loop.read_log(out / "t2v" / "log.jsonl")
    assert anchored[0]["loss"] != plain[0]["loss"]  # the same batch and noise, frame 0 left out of the loss
    assert json.loads((run / "t2v" / "DONE.json").read_text())["steps"] == 3


def test_an_extended_stage_replays_the_learning_rate_it_ran_with():
    """v4 continued v3's finished stages (t2v 5000 -> 8000): the schedule a fresh run follows is the one the
    shipped run logged (values from runs/mini-v4/t2v/log.jsonl: the LR of the window's last step)."""
    from fvg.miniworld.loop import lr_at

    assert lr_at(4999, 1e-3, 200, 8000, [5000]) == 0.00010000009638285205  # v3's cosine ends at 10%
    assert lr_at(5009, 1e-3, 200, 8000, [5000]) == 0.0003889036432464038  # the stretched cosine takes over
    assert lr_at(5009, 1e-3, 200, 8000) < lr_at(4999, 1e-3, 200, 8000)  # one cosine: no restart
    assert lr_at(7999, 1e-3, 200, 8000, [5000]) == pytest.approx(1e-4, rel=1e-6)
    # a second extension: the first two stretches replay unchanged
    assert lr_at(5009, 1e-3, 200, 11000, [5000, 8000]) == lr_at(5009, 1e-3, 200, 8000, [5000])
    assert lr_at(8009, 1e-3, 200, 11000, [5000, 8000]) > lr_at(7999, 1e-3, 200, 11000, [5000, 8000])
    # v5 continued v4's T2V stage to 11000: its log (runs/mini-v5/t2v/log.jsonl, steps 8010 and 11000)
    assert lr_at(8009, 1e-3, 200, 11000, [5000, 8000]) == 0.00025984409308262664
    assert lr_at(10999, 1e-3, 200, 11000, [5000, 8000]) == 0.00010000001903858862
    # v6 continued v4's anchor stage to 26000 (runs/mini-v6/anchor/log.jsonl, steps 18010 and 26000)
    assert lr_at(18009, 1e-3, 200, 26000, [12000, 18000]) == 0.000296745331450663
    assert lr_at(25999, 1e-3, 200, 26000, [12000, 18000]) == 0.00010000000333612913


def test_extension_settings_default_to_one_cosine_for_older_runs_and_are_validated():
    from fvg.io import FvgError
    from fvg.miniworld.settings import RunSettings

    full = RunSettings()
    assert (full.anchor_extended_from, full.t2v_extended_from) == ([], [])  # v8: both trained fresh
    v6 = RunSettings(anchor_extended_from=[12000, 18000])
    assert RunSettings.from_dict(v6.to_dict()).anchor_extended_from == [12000, 18000]
    old = {k: v for k, v in v6.to_dict().items() if not k.endswith("_extended_from")}
    assert RunSettings.from_dict(old).anchor_extended_from == []  # a v3 manifest: one cosine
    for bad in ([11000], [6000, 5000], [0], [5000, 5000], 5000):
        with pytest.raises(FvgError, match="t2v_extended_from must list earlier totals"):
            RunSettings(t2v_extended_from=bad)


def test_lora_decay_reaches_fvg_train_and_older_runs_read_constant(tmp_path):
    from fvg.io import FvgError
    from fvg.miniworld.settings import RunSettings

    assert stages.lora_config(tmp_path, RunSettings()).lr_scheduler == "constant_with_warmup"
    cfg = stages.lora_config(tmp_path, RunSettings(lora_steps=8000, lora_decay_steps=2000))
    assert (cfg.lr_scheduler, cfg.lr_decay_steps, cfg.lr_warmup_steps, cfg.max_steps) == (
        "warmup_stable_decay", 2000, 50, 8000)
    old = {k: v for k, v in RunSettings().to_dict().items() if k != "lora_decay_steps"}
    assert RunSettings.from_dict(old).lora_decay_steps == 0  # a v12 run: a constant rate
    for bad in (-1, 951):  # past lora_steps after the 50-step warmup
        with pytest.raises(FvgError, match=r"lora_decay_steps must be in \[0, 950\]"):
            RunSettings(lora_steps=1000, lora_decay_steps=bad)
    assert RunSettings(lora_steps=1000, lora_decay_steps=950).lora_decay_steps == 950


def test_a_grown_lora_continues_the_first_phase_and_ships(tiny_run, tmp_path):
    from fvg.miniworld.settings import RunSettings
    from fvg.train.export import read_lora

    out, _ = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    for part in ("data", "vae", "latents", "anchor", "t2v", "pipelines"):
        (run / part).symlink_to(out / part)
    s = settings.load_settings(run, "tiny", {"lora_grow_rank": 8, "lora_grow_steps": 2})
    mt.run(run, stage="lora")
    grown = stages.lora_config(run, s, grown=True)  # it needs the first phase's file
    assert (grown.rank, grown.alpha, grown.max_steps, grown.seed, grown.lr_scheduler) == (
        8, 8.0, 2, s.seed + 1, "constant_with_warmup")
    assert grown.init_lora == str(run / "lora" / "lora" / models.LORA_FILE)
    done = json.loads((run / "lora" / "DONE.json").read_text())
    assert done["steps"] == 4 and done["lora"] == str(stages.lora_file(run, s))
    assert {k: (v["steps"], v["rank"]) for k, v in done["phases"].items()} == {"first": (2, 4), "grown": (2, 8)}
    tensors, config, info = read_lora(stages.lora_file(run, s))
    assert config["r"] == 8 and info["steps"] == 2
    assert tensors["blocks.0.attn1.to_q.lora_A.weight"].shape[0] == 8
    first, _, _ = read_lora(run / "lora" / "lora" / models.LORA_FILE)
    assert first["blocks.0.attn1.to_q.lora_A.weight"].shape[0] == 4
    # resumed: the first phase, whose LoRA has its steps, is not trained again
    (run / "lora" / "DONE.json").unlink()
    mt.run(run, stage="lora", resume=True)
    assert json.loads((run / "lora" / "DONE.json").read_text())["phases"]["first"]["trained_before"] is True
    mt.run(run, stage="export", weights_dir=tmp_path / "weights")
    assert read_lora(models.lora_path(tmp_path / "weights"))[1]["r"] == 8
    # older runs read no growth; the two settings go together, above lora_rank
    old = {k: v for k, v in RunSettings().to_dict().items() if not k.startswith("lora_grow")}
    assert (RunSettings.from_dict(old).lora_grow_rank, RunSettings.from_dict(old).lora_grow_steps) == (0, 0)
    for bad in ({"lora_grow_rank": 64}, {"lora_grow_steps": 100}, {"lora_grow_rank": 16, "lora_grow_steps": 100}):
        with pytest.raises(FvgError, match="lora_grow_rank and lora_grow_steps go together"):
            RunSettings(**bad)


def test_workers_render_the_same_latents_and_rows_record_their_device(tiny_run, tmp_path):
    out, _ = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    for part in ("data", "vae"):
        (run / part).symlink_to(out / part)
    settings.load_settings(run, "tiny")
    rows = stages.dataset_rows(out)
    with stages.clip_renderer(2) as render:
        assert np.array_equal(render(rows), np.stack([stages.render_clip(r) for r in rows]))
    mt.run(run, stage="latents", workers=2, device="cpu")
    # the same frames; the encoding may round differently at another torch thread count than the fixture's
    torch.testing.assert_close(stages.LatentSet(run).latents, stages.LatentSet(out).latents, rtol=1e-5, atol=1e-5)
    assert json.loads((run / "latents" / "DONE.json").read_text())["device"] == "cpu"
    assert {r["device"] for r in loop.read_log(out / "t2v" / "log.jsonl")} == {"cpu"}
    for stage in ("vae", "t2v"):
        assert json.loads((out / stage / "DONE.json").read_text())["devices"] == ["cpu"], stage


def test_cli_rejects_a_missing_device_and_bad_workers_in_one_line(tmp_path, capsys):
    from fvg.cli import main

    assert main(["miniworld", "train", "--out", str(tmp_path / "r"), "--stage", "t2v", "--workers", "0"]) == 2
    assert "--workers must be a whole number of at least 1, got 0" in capsys.readouterr().err
    assert main(["miniworld", "train", "--out", str(tmp_path / "r"), "--stage", "t2v", "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    assert main(["miniworld", "diagnose", "--what", "text", "--threads", "-1"]) == 2
    assert "--threads must be at least 1, got -1" in capsys.readouterr().err
    assert main(["miniworld", "train", "--out", str(tmp_path / "r"), "--stage", "t2v", "--device", "tpu"]) == 2
    assert "device 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["miniworld", "train", "--out", str(tmp_path / "r"), "--stage", "t2v", "--device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_reused_stages_ship_unchanged_beside_a_retrained_anchor_model(tiny_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fvg.cli import main
    from fvg.miniworld.reuse import reuse_stages

    out, weights = tiny_run
    run = run_beside(out, tmp_path / "run", {"vae_source": str(weights / "video" / "vae"), "anchor_steps": 4})
    for stage in ("vae", "latents"):  # the export's VAE, copied; its statistics measured again
        mt.run(run, stage=stage)
    with pytest.raises(FvgError, match="trained on its T2V base"):
        reuse_stages(run, weights, ["lora"])
    with pytest.raises(FvgError, match="choose from anchor, t2v, lora"):
        reuse_stages(run, weights, ["vae"])
    assert main(["miniworld", "reuse", "--out", str(run), "--weights", str(weights), "--stages", "t2v,lora"]) == 0
    assert main(["miniworld", "reuse", "--out", str(run), "--weights", str(weights), "--stages", "t2v"]) == 2
    mt.run(run, stage="all", weights_dir=tmp_path / "w")  # trains only the anchor model, then exports

    shipped = tmp_path / "w"
    part = "video/transformer/diffusion_pytorch_model.safetensors"
    assert (shipped / part).read_bytes() == (weights / part).read_bytes()
    loras = [safe_open(str(w / "anchor_lora.safetensors"), "pt") for w in (shipped, weights)]
    assert loras[0].metadata() == loras[1].metadata()  # (safetensors orders the header's metadata at random)
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0].get_tensor(k), loras[1].get_tensor(k)) for k in loras[1].keys())
    new, old = (load_file(str(w / "anchor/transformer/diffusion_pytorch_model.safetensors")) for w in (shipped, weights))
    assert any(not torch.equal(new[k], old[k]) for k in old)  # 4 steps instead of 3
    manifest = json.loads((shipped / "manifest.json").read_text())
    old_manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["settings"]["anchor_steps"] == 4 and manifest["stages"]["anchor"]["steps"] == 4
    assert manifest["stages"]["t2v"] == {**old_manifest["stages"]["t2v"], "reused_from": str(weights.resolve())}
    assert manifest["stages"]["lora"]["reused_from"] == str(weights.resolve())


def test_an_anchor_model_is_reused_with_its_own_vae_beside_a_new_video_vae(tiny_run, tmp_path):
    from fvg.miniworld.curves import run_anchor_pipeline
    from fvg.miniworld.reuse import reuse_stages

    out, weights = tiny_run
    run = run_beside(out, tmp_path / "run", {"vae_source": str(weights / "video" / "vae"), "vae_still_steps": 2})
    for stage in ("vae", "latents"):  # a fine-tuned video VAE: the export's T2V base learnt on the old one
        mt.run(run, stage=stage)
    with pytest.raises(FvgError, match="is not this run's vae"):
        reuse_stages(run, weights, ["t2v"])
    assert reuse_stages(run, weights, ["anchor"]) == ["anchor"]
    assert json.loads((run / "anchor" / "DONE.json").read_text())["vae"] == "the export's anchor VAE"
    pipe, step = run_anchor_pipeline(run)
    shipped = models.load_anchor_pipeline(weights).vae.state_dict()
    assert step == 3 and all(torch.equal(v, shipped[k]) for k, v in pipe.vae.state_dict().items())
    mt.run(run, stage="t2v")
    assert "vae" not in json.loads((run / "t2v" / "DONE.json").read_text())


def test_reuse_refuses_a_run_that_would_not_have_trained_the_export(tiny_run, tmp_path):
    from fvg.miniworld.reuse import reuse_stages

    out, weights = tiny_run
    # a T2V recipe of its own (and another ship dtype, which reuse does not compare: it rounds nothing trained)
    other = run_beside(out, tmp_path / "other", {"vae_source": str(weights / "video" / "vae"), "t2v_steps": 5,
                                                 "t2v_ship_dtype": "float16"})
    for stage in ("vae", "latents"):
        mt.run(other, stage=stage)
    with pytest.raises(FvgError, match=r"t2v_steps \(5 here, 3 in the export\)"):
        reuse_stages(other, weights, ["t2v", "lora"])
    partial = tmp_path / "partial"
    shutil.copytree(weights, partial)
    (partial / "anchor_lora.safetensors").unlink()
    with pytest.raises(FvgError, match="not a complete mini export .missing: anchor_lora.safetensors"):
        reuse_stages(other, partial, ["t2v", "lora"])
    reuse_stages(other, weights, ["anchor"])  # the anchor model does not depend on the T2V recipe
    assert (other / "pipelines" / "anchor" / "model_index.json").is_file() and loop.done(other / "anchor")

    # its own VAE: the export's transformers learnt on other latents
    retrained = run_beside(out, tmp_path / "retrained", {"vae_steps": 2})
    for stage in ("vae", "latents"):
        mt.run(retrained, stage=stage)
    with pytest.raises(FvgError, match="not this run's vae"):
        reuse_stages(retrained, weights, ["t2v"])
    assert not (retrained / "t2v").exists()


class _LosslessVae:
    """A VAE double that returns its input: the VAE rung then measures the evaluator and the MP4 alone."""
    device, dtype = torch.device("cpu"), torch.float32

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        return SimpleNamespace(sample=z)


def test_vae_rung_scores_round_trips_from_mp4_as_the_bench_does(tiny_run, tmp_path, capsys):
    from fvg.cli import main
    from fvg.miniworld import diagnose as d

    _, weights = tiny_run
    lossless = d.vae_rung(_LosslessVae(), seeds=(0, 1), limit=1)
    assert lossless.videos == 14 and len(lossless.per_category) == 7
    assert lossless.mean == 1.0  # the rendered rung: the evaluator passes its own clips through the MP4
    tiny = d.vae_rung(models.load_video_pipeline(weights, lora=False).vae, seeds=(0, 1), limit=1)
    assert tiny.videos == 14 and tiny.mean < 0.9  # three training steps: a VAE that loses the scene
    assert tiny.mean == pytest.approx(float(np.mean(list(tiny.per_category.values()))))  # 2 videos per category

    assert main(["miniworld", "diagnose", "--what", "still-code", "--vae", str(weights / "video" / "vae")]) == 0
    assert capsys.readouterr().out.count("still-code: latent frame") == 4
    assert main(["miniworld", "diagnose", "--what", "vae-rung", "--vae", str(tmp_path)]) == 2
    assert "is not a diffusers AutoencoderKLWan directory" in capsys.readouterr().err
    assert main(["miniworld", "diagnose", "--what", "text", "--vae", str(tmp_path)]) == 2
    assert "--vae is only for --what still-code and vae-rung" in capsys.readouterr().err


def test_the_t2v_stage_takes_the_anchor_stage_threads_once_it_finishes(tmp_path):
    """`fit` calls the registered hooks every `log_every` steps and only while registered; the side stage's
    hook gives this process the child's threads back once the child has exited, and not before."""
    import subprocess
    import sys

    calls = []
    model = torch.nn.Linear(2, 1)
    run = settings.RunSettings(log_every=2, checkpoint_every=100, warmup_steps=1)
    with loop.between_steps(lambda: calls.append(1)):
        loop.fit(tmp_path / "a", model, lambda step: model(torch.ones(1, 2)).pow(2).sum(), 6, 1e-3, run,
                 resume=False, time_limit=None, ema=False)
    loop.fit(tmp_path / "b", model, lambda step: model(torch.ones(1, 2)).pow(2).sum(), 4, 1e-3, run,
             resume=False, time_limit=None, ema=False)
    assert len(calls) == 3 and loop._BETWEEN_STEPS == []

    before = torch.get_num_threads()
    side = object.__new__(mt._SideStage)
    side.name, side.threads = "anchor", 2
    side.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        torch.set_num_threads(1)
        side.reclaim_if_finished()
        assert torch.get_num_threads() == 1  # still running: its thread stays its own
        side.proc.terminate()
        side.proc.wait()
        side.reclaim_if_finished()
        assert torch.get_num_threads() == 2
    finally:
        side.proc.kill()
        torch.set_num_threads(before)
