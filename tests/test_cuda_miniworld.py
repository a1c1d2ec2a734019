"""`fvg miniworld train --device cuda`, on a CUDA device (skipped elsewhere: CI has no GPU).

A stage's batches are drawn on the host from (seed, step), so a GPU run trains on exactly the batches
a CPU run would; only float rounding differs. These tests check that on the tiny profile: the latents
a GPU encodes are the CPU's to rounding, and a T2V stage begun on the CPU and resumed on the GPU (and
the other way round) logs the same losses as one that never left the CPU, and says where each step ran.

    python -m pytest tests/test_cuda_miniworld.py      # on a machine with a CUDA GPU

The data stage writes MP4s (PyAV); the metadata alone is all the later stages read, so it is written
here directly and the tests run where PyAV is not installed.
"""

import json

import pytest
import torch

from fvg.miniworld import loop, settings, stages
from fvg.miniworld import train as mt
from fvg.miniworld.dataset import clip_row

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CLIPS = 14


def metadata_only(run, clips: int = CLIPS) -> None:
    rows = [clip_row(i, 0)[0] for i in range(clips)]  # write_dataset's rows, without its MP4s and PNGs
    (run / "data").mkdir(parents=True)
    (run / "data" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loop.mark_done(run / "data", {"clips": clips})


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cpu") / "run"
    metadata_only(run)
    settings.load_settings(run, "tiny", {"t2v_steps": 6, "checkpoint_every": 100})
    for stage in ("vae", "latents", "t2v"):
        mt.run(run, stage=stage)
    return run


def linked(run, tmp_path, *parts):
    """A new run folder sharing `parts` of `run` (and its settings)."""
    new = tmp_path / "run"
    new.mkdir()
    for part in parts:
        (new / part).symlink_to(run / part)
    (new / "settings.json").write_text((run / "settings.json").read_text())
    return new


def test_gpu_latents_equal_the_cpus_to_rounding(cpu_run, tmp_path):
    run = linked(cpu_run, tmp_path, "data", "vae")
    mt.run(run, stage="latents", device="cuda", workers=2)
    assert json.loads((run / "latents" / "DONE.json").read_text())["device"].startswith("cuda (")
    cpu, gpu = stages.LatentSet(cpu_run), stages.LatentSet(run)
    # cuDNN's default TF32 convolutions put them up to 4e-3 apart (H100); the stage encodes in full fp32
    torch.testing.assert_close(gpu.latents, cpu.latents, rtol=1e-4, atol=1e-4)
    for a, b in zip(gpu.embeds, cpu.embeds):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("first, then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_stage_resumes_across_devices_with_the_same_losses(cpu_run, tmp_path, first, then):
    run = linked(cpu_run, tmp_path, "data", "vae", "latents")
    mt.run(run, stage="t2v", device=first, time_limit=0.0)  # one step, a checkpoint, stop
    mt.run(run, stage="t2v", device=then, resume=True)
    want, got = loop.read_log(cpu_run / "t2v" / "log.jsonl"), loop.read_log(run / "t2v" / "log.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in got]), torch.tensor([r["loss"] for r in want]),
                               rtol=1e-3, atol=1e-4)
    devices = [r["device"].split(" ")[0] for r in got]
    assert devices == [first] + [then] * 5
    assert len(json.loads((run / "t2v" / "DONE.json").read_text())["devices"]) == 2
    from safetensors.torch import load_file

    a = load_file(str(run / "t2v" / "final" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(cpu_run / "t2v" / "final" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(t.device.type == "cpu" for t in a.values())
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
