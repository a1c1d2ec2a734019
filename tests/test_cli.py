"""The CLI end to end on the `tiny` preset: outputs, batches with resume, and every bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from fvg.cli import main
from fvg.io import read_mp4

FAST = ["--preset", "tiny", "--steps", "2"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "generate", "a red circle moves right", *FAST, "-n", "2", "--out", out)
    assert code == 0, err
    assert "noise" in err  # the tiny preset says its output is noise
    frames = read_mp4(out / "video.mp4")
    assert frames.shape == (9, 32, 32, 3)
    assert Image.open(out / "anchor.png").size == (32, 32)
    assert sorted(os.listdir(out / "candidates")) == ["00.png", "01.png"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["prompt"] == "a red circle moves right" and plan["first_frame_caption"]
    record = json.loads((out / "run.json").read_text())
    assert record["mode"] == "factorized" and record["seed"] == 0 and record["steps"] == 2
    assert record["anchor"]["seeds"] == [0, 1] and record["anchor"]["selected"] == 0
    assert record["settings"]["video_model"] == "builtin:tiny-wan"
    assert {"plan", "anchor", "animate", "total"} <= set(record["timings_s"])
    assert {"torch", "diffusers", "transformers"} <= set(record["versions"])
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("mode", ["t2v", "upsampled"])
def test_baseline_modes_write_video_without_anchor(tmp_path, capsys, mode):
    out = tmp_path / mode
    code, _, err = run_cli(capsys, "generate", "a blue square grows", *FAST, "--mode", mode, "--out", out)
    assert code == 0, err
    assert read_mp4(out / "video.mp4").shape == (9, 32, 32, 3)
    assert not (out / "anchor.png").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["mode"] == mode
    if mode == "upsampled":
        assert record["video_prompt"] == json.loads((out / "plan.json").read_text())["upsampled_prompt"]
    else:
        assert record["video_prompt"] == "a blue square grows" and not (out / "plan.json").exists()


def test_batch_layout_and_resume(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\na green triangle turns orange\na cyan square shrinks\n\n")
    out = tmp_path / "batch"
    code, _, err = run_cli(capsys, "generate", "--prompts", prompts, *FAST, "--mode", "t2v", "--out", out)
    assert code == 0, err
    videos = sorted(p.name for p in out.glob("*.mp4"))
    assert videos == ["0001.mp4", "0002.mp4", "0003.mp4"]
    assert json.loads((out / "0002.run.json").read_text())["prompt"] == "a green triangle turns orange"
    first = (out / "0001.mp4").stat().st_mtime_ns
    (out / "0002.mp4").write_bytes(b"truncated")  # a corrupt video is redone, complete ones are skipped
    code, _, err = run_cli(capsys, "generate", "--prompts", prompts, *FAST, "--mode", "t2v", "--out", out)
    assert code == 0 and "1 generated, 2 already present" in err
    assert (out / "0001.mp4").stat().st_mtime_ns == first
    assert read_mp4(out / "0002.mp4").shape == (9, 32, 32, 3)


def test_still_start_batch_is_redone_only_when_the_option_changes(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\n")
    out = tmp_path / "batch"
    redo, skip = "1 generated, 0 already present", "nothing to do: all 1 videos"
    for args, expected in (([], redo), (["--still-strength", "0.5"], redo), (["--still-strength", "0.5"], skip),
                           ([], redo)):
        code, _, err = run_cli(capsys, "generate", "--prompts", prompts, *FAST, "--out", out, *args)
        assert code == 0 and expected in err, err
        assert json.loads((out / "0001.run.json").read_text())["settings"]["still_strength"] == (
            0.5 if args else None)


def test_modes_share_the_seed_noise(tmp_path, capsys):
    """Paired comparisons: the same prompt and seed give t2v the same video twice, another seed differs."""
    a, b, c = (tmp_path / n for n in "abc")
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        assert run_cli(capsys, "generate", "a red circle", *FAST, "--mode", "t2v", "--seed", seed, "--out", out)[0] == 0
    np.testing.assert_array_equal(read_mp4(a / "video.mp4"), read_mp4(b / "video.mp4"))
    assert not np.array_equal(read_mp4(a / "video.mp4"), read_mp4(c / "video.mp4"))


def test_animate_from_own_anchor_and_plan_and_anchor_commands(tmp_path, capsys):
    image = tmp_path / "frame.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    code, _, err = run_cli(capsys, "animate", "a red circle moves right", "--anchor", image, *FAST,
                           "--out", tmp_path / "anim")
    assert code == 0, err
    record = json.loads((tmp_path / "anim" / "run.json").read_text())
    assert record["anchor"]["source"] == "file" and record["planner"] is None

    code, out, _ = run_cli(capsys, "plan", "a green triangle turns orange")
    assert code == 0 and json.loads(out)["backend"] == "rules"

    code, _, err = run_cli(capsys, "anchor", "a green triangle turns orange", "--preset", "tiny", "-n", "3",
                           "--out", tmp_path / "anc")
    assert code == 0, err
    assert len(os.listdir(tmp_path / "anc" / "candidates")) == 3 and (tmp_path / "anc" / "plan.json").exists()


COMMAND_OWN_PARAMETERS = {  # what each command uses itself; every other parameter goes to an options dataclass
    "generate": {"prompt", "prompts", "out", "anchor"},
    "animate": {"prompt", "out", "anchor"},
    "plan": {"prompt", "out"},
    "anchor": {"prompt", "caption", "out", "seed", "num_candidates", "select"},
}


@pytest.mark.parametrize("command", sorted(COMMAND_OWN_PARAMETERS))
def test_every_option_of_a_command_reaches_the_pipeline_or_the_call(command):
    import inspect
    from dataclasses import fields

    from fvg import cli

    picked = {f.name for cls in (cli._PipelineOptions, cli._CallOptions) for f in fields(cls)}
    params = set(inspect.signature(getattr(cli, command)).parameters)
    assert params - COMMAND_OWN_PARAMETERS[command] <= picked  # `_pick` drops a name no dataclass has


def test_animate_passes_its_options_on(tmp_path, monkeypatch):
    from fvg import cli

    seen = {}

    def load(options):
        seen["options"] = options
        raise cli.FvgError("stop before loading models")

    monkeypatch.setattr(cli._PipelineOptions, "load", load)
    image = tmp_path / "frame.png"
    Image.new("RGB", (32, 32)).save(image)
    code = main(["animate", "x", "--anchor", str(image), "--preset", "tiny", "--lora", "a.safetensors",
                 "--frames", "13", "--cache", "fbc", "--memory", "sequential", "--weights", "fp8", "--seed", "3"])
    assert code == 2
    o = seen["options"]
    assert (o.preset, o.lora, o.frames, o.cache, o.memory, o.weights) == (
        "tiny", "a.safetensors", 13, "fbc", "sequential", "fp8")
    assert (o.planner, o.anchor_model, o.api_key_env) == (None, None, "OPENAI_API_KEY")  # not animate's options


BAD_INPUTS = [
    (["generate", "   "], "prompt is empty"),
    (["generate", "x", "--preset", "nope"], "unknown preset 'nope'"),
    (["generate", "x", "--mode", "fast"], "unknown mode 'fast'"),
    (["generate", "x", "--frames", "10"], "frames must be 4n+1"),
    (["generate", "x", "--height", "40"], "multiples of 16"),
    (["generate", "x", "--preset", "cogvideox1.5-5b"], "not available offline"),
    (["generate", "x", "--video-model", "no-such-org/no-such-wan"], "not available offline"),
    (["generate", "x", "--mode", "t2v", "--anchor", "frame.png"], "only applies to mode 'factorized'"),
    (["animate", "x", "--anchor", "missing.png"], "anchor image not found"),
    (["animate", "x", "--anchor", "corrupt.png"], "cannot read image"),
    (["generate", "x", "--lora", "unmatched.safetensors"], "matched no weights"),
    (["generate", "--prompts", "empty.txt", "--out", "o"], "has no prompts"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message):
    from huggingface_hub import constants
    from safetensors.torch import save_file
    import torch

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32)).save("frame.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, "unmatched.safetensors")
    (tmp_path / "empty.txt").write_text("\n \n")
    before = set(tmp_path.rglob("*"))
    code, _, err = run_cli(capsys, *args, "--steps", "1", "--out", tmp_path / "out") if "--out" not in args else \
        run_cli(capsys, *args, "--steps", "1")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in err
    assert set(tmp_path.rglob("*")) == before  # no partial outputs
