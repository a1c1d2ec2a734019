"""The bad-input matrix: every mistake gets one line naming it, exit 2, no traceback, nothing
written, and (where the input is known then) no model loaded."""

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fvg.cli import main
from fvg.console import run_app
from fvg.io import (FvgError, check_output_dir, load_image, read_mp4, read_prompt_lines, sweep_stale_temps,
                    write_json)

FAST = ["--preset", "tiny", "--steps", "1"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model loads: the input should have been refused before."""
    from fvg.pipeline import FactorizedPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the bad input was refused")

    monkeypatch.setattr(FactorizedPipeline, "load", refuse)
    monkeypatch.setattr(FactorizedPipeline, "video_pipe", property(refuse))
    monkeypatch.setattr(FactorizedPipeline, "anchor_source", property(refuse))


def lora_files(root):
    """Every broken kind of LoRA file the probe tried, by name."""
    (root / "text.safetensors").write_text("this is not a LoRA\n")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "pickle.safetensors").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    torch.save({"w": torch.zeros(2)}, root / "model.pt")
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 4)}, root / "whole.safetensors")
    data = (root / "whole.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) - 20])
    (root / "hugeheader.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.tensor([[float("nan")]])},
              root / "nan.safetensors")
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.tensor([[float("inf")]])},
              root / "inf.safetensors")


BAD_INPUTS = [
    (["generate", "x", "--seed", str(10**23)], "seed must be an integer from 0 to 4294967295"),
    (["generate", "x", "--seed", "-1"], "seed must be an integer from 0"),
    (["generate", "x", "--seed", "4294967295", "-n", "2"], "candidate 1's seed"),
    (["generate", "x", "--device", "cuda:7"], "device 'cuda:7' is not available"),
    (["generate", "x", "--device", "tpu"], "unknown device 'tpu'"),
    (["generate", "x", "--fps", "0"], "fps must be from 1 to 240"),
    (["generate", "x", "--guidance", "nan"], "guidance must be a finite number"),
    (["generate", "x", "--guidance", "inf"], "guidance must be a finite number"),
    (["generate", "x", "--guidance", "-1"], "guidance must be a finite number >= 0"),
    (["generate", "x", "--steps", "0"], "steps must be at least 1"),
    (["generate", "x", "-n", "0"], "anchor candidates must be from 1 to 64"),
    (["generate", "x", "-n", "2", "--select", "2"], "--select must be from 0 to 1"),
    (["anchor", "x", "-n", "100"], "anchor candidates must be from 1 to 64"),
    (["generate", "x", "--out", "afile"], "--out afile is a file, not a folder"),
    (["generate", "x", "--out", "afile/sub"], "afile is a file, not a folder"),
    (["plan", "x", "--out", "afolder"], "is a folder, not a file"),
    (["plan", "x", "--out", "afile/plan.json"], "afile is a file, not a folder"),
    (["generate", "--prompts", "utf16.txt", "--out", "o"], "is UTF-16 text: save it as UTF-8"),
    (["generate", "--prompts", "latin1.txt", "--out", "o"], "is not UTF-8 text (byte 0xe9 at offset 5)"),
    (["generate", "--prompts", "blank.txt", "--out", "o"], "blank.txt:2 is empty"),
    (["generate", "--prompts", "binary.txt", "--out", "o"], "contains NUL bytes"),
    (["generate", "--prompts", "afolder", "--out", "o"], "afolder is not a file"),
    (["generate", "x", "--lora", "text.safetensors"], "not a safetensors file"),
    (["generate", "x", "--lora", "empty.safetensors"], "is an empty file"),
    (["generate", "x", "--lora", "pickle.safetensors"], "is a PyTorch pickle"),
    (["generate", "x", "--lora", "model.pt"], "is a PyTorch pickle"),
    (["generate", "x", "--lora", "truncated.safetensors"], "is truncated"),
    (["generate", "x", "--lora", "hugeheader.safetensors"], "not a safetensors file (no valid header"),
    (["generate", "x", "--lora", "nan.safetensors"], "non-finite weights (NaN or inf)"),
    (["generate", "x", "--lora", "inf.safetensors"], "non-finite weights (NaN or inf)"),
    (["generate", "x", "--lora", "afolder"], "has no .safetensors file"),
    (["animate", "x", "--anchor", "thin.png"], "aspect ratio is beyond 8:1"),
    (["eval", "generate", "--suite", "p.txt", "--seeds", "0-999999999", "--dry-run", "--out", "o"],
     "names more than 10000 seeds"),
    (["eval", "generate", "--suite", "p.txt", "--seeds", "99999999999", "--dry-run", "--out", "o"],
     "out of range"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_models_load(tmp_path, capsys, monkeypatch, no_model_loads, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "afolder").mkdir()
    (tmp_path / "p.txt").write_text("a red circle moves left\n")
    (tmp_path / "utf16.txt").write_text("a dog runs\n", encoding="utf-16")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\xe9 au lait\n".encode("latin-1")[:0] + b"a caf\xe9 runs\n")
    (tmp_path / "blank.txt").write_text("a dog runs\n\na cat jumps\n")
    (tmp_path / "binary.txt").write_bytes(b"a dog\x00runs\n")
    Image.new("RGB", (1, 2000)).save(tmp_path / "thin.png")
    lora_files(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    extra = [] if args[0] in ("plan", "eval") or "--out" in args else ["--out", "out"]
    extra += [] if args[0] in ("plan", "eval", "anchor") or "--steps" in args else ["--steps", "1"]
    code, out, err = run_cli(capsys, *args, *extra, "--preset", "tiny") if args[0] != "eval" else \
        run_cli(capsys, *args, *extra)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in err + out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written or touched


def test_out_that_cannot_be_written_is_refused_before_models_load(capsys, no_model_loads):
    target = "/sys/fvg-bad-input-test"
    try:
        check_output_dir(target)
    except FvgError:
        pass
    else:
        pytest.skip("/sys is writable here")
    code, _, err = run_cli(capsys, "generate", "x", *FAST, "--out", target)
    assert code == 2 and err.startswith("error: --out /sys/fvg-bad-input-test is not writable")
    assert len(err.strip().splitlines()) == 1


def test_error_text_keeps_square_brackets(capsys):
    import typer

    app = typer.Typer()

    @app.command()
    def fail():
        raise FvgError("the studio needs Gradio: pip install 'fvg[studio]' (see [docs])\nsecond line")

    assert run_app(app, []) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: the studio needs Gradio: pip install 'fvg[studio]' (see [docs]) second line"


# ---------------------------------------------------------------- prompt files


def test_prompt_file_drops_bom_and_splits_on_newlines_only(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa leaf turns red\r\na dog\u2028runs\x0cleft\nthe end\n\n".encode("utf-8"))
    assert read_prompt_lines(path) == ["a leaf turns red", "a dog\u2028runs\x0cleft", "the end"]


def test_bom_does_not_change_the_plan(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa leaf turns from green to red\n".encode("utf-8"))
    assert read_prompt_lines(path) == ["a leaf turns from green to red"]


# ---------------------------------------------------------------- images


def test_sixteen_bit_grey_png_keeps_its_grey_levels(tmp_path):
    grey = np.full((16, 16), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    rgb = np.asarray(load_image(tmp_path / "g.png"))
    assert rgb.shape == (16, 16, 3) and (rgb == 128).all()  # was 255: clipped to white


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # blue on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "photo.jpg")
    assert upright.size == (20, 40)
    top = np.asarray(upright)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the left half went to the top


@pytest.mark.parametrize("size, message", [((1, 2_000_000), "aspect ratio"), ((9000, 9000), "megapixels")])
def test_absurd_images_are_refused_before_decoding(tmp_path, size, message):
    Image.new("L", size).save(tmp_path / "big.png")
    with pytest.raises(FvgError, match=message):
        load_image(tmp_path / "big.png")


def test_pil_images_from_the_studio_are_checked_too():
    from fvg.pipeline import FactorizedPipeline

    pipe = FactorizedPipeline.from_preset("tiny", device="cpu")
    with pytest.raises(FvgError, match="aspect ratio"):
        pipe.anchor_from_image(Image.new("RGB", (1, 500)))
    grey16 = Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16))
    assert np.asarray(pipe.anchor_from_image(grey16).image).min() == 255


# ---------------------------------------------------------------- batch resume and outputs


def batch(capsys, prompts, out, *more):
    return run_cli(capsys, "generate", "--prompts", prompts, *FAST, "--mode", "t2v", "--out", out, *more)


def test_resume_trusts_only_records_that_match(tmp_path, capsys, monkeypatch):
    prompts, out = tmp_path / "p.txt", tmp_path / "batch"
    prompts.write_text("a red circle moves left\na green square grows\na blue dot falls\n")
    code, _, err = batch(capsys, prompts, out)
    assert code == 0, err
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}

    code, _, err = batch(capsys, prompts, out)  # a finished folder: nothing to do, no model loads
    assert code == 0 and "nothing to do: all 3 videos" in err

    (out / "0001.run.json").write_text("{garbage")  # garbage record
    record = json.loads((out / "0003.run.json").read_text())
    write_json(out / "0003.run.json", {**record, "prompt": "an older prompt on that line"})
    code, _, err = batch(capsys, prompts, out)
    assert code == 0 and "2 generated, 1 already present" in err, err
    assert (out / "0002.mp4").stat().st_mtime_ns == mtimes["0002.mp4"]
    assert json.loads((out / "0003.run.json").read_text())["prompt"] == "a blue dot falls"

    code, _, err = batch(capsys, prompts, out, "--seed", "5")  # other settings: everything is redone
    assert code == 0 and "3 generated, 0 already present" in err
    code, _, err = run_cli(capsys, "generate", "--prompts", prompts, *FAST, "--mode", "upsampled", "--seed", "5",
                           "--out", out)  # another mode
    assert code == 0 and "3 generated, 0 already present" in err
    assert all(json.loads((out / f"000{i}.run.json").read_text())["mode"] == "upsampled" for i in (1, 2, 3))


def test_stale_temp_files_of_dead_writers_are_swept(tmp_path, capsys):
    import fvg.io as fvg_io

    prompts, out = tmp_path / "p.txt", tmp_path / "batch"
    prompts.write_text("a red circle moves left\n")
    assert batch(capsys, prompts, out)[0] == 0
    dead_pid = 2**22 + 12345  # above pid_max on Linux: no such process
    host = fvg_io._HOST
    stale = [out / f".0001.{host}-{dead_pid}.abcd1234.tmp.mp4", out / f".0002.run.{host}-{dead_pid}.zz.tmp.json"]
    live = out / f".0001.{host}-1.abcd1234.tmp.mp4"  # pid 1 is alive: another writer's file stays
    other_host = out / f".0001.00000000-{dead_pid}.abcd1234.tmp.mp4"
    for path in (*stale, live, other_host):
        path.write_bytes(b"partial")
    code, _, err = batch(capsys, prompts, out)
    assert code == 0 and "removed 2 temporary file(s)" in err and "nothing to do" in err
    assert not any(p.exists() for p in stale) and live.exists() and other_host.exists()
    assert sweep_stale_temps(out) == []


def test_failed_save_leaves_no_video_without_record(tmp_path, capsys, monkeypatch):
    import fvg.pipeline

    real = fvg.pipeline.write_json

    def full_disk(path, data):
        if str(path).endswith("run.json"):
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(fvg.pipeline, "write_json", full_disk)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "generate", "a red circle", *FAST, "--out", out)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "No space left on device" in errors[0]
    assert errors[0].startswith("error: cannot write the outputs in") and "Traceback" not in err
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_rerun_in_the_same_folder_replaces_the_older_runs_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "generate", "a red circle", *FAST, "-n", "3", "--out", out)[0] == 0
    assert run_cli(capsys, "generate", "a blue square", *FAST, "--mode", "t2v", "--out", out)[0] == 0
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["run.json", "video.mp4"]
    assert json.loads((out / "run.json").read_text())["prompt"] == "a blue square"
    assert read_mp4(out / "video.mp4").shape[0] == 9


def test_lora_of_the_wrong_shape_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "other-model.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 7),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(9, 4)}, path)
    code, _, err = run_cli(capsys, "generate", "x", *FAST, "--lora", path, "--out", tmp_path / "out")
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert lines == [f"error: LoRA {path} does not fit builtin:tiny-wan: blocks.0.attn1.to_q.lora_A is [4, 7], "
                     "the model needs [4, 24] (and 1 more); it was trained for another model or size"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--height", "40960"], ["--width", "8192"], ["--frames", "4097"]])
def test_absurd_video_sizes_are_refused_before_loading(tmp_path, capsys, args):
    code = main(["generate", "a red circle", "--preset", "tiny", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and "too large" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--still-strength", "0"], "error: still_strength must be in (0, 1], got 0.0"),
    (["--still-strength", "1.5"], "error: still_strength must be in (0, 1], got 1.5"),
    (["--still-strength", "0.5", "--preset", "tiny-cogvideox"],
     "error: still_strength applies to Wan-family pipelines, not CogVideoX"),
    (["--still-strength", "0.5", "--steps", "1"],
     "error: still_strength 0.5 leaves none of 1 steps to run: raise it or the steps"),
])
def test_bad_still_strength_is_refused_before_loading(tmp_path, capsys, args, message):
    code = main(["generate", "a red circle", "--preset", "tiny", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == message, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--bogus"], "error: No such option: --bogus (Possible options: --out) (see: fvg generate --help)"),
    (["miniworld", "anchor-score", "--threads", "1"], "error: No such option: --threads"),
    (["generate", "x", "--steps", "many"], "error: Invalid value for '--steps'"),
    (["no-such-command"], "error: No such command 'no-such-command'"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("value,kinds,expected", [(1, (float,), 1.0), (2, (int,), 2), (True, (bool,), True),
                                                   ("x", (str,), "x"), (["a"], (list,), ["a"]),
                                                   (3, (bool, int, float), 3), (2.5, (int, float), 2.5)])
def test_conform_reads_an_override_as_its_setting_type(value, kinds, expected):
    from fvg.io import conform

    result = conform(value, kinds)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value,kinds", [(True, (int,)), (True, (float,)), (2.5, (int,)), (3, (str,)), ("1", (float,)),
                                         (None, (int,))])
def test_conform_refuses_other_types(value, kinds):
    from fvg.io import conform

    with pytest.raises(ValueError):
        conform(value, kinds)
