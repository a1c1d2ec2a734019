"""The shared training loop of the `mini` stages: AdamW, warmup + cosine LR, EMA, resumable
checkpoints (weights_only), a JSONL loss log, and the stages' DONE.json bookkeeping."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from fvg.io import FvgError, atomic_path, write_json

from .settings import RunSettings

log = logging.getLogger("fvg.miniworld")


def done(path: Path) -> bool:
    return (path / "DONE.json").is_file()


def skip_if_done(out: Path, name: str, needs: tuple[str, ...] = ()) -> bool:
    """Every stage's preamble: a finished stage is skipped; one whose inputs are unfinished refuses to start."""
    if done(out / name):
        log.info("%s: complete, skipped", name)
        return True
    for need in needs:
        if not done(out / need):
            raise FvgError(f"{name}: the {need} stage is not complete")
    return False


def done_info(path: Path) -> dict | None:
    """What `mark_done` recorded for a finished stage, or None while it is unfinished."""
    return json.loads((path / "DONE.json").read_text(encoding="utf-8")) if done(path) else None


def mark_done(path: Path, info: dict) -> None:
    write_json(path / "DONE.json", {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info})


def generator(seed: int, *counters: int) -> torch.Generator:
    from fvg.train.seeds import step_generator

    return step_generator(seed, *counters)



def lr_at(step: int, base: float, warmup: int, total: int, extended_from: Sequence[int] = ()) -> float:
    """Linear warmup, then cosine decay to 10% of `base` at `total` steps. `extended_from`: the earlier
    totals of a finished stage continued to a longer one; a step decays to the first of them it lies before."""
    total = next((t for t in extended_from if step < t), total)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Log:
    """Appends {"step", "loss", "lr", "elapsed_s", ...} rows to log.jsonl (a resumed run drops rows
    past its checkpoint first, so the curve has one row per step)."""

    def __init__(self, path: Path, from_step: int):
        self.path = path
        rows = read_log(path)
        kept = [r for r in rows if r["step"] <= from_step]
        if len(kept) != len(rows) or not path.exists():
            path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.elapsed = kept[-1]["elapsed_s"] if kept else 0.0

    def write(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _save_ckpt(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, str(tmp))


def device_label(device: torch.device) -> str:
    """"cpu", or "cuda (NVIDIA H100 80GB HBM3)": what a log row and a stage summary record."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def logged_devices(rows: list[dict]) -> list[str]:
    """The devices a stage's log rows ran on (rows logged before devices were recorded ran on the CPU)."""
    return sorted({r.get("device", "cpu") for r in rows})


# Called every `log_every` steps by each `fit` in this process. `train.run` registers one while the T2V stage
# trains beside the anchor stage's child process, to take that child's threads once it has finished.
_BETWEEN_STEPS: list[Callable[[], None]] = []


@contextlib.contextmanager
def between_steps(fn: Callable[[], None]):
    """Run `fn` between training steps (every `log_every` steps) while the context is open."""
    _BETWEEN_STEPS.append(fn)
    try:
        yield
    finally:
        _BETWEEN_STEPS.remove(fn)


def fit(stage_dir: Path, model: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
        settings: RunSettings, resume: bool, time_limit: float | None, ema: bool = True,
        weight_decay: float = 0.0, extended_from: Sequence[int] = (),
        device: torch.device | str = "cpu") -> tuple[torch.nn.Module, bool]:
    """The shared training loop: AdamW, warmup + cosine LR, grad clip 1, EMA, checkpoints, log.

    `loss_fn(step)` draws its own batch from (seed, step), so a resumed run repeats exactly what an
    uninterrupted one would. The model, its EMA and the optimizer live on `device`; a checkpoint
    resumes on any device (it is read onto the host, then copied into place), so a stage begun on a
    CPU can finish on a GPU and the other way round. Each log row records the device that ran it.
    Returns (the model to export: EMA weights if `ema`, finished?)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model.to(device)
    label = device_label(device)
    ckpt = stage_dir / "ckpt.pt"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    ema_model = copy.deepcopy(model).requires_grad_(False) if ema else None
    step = 0
    if ckpt.exists():
        if not resume:
            raise FvgError(f"{stage_dir.name}: a checkpoint exists ({ckpt}); pass --resume to continue it, "
                           f"or delete {stage_dir} to start the stage over")
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema_model is not None:
            ema_model.load_state_dict(state["ema"])
        step = state["step"]
        log.info("%s: resumed at step %d", stage_dir.name, step)
    logger, first_step = _Log(stage_dir / "log.jsonl", step), step
    elapsed0, start = logger.elapsed, time.perf_counter()
    model.train()

    def checkpoint():
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step}
        if ema_model is not None:
            state["ema"] = ema_model.state_dict()
        _save_ckpt(ckpt, state)

    window: list[float] = []
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, settings.warmup_steps, steps, extended_from)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema_model is not None:
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema_model.parameters(), model.parameters()):
                    e.lerp_(p.detach(), 1 - decay)
        step += 1
        window.append(loss.item())
        if step % settings.log_every == 0 or step == steps:
            elapsed = elapsed0 + time.perf_counter() - start
            logger.write({"step": step, "loss": sum(window) / len(window), "lr": opt.param_groups[0]["lr"],
                          "grad_norm": float(grad_norm), "elapsed_s": round(elapsed, 2), "device": label})
            if step % (settings.log_every * 20) == 0:
                log.info("%s: step %d/%d loss %.4f (%.2f s/step)", stage_dir.name, step, steps,
                         sum(window) / len(window), (time.perf_counter() - start) / max(1, step - first_step))
            window = []
            for fn in _BETWEEN_STEPS:
                fn()
        if step % settings.checkpoint_every == 0 or step == steps:
            checkpoint()
        if time_limit is not None and time.perf_counter() - start > time_limit * 60 and step < steps:
            checkpoint()
            log.info("%s: time limit reached at step %d/%d; continue with --resume", stage_dir.name, step, steps)
            return (ema_model or model), False
    return (ema_model or model).eval(), True
