"""Training the `mini` preset from scratch, in resumable stages.

    fvg miniworld train --out runs/mini --stage all --resume

Stages, in order (each skips when its output is complete; `--resume` continues an interrupted
one from its last checkpoint; `--time-limit MIN` checkpoints and stops a training stage after
MIN minutes so that a session can run part of a long stage; `--device cuda` runs the vae, latents,
anchor and t2v stages on a GPU, and a checkpoint written on one device resumes on another;
`--workers N` renders clips in N processes):

    data      render the MiniWorld training set (MP4 + first-frame PNG + metadata.jsonl)
    vae       train the AutoencoderKLWan on short random crops of the clips
    latents   encode every clip (re-rendered exactly from its seed, no MP4 loss) with the VAE,
              measure latents_mean / latents_std, and encode prompts and first-frame captions
              with the frozen UMT5 encoder
    anchor    train the one-frame text-to-image WanTransformer3DModel on (first-frame caption,
              latent frame 0); flow matching from fvg.families.flow_matching
    t2v       train the T2V WanTransformer3DModel on (prompt, clip latents), p_anchor = 0
    lora      train the anchor LoRA on the T2V base with the project's trainer (fvg.train)
    export    write the diffusers pipelines + LoRA into the weights dir (40 MB at most)

Layout of `--out` (RUN):
    settings.json                 every setting of the run (written once; `--set` changes it)
    data/                         write_dataset's layout, plus lora_metadata.jsonl (a subset)
    vae/ckpt.pt, log.jsonl, final/
    latents/shard-XXXX.safetensors, text.safetensors, vae/, tokenizer/, text_encoder/, stats.json
    anchor/ckpt.pt, log.jsonl, final/      (final: the EMA weights, save_pretrained)
    t2v/    ckpt.pt, log.jsonl, final/
    pipelines/video/, pipelines/anchor/    WanPipeline dirs assembled from the parts
    lora/                                  fvg.train's run folder

Code: settings.py (RunSettings, profiles), loop.py (the training loop, checkpoints, logs),
sink.py (PaddingSink), stages.py (the stages), curves.py (loss curves, VAE preview); this
module runs stages in order, the anchor beside t2v when there are threads for both.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from fvg.io import FvgError

from .loop import between_steps, done
from .settings import load_settings, require_run
from .stages import (
    stage_anchor, stage_data, stage_export, stage_latents, stage_lora, stage_t2v, stage_vae,
)

log = logging.getLogger("fvg.miniworld")

STAGES = ("data", "vae", "latents", "anchor", "t2v", "lora", "export")


class _SideStage:
    """One training stage in a child process (`fvg miniworld train --stage NAME`), beside this one.

    Each of the two transformers gets half the threads: these small models run much faster on one
    thread each than on two threads taken in turns, and the two stages share nothing but the latents.
    The T2V stage is the longer one (v11 on 2 cores: 11000 steps at 2.18 s on one thread against the
    anchor's 20000 at 0.43 s), so once the child exits this process takes its threads back
    (`reclaim_if_finished`, called between T2V steps): from scratch the pair then takes about 4.8 hours
    instead of 6.7 on one thread, or 5.5 taken in turns on two."""

    def __init__(self, out: Path, name: str, resume: bool, time_limit: float | None, device: str = "cpu"):
        import subprocess
        import sys

        threads = torch.get_num_threads()
        mine = max(1, threads // 2)
        cmd = [sys.executable, "-m", "fvg", "miniworld", "train", "--out", str(out), "--stage", name,
               "--threads", str(threads - mine), "--device", device]
        if resume:
            cmd.append("--resume")
        if time_limit is not None:
            cmd += ["--time-limit", str(time_limit)]
        self.name, self.log_path = name, out / f"{name}.stage.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as sink:
            self.proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        torch.set_num_threads(mine)
        self.threads = threads
        log.info("stage %s: started beside the next stage (process %d, log %s)", name, self.proc.pid, self.log_path)

    def reclaim_if_finished(self) -> None:
        if self.proc.poll() is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # on the training thread: OpenMP's thread count is per thread
            log.info("stage %s: finished; the next stage continues on %d threads", self.name, self.threads)

    def join(self) -> None:
        code = self.proc.wait()
        torch.set_num_threads(self.threads)
        if code != 0:
            tail = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            raise FvgError(f"stage {self.name} failed (exit {code}; see {self.log_path}): {' '.join(tail)}")
        log.info("stage %s: finished beside t2v", self.name)

    def stop(self) -> None:
        self.proc.terminate()  # its last checkpoint stays: --resume continues it
        self.proc.wait()
        torch.set_num_threads(self.threads)


RUNNERS = {"data": stage_data, "vae": stage_vae, "latents": stage_latents, "anchor": stage_anchor,
           "t2v": stage_t2v, "lora": stage_lora, "export": stage_export}


def run(out: str | Path, stage: str = "all", resume: bool = False, profile: str | None = None,
        overrides: dict | None = None, time_limit: float | None = None, weights_dir: str | Path | None = None,
        parallel: bool = True, device: str = "cpu", workers: int = 1) -> None:
    """Run one stage or all of them in order (complete stages are skipped). With `parallel` and two or
    more torch threads, `all` trains the anchor and T2V transformers at once (they are independent),
    the anchor in a child process, each on half the threads.

    `device` places the stages this module trains itself (vae, latents, anchor, t2v). The lora stage
    is `fvg train`'s, on accelerate's device (the GPU when there is one). `workers`: processes that
    render clips for the vae and latents stages (the frames are the same for any number)."""
    from fvg.pipeline import validate_device

    if stage != "all" and stage not in STAGES:
        raise FvgError(f"unknown stage '{stage}' (choose from: {', '.join(STAGES)}, all)")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise FvgError(f"--workers must be a whole number of at least 1, got {workers}")
    validate_device(device)
    out = Path(out)
    if stage not in ("all", "data"):
        require_run(out, hint=f": start one with `fvg miniworld train --out {out}` (all stages) or `--stage data`")
    settings = load_settings(out, profile, overrides)
    todo = STAGES if stage == "all" else (stage,)
    deadline = None if time_limit is None else time.perf_counter() + time_limit * 60
    side: _SideStage | None = None
    for name in todo:
        left = None if deadline is None else max(0.0, (deadline - time.perf_counter()) / 60)
        if left == 0.0 and name != todo[0] and not done(out / name):
            log.info("time limit reached before stage %s; continue with --resume", name)
            return
        tick = time.perf_counter()
        if name == "anchor" and stage == "all" and parallel and not done(out / "anchor") \
                and not done(out / "t2v") and torch.get_num_threads() >= 2:
            side = _SideStage(out, "anchor", resume, left, device)  # runs beside t2v; joined after it
            continue
        try:
            with between_steps(side.reclaim_if_finished) if side is not None else contextlib.nullcontext():
                RUNNERS[name](out, settings, resume=resume, time_limit=left, weights_dir=weights_dir, device=device,
                              workers=workers)
        except BaseException:
            if side is not None:
                side.stop()
            raise
        if side is not None and name == "t2v":
            side.join()
            side = None
            if not done(out / "anchor"):
                return  # stopped by the time limit
        if not done(out / name):
            return  # stopped by the time limit
        log.info("stage %s: %.0f s", name, time.perf_counter() - tick)
