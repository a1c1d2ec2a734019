"""Training the `mini` preset from scratch, in resumable stages.

    fvg miniworld train --out runs/mini --stage all --resume

Stages, in order (each skips when its output is complete; `--resume` continues an interrupted
one from its last checkpoint; `--time-limit MIN` checkpoints and stops a training stage after
MIN minutes so that a session can run part of a long stage):

    data      render the MiniWorld training set (MP4 + first-frame PNG + metadata.jsonl)
    vae       train the AutoencoderKLWan on short random crops of the clips
    latents   encode every clip (re-rendered exactly from its seed, no MP4 loss) with the VAE,
              measure latents_mean / latents_std, and encode prompts and first-frame captions
              with the frozen UMT5 encoder
    anchor    train the one-frame text-to-image WanTransformer3DModel on (first-frame caption,
              latent frame 0); flow matching from fvg.train.objective
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
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fvg.io import FvgError, atomic_path, write_json

from . import models
from .models import MiniConfig

log = logging.getLogger("fvg.miniworld")

STAGES = ("data", "vae", "latents", "anchor", "t2v", "lora", "export")
NUM_FRAMES, SIZE, FPS = 17, 64, 8
SHARD = 1000  # clips per latent shard


@dataclass
class RunSettings:
    """Every setting of a `mini` training run. `profile` picks the defaults; `--set` overrides."""

    profile: str = "full"
    seed: int = 0
    # data
    num_clips: int = 8000
    lora_clips: int = 1000  # the LoRA stage's subset (fvg.train re-encodes these from the MP4s)
    # vae
    vae_clips: int = 1500  # clips held in memory as training material
    vae_steps: int = 8000
    vae_batch: int = 4
    vae_frames: int = 17  # all five chunks (1 + 4 x 4): every cache state the VAE meets at inference
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    vae_object_weight: float = 9.0  # extra loss weight on pixels that differ from the background
    vae_first_frame_weight: float = 3.0  # loss weight of a crop's first frame (the anchor's path)
    # diffusion transformers (flow matching, fvg.train.objective)
    anchor_steps: int = 10000  # at 4000 its loss still fell 5% over the last fifth (and anchors were worse)
    anchor_batch: int = 32
    anchor_lr: float = 5e-4
    t2v_steps: int = 6000
    t2v_batch: int = 16
    t2v_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # empty prompt, so classifier-free guidance works
    # Text embeddings are zero-padded to this many tokens, as WanPipeline pads them at inference
    # (its max_sequence_length, 512 unless the caller passes another): the padded keys act as an
    # attention sink whose weight depends on their count, so training and sampling must agree.
    text_tokens: int = models.MAX_SEQUENCE_LENGTH
    ema_decay: float = 0.999
    # lora (fvg.train)
    lora_steps: int = 1000
    lora_batch: int = 8
    lora_rank: int = 16
    lora_lr: float = 5e-4
    p_anchor: float = 1.0  # fvg.train's default: every sample anchored, as in the paper
    # bookkeeping
    checkpoint_every: int = 250
    log_every: int = 10
    encode_batch: int = 16
    model: MiniConfig = field(default_factory=MiniConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        d = dict(d)
        model = MiniConfig.from_dict(d.pop("model"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FvgError(f"unknown mini training setting(s): {', '.join(unknown)}")
        return cls(model=model, **d)


def tiny_settings() -> RunSettings:
    """Seconds-long versions of every stage, for tests."""
    return RunSettings(profile="tiny", num_clips=14, lora_clips=8, vae_clips=8, vae_steps=3, vae_batch=2,
                       vae_crop=16, anchor_steps=3, anchor_batch=4, t2v_steps=3, t2v_batch=2, warmup_steps=1,
                       lora_steps=2, lora_batch=2, lora_rank=4, checkpoint_every=2, log_every=1, encode_batch=4,
                       model=models.tiny_config())


PROFILES: dict[str, Callable[[], RunSettings]] = {"full": RunSettings, "tiny": tiny_settings}


def _apply(settings: RunSettings, overrides: dict) -> RunSettings:
    d = settings.to_dict()
    for key, value in overrides.items():
        target, parts = d, key.split(".")
        for p in parts[:-1]:
            if not isinstance(target.get(p), dict):
                raise FvgError(f"unknown mini training setting '{key}'")
            target = target[p]
        if parts[-1] not in target:
            raise FvgError(f"unknown mini training setting '{key}'")
        old = target[parts[-1]]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and type(old) is not type(value):
            raise FvgError(f"mini training setting '{key}' expects {type(old).__name__}, got {value!r}")
        target[parts[-1]] = value
    return RunSettings.from_dict(d)


def load_settings(out: Path, profile: str | None = None, overrides: dict | None = None) -> RunSettings:
    """The run's settings: RUN/settings.json if it exists (the profile it was made with wins), else the
    profile's defaults; `overrides` (dotted keys, e.g. `t2v_steps` or `model.flow_shift`) are applied
    and saved, so a resumed run keeps them."""
    path = out / "settings.json"
    if path.is_file():
        settings = RunSettings.from_dict(json.loads(path.read_text(encoding="utf-8")))
        if profile is not None and profile != settings.profile:
            raise FvgError(f"{out} was started with profile '{settings.profile}', not '{profile}'")
    else:
        settings = PROFILES[profile or "full"]()
    if overrides:
        settings = _apply(settings, overrides)
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings.to_dict())
    return settings


# -- small utilities ---------------------------------------------------------------------------------

def _done(path: Path) -> bool:
    return (path / "DONE.json").is_file()


def _skip_if_done(out: Path, name: str, needs: tuple[str, ...] = ()) -> bool:
    """Every stage's preamble: a finished stage is skipped; one whose inputs are unfinished refuses to start."""
    if _done(out / name):
        log.info("%s: complete, skipped", name)
        return True
    for need in needs:
        if not _done(out / need):
            raise FvgError(f"{name}: the {need} stage is not complete")
    return False


def _mark_done(path: Path, info: dict) -> None:
    write_json(path / "DONE.json", {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info})


def _generator(seed: int, *counters: int) -> torch.Generator:
    from fvg.train.seeds import step_generator

    return step_generator(seed, *counters)


def _rows(out: Path) -> list[dict]:
    meta = out / "data" / "metadata.jsonl"
    return [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]


def render_clip(row: dict) -> np.ndarray:
    """The exact frames [17, 64, 64, 3] uint8 of a dataset row, re-rendered from its seed."""
    from .dataset import sample_clip
    from .render import render_video

    _, scene = sample_clip(row["category"], int(row["seed"]))
    return render_video(scene)


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., T, H, W, 3] -> float [..., 3, T, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0)
    return x.movedim(-1, -4)


def _lr(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of `base` at `total` steps."""
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


def fit(stage_dir: Path, model: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
        settings: RunSettings, resume: bool, time_limit: float | None, ema: bool = True,
        weight_decay: float = 0.0) -> tuple[torch.nn.Module, bool]:
    """The shared training loop: AdamW, warmup + cosine LR, grad clip 1, EMA, checkpoints, log.

    `loss_fn(step)` draws its own batch from (seed, step), so a resumed run repeats exactly what an
    uninterrupted one would. Returns (the model to export: EMA weights if `ema`, finished?)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
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
            group["lr"] = _lr(step, lr, settings.warmup_steps, steps)
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
                          "grad_norm": float(grad_norm), "elapsed_s": round(elapsed, 2)})
            if step % (settings.log_every * 20) == 0:
                log.info("%s: step %d/%d loss %.4f (%.2f s/step)", stage_dir.name, step, steps,
                         sum(window) / len(window), (time.perf_counter() - start) / max(1, step - first_step))
            window = []
        if step % settings.checkpoint_every == 0 or step == steps:
            checkpoint()
        if time_limit is not None and time.perf_counter() - start > time_limit * 60 and step < steps:
            checkpoint()
            log.info("%s: time limit reached at step %d/%d; continue with --resume", stage_dir.name, step, steps)
            return (ema_model or model), False
    return (ema_model or model).eval(), True


# -- stages ----------------------------------------------------------------------------------------

def stage_data(out: Path, s: RunSettings, **_) -> None:
    from .dataset import write_dataset

    data = out / "data"
    if _skip_if_done(out, "data"):
        return
    tick = time.perf_counter()
    write_dataset(data, s.num_clips, s.seed)
    rows = _rows(out)
    (data / "lora_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:s.lora_clips]),
                                              encoding="utf-8")
    _mark_done(data, {"clips": len(rows), "seconds": round(time.perf_counter() - tick, 1)})


def _vae_material(out: Path, s: RunSettings) -> tuple[np.ndarray, np.ndarray]:
    """Clips [N, 17, 64, 64, 3] uint8 and each clip's background colour [N, 3] (frame 0's median)."""
    rows = _rows(out)[: s.vae_clips]
    clips = np.stack([render_clip(r) for r in rows])
    return clips, np.median(clips[:, 0].reshape(len(clips), -1, 3), axis=1)


def stage_vae(out: Path, s: RunSettings, resume: bool = False, time_limit: float | None = None, **_) -> None:
    stage = out / "vae"
    if _skip_if_done(out, "vae"):
        return
    clips, backgrounds = _vae_material(out, s)
    torch.manual_seed(s.seed)
    vae = models.build_vae(s.model.vae)
    n, frames, crop = len(clips), s.vae_frames, s.vae_crop

    def loss_fn(step: int) -> torch.Tensor:
        g = _generator(s.seed, 0xAE, step)
        idx = torch.randint(0, n, (s.vae_batch,), generator=g).tolist()
        t0 = torch.randint(0, NUM_FRAMES - frames + 1, (s.vae_batch,), generator=g).tolist()
        ys = torch.randint(0, SIZE - crop + 1, (s.vae_batch,), generator=g).tolist()
        xs = torch.randint(0, SIZE - crop + 1, (s.vae_batch,), generator=g).tolist()
        batch = np.stack([clips[i, t:t + frames, y:y + crop, x:x + crop] for i, t, y, x in zip(idx, t0, ys, xs)])
        x = to_pixels(batch)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        # Objects cover a few percent of the pixels: weight them up, or the flat background wins.
        bg = to_pixels(backgrounds[idx][:, None, None, None, :])
        w = 1 + s.vae_object_weight * ((x - bg).abs().amax(dim=1, keepdim=True) > 0.05).float()
        w[:, :, 0] *= s.vae_first_frame_weight
        err = recon - x
        rec = ((err.pow(2) + err.abs()) * w).mean() / w.mean()
        return rec + s.vae_kl * posterior.kl().mean()

    model, finished = fit(stage, vae, loss_fn, s.vae_steps, s.vae_lr, s, resume, time_limit, ema=False)
    if not finished:
        return
    model.save_pretrained(str(stage / "final"))
    quality = vae_quality(model, clips[-min(16, n):])
    _mark_done(stage, {"steps": s.vae_steps, **quality})
    log.info("vae: done, %s", quality)


@torch.no_grad()
def vae_quality(vae, clips: np.ndarray) -> dict:
    """PSNR of full 17-frame clips through encode (mode) + decode, and the share of pixels whose
    nearest palette colour survives: what the MiniWorld evaluator reads."""
    from .score import quantize

    vae.eval()
    x = to_pixels(clips)
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = (recon - x).pow(2).mean().item()
    frames = ((recon + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).movedim(1, -1).numpy()
    got = np.stack([quantize(f) for clip in frames for f in clip])
    want = np.stack([quantize(f) for clip in clips for f in clip])
    objects = want >= 2  # labels 0 and 1 are the two backgrounds
    return {"psnr_db": round(10 * math.log10(4.0 / max(mse, 1e-12)), 2),
            "palette_agreement": round(float(np.mean(got == want)), 5),
            "object_pixel_agreement": round(float(np.mean(got[objects] == want[objects])), 5)}


def _text_parts(out: Path, s: RunSettings):
    lat = out / "latents"
    tok_dir, te_dir = lat / "tokenizer", lat / "text_encoder"
    if (te_dir / "config.json").is_file():
        from transformers import AutoTokenizer, UMT5EncoderModel

        return AutoTokenizer.from_pretrained(str(tok_dir)), UMT5EncoderModel.from_pretrained(str(te_dir)).eval()
    tokenizer = models.build_tokenizer()
    encoder = models.build_text_encoder(s.model.text, len(tokenizer))
    tokenizer.save_pretrained(str(tok_dir))
    encoder.save_pretrained(str(te_dir))
    return tokenizer, encoder


def stage_latents(out: Path, s: RunSettings, **_) -> None:
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file, save_file

    from fvg.train.data import encode_captions

    lat = out / "latents"
    if _skip_if_done(out, "latents", needs=("vae",)):
        return
    lat.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKLWan.from_pretrained(str(out / "vae" / "final")).eval()
    rows = _rows(out)
    tick = time.perf_counter()
    for shard_no, start in enumerate(range(0, len(rows), SHARD)):
        path = lat / f"shard-{shard_no:04d}.safetensors"
        if path.is_file():
            continue  # shards are written atomically: an existing one is complete
        chunk, parts = rows[start:start + SHARD], []
        with torch.no_grad():
            for b in range(0, len(chunk), s.encode_batch):
                x = to_pixels(np.stack([render_clip(r) for r in chunk[b:b + s.encode_batch]]))
                parts.append(vae.encode(x).latent_dist.mode())
        with atomic_path(path) as tmp:
            save_file({"latents": torch.cat(parts).contiguous()}, str(tmp))
        log.info("latents: %d/%d clips (%.0f s)", min(start + SHARD, len(rows)), len(rows), time.perf_counter() - tick)
    raw = torch.cat([load_file(str(p))["latents"] for p in sorted(lat.glob("shard-*.safetensors"))])
    mean = raw.mean(dim=(0, 2, 3, 4))
    std = raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=[round(float(v), 6) for v in mean],
                           latents_std=[round(float(v), 6) for v in std])
    vae.save_pretrained(str(lat / "vae"))
    write_json(lat / "stats.json", {"latents_mean": vae.config.latents_mean, "latents_std": vae.config.latents_std,
                                    "shape": list(raw.shape)})

    # Text: the pipeline's own encode_prompt embeddings (trimmed; padded to 512 with zeros on use).
    tokenizer, encoder = _text_parts(out, s)
    pipe = models.assemble_pipeline(tokenizer, encoder, vae, None, s.model.flow_shift)
    texts = [""] + sorted({r["caption"] for r in rows} | {r["first_frame_caption"] for r in rows})
    index = {t: i for i, t in enumerate(texts)}
    embeds = []
    for b in range(0, len(texts), 64):
        embeds += encode_captions(pipe, texts[b:b + 64], models.MAX_SEQUENCE_LENGTH, "cpu")
    lengths = torch.tensor([e.shape[0] for e in embeds])
    save_file({"embeds": torch.cat(embeds).contiguous(), "lengths": lengths,
               "prompt": torch.tensor([index[r["caption"]] for r in rows]),
               "caption": torch.tensor([index[r["first_frame_caption"]] for r in rows])}, str(lat / "text.safetensors"))
    _mark_done(lat, {"clips": len(rows), "texts": len(texts), "max_tokens": int(lengths.max()),
                     "seconds": round(time.perf_counter() - tick, 1)})


class LatentSet:
    """Normalised latents [N, C, F, h, w] and text embeddings, held in memory for the transformer stages."""

    def __init__(self, out: Path):
        from safetensors.torch import load_file

        lat = out / "latents"
        if not _done(lat):
            raise FvgError("the latents stage is not complete")
        stats = json.loads((lat / "stats.json").read_text(encoding="utf-8"))
        raw = torch.cat([load_file(str(p))["latents"] for p in sorted(lat.glob("shard-*.safetensors"))])
        mean = torch.tensor(stats["latents_mean"]).view(1, -1, 1, 1, 1)
        std = torch.tensor(stats["latents_std"]).view(1, -1, 1, 1, 1)
        self.latents = ((raw - mean) / std).float()
        text = load_file(str(lat / "text.safetensors"))
        lengths = text["lengths"].tolist()
        offsets = np.cumsum([0] + lengths)
        self.embeds = [text["embeds"][offsets[i]:offsets[i + 1]] for i in range(len(lengths))]
        self.prompt, self.caption = text["prompt"], text["caption"]
        self.text_dim = text["embeds"].shape[1]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def text(self, ids: list[int], drop: torch.Tensor, length: int = models.MAX_SEQUENCE_LENGTH) -> torch.Tensor:
        """Text embeddings [B, length, D], zero-padded as WanPipeline pads them; dropped rows get the empty prompt."""
        out = torch.zeros(len(ids), length, self.text_dim)
        for row, (i, d) in enumerate(zip(ids, drop.tolist())):
            e = self.embeds[0 if d else i]
            out[row, :e.shape[0]] = e
        return out


class PaddingSink:
    """Exact, cheap training of cross-attention over zero-padded text.

    WanPipeline pads each prompt's n token embeddings with zeros to `length` (512) tokens. The
    padded rows are identical, so their keys and values are identical, and attention over them
    equals attention over fewer copies whose logits are raised by log(copies at inference /
    copies here). Training therefore feeds each batch padded only to its longest prompt + 1 and
    passes that additive bias to every cross-attention (a wrapper around the model's own
    processor): the same function the 512-token model computes, at a fraction of the cost (the
    anchor model spends about half its compute on padding otherwise). Weights are untouched, so
    the saved model samples with the ordinary 512-token padding."""

    def __init__(self, model, length: int):
        self.length = length
        self.bias: torch.Tensor | None = None
        for block in model.blocks:
            block.attn2.processor = _SinkProcessor(block.attn2.processor, self)

    def pack(self, embeds: list[torch.Tensor], text_dim: int) -> torch.Tensor:
        """Text [B, L, D] with L = longest + 1 (at least one padding row each); sets the bias [B, 1, 1, L]."""
        width = min(self.length, max(e.shape[0] for e in embeds) + 1)
        text = torch.zeros(len(embeds), width, text_dim)
        bias = torch.zeros(len(embeds), 1, 1, width)
        for row, e in enumerate(embeds):
            n = e.shape[0]
            text[row, :n] = e
            if n < width:
                bias[row, 0, 0, n:] = math.log((self.length - n) / (width - n))
        self.bias = bias
        return text


class _SinkProcessor:
    def __init__(self, base, sink: PaddingSink):
        self.base, self.sink = base, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        if encoder_hidden_states is not None and self.sink.bias is not None:
            attention_mask = self.sink.bias.to(hidden_states.device, hidden_states.dtype)
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


def _train_transformer(out: Path, s: RunSettings, name: str, resume: bool, time_limit: float | None) -> None:
    from fvg.families.flow_matching import SigmaSampler, draw_batch, masked_flow_loss

    stage = out / name
    if _skip_if_done(out, name):
        return
    data = LatentSet(out)
    arch = s.model.anchor if name == "anchor" else s.model.t2v
    steps, batch, lr = (s.anchor_steps, s.anchor_batch, s.anchor_lr) if name == "anchor" else (
        s.t2v_steps, s.t2v_batch, s.t2v_lr)
    torch.manual_seed(s.seed + (1 if name == "anchor" else 2))
    model = models.build_transformer(arch, data.latents.shape[1], data.text_dim)
    sink = PaddingSink(model, s.text_tokens)
    sampler = SigmaSampler(shift=s.model.flow_shift)
    text_ids = data.caption if name == "anchor" else data.prompt
    patch = tuple(arch.patch_size)
    salt = 0xA1 if name == "anchor" else 0x72

    def loss_fn(step: int) -> torch.Tensor:
        g = _generator(s.seed, salt, step)
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x0 = data.latents[idx]
        if name == "anchor":
            x0 = x0[:, :, :1]  # latent frame 0 is the first frame encoded alone (causal VAE)
        drop = torch.rand(batch, generator=g) < s.caption_dropout
        text = sink.pack([data.embeds[0 if d else i] for i, d in zip(text_ids[idx].tolist(), drop.tolist())],
                         data.text_dim)
        nb = draw_batch(x0, sampler, 0.0, g, patch)
        pred = model(hidden_states=nb.model_input, timestep=nb.timestep, encoder_hidden_states=text,
                     return_dict=False)[0]
        return masked_flow_loss(pred, nb.target, nb.frame_weight)

    final, finished = fit(stage, model, loss_fn, steps, lr, s, resume, time_limit, ema=True, weight_decay=0.01)
    if not finished:
        return
    final.save_pretrained(str(stage / "final"))
    rows = read_log(stage / "log.jsonl")
    _mark_done(stage, {"steps": steps, "batch": batch, "params": sum(p.numel() for p in final.parameters()),
                       "tokens_per_sample": int(np.prod(x0_shape(data, name)[1:])) // math.prod(patch),
                       "final_loss": _tail_mean(rows), "train_seconds": rows[-1]["elapsed_s"] if rows else None})
    assemble(out, name)


def x0_shape(data: LatentSet, name: str) -> tuple:
    shape = tuple(data.latents.shape[1:])
    return (shape[0], 1, *shape[2:]) if name == "anchor" else shape


def _tail_mean(rows: list[dict], frac: float = 0.05) -> float | None:
    if not rows:
        return None
    k = max(1, int(len(rows) * frac))
    return round(sum(r["loss"] for r in rows[-k:]) / k, 5)


def assemble(out: Path, name: str) -> Path:
    """RUN/pipelines/{video,anchor}: a WanPipeline from the tokenizer, frozen encoder, VAE (with its
    latent statistics) and the stage's final transformer."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    s = load_settings(out)
    tokenizer, encoder = _text_parts(out, s)
    vae = AutoencoderKLWan.from_pretrained(str(out / "latents" / "vae"))
    transformer = WanTransformer3DModel.from_pretrained(str(out / name / "final"))
    pipe = models.assemble_pipeline(tokenizer, encoder, vae, transformer, s.model.flow_shift)
    target = out / "pipelines" / ("video" if name == "t2v" else "anchor")
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(str(target))
    return target


def stage_anchor(out: Path, s: RunSettings, resume: bool = False, time_limit: float | None = None, **_) -> None:
    _train_transformer(out, s, "anchor", resume, time_limit)


def stage_t2v(out: Path, s: RunSettings, resume: bool = False, time_limit: float | None = None, **_) -> None:
    _train_transformer(out, s, "t2v", resume, time_limit)


def lora_config(out: Path, s: RunSettings):
    from fvg.train.config import TrainConfig

    return TrainConfig(
        model=str((out / "pipelines" / "video").resolve()), data=str((out / "data" / "lora_metadata.jsonl").resolve()),
        output_dir=str(out / "lora"), cache_dir=str(out / "lora" / "cache"), height=SIZE, width=SIZE,
        num_frames=NUM_FRAMES, fps=FPS, max_sequence_length=s.text_tokens, num_workers=0,
        rank=s.lora_rank, alpha=float(s.lora_rank), p_anchor=s.p_anchor, flow_shift=s.model.flow_shift,
        learning_rate=s.lora_lr, weight_decay=1e-4, lr_scheduler="constant_with_warmup",
        lr_warmup_steps=min(50, s.lora_steps), max_steps=s.lora_steps, batch_size=s.lora_batch,
        mixed_precision="no", gradient_checkpointing=False, seed=s.seed,
        checkpoint_every=max(1, min(s.checkpoint_every, s.lora_steps)), checkpoints_keep=2, validation_every=0,
        log_with="none",
    ).validate()


def stage_lora(out: Path, s: RunSettings, resume: bool = False, **_) -> None:
    from fvg.animate.wan import AnchoredWanPipeline
    from fvg.train.trainer import train as run_training

    stage = out / "lora"
    if _skip_if_done(out, "lora", needs=("t2v",)):
        return
    cfg = lora_config(out, s)
    pipe = AnchoredWanPipeline.from_pretrained(cfg.model, dtype=torch.float32)
    result = run_training(cfg, resume="latest" if resume else None, pipe=pipe)
    losses = result.losses
    _mark_done(stage, {"steps": result.step, "lora": str(result.lora_files.get("transformer.diffusers")),
                       "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 5) if losses else None})


def stage_export(out: Path, s: RunSettings, weights_dir: str | Path | None = None, **_) -> Path:
    """Copy the pipelines and the LoRA into `weights_dir` (default: the package's weights/mini)."""
    for name in ("anchor", "t2v", "lora"):
        if not _done(out / name):
            raise FvgError(f"export: the {name} stage is not complete")
    target = Path(weights_dir or models.WEIGHTS_DIR)
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(out / "pipelines" / "video", staging / models.VIDEO_SUBDIR)
    shutil.copytree(out / "pipelines" / "anchor", staging / models.ANCHOR_SUBDIR)
    shutil.copy2(out / "lora" / "lora" / "anchor_lora.safetensors", staging / models.LORA_FILE)
    stages = {n: json.loads((out / n / "DONE.json").read_text(encoding="utf-8")) for n in STAGES[1:6]}
    write_json(staging / "manifest.json", {"settings": s.to_dict(), "stages": stages,
                                           "bytes": models.shipped_size(staging)})
    size = models.shipped_size(staging)
    if size > models.MAX_SHIPPED_BYTES:
        raise FvgError(f"export: the weights take {size / 2**20:.1f} MB, more than the 40 MB allowed "
                       f"(left in {staging})")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    log.info("export: %s (%.1f MB)", target, size / 2**20)
    return target


class _SideStage:
    """One training stage in a child process (`fvg miniworld train --stage NAME`), beside this one.

    Each of the two transformers gets half the threads: these small models run much faster on one
    thread each than on two threads taken in turns, and the two stages share nothing but the latents."""

    def __init__(self, out: Path, name: str, resume: bool, time_limit: float | None):
        import subprocess
        import sys

        threads = torch.get_num_threads()
        mine = max(1, threads // 2)
        cmd = [sys.executable, "-m", "fvg", "miniworld", "train", "--out", str(out), "--stage", name,
               "--threads", str(threads - mine)]
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
        parallel: bool = True) -> None:
    """Run one stage or all of them in order (complete stages are skipped). With `parallel` and two or
    more torch threads, `all` trains the anchor and T2V transformers at once (they are independent),
    the anchor in a child process, each on half the threads."""
    if stage != "all" and stage not in STAGES:
        raise FvgError(f"unknown stage '{stage}' (choose from: {', '.join(STAGES)}, all)")
    out = Path(out)
    settings = load_settings(out, profile, overrides)
    todo = STAGES if stage == "all" else (stage,)
    deadline = None if time_limit is None else time.perf_counter() + time_limit * 60
    side: _SideStage | None = None
    for name in todo:
        left = None if deadline is None else max(0.0, (deadline - time.perf_counter()) / 60)
        if left == 0.0 and name != todo[0] and not _done(out / name):
            log.info("time limit reached before stage %s; continue with --resume", name)
            return
        tick = time.perf_counter()
        if name == "anchor" and stage == "all" and parallel and not _done(out / "anchor") \
                and not _done(out / "t2v") and torch.get_num_threads() >= 2:
            side = _SideStage(out, "anchor", resume, left)  # runs beside t2v; joined after it
            continue
        try:
            RUNNERS[name](out, settings, resume=resume, time_limit=left, weights_dir=weights_dir)
        except BaseException:
            if side is not None:
                side.stop()
            raise
        if side is not None and name == "t2v":
            side.join()
            side = None
            if not _done(out / "anchor"):
                return  # stopped by the time limit
        if name not in ("export",) and not _done(out / name):
            return  # stopped by the time limit
        log.info("stage %s: %.0f s", name, time.perf_counter() - tick)


# -- curves ------------------------------------------------------------------------------------------

def smoothed(rows: list[dict], points: int = 20) -> list[tuple[int, float]]:
    """(last step, mean loss) over `points` equal slices of the log."""
    if not rows:
        return []
    size = max(1, len(rows) // points)
    return [(chunk[-1]["step"], sum(r["loss"] for r in chunk) / len(chunk))
            for chunk in (rows[i:i + size] for i in range(0, len(rows), size))]


def plateau(rows: list[dict], tail: float = 0.2) -> dict:
    """How much the loss still falls over the last `tail` of training: a least-squares line through
    the tail's logged losses, its drop across the tail relative to the tail's mean (a line uses every
    point, so one noisy slice cannot decide it). Under 2% counts as a plateau. Also the mean loss of
    the tail's two halves, to read the same thing without a fit."""
    if len(rows) < 20:
        return {"relative_drop": None, "plateau": None, "tail_halves": None}
    n = len(rows)
    losses = np.array([r["loss"] for r in rows[n - max(4, int(n * tail)):]])
    slope = np.polyfit(np.arange(len(losses)), losses, 1)[0]
    drop = float(-slope * len(losses) / losses.mean())
    half = len(losses) // 2
    return {"relative_drop": round(drop, 4), "plateau": drop < 0.02,
            "tail_halves": [round(float(losses[:half].mean()), 5), round(float(losses[half:].mean()), 5)]}


def write_curves(out: str | Path, png: str | Path | None = None) -> dict:
    """Loss curves of the vae, anchor and t2v stages (and the LoRA's from fvg.train's run.json):
    a summary dict, and a PNG if matplotlib is installed."""
    out = Path(out)
    curves: dict[str, list[dict]] = {n: read_log(out / n / "log.jsonl") for n in ("vae", "anchor", "t2v")}
    run_json = out / "lora" / "run.json"
    if run_json.is_file():
        losses = json.loads(run_json.read_text(encoding="utf-8"))["loss"]["per_step"]
        curves["lora"] = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    summary = {}
    for name, rows in curves.items():
        if rows:
            summary[name] = {"steps": rows[-1]["step"], "seconds": rows[-1].get("elapsed_s"),
                             "s_per_step": round(rows[-1]["elapsed_s"] / rows[-1]["step"], 3)
                             if rows[-1].get("elapsed_s") else None,
                             "curve": [(s, round(v, 4)) for s, v in smoothed(rows)], **plateau(rows)}
    if png is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib is not installed (pip install 'fvg[eval]'): no PNG")
        else:
            names = [n for n in summary]
            fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.2))
            for ax, name in zip(np.atleast_1d(axes), names):
                pts = smoothed(curves[name], 100)
                ax.plot([p[0] for p in pts], [p[1] for p in pts])
                ax.set_title(name)
                ax.set_xlabel("step")
                ax.set_ylabel("loss")
                ax.set_yscale("log")
                ax.grid(alpha=0.3, which="both")
            fig.tight_layout()
            fig.savefig(str(png), dpi=100)
            plt.close(fig)
    return summary


@torch.no_grad()
def vae_preview(out: str | Path, png: str | Path, clips: int = 4) -> dict:
    """Reconstruct the last `clips` training clips (full 17 frames) with the run's VAE (final, else the
    latest checkpoint): a PNG of frames 0, 4, 8, 12, 16 (original row over reconstruction) + metrics."""
    from PIL import Image

    out = Path(out)
    s = load_settings(out)
    final = out / "vae" / "final"
    if (final / "config.json").is_file():
        from diffusers import AutoencoderKLWan

        vae, step = AutoencoderKLWan.from_pretrained(str(final)), s.vae_steps
    else:
        ckpt = out / "vae" / "ckpt.pt"
        if not ckpt.is_file():
            raise FvgError(f"no VAE in {out / 'vae'} yet")
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        vae, step = models.build_vae(s.model.vae), state["step"]
        vae.load_state_dict(state["model"])
    vae.eval()
    rows = _rows(out)[-max(clips, 16):]
    frames = np.stack([render_clip(r) for r in rows])
    quality = vae_quality(vae, frames)
    recon = vae.decode(vae.encode(to_pixels(frames[:clips])).latent_dist.mode()).sample.clamp(-1, 1)
    recon = ((recon + 1) * 127.5).round().to(torch.uint8).movedim(1, -1).numpy()
    picks = [0, 4, 8, 12, 16]
    grid = np.concatenate([np.concatenate([np.concatenate(list(a[picks]), 1), np.concatenate(list(b[picks]), 1)], 0)
                           for a, b in zip(frames[:clips], recon)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(str(png))
    return {"step": step, **quality}
