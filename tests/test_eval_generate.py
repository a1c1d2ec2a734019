"""`fvg eval generate` end to end on the tiny preset: layout, records, manifest, resume, 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fvg.eval.cli import main
from fvg.io import mp4_is_valid, read_mp4

PROMPTS = ["a red circle moves right", "a blue square grows", "a green triangle turns orange"]
ARGS = ["--preset", "tiny", "--steps", "1", "--seeds", "0"]


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "2_tiny_set.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = root / "out"
    argv = ["generate", "--suite", str(prompts), "--out", str(out), "--modes", "t2v,upsampled,factorized", *ARGS]
    assert main(argv) == 0
    return out, argv


def test_layout_records_and_manifest(run):
    out, _ = run
    videos = sorted(str(p.relative_to(out)) for p in out.rglob("*.mp4"))
    modes = ("t2v", "upsampled", "factorized")
    assert videos == sorted(f"{m}/seed0/tiny_set/{i:04d}.mp4" for m in modes for i in (1, 2))
    assert all(mp4_is_valid(out / v, 9) for v in videos)
    # benchmark folders hold only MP4s; plans, anchors and run records live in the parallel tree
    assert {p.suffix for p in (out / "factorized").rglob("*") if p.is_file()} == {".mp4"}
    rows = _manifest(out)
    assert [r["video"] for r in rows] == [f"{m}/seed0/tiny_set/{i:04d}.mp4" for i in (1, 2)
                                          for m in ("t2v", "upsampled", "factorized")]
    assert {r["status"] for r in rows} == {"generated"}
    for r in rows:
        assert r["prompt"] == PROMPTS[r["index"] - 1] and r["category"] == "tiny_set" and r["suite"] == "file"
        assert (out / r["record"] / "run.json").is_file() and r["timings"]["animate"] > 0
        if r["mode"] == "factorized":
            assert r["anchor"] == f"{r['record']}/anchor.png" and (out / r["anchor"]).is_file()
        else:
            assert r["anchor"] is None
        assert (r["plan"] is None) == (r["mode"] == "t2v")
    # one plan per prompt, shared by upsampled and factorized: the pair differs in the mode only
    for i in (1, 2):
        up, fac = (next(r for r in rows if r["index"] == i and r["mode"] == m) for m in ("upsampled", "factorized"))
        assert up["plan"] == fac["plan"] and up["video_prompt"] == up["plan"]["upsampled_prompt"]
    run_json = json.loads((out / rows[2]["record"] / "run.json").read_text())
    assert run_json["eval"]["video"] == rows[2]["video"] and run_json["seed"] == 0
    config = json.loads((out / "eval.json").read_text())
    assert config["preset"] == "tiny" and config["steps"] == 1
    assert not list(out.glob("manifest.part-*"))


def test_resume_skips_valid_videos_and_redoes_corrupt_ones(run):
    out, argv = run
    target = out / "factorized/seed0/tiny_set/0002.mp4"
    keep = out / "t2v/seed0/tiny_set/0001.mp4"
    before = keep.stat().st_mtime_ns
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # an interrupted copy: truncated
    (out / "upsampled/seed0/tiny_set/0001.mp4").unlink()
    assert not mp4_is_valid(target)
    assert main(argv) == 0
    rows = {r["video"]: r for r in _manifest(out)}
    assert len(rows) == 6
    redone = {v for v, r in rows.items() if r["status"] == "generated"}
    assert redone == {"factorized/seed0/tiny_set/0002.mp4", "upsampled/seed0/tiny_set/0001.mp4"}
    assert mp4_is_valid(target, 9) and keep.stat().st_mtime_ns == before
    # the redone factorized video reused the prompt's saved plan
    assert rows["factorized/seed0/tiny_set/0002.mp4"]["plan"] == rows["upsampled/seed0/tiny_set/0002.mp4"]["plan"]
    assert "plan" not in rows["factorized/seed0/tiny_set/0002.mp4"]["timings"]
    # skipped rows still carry their records
    assert rows["t2v/seed0/tiny_set/0001.mp4"]["timings"]["animate"] > 0


def test_other_settings_refuse_the_same_folder(run, capsys):
    out, argv = run
    changed = [a if a != "1" else "2" for a in argv]  # --steps 2
    assert main(changed) == 2
    assert "other settings (steps" in capsys.readouterr().err


def test_dry_run_lists_videos_without_generating(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    assert main(["generate", "--suite", str(prompts), "--out", str(tmp_path / "o"), "--modes", "t2v",
                 "--seeds", "0-1", "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == ["t2v/seed0/p/0001.mp4", "t2v/seed1/p/0001.mp4",
                                               "t2v/seed0/p/0002.mp4", "t2v/seed1/p/0002.mp4"]
    assert not (tmp_path / "o").exists()
    assert main(["generate", "--suite", str(prompts), "--out", str(tmp_path / "o"), "--modes", "t2v,video"]) == 2
    from fvg.cli import main as fvg_main  # the same commands under `fvg eval`

    assert fvg_main(["eval", "generate", "--suite", str(prompts), "--out", str(tmp_path / "o"), "--modes",
                     "factorized", "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == ["factorized/seed0/p/0001.mp4", "factorized/seed0/p/0002.mp4"]


def test_two_processes_write_every_video_exactly_once(tmp_path, free_port):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `--multi_gpu` is accelerate's torchrun launcher; on a machine without GPUs fvg runs it on CPU (gloo).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "fvg.eval.cli", "generate", "--suite", str(prompts),
           "--out", str(out), "--modes", "t2v,factorized", *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _manifest(out)
    videos = [r["video"] for r in rows]
    expected = [f"{m}/seed0/p/{i:04d}.mp4" for i in (1, 2, 3) for m in ("t2v", "factorized")]
    assert videos == expected  # one merged manifest, in job order, each video once
    assert all(r["status"] == "generated" for r in rows)
    assert {r["rank"] for r in rows} == {0, 1}
    assert all(r["rank"] == (r["index"] - 1) % 2 for r in rows)  # prompt k on process k mod 2
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.mp4")) == sorted(expected)
    assert all(len(read_mp4(out / v)) == 9 for v in videos)
    assert not list(out.glob("manifest.part-*"))
    assert "rank 1:" in proc.stderr and "rank 0:" in proc.stderr


def test_factorized_frame0_is_the_anchor_on_the_mini_preset(tmp_path):
    """With a trained VAE, latent frame 0 = the anchor's latent decodes close to the anchor image."""
    from fvg.eval.generate import GenerateSettings, run_generation
    from fvg.eval.metrics import score_run
    from fvg.eval.suites import load_suite

    suite = load_suite("minicompbench").select(["consistent_attr"], 1)
    out = tmp_path / "mini"
    settings = GenerateSettings(suite, ["t2v", "factorized"], [0], out, preset="mini", steps=2,
                                overrides={"anchor_steps": 2})
    assert run_generation(settings).failed == 0
    score_run(out, out / "scores.jsonl", ["anchor", "motion"])
    rows = {r["mode"]: r["metrics"] for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}
    assert "anchor_psnr" not in rows["t2v"]
    # the same seed's t2v video starts from a scene of its own: the anchor explains only the factorized one
    from PIL import Image

    from fvg.eval.metrics import anchor_fidelity

    anchor = np.asarray(Image.open(out / "records/factorized/seed0/consistent_attr/0001/anchor.png").convert("RGB"))
    baseline = anchor_fidelity(read_mp4(out / "t2v/seed0/consistent_attr/0001.mp4"), anchor)
    assert rows["factorized"]["anchor_psnr"] > baseline["anchor_psnr"] + 3
    assert rows["factorized"]["anchor_ssim"] > baseline["anchor_ssim"]
