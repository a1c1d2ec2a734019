"""Context parallelism (`fvg.parallel`, `--context-parallel N`): one video over N processes.

On the CPU two torchrun processes (gloo) run diffusers' Ulysses attention on the tiny anchored Wan:
the output equals the one-process output within fp32 rounding, plain and anchored, with per-frame
modulation (timesteps split frame by frame) and per-token modulation (token by token), one and two
experts; rank 0 alone writes. Ring attention needs a CUDA attention kernel (see `fvg.parallel`): only
its refusals are tested here. Errors: not under torchrun, a degree that is not torchrun's world
size, a sequence or head count that does not divide, a family without a plan, a step cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from fvg.animate.cogvideox import AnchoredCogVideoXPipeline
from fvg.animate.wan import AnchoredWanPipeline
from fvg.cli import main
from fvg.families import get_family
from fvg.io import FvgError, read_mp4
from fvg.parallel import torchrun_world
from fvg.speed import SpeedOptions, validate_speed
from fvg.tiny import tiny_cogvideox_components, tiny_wan_components

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture
def outside_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def torchrun_env(monkeypatch):
    """This process posing as rank 0 of a two-process torchrun launch (nothing is joined)."""
    def pose(world_size: int = 2):
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size)}.items():
            monkeypatch.setenv(name, value)
    return pose


def assert_same_video(split: np.ndarray, whole: np.ndarray) -> None:
    """The split and the one-process video are the same up to fp32 rounding (a level here and there). The
    MP4 writer once made this flaky: it converted frames to yuv420p differently from one encode to the next
    (fixed in fvg.io.write_mp4, tests/test_video_io.py). A wrong prompt, seed or anchor on a rank differs
    by about 11 levels on average (t2v against factorized here)."""
    difference = np.abs(split.astype(int) - whole.astype(int))
    assert difference.max() <= 2, f"max difference {difference.max()} levels, mean {difference.mean():.3f}"


def torchrun(free_port, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


# -- two processes ------------------------------------------------------------------------------------------

@needs_gloo
def test_two_processes_match_one_process(tmp_path, free_port):
    out = tmp_path / "findings.json"
    proc = torchrun(free_port, str(ROOT / "tests" / "context_parallel_worker.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    api = found.pop("api-animate")  # FactorizedPipeline.animate, each rank handed a different anchor
    assert api["ranks_equal"] and api["max_uint8_diff"] <= 1  # rank 0's anchor on both, fp32 rounding at most
    assert api["recorded"] == {"degree": 2, "mode": "ulysses"}
    assert api["anchor_split"] and max(api["anchor_uint8_diffs"]) <= 1  # Qwen-Image split: the same anchors
    tokens_per_frame = 4  # 32x32 pixels: 4x4 latent, patch 2x2
    for name, case in found.items():
        assert case["ranks_equal"], name  # every rank steps the scheduler on the same gathered latent
        assert case["max_abs_diff"] <= 1e-5 * max(1.0, case["scale"]), (name, case)
        half = case["latent_frames"] * tokens_per_frame // 2
        rows = case["local_rows"]
        if name == "plain":
            assert rows == [[half, None]]  # one timestep for every token: nothing to split
        elif name == "anchored-token" or name == "anchored-frame-uneven":
            assert rows == [[half, half]]  # per-token modulation rows, split like the tokens
        else:  # per-frame rows: each rank holds half the frames, exactly the frames of its tokens
            assert rows == [[half, case["latent_frames"] // 2]]
    assert found["anchored-frame-uneven"]["latent_frames"] == 3  # 2 does not divide: per token, not per frame


@needs_gloo
def test_cli_under_torchrun_writes_once_from_rank_0(tmp_path, free_port, outside_torchrun):
    common = ["a red circle moves left", "--preset", "tiny", "--steps", "3", "--frames", "13", "--device", "cpu"]
    proc = torchrun(free_port, "-m", "fvg", "generate", *common, "-o", str(tmp_path / "cp"),
                    "--context-parallel", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("wrote ") == 1  # rank 1 is quiet
    record = json.loads((tmp_path / "cp" / "run.json").read_text())
    assert record["settings"]["context_parallel"] == {"degree": 2, "mode": "ulysses", "anchor_split": True}
    assert sorted(p.name for p in (tmp_path / "cp").iterdir()) == ["anchor.png", "candidates", "plan.json",
                                                                   "run.json", "video.mp4"]
    assert main(["generate", *common, "-o", str(tmp_path / "one")]) == 0
    split, whole = read_mp4(tmp_path / "cp" / "video.mp4"), read_mp4(tmp_path / "one" / "video.mp4")
    assert split.shape == whole.shape == (13, 32, 32, 3)
    assert_same_video(split, whole)


def test_only_the_main_process_saves(tmp_path, monkeypatch):
    import fvg.pipeline as pipeline
    from fvg.pipeline import FactorizedOutput

    frames = np.zeros((5, 16, 16, 3), np.uint8)
    result = FactorizedOutput(frames, "t2v", "p", "p", 0, 1, 8, None, None, {}, {})
    monkeypatch.setattr(pipeline, "is_main_process", lambda: False)
    assert result.save(tmp_path / "out") == tmp_path / "out" / "video.mp4"
    assert not (tmp_path / "out").exists()


@needs_gloo
def test_leaving_frees_the_group_and_what_holds_it(free_port):
    """`leave_process_group` (run by every successful `fvg` command) leaves the group, after collecting the
    unreachable objects that still hold it: a gloo group torn down at interpreter exit instead can abort a
    rank whose peer already left. Outside a group it does nothing."""
    import gc
    import weakref

    from fvg.parallel import leave_process_group

    leave_process_group()  # no group: a no-op
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)

    class Holder:  # a split model in a reference cycle, as a model with hooks back to itself is
        pass

    holder = Holder()
    holder.group, holder.me = dist.group.WORLD, holder
    alive = weakref.ref(holder)
    del holder
    gc.disable()  # only leave_process_group's own collection may free it
    try:
        leave_process_group()
        assert alive() is None
    finally:
        gc.enable()
    assert not dist.is_initialized()


# -- the split the plan relies on ---------------------------------------------------------------------------

@pytest.mark.parametrize("shards", [2, 4])
def test_per_frame_timesteps_split_like_the_tokens(shards):
    """The plan cuts a 2-D timestep into equal chunks along dim 1, as it cuts the tokens: per-frame chunk k,
    spread over its frames' tokens, is per-token chunk k whenever the ranks divide the frame count."""
    pipe = AnchoredWanPipeline(**tiny_wan_components())
    latents = torch.zeros(1, 16, 8, 6, 4)  # 8 latent frames of 3x2 tokens
    t = torch.tensor(700.0)
    per_frame = pipe.frame_timesteps(t, latents, anchored=True)
    per_token = pipe.token_timesteps(t, latents, anchored=True)
    for frames, tokens in zip(per_frame.chunk(shards, dim=1), per_token.chunk(shards, dim=1)):
        torch.testing.assert_close(frames.repeat_interleave(6, dim=1), tokens, rtol=0, atol=0)
    assert per_frame[0, 0] == 0 and per_token[0, :6].eq(0).all() and per_token[0, 6:].eq(700).all()
    assert pipe.frames_shard_evenly(latents)  # no parallelism: always per frame


# -- errors ---------------------------------------------------------------------------------------------------

def run_cli(tmp_path, *args):
    return main(["generate", "a red circle", "--preset", "tiny", "--device", "cpu", "-o", str(tmp_path / "o"), *args])


def test_outside_torchrun_is_one_line(tmp_path, capsys, outside_torchrun):
    assert torchrun_world() is None
    assert run_cli(tmp_path, "--context-parallel", "2") == 2
    err = capsys.readouterr().err
    assert "runs under torchrun, one process per part: torchrun --nproc-per-node 2 -m fvg COMMAND" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    image = tmp_path / "anchor.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert main(["animate", "a red circle", "--anchor", str(image), "--preset", "tiny", "--device", "cpu",
                 "-o", str(tmp_path / "a"), "--context-parallel", "2"]) == 2
    assert "runs under torchrun" in capsys.readouterr().err


def test_degree_must_match_the_world_size(tmp_path, capsys, torchrun_env):
    torchrun_env(world_size=3)
    assert run_cli(tmp_path, "--context-parallel", "2") == 2
    assert "does not match torchrun's 3 process(es)" in capsys.readouterr().err
    assert run_cli(tmp_path, "--context-parallel", "0") == 2
    assert "--context-parallel must be a whole number >= 1, got 0" in capsys.readouterr().err
    assert run_cli(tmp_path, "--context-parallel", "3", "--context-parallel-mode", "stripes") == 2
    assert "unknown context-parallel mode 'stripes'" in capsys.readouterr().err


def test_refused_combinations(torchrun_env):
    torchrun_env(world_size=2)
    with pytest.raises(FvgError, match="--cache fbc cannot be combined with --context-parallel"):
        validate_speed(SpeedOptions(cache="fbc", context_parallel=2))
    with pytest.raises(FvgError, match="ring attention needs an attention backend that returns the log-sum-exp"):
        validate_speed(SpeedOptions(context_parallel=2, context_parallel_mode="ring"))
    ok = validate_speed(SpeedOptions(context_parallel=2))
    assert ok.settings()["context_parallel"] == {"degree": 2, "mode": "ulysses"}
    assert "context_parallel" not in SpeedOptions().settings()  # one-process records are unchanged


def test_shapes_that_do_not_split():
    wan, pipe = get_family("wan"), AnchoredWanPipeline(**tiny_wan_components())
    wan.check_context_parallel(pipe, 32, 32, 13, 2, "ulysses")  # 16 tokens, 2 heads
    with pytest.raises(FvgError, match=r"16x48x9 gives 9 video tokens \(3 latent frames x 3\), which do not split "
                                       "into 2 equal parts"):
        wan.check_context_parallel(pipe, 16, 48, 9, 2, "ulysses")
    with pytest.raises(FvgError, match="Ulysses attention splits the 2 attention heads of the video transformer "
                                       "and 4 does not divide them"):
        wan.check_context_parallel(pipe, 32, 32, 13, 4, "ulysses")
    wan.check_context_parallel(pipe, 32, 32, 13, 4, "ring")  # ring splits no heads


def test_a_family_without_a_plan_is_refused():
    cogvideox = get_family("cogvideox")
    pipe = AnchoredCogVideoXPipeline(**tiny_cogvideox_components())
    with pytest.raises(FvgError, match="CogVideoX has no context-parallel plan .*CogVideoXTransformer3DModel"):
        cogvideox.check_context_parallel(pipe, 32, 32, 9, 2, "ulysses")


@needs_gloo
@pytest.mark.parametrize("shape", [
    ("--frames", "13", "--height", "384", "--width", "384", "--heads", "4"),  # 4 latent frames: per frame
    ("--frames", "9", "--height", "256", "--width", "512", "--heads", "6"),  # 3 latent frames: per token
])
def test_fvg_memory_per_rank_activation_against_two_processes(free_port, shape):
    """`fvg memory --context-parallel N`'s per-rank activation (WanActivation) against the live tensors one
    rank of a 2-process Ulysses forward holds (all-to-all buffers included), and the one-process forward."""
    import re

    proc = torchrun(free_port, str(ROOT / "benchmarks" / "bench_context_parallel.py"), *shape, "--dtype", "bfloat16",
                    "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("activation peak per rank"))
    # "...: W GiB one process (estimate W'), S GiB split (estimate S', ratio R)"
    whole, whole_est, split, split_est = [float(v) for v in re.findall(r"\d+\.\d+", line)[:4]]
    assert abs(whole_est / whole - 1) < 0.15 and abs(split_est / split - 1) < 0.15, line
    assert split < 0.7 * whole  # the split is real: each rank holds about half the tokens' activations


@needs_gloo
def test_eval_generate_splits_each_video_and_writes_once(tmp_path, free_port, outside_torchrun):
    """`fvg eval generate --context-parallel 2` under torchrun: both ranks run every video (not a shard each),
    rank 0 alone writes the videos, records and manifest; a rerun skips them on every rank alike."""
    common = ["eval", "generate", "--suite", "minicompbench", "--preset", "tiny", "--limit", "1", "--categories",
              "consistent_attr", "--modes", "t2v,factorized", "--seeds", "0", "--device", "cpu", "--frames", "13",
              "--steps", "2"]
    proc = torchrun(free_port, "-m", "fvg", *common, "-o", str(tmp_path / "cp"), "--context-parallel", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("2 generated, 0 already present, 0 failed") == 1  # rank 1 is quiet
    manifest = [json.loads(x) for x in (tmp_path / "cp" / "manifest.jsonl").read_text().splitlines()]
    assert [(e["mode"], e["status"]) for e in manifest] == [("t2v", "generated"), ("factorized", "generated")]
    assert not list((tmp_path / "cp").glob("manifest.part-*"))
    record = json.loads((tmp_path / "cp" / "records" / "factorized" / "seed0" / "consistent_attr" / "0001" /
                         "run.json").read_text())
    assert record["settings"]["context_parallel"]["degree"] == 2
    again = torchrun(free_port, "-m", "fvg", *common, "-o", str(tmp_path / "cp"), "--context-parallel", "2")
    assert again.returncode == 0 and "0 generated, 2 already present" in again.stderr, again.stderr[-3000:]
    assert main([*common, "-o", str(tmp_path / "one")]) == 0
    for mode in ("t2v", "factorized"):
        video = Path(mode) / "seed0" / "consistent_attr" / "0001.mp4"
        split, whole = read_mp4(tmp_path / "cp" / video), read_mp4(tmp_path / "one" / video)
        assert split.shape == whole.shape == (13, 32, 32, 3)
        assert_same_video(split, whole)
