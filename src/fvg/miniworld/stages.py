"""The stages of `fvg miniworld train`: data, vae, latents, anchor, t2v, lora, export (see train.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from fvg.io import FvgError, atomic_path, write_json

from . import models
from .loop import device_label, done, done_info, fit, generator, logged_devices, mark_done, read_log, skip_if_done
from .settings import RunSettings, load_settings, lora_warmup_steps
from .sink import PaddingSink

log = logging.getLogger("fvg.miniworld")

NUM_FRAMES, SIZE, FPS = 17, 64, 8
SHARD = 1000  # clips per latent shard
TRAINED = ("vae", "latents", "anchor", "t2v", "lora")  # the stages whose summaries the export records


def dataset_rows(out: Path) -> list[dict]:
    meta = out / "data" / "metadata.jsonl"
    return [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]


def render_clip(row: dict) -> np.ndarray:
    """The exact frames [17, 64, 64, 3] uint8 of a dataset row, re-rendered from its seed."""
    from .dataset import sample_clip
    from .render import render_video

    _, scene = sample_clip(row["category"], int(row["seed"]))
    return render_video(scene)


@contextlib.contextmanager
def clip_renderer(workers: int = 1) -> Iterator[Callable[[list[dict]], np.ndarray]]:
    """A function rows -> `render_clip` of each, stacked [N, 17, 64, 64, 3]; with `workers` > 1 it
    renders in that many processes, started once for every call inside the block (rendering is
    single-threaded numpy: a GPU run would otherwise wait on it). The same frames either way."""
    if workers <= 1:
        yield lambda rows: np.stack([render_clip(r) for r in rows])
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold CUDA or OpenMP state a forked child must not inherit
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda rows: np.stack(list(pool.map(render_clip, rows, chunksize=max(1, len(rows) // (4 * workers)))))


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., T, H, W, 3] -> float [..., 3, T, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0)
    return x.movedim(-1, -4)



def stage_data(out: Path, s: RunSettings, **_) -> None:
    from .dataset import write_dataset

    data = out / "data"
    if skip_if_done(out, "data"):
        return
    tick = time.perf_counter()
    write_dataset(data, s.num_clips, s.seed)
    rows = dataset_rows(out)
    (data / "lora_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:s.lora_clips]),
                                              encoding="utf-8")
    mark_done(data, {"clips": len(rows), "seconds": round(time.perf_counter() - tick, 1)})


def _vae_material(out: Path, s: RunSettings, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Clips [N, 17, 64, 64, 3] uint8 and each clip's background colour [N, 3] (frame 0's median)."""
    with clip_renderer(workers) as render:
        clips = render(dataset_rows(out)[: s.vae_clips])
    return clips, np.median(clips[:, 0].reshape(len(clips), -1, 3), axis=1)


def stage_vae(out: Path, s: RunSettings, resume: bool = False, time_limit: float | None = None,
              device: str = "cpu", workers: int = 1, **_) -> None:
    """Two phases: the VAE (trained for `vae_steps` from random weights, or copied from `vae_source`) in
    vae/final, then, with `vae_still_steps`, its still-scene fine-tune in vae/still/final (`trained_vae_dir`)."""
    stage = out / "vae"
    if skip_if_done(out, "vae"):
        return
    tick = time.perf_counter()
    plain = stage / "final"
    info = {"source": s.vae_source} if s.vae_source else {"steps": s.vae_steps}  # a source as given: it ships
    vae, clips, backgrounds = None, None, None
    if s.vae_source and not (plain / "config.json").is_file():
        vae = load_trained_vae(s.vae_source, s, "vae_source")
        vae.save_pretrained(str(plain))
    if not (plain / "config.json").is_file():
        clips, backgrounds = _vae_material(out, s, workers)
        torch.manual_seed(s.seed)
        vae = models.build_vae(s.model.vae)
        vae, finished = fit(stage, vae, vae_loss(vae, clips, backgrounds, s, still_weight=0.0, device=device),
                            s.vae_steps, s.vae_lr, s, resume, time_limit, ema=False, device=device)
        if not finished:
            return
        vae.save_pretrained(str(plain))
    if vae is None:  # the first phase finished in an earlier run
        vae = load_vae_dir(plain, "vae/final")
    if s.vae_still_steps:
        if clips is None:
            clips, backgrounds = _vae_material(out, s, workers)
        left = None if time_limit is None else max(0.0, time_limit - (time.perf_counter() - tick) / 60)
        vae, finished = fit(stage / "still", vae, vae_loss(vae, clips, backgrounds, s, s.vae_still_weight, device),
                            s.vae_still_steps, s.vae_still_lr, s, resume, left, ema=False, device=device)
        if not finished:
            return
        vae.save_pretrained(str(stage / "still" / "final"))
        info["still_steps"] = s.vae_still_steps
    if clips is None:  # copied and not fine-tuned: measured on the dataset's last clips
        clips = np.stack([render_clip(r) for r in dataset_rows(out)[-16:]])
    quality = vae_quality(vae, clips[-16:])
    logs = [read_log(p / "log.jsonl") for p in (stage, stage / "still")]
    mark_done(stage, {**info, **quality, "devices": logged_devices([r for rows in logs for r in rows])})
    log.info("vae: done, %s", quality)


def trained_vae_dir(out: Path, s: RunSettings) -> Path:
    """The vae stage's result: the still-scene fine-tune when the recipe has one."""
    return out / "vae" / ("still/final" if s.vae_still_steps else "final")


def vae_loss(vae: torch.nn.Module, clips: np.ndarray, backgrounds: np.ndarray, s: RunSettings, still_weight: float,
             device: str = "cpu") -> Callable[[int], torch.Tensor]:
    """The VAE's training loss at a step, drawn from (seed, step): reconstruction of `vae_batch` moving crops
    (all 17 frames: every cache state the VAE meets at inference), and with `still_weight` also of `vae_batch`
    still crops, plus their `still_consistency`. Both phases draw from the same stream (salt 0xAE); the still
    crops are drawn after the moving ones, so a zero weight keeps the first phase's draws."""
    n, frames, crop = len(clips), s.vae_frames, s.vae_crop

    def crops(g: torch.Generator, still: bool) -> tuple[np.ndarray, list[int]]:
        idx = torch.randint(0, n, (s.vae_batch,), generator=g).tolist()
        t0 = torch.randint(0, NUM_FRAMES - frames + 1, (s.vae_batch,), generator=g).tolist()
        ys = torch.randint(0, SIZE - crop + 1, (s.vae_batch,), generator=g).tolist()
        xs = torch.randint(0, SIZE - crop + 1, (s.vae_batch,), generator=g).tolist()
        if still:  # one frame of the clip held for the whole crop
            return np.stack([np.repeat(clips[i, t:t + 1, y:y + crop, x:x + crop], frames, axis=0)
                             for i, t, y, x in zip(idx, t0, ys, xs)]), idx
        return np.stack([clips[i, t:t + frames, y:y + crop, x:x + crop] for i, t, y, x in zip(idx, t0, ys, xs)]), idx

    def loss_fn(step: int) -> torch.Tensor:
        g = generator(s.seed, 0xAE, step)
        batch, idx = crops(g, still=False)
        if still_weight:
            still, still_idx = crops(g, still=True)
            batch, idx = np.concatenate([batch, still]), idx + still_idx
        x = to_pixels(batch).to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        recon = vae.decode(z).sample
        # Objects cover a few percent of the pixels: weight them up, or the flat background wins.
        bg = to_pixels(backgrounds[idx][:, None, None, None, :]).to(device)
        w = 1 + s.vae_object_weight * ((x - bg).abs().amax(dim=1, keepdim=True) > 0.05).float()
        w[:, :, 0] *= s.vae_first_frame_weight
        err = recon - x
        rec = ((err.pow(2) + err.abs()) * w).mean() / w.mean()
        loss = rec + s.vae_kl * posterior.kl().mean()
        if still_weight:
            loss = loss + still_weight * still_consistency(posterior.mean[s.vae_batch:])
        return loss

    return loss_fn


def still_consistency(mean: torch.Tensor) -> torch.Tensor:
    """For still crops' posterior means [B, C, F, h, w]: the squared distance of latent frames 1.. from latent
    frame 0 (detached: the anchor's code is the target, the chunks move to it), per channel in units of that
    channel's variance over the batch's frame 0 (latents are normalised per channel before the transformers
    see them; the VAE's statistics are not known while it trains)."""
    target = mean[:, :, :1].detach()
    scale = target.var(dim=(0, 2, 3, 4), keepdim=True).clamp_min(1e-6)
    return ((mean[:, :, 1:] - target).pow(2) / scale).mean()


def load_trained_vae(path: str, s: RunSettings, setting: str):
    """A trained AutoencoderKLWan directory named by `setting`, refused unless its architecture is `model.vae`'s."""
    source = Path(path)
    vae = load_vae_dir(source, setting)
    want = models.build_vae(s.model.vae).config
    differ = [k for k in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")
              if list(np.atleast_1d(vae.config[k])) != list(np.atleast_1d(want[k]))]
    if differ:
        raise FvgError(f"{setting} {source} differs from model.vae in {', '.join(differ)}")
    return vae


def load_vae_dir(path: str | Path, what: str):
    """An AutoencoderKLWan directory (`what` names where it came from), refused in one line when it is not one."""
    from diffusers import AutoencoderKLWan

    if not (Path(path) / "config.json").is_file():
        raise FvgError(f"{what} {path} is not a diffusers AutoencoderKLWan directory (no config.json)")
    return AutoencoderKLWan.from_pretrained(str(path)).eval()


@torch.no_grad()
def vae_quality(vae, clips: np.ndarray) -> dict:
    """PSNR of full 17-frame clips through encode (mode) + decode, the share of pixels whose nearest
    palette colour survives (what the MiniWorld evaluator reads), and `still_code`: `still_consistency`
    of the clips' frame 0 held still (0 when the chunks code a still scene as latent frame 0 does)."""
    from .score import quantize

    vae.eval()
    x = to_pixels(clips).to(vae.device)
    still = vae.encode(x[:, :, :1].expand_as(x).contiguous()).latent_dist.mode()
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = (recon - x).pow(2).mean().item()
    frames = ((recon + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).movedim(1, -1).cpu().numpy()
    got = np.stack([quantize(f) for clip in frames for f in clip])
    want = np.stack([quantize(f) for clip in clips for f in clip])
    objects = want >= 2  # labels 0 and 1 are the two backgrounds
    return {"psnr_db": round(10 * math.log10(4.0 / max(mse, 1e-12)), 2),
            "palette_agreement": round(float(np.mean(got == want)), 5),
            "object_pixel_agreement": round(float(np.mean(got[objects] == want[objects])), 5),
            "still_code": round(float(still_consistency(still)), 5)}


def text_parts(out: Path, s: RunSettings):
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


def stage_latents(out: Path, s: RunSettings, device: str = "cpu", workers: int = 1, **_) -> None:
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file, save_file

    from fvg.train.data import encode_captions

    lat = out / "latents"
    if skip_if_done(out, "latents", needs=("vae",)):
        return
    lat.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKLWan.from_pretrained(str(trained_vae_dir(out, s))).eval().to(device)
    rows = dataset_rows(out)
    tick = time.perf_counter()
    # The latents are the training data: full fp32 convolutions on a GPU too (cuDNN's default TF32
    # moved them up to 4e-3 from the CPU's, measured on an H100; without it they agree to rounding).
    with clip_renderer(workers) as render, torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for shard_no, start in enumerate(range(0, len(rows), SHARD)):
            path = lat / f"shard-{shard_no:04d}.safetensors"
            if path.is_file():
                continue  # shards are written atomically: an existing one is complete
            clips, parts = render(rows[start:start + SHARD]), []
            with torch.no_grad():
                for b in range(0, len(clips), s.encode_batch):
                    x = to_pixels(clips[b:b + s.encode_batch]).to(device)
                    parts.append(vae.encode(x).latent_dist.mode().cpu())
            with atomic_path(path) as tmp:
                save_file({"latents": torch.cat(parts).contiguous()}, str(tmp))
            log.info("latents: %d/%d clips (%.0f s)", min(start + SHARD, len(rows)), len(rows),
                     time.perf_counter() - tick)
    raw = torch.cat([load_file(str(p))["latents"] for p in sorted(lat.glob("shard-*.safetensors"))])
    mean = raw.mean(dim=(0, 2, 3, 4))
    std = raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=[round(float(v), 6) for v in mean],
                           latents_std=[round(float(v), 6) for v in std])
    vae.to("cpu").save_pretrained(str(lat / "vae"))
    write_json(lat / "stats.json", {"latents_mean": vae.config.latents_mean, "latents_std": vae.config.latents_std,
                                    "shape": list(raw.shape)})

    # Text: the pipeline's own encode_prompt embeddings (trimmed; padded to 512 with zeros on use).
    tokenizer, encoder = text_parts(out, s)
    pipe = models.assemble_pipeline(tokenizer, encoder.to(device), vae, None, s.model.flow_shift)
    texts = [""] + sorted({r["caption"] for r in rows} | {r["first_frame_caption"] for r in rows})
    index = {t: i for i, t in enumerate(texts)}
    embeds = []
    for b in range(0, len(texts), 64):
        embeds += [e.cpu() for e in encode_captions(pipe, texts[b:b + 64], models.MAX_SEQUENCE_LENGTH, device)]
    lengths = torch.tensor([e.shape[0] for e in embeds])
    save_file({"embeds": torch.cat(embeds).contiguous(), "lengths": lengths,
               "prompt": torch.tensor([index[r["caption"]] for r in rows]),
               "caption": torch.tensor([index[r["first_frame_caption"]] for r in rows])}, str(lat / "text.safetensors"))
    mark_done(lat, {"clips": len(rows), "texts": len(texts), "max_tokens": int(lengths.max()),
                     "seconds": round(time.perf_counter() - tick, 1), "device": device_label(torch.device(device))})


class LatentSet:
    """Normalised latents [N, C, F, h, w] and text embeddings, held in memory for the transformer stages."""

    def __init__(self, out: Path):
        from safetensors.torch import load_file

        lat = out / "latents"
        if not done(lat):
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


def _train_transformer(out: Path, s: RunSettings, name: str, resume: bool, time_limit: float | None,
                       device: str = "cpu") -> None:
    from fvg.families.flow_matching import SigmaSampler, draw_batch, masked_flow_loss

    stage = out / name
    if skip_if_done(out, name):
        restore_pipeline(out, name)
        return
    data = LatentSet(out)
    latents = data.latents.to(device)  # indexed on the device: one host-to-device copy per run, not per step
    arch = s.model.anchor if name == "anchor" else s.model.t2v
    steps, batch, lr = (s.anchor_steps, s.anchor_batch, s.anchor_lr) if name == "anchor" else (
        s.t2v_steps, s.t2v_batch, s.t2v_lr)
    torch.manual_seed(s.seed + (1 if name == "anchor" else 2))
    model = models.build_transformer(arch, data.latents.shape[1], data.text_dim)
    sink = PaddingSink(model, s.text_tokens, device)
    sampler = SigmaSampler(shift=s.model.flow_shift, sampling=s.sigma_sampling, logit_mean=s.sigma_logit_mean,
                           logit_std=s.sigma_logit_std)
    text_ids = data.caption if name == "anchor" else data.prompt
    patch = tuple(arch.patch_size)
    salt = 0xA1 if name == "anchor" else 0x72

    def loss_fn(step: int) -> torch.Tensor:
        g = generator(s.seed, salt, step)
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x0 = latents[idx.to(latents.device)]
        if name == "anchor":
            x0 = x0[:, :, :1]  # latent frame 0 is the first frame encoded alone (causal VAE)
        drop = torch.rand(batch, generator=g) < s.caption_dropout
        text = sink.pack([data.embeds[0 if d else i] for i, d in zip(text_ids[idx].tolist(), drop.tolist())],
                         data.text_dim)
        nb = draw_batch(x0, sampler, s.t2v_p_anchor if name == "t2v" else 0.0, g, patch)
        pred = model(hidden_states=nb.model_input, timestep=nb.timestep, encoder_hidden_states=text,
                     return_dict=False)[0]
        return masked_flow_loss(pred, nb.target, nb.frame_weight)

    extended_from = s.anchor_extended_from if name == "anchor" else s.t2v_extended_from
    final, finished = fit(stage, model, loss_fn, steps, lr, s, resume, time_limit, ema=True, weight_decay=0.01,
                          extended_from=extended_from, device=device)
    if not finished:
        return
    final.to("cpu").save_pretrained(str(stage / "final"))
    rows = read_log(stage / "log.jsonl")
    mark_done(stage, {"steps": steps, "batch": batch, "params": sum(p.numel() for p in final.parameters()),
                       "tokens_per_sample": int(np.prod(x0_shape(data, name)[1:])) // math.prod(patch),
                       "final_loss": _tail_mean(rows), "train_seconds": rows[-1]["elapsed_s"] if rows else None,
                       "devices": logged_devices(rows)})
    assemble(out, name)


def x0_shape(data: LatentSet, name: str) -> tuple:
    shape = tuple(data.latents.shape[1:])
    return (shape[0], 1, *shape[2:]) if name == "anchor" else shape


def _tail_mean(rows: list[dict], frac: float = 0.05) -> float | None:
    if not rows:
        return None
    k = max(1, int(len(rows) * frac))
    return round(sum(r["loss"] for r in rows[-k:]) / k, 5)


def restore_pipeline(out: Path, name: str) -> None:
    """A finished stage whose pipeline folder is gone gets it back from `NAME/final`.

    Why: a finished transformer travels between machines as its `final/` weights, DONE.json and log
    (runs-carry/), a quarter of the resumable checkpoint's size; the pipeline is the same frozen parts around it.
    A reused stage is not rebuilt here: its pipeline may hold a VAE of its own (reuse.py), so `fvg miniworld
    reuse` writes it again."""
    if models.is_pipeline_dir(out / "pipelines" / models.PIPELINE_SUBDIRS[name]):
        return
    if "reused_from" in (done_info(out / name) or {}):
        raise FvgError(f"{out}: the reused {name} stage's pipeline is missing: run `fvg miniworld reuse --out {out} "
                       f"--stages {name}` again")
    if not (out / name / "final" / "config.json").is_file():
        raise FvgError(f"{out}: the {name} stage is marked done but {out / name / 'final'} is missing")
    log.info("%s: complete; its pipeline is missing, assembled again from %s", name, out / name / "final")
    assemble(out, name)


def assemble(out: Path, name: str) -> Path:
    """RUN/pipelines/{video,anchor}: a WanPipeline from the tokenizer, frozen encoder, VAE (with its
    latent statistics) and the stage's final transformer."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    s = load_settings(out)
    tokenizer, encoder = text_parts(out, s)
    vae = AutoencoderKLWan.from_pretrained(str(out / "latents" / "vae"))
    transformer = WanTransformer3DModel.from_pretrained(str(out / name / "final"))
    pipe = models.assemble_pipeline(tokenizer, encoder, vae, transformer, s.model.flow_shift)
    target = out / "pipelines" / models.PIPELINE_SUBDIRS[name]
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(str(target))
    return target


def stage_anchor(out: Path, s: RunSettings, resume: bool = False, time_limit: float | None = None,
                 device: str = "cpu", **_) -> None:
    _train_transformer(out, s, "anchor", resume, time_limit, device)


def stage_t2v(out: Path, s: RunSettings, resume: bool = False, time_limit: float | None = None,
              device: str = "cpu", **_) -> None:
    _train_transformer(out, s, "t2v", resume, time_limit, device)


def lora_config(out: Path, s: RunSettings, grown: bool = False):
    """fvg.train's settings for the lora stage; `grown`: for its second phase (`lora_grow_steps` at
    `lora_grow_rank`, from the first phase's LoRA, in lora/grown/; a constant rate and the next data order)."""
    from fvg.train.config import TrainConfig

    steps, rank = (s.lora_grow_steps, s.lora_grow_rank) if grown else (s.lora_steps, s.lora_rank)
    decay = 0 if grown else s.lora_decay_steps
    return TrainConfig(
        model=str((out / "pipelines" / "video").resolve()), data=str((out / "data" / "lora_metadata.jsonl").resolve()),
        output_dir=str(_phase_dir(out, grown)), cache_dir=str(out / "lora" / "cache"), height=SIZE, width=SIZE,
        num_frames=NUM_FRAMES, fps=FPS, max_sequence_length=s.text_tokens, num_workers=0,
        rank=rank, alpha=float(rank), init_lora=str(_phase_file(out, False)) if grown else "",
        p_anchor=s.p_anchor, flow_shift=s.model.flow_shift,
        caption_dropout=s.lora_caption_dropout, timestep_sampling=s.lora_sigma_sampling,
        logit_mean=s.lora_sigma_logit_mean,
        learning_rate=s.lora_lr, weight_decay=1e-4,
        lr_scheduler="warmup_stable_decay" if decay else "constant_with_warmup",
        lr_warmup_steps=lora_warmup_steps(steps), lr_decay_steps=decay, max_steps=steps,
        batch_size=s.lora_batch,
        mixed_precision="no", gradient_checkpointing=False, seed=s.seed + 1 if grown else s.seed,
        checkpoint_every=max(1, min(s.checkpoint_every, steps)), checkpoints_keep=2, validation_every=0,
        log_with="none",
    ).validate()


def _phase_dir(out: Path, grown: bool) -> Path:
    """fvg.train's output_dir for a phase of the lora stage."""
    return out / "lora" / "grown" if grown else out / "lora"


def _phase_file(out: Path, grown: bool) -> Path:
    """The LoRA a phase of the lora stage writes (its output_dir's lora/)."""
    return _phase_dir(out, grown) / "lora" / models.LORA_FILE


def lora_file(out: Path, s: RunSettings) -> Path:
    """The lora stage's result: the grown LoRA when the recipe grows one."""
    return _phase_file(out, bool(s.lora_grow_steps))


def _trained_steps(path: Path) -> int:
    from fvg.train.export import read_lora

    return int(read_lora(path)[2].get("steps", -1)) if path.is_file() else -1


def stage_lora(out: Path, s: RunSettings, resume: bool = False, **_) -> None:
    """The anchor LoRA by fvg.train (`lora_steps` at `lora_rank`), then, with `lora_grow_steps`, grown to
    `lora_grow_rank` and trained on. A first phase whose LoRA has its steps is not trained again."""
    from fvg.animate.wan import AnchoredWanPipeline
    from fvg.train.trainer import train as run_training

    stage = out / "lora"
    if skip_if_done(out, "lora", needs=("t2v",)):
        return
    info = {}
    for grown in (False, True) if s.lora_grow_steps else (False,):
        cfg = lora_config(out, s, grown)
        steps = cfg.max_steps
        if not grown and s.lora_grow_steps and _trained_steps(_phase_file(out, False)) == steps:
            log.info("lora: the first phase's %d steps are done", steps)
            info["first"] = {"steps": steps, "rank": cfg.rank, "trained_before": True}
            continue
        # the trainer takes a pipeline over (adapters, no text encoder): each phase loads its own
        pipe = AnchoredWanPipeline.from_pretrained(cfg.model, dtype=torch.float32)
        losses = run_training(cfg, resume="latest" if resume else None, pipe=pipe).losses
        info["grown" if grown else "first"] = {
            "steps": steps, "rank": cfg.rank,
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 5) if losses else None}
    last = info.get("grown", info.get("first", {}))
    mark_done(stage, {"steps": s.lora_steps + s.lora_grow_steps, "lora": str(lora_file(out, s)),
                      "final_loss": last.get("final_loss"), "phases": info})


def ship_lora(src: Path, dst: Path) -> None:
    """Copy the trained LoRA with its `base_model` provenance naming the shipped video model (the weights
    folder's `video/`) instead of the training run's absolute path on the machine that trained it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "base_model" in metadata:
        metadata["base_model"] = models.VIDEO_SUBDIR
    if "fvg" in metadata:
        metadata["fvg"] = json.dumps({**json.loads(metadata["fvg"]), "base_model": models.VIDEO_SUBDIR})
    save_file(tensors, str(dst), metadata=metadata)


def store_transformer(path: Path, dtype: torch.dtype) -> None:
    """Store the saved transformer at `path` in `dtype` (settings.t2v_ship_dtype), as diffusers casts it: the
    class's `_keep_in_fp32_modules` stay float32. Written beside it, then swapped in: the loaded model may still
    read the old file through its memory map."""
    from diffusers import WanTransformer3DModel

    cast = path.with_name(path.name + f".{str(dtype).removeprefix('torch.')}")
    WanTransformer3DModel.from_pretrained(str(path), dtype=dtype).save_pretrained(str(cast))
    shutil.rmtree(path)
    os.replace(cast, path)


def stage_export(out: Path, s: RunSettings, weights_dir: str | Path | None = None, **_) -> Path:
    """Copy the pipelines and the LoRA into `weights_dir` (default: the package's weights/mini)."""
    for name in ("anchor", "t2v", "lora"):
        if not done(out / name):
            raise FvgError(f"export: the {name} stage is not complete")
    target = Path(weights_dir or models.WEIGHTS_DIR)
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(out / "pipelines" / "video", staging / models.VIDEO_SUBDIR)
    shutil.copytree(out / "pipelines" / "anchor", staging / models.ANCHOR_SUBDIR)
    if s.t2v_ship_dtype != "float32":
        store_transformer(staging / models.VIDEO_SUBDIR / "transformer", getattr(torch, s.t2v_ship_dtype))
    ship_lora(lora_file(out, s), staging / models.LORA_FILE)
    stages = {n: done_info(out / n) for n in TRAINED}
    write_json(staging / "manifest.json", {"settings": s.to_dict(), "stages": stages,
                                           "bytes": models.shipped_size(staging)})
    size = models.shipped_size(staging)
    if size > models.MAX_SHIPPED_BYTES:
        raise FvgError(f"export: the weights take {size / 2**20:.1f} MB, more than the 40 MB allowed "
                       f"(left in {staging})")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    # Recorded in the run folder too, so `fvg miniworld status` says where a run's weights went (`--weights-dir`
    # may put them anywhere). Not a skip marker: `all` exports again each time, the copy is cheap.
    mark_done(out / "export", {"weights_dir": str(target), "bytes": size})
    log.info("export: %s (%.1f MB)", target, size / 2**20)
    return target
