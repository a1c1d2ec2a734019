"""`fvg train` end to end on the tiny Wan: learning, anchoring, resume, export, experts, 2 processes."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fvg.animate.loading import load_anchor_lora
from fvg.animate.wan import AnchoredWanPipeline
from fvg.families.wan import load_wan_pipeline
from fvg.io import FvgError
from fvg.tiny import tiny_wan_components
from fvg.train.export import export_checkpoint, read_lora
from fvg.train.trainer import experts_to_train, train


# accelerate keeps process-wide singletons; every test here starts from a fresh one.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def train_defaults() -> dict:  # for conftest's `config`
    return dict(model="builtin:tiny-wan", max_sequence_length=16, rank=4, alpha=8.0, learning_rate=2e-3, max_steps=6,
                checkpoint_every=0, validation_every=0)


def transformer_output(transformer, anchored=True):
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 32, generator=g)
    t = torch.tensor([[0.0] * 4 + [600.0] * 8] * 2) if anchored else torch.tensor([600.0, 300.0])
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


# -- one 30-step run, inspected by several tests -------------------------------------------------

@pytest.fixture(scope="module")
def trained(workdir, config):
    pipe = load_wan_pipeline("builtin:tiny-wan", torch.float32)
    cfg = config("run", max_steps=30, batch_size=2, learning_rate=4e-3, rank=8, alpha=16.0,
                 checkpoint_every=15, validation_every=15, validation_holdout=1, validation_steps=2,
                 log_with="tensorboard")
    result = train(cfg, pipe=pipe)
    pipe.transformer.eval()
    return cfg, result, pipe


def test_loss_falls(trained):
    _, result, _ = trained
    losses = result.losses
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < 0.9 * np.mean(losses[:6])


def test_run_outputs(trained, workdir):
    cfg, result, _ = trained
    out = workdir / "run"
    record = json.loads((out / "run.json").read_text())
    assert record["steps"] == {"resumed_from": None, "start": 0, "end": 30}
    assert record["config"]["rank"] == 8 and record["versions"]["torch"] == torch.__version__
    assert record["data"]["clips_trained"] == 7 and record["data"]["cache"]["hit"] in (True, False)
    assert record["throughput"]["samples_per_s"] > 0 and record["timings_s"]["train_loop"] > 0
    for step in ("step_000015", "step_000030"):
        assert {p.name for p in (out / "validation" / step).iterdir()} == {"00.mp4", "00.anchor.png", "prompts.json"}
        assert (out / "checkpoints" / step / "trainer_state.json").is_file()
    if importlib.util.find_spec("tensorboard") is not None:  # the `train` extra; without it logging is off
        assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert set(result.lora_files) == {"transformer.diffusers", "transformer.wan"}


@pytest.mark.parametrize("key_format", ["diffusers", "wan"])
def test_exported_lora_loads_into_the_factorized_pipeline(trained, key_format):
    cfg, result, pipe = trained
    path = result.lora_files[f"transformer.{key_format}"]
    fresh = load_wan_pipeline("builtin:tiny-wan", torch.float32)
    load_anchor_lora(fresh, str(path))
    assert fresh.get_list_adapters() == {"transformer": ["anchor"]}
    trained_out = transformer_output(pipe.transformer)
    assert not torch.allclose(trained_out, transformer_output(load_wan_pipeline("builtin:tiny-wan",
                                                                                torch.float32).transformer))
    torch.testing.assert_close(transformer_output(fresh.transformer), trained_out)  # alpha 16 / rank 8 honoured
    torch.testing.assert_close(transformer_output(fresh.transformer, anchored=False),
                               transformer_output(pipe.transformer, anchored=False))


def test_lora_metadata_and_checkpoint_export(trained, workdir, tmp_path):
    _, result, _ = trained
    _, config_dict, info = read_lora(result.lora_files["transformer.diffusers"])
    assert (config_dict["r"], config_dict["lora_alpha"]) == (8, 16.0)
    assert info["rank"] == 8 and info["steps"] == 30 and info["base_model"] == "builtin:tiny-wan" and info["data_hash"]
    from safetensors import safe_open

    with safe_open(str(result.lora_files["transformer.wan"]), framework="pt") as f:
        assert f.metadata()["rank"] == "8" and f.metadata()["alpha"] == "16.0"
        assert all(k.startswith("diffusion_model.blocks.") for k in f.keys())
    exported = export_checkpoint(workdir / "run" / "checkpoints" / "step_000030", tmp_path)
    for fmt in ("diffusers", "wan"):
        a, b = load_file(exported[f"transformer.{fmt}"]), load_file(result.lora_files[f"transformer.{fmt}"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FvgError, match="not a training checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "x")


def test_a_lora_grown_from_a_file_starts_as_the_file(trained, config):
    """init_lora: rank 8 (alpha 16, scale 2) into rank 16 (alpha 16, scale 1) computes what the file does, and a
    run from it trains the extra ranks from zero."""
    from peft import LoraConfig

    from fvg.train.export import start_from_lora

    _, result, pipe = trained
    path = result.lora_files["transformer.diffusers"]
    grown = load_wan_pipeline("builtin:tiny-wan", torch.float32).transformer
    grown.add_adapter(LoraConfig(r=16, lora_alpha=16.0, init_lora_weights=True,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]))
    assert start_from_lora(grown, path, alpha=16.0) == 8
    torch.testing.assert_close(transformer_output(grown), transformer_output(pipe.transformer))
    torch.testing.assert_close(transformer_output(grown, anchored=False),
                               transformer_output(pipe.transformer, anchored=False))

    run = train(config("grown", rank=16, alpha=16.0, init_lora=str(path), max_steps=2, learning_rate=1e-4),
                pipe=load_wan_pipeline("builtin:tiny-wan", torch.float32))
    started, _, _ = read_lora(path)
    after, config_dict, _ = read_lora(run.lora_files["transformer.diffusers"])
    assert config_dict["r"] == 16 and after.keys() == started.keys()
    b = "blocks.0.attn1.to_q.lora_B.weight"
    assert after[b].shape == (started[b].shape[0], 16)
    # two Adam steps move a weight by at most about 2 x lr; the file's B is doubled (scale 2 -> 1)
    torch.testing.assert_close(after[b][:, :8], 2 * started[b], atol=3e-4, rtol=0)
    assert 0 < after[b][:, 8:].abs().max() <= 3e-4


def test_init_lora_refuses_a_file_it_cannot_hold(trained, config, tmp_path):
    from peft import LoraConfig

    from fvg.train.export import start_from_lora

    path = trained[1].lora_files["transformer.diffusers"]
    smaller = load_wan_pipeline("builtin:tiny-wan", torch.float32).transformer
    smaller.add_adapter(LoraConfig(r=4, lora_alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                         "ffn.net.0.proj", "ffn.net.2"]))
    with pytest.raises(FvgError, match="a larger rank"):
        start_from_lora(smaller, path, alpha=4.0)
    fewer = load_wan_pipeline("builtin:tiny-wan", torch.float32).transformer
    fewer.add_adapter(LoraConfig(r=8, lora_alpha=8.0, target_modules=["to_q"]))
    with pytest.raises(FvgError, match="not adapted in this run"):
        start_from_lora(fewer, path, alpha=8.0)
    from safetensors.torch import save_file

    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(32, 32)}, str(tmp_path / "base.safetensors"))
    with pytest.raises(FvgError, match="not a LoRA in diffusers keys"):  # a model file, not a LoRA
        start_from_lora(fewer, tmp_path / "base.safetensors", alpha=8.0)
    (tmp_path / "text.safetensors").write_text("not tensors")
    with pytest.raises(FvgError, match="not a safetensors file"):
        start_from_lora(fewer, tmp_path / "text.safetensors", alpha=8.0)
    with pytest.raises(FvgError, match="init_lora: no such file"):
        config("x", init_lora=str(tmp_path / "missing.safetensors")).validate()


# -- anchoring as the transformer sees it ------------------------------------------------------------

def test_training_feeds_frame0_tokens_at_timestep_zero(workdir, config):
    pipe = load_wan_pipeline("builtin:tiny-wan", torch.float32)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].detach().clone()) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    train(config("anchoring", max_steps=12, p_anchor=0.5, checkpoint_every=4, checkpoints_keep=1),
          pipe=pipe)
    assert len(seen) == 12
    assert [p.name for p in (workdir / "anchoring" / "checkpoints").iterdir()] == ["step_000012"]  # last K kept
    tokens = 4  # 4x4 latent, patch (1, 2, 2)
    rows = [row for ts in seen if ts.ndim == 2 for row in ts]
    anchored = [r for r in rows if torch.all(r[:tokens] == 0)]
    assert anchored and all(torch.all(r[tokens:] > 0) for r in anchored)
    assert len(anchored) < len(rows) or any(ts.ndim == 1 for ts in seen)  # p_anchor 0.5 keeps plain samples
    assert all(ts.shape == (2,) for ts in seen if ts.ndim == 1)


def test_caption_dropout_trains_a_share_of_samples_on_the_empty_caption(workdir, config):
    pipe = load_wan_pipeline("builtin:tiny-wan", torch.float32)
    empty, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=16, device="cpu")
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].detach().clone()) if torch.is_grad_enabled()
        else None, with_kwargs=True)
    train(config("dropout", max_steps=12, batch_size=2, caption_dropout=0.5), pipe=pipe)
    rows = [row for text in seen for row in text]
    dropped = [torch.equal(row, empty[0]) for row in rows]
    assert len(rows) == 24 and 4 <= sum(dropped) <= 20  # about half, exactly the empty caption's embedding
    assert len({tuple(row.flatten()[:8].tolist()) for row, d in zip(rows, dropped) if not d}) > 1  # real captions


# -- resume ---------------------------------------------------------------------------------------------

def test_resume_reproduces_the_uninterrupted_run(workdir, config):
    kwargs = dict(max_steps=6, checkpoint_every=3, dropout=0.1, caption_dropout=0.5, gradient_accumulation_steps=2,
                  lr_scheduler="cosine", lr_warmup_steps=2, num_workers=1)
    full = train(config("full", **kwargs))
    # "interrupted" at step 3: a run folder holding only the step-3 checkpoint
    shutil.copytree(workdir / "full" / "checkpoints" / "step_000003",
                    workdir / "resumed" / "checkpoints" / "step_000003")
    resumed = train(config("resumed", **kwargs), resume="latest")
    assert resumed.record["steps"]["start"] == 3 and resumed.record["steps"]["resumed_from"].endswith("step_000003")
    assert resumed.losses == full.losses[3:]
    a, b = load_file(full.lora_files["transformer.diffusers"]), load_file(resumed.lora_files["transformer.diffusers"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    with pytest.raises(FvgError, match="not a complete training checkpoint"):
        train(config("resumed", **kwargs), resume=str(workdir / "nowhere"))


# -- Wan2.2-A14B: two experts -----------------------------------------------------------------------------

def two_expert_pipeline():
    components = tiny_wan_components()
    torch.manual_seed(5)
    low_noise = type(components["transformer"])(**components["transformer"].config)
    return AnchoredWanPipeline(**components, transformer_2=low_noise.eval(), boundary_ratio=0.875)


def test_two_experts_train_on_their_own_noise_levels(workdir, config):
    pipe = two_expert_pipeline()
    seen = {"transformer": [], "transformer_2": []}
    for name in seen:
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, a, kw, name=name: seen[name].append(kw["timestep"].detach().clone())
            if torch.is_grad_enabled() else None, with_kwargs=True)
    anchor = workdir / "anchor.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(anchor)
    result = train(config("experts", expert="both", flow_shift=12.0, max_steps=8, validation_every=8,
                          validation_prompts=["a red square moves left"], validation_anchors=[str(anchor)],
                          validation_steps=4, validation_guidance=1.0, gradient_checkpointing=True), pipe=pipe)
    assert seen["transformer"] and seen["transformer_2"]
    assert all(torch.all(ts[:, 4:] >= 875) for ts in seen["transformer"])  # frame 0 (4 tokens) is at t = 0
    assert all(torch.all(ts[:, 4:] < 875) for ts in seen["transformer_2"])
    assert (workdir / "experts" / "validation" / "step_000008" / "00.mp4").is_file()
    experts, formats = ("transformer", "transformer_2"), ("diffusers", "wan")
    assert set(result.lora_files) == {f"{e}.{f}" for e in experts for f in formats}
    fresh = two_expert_pipeline()
    load_anchor_lora(fresh, str(result.lora_files["transformer.diffusers"]), "transformer")
    load_anchor_lora(fresh, str(result.lora_files["transformer_2.wan"]), "transformer_2")
    assert fresh.get_list_adapters() == {"transformer": ["anchor"], "transformer_2": ["anchor_2"]}
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).eval()
        torch.testing.assert_close(transformer_output(getattr(fresh, name)), transformer_output(getattr(pipe, name)))


def test_expert_choice_must_fit_the_model():
    pipe = AnchoredWanPipeline(**tiny_wan_components())
    with pytest.raises(FvgError, match="two-expert"):
        experts_to_train(pipe, "transformer_2")
    assert experts_to_train(two_expert_pipeline(), "both") == ["transformer", "transformer_2"]


# -- two processes (accelerate launch, gloo on CPU) ------------------------------------------------------

def test_two_processes_end_with_identical_weights(workdir, free_port):
    toml = workdir / "ddp.toml"
    toml.write_text("\n".join([
        'model = "builtin:tiny-wan"', f'data = "{workdir / "data"}"', f'output_dir = "{workdir / "ddp"}"',
        f'cache_dir = "{workdir / "ddp-cache"}"', "height = 32", "width = 32", "num_frames = 9", "fps = 8",
        "max_sequence_length = 16", "num_workers = 1", "rank = 4", "alpha = 8.0", "learning_rate = 2e-3",
        "max_steps = 4", "batch_size = 2", 'mixed_precision = "no"', "checkpoint_every = 2",
        "validation_every = 0", 'log_with = "none"']))
    # `--cpu` alone would start one process (accelerate's CPU launcher expects mpirun); torchrun through
    # `--multi_gpu` plus ACCELERATE_USE_CPU gives two gloo processes on one machine.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "fvg.train.cli", "--config", str(toml)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((workdir / "ddp" / "run.json").read_text())
    assert record["distributed"]["num_processes"] == 2 and "MULTI_CPU" in record["distributed"]["type"]
    digests = record["lora_sha256_by_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert record["data"]["clips_cached"] == 8  # the cache was encoded by both processes, half each
    assert {p.name[:10] for p in (workdir / "ddp-cache").rglob("shard-*")} == {"shard-r000", "shard-r001"}
    state = json.loads((workdir / "ddp" / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["epoch"] == 2  # 8 clips / (2 x 2) per step: two steps an epoch


# -- the command line ----------------------------------------------------------------------------------------

def test_cli_mistakes_are_one_line_errors(tmp_path, capsys):
    from fvg.train.cli import main

    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: training config not found: {tmp_path / 'missing.toml'}"
    (tmp_path / "bad.toml").write_text('data = "x"\nrnak = 4\n')
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown training setting(s)" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nothing"), "--set", "log_with='none'"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: training data not found")


def test_register_mounts_the_commands():
    import typer
    from typer.testing import CliRunner

    from fvg.train.cli import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    assert runner.invoke(app, ["train", "--help"]).exit_code == 0
    assert "--resume" in runner.invoke(app, ["train", "--help"]).output
    assert runner.invoke(app, ["train-export", "--help"]).exit_code == 0
