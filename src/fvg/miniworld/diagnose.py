"""Measurements behind the `mini` recipe (docs/miniworld.md, "v2 diagnosis").

    fvg miniworld diagnose --what text,padding
    fvg miniworld diagnose --what noise --run runs/mini-v2

* `text`: does the frozen text encoder tell word order apart? Wan's cross-attention has no
  positions over text tokens: it sees the encoder's output as a set. So "A left of B" and "B left
  of A" (the same words) differ for the DiT only through the encoder's context. Measured as the
  distance between the two prompts' token sets (each token matched to its nearest counterpart,
  Hungarian matching, relative to the mean token norm), against prompts that differ in one word.
* `noise`: from how much noise does the anchor model restore a scene? Each prompt's true first
  frame is encoded, noised to sigma (SDEdit), denoised by the model on the rest of the sampler's
  schedule and scored on the frame-0 checks. sigma = 1 is sampling from pure noise (the ladder's
  anchor-stills rung), sigma = 0 the VAE alone: where the score falls says which noise levels, and
  so which decisions (layout and counts at high sigma, outlines at low sigma), the model gets wrong.
* `video-noise`: the same for the video stage. Each prompt's reference clip is encoded, latent frames
  1-4 noised to sigma while frame 0 stays the clean anchor, denoised by the anchored video model and
  scored on the whole video. sigma = 1 is the quality ladder's true-first-frame rung (without the MP4
  round trip); where the score falls says at which noise levels the video model loses the scene.
* `fit`: does the T2V base generalise, or has it learnt its training clips? Its flow-matching loss at
  fixed sigmas, with the same noise, on the first clips of its training set (rebuilt from the data seed
  and indices in the weights' manifest) against as many fresh clips of the same grammar (another data
  seed). A large gap would make more clips the lever; a small one says the model's capacity or the
  task is. Reports how many fresh captions are also training captions (the grammar repeats short ones).
* `lost`: why objects are missing from the last frame of a bench's videos. Per configuration and ladder
  rung of an `fvg bench mini` folder, each single object whose frame-16 presence check fails is put in
  one bin (`score.why_missing`): its colour gone (merged or faded), its colour there in another shape's
  outline (rounded corners read as a circle), or a shapeless blob; and where in the video objects go
  missing: the share of single objects that keep their colour found at frames 0, 4, 8, 12 and 16.
* `still-code`: does the VAE code an unchanging scene alike in latent frame 0 (frame 0 encoded alone) and
  in the later latent frames (4-frame chunks)? Still clips are encoded; each later latent frame is compared
  with latent frame 0 (mean squared difference, and the share a per-pixel affine map explains). Where they
  differ, an anchored video model must translate the anchor's code before it can carry an object forward.
* `vae-rung`: the quality ladder's VAE rung for any VAE (`--vae DIR`, e.g. a run's vae/still/final), without
  a bench: MiniCompBench's reference clips, seeds 0, 1 and 2, encoded (posterior mode), decoded, written as
  MP4 and scored from the files, as `fvg bench mini` scores that rung. The screen for a VAE recipe: a VAE
  that loses here caps every rung below it.
* `padding`: the share of a denoising step spent on WanPipeline's 512-token zero padding (one CFG
  step, batch 2, of each shipped transformer, 512 against 32 text tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import models

COLORS = ("red", "green", "blue", "orange", "purple", "cyan")
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")
DIRECTIONS = ("left", "right", "up", "down")


@dataclass
class OrderDistance:
    encoder: str
    swapped: float  # roles swapped (same words, opposite scene)
    one_word: float  # one colour or direction word changed

    @property
    def ratio(self) -> float:
        return self.swapped / self.one_word


def set_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance between two equally long token sets under the best one-to-one matching,
    relative to the mean token norm of `a`."""
    from scipy.optimize import linear_sum_assignment

    cost = np.linalg.norm(a[:, None] - b[None], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean() / np.linalg.norm(a, axis=-1).mean())


def prompt_triples(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, roles swapped, one word changed): half spatial relations, half motion bindings."""
    rng = np.random.default_rng(seed)
    triples = []
    for k in range(n):
        c1, c2, c3 = rng.choice(COLORS, 3, replace=False)
        s1, s2 = rng.choice(SHAPES, 2)
        if k % 2 == 0:
            rel = RELATIONS[rng.integers(len(RELATIONS))]
            triples.append((f"a {c1} {s1} is {rel} a {c2} {s2}", f"a {c2} {s2} is {rel} a {c1} {s1}",
                            f"a {c3} {s1} is {rel} a {c2} {s2}"))
        else:
            d1, d2, d3 = rng.choice(DIRECTIONS, 3, replace=False)
            triples.append((f"a {c1} {s1} moves {d1} while a {c2} {s2} moves {d2}",
                            f"a {c1} {s1} moves {d2} while a {c2} {s2} moves {d1}",
                            f"a {c1} {s1} moves {d3} while a {c2} {s2} moves {d2}"))
    return triples


def text_order(encoders: dict[str, object], tokenizer, n: int = 40) -> list[OrderDistance]:
    def embed(encoder, text: str) -> np.ndarray:
        with torch.no_grad():
            return encoder(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].numpy()

    results = []
    for name, encoder in encoders.items():
        swapped, one_word = [], []
        for a, b, c in prompt_triples(n):
            ea = embed(encoder, a)
            swapped.append(set_distance(ea, embed(encoder, b)))
            one_word.append(set_distance(ea, embed(encoder, c)))
        results.append(OrderDistance(name, float(np.mean(swapped)), float(np.mean(one_word))))
    return results


def default_encoders(weights: Path | None = None) -> dict[str, object]:
    """v1's encoder (rebuilt from its recipe: UMT5's own bias scale) and the shipped one (v3's recipe, the
    same seed with the relative biases scaled by 10)."""
    from transformers import UMT5EncoderModel

    tokenizer = models.build_tokenizer()
    return {"v1 recipe": models.build_text_encoder(models.v1_config().text, len(tokenizer)),
            "shipped (bias x10)": UMT5EncoderModel.from_pretrained(str(models.video_dir(weights) / "text_encoder")).eval()}


def padding_cost(weights: Path | None = None, reps: int = 9) -> dict[str, dict[int, float]]:
    """Median seconds of one CFG step (batch 2) per shipped transformer, with 512 and 32 text tokens
    (interleaved, so load from other processes hits both alike)."""
    from diffusers import WanTransformer3DModel

    out = {}
    for name, frames in (("video", 5), ("anchor", 1)):
        root = models.video_dir(weights) if name == "video" else models.anchor_dir(weights)
        model = WanTransformer3DModel.from_pretrained(str(root / "transformer")).eval()
        x, t = torch.randn(2, model.config.in_channels, frames, 16, 16), torch.tensor([500.0, 500.0])
        times: dict[int, list[float]] = {512: [], 32: []}
        with torch.no_grad():
            for _ in range(reps):
                for tokens in times:
                    text = torch.zeros(2, tokens, model.config.text_dim)
                    text[:, :12] = torch.randn(12, model.config.text_dim)
                    tick = time.perf_counter()
                    model(hidden_states=x, timestep=t, encoder_hidden_states=text)
                    times[tokens].append(time.perf_counter() - tick)
        out[name] = {k: float(np.median(v)) for k, v in times.items()}
    return out


def patch_cost(reps: int = 7) -> dict[str, float]:
    """Median seconds of one CFG step (batch 2) of the transformers' architecture (random weights) on
    the video (5 latent frames of 16x16) and on the anchor (1 frame), at patch 2 and at patch 1, with
    512 and with 32 text tokens (interleaved): what patch 1 costs at sampling time."""
    import dataclasses

    cfg = models.MiniConfig()
    built = {p: models.build_transformer(dataclasses.replace(cfg.t2v, patch_size=[1, p, p]), cfg.vae.z_dim,
                                         cfg.text.d_model).eval() for p in (2, 1)}
    t = torch.tensor([500.0, 500.0])
    times: dict[str, list[float]] = {}
    with torch.no_grad():
        for _ in range(reps):
            for name, frames in (("video", 5), ("anchor", 1)):
                x = torch.randn(2, cfg.vae.z_dim, frames, 16, 16)
                for p, model in built.items():
                    for tokens in (512, 32):
                        text = torch.zeros(2, tokens, cfg.text.d_model)
                        text[:, :12] = torch.randn(12, cfg.text.d_model)
                        tick = time.perf_counter()
                        model(hidden_states=x, timestep=t, encoder_hidden_states=text)
                        times.setdefault(f"{name}, patch {p}, {tokens} text tokens", []).append(
                            time.perf_counter() - tick)
    return {k: float(np.median(v)) for k, v in times.items()}


@dataclass
class NoiseRestoration:
    sigma: float  # the noise level the true first frame was pushed to (0: the VAE alone)
    mean: float  # frame-0 score, mean over categories
    per_category: dict[str, float]
    kinds: dict[str, float]  # pass rate per kind of check


def _schedule_from(pipe, steps: int, sigma: float):
    """(a copy of the pipeline's scheduler set to `steps`, the index of its first step at or below `sigma`,
    that step's sigma); the index is `steps` when no step starts that low (no step runs)."""
    import copy

    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    below = (scheduler.sigmas[:-1] <= sigma + 1e-6).nonzero()
    start = int(below[0]) if len(below) else steps
    return scheduler, start, float(scheduler.sigmas[start])


def _guided_steps(pipe, scheduler, start: int, x: torch.Tensor, prompt: str, negative: str, guidance: float,
                  timestep, pin=lambda x: x) -> torch.Tensor:
    """The scheduler's steps from `start` on, with classifier-free guidance (prompt and negative batched);
    `timestep(t, x)` is the model's timestep for that batch of 2, `pin(x)` restores what stays clean."""
    scheduler.set_begin_index(start)
    cond, uncond = pipe.encode_prompt(prompt, negative_prompt=negative, do_classifier_free_guidance=True,
                                      max_sequence_length=models.MAX_SEQUENCE_LENGTH, device="cpu")
    text = torch.cat([cond, uncond])
    for t in scheduler.timesteps[start:]:
        v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=timestep(t, x), encoder_hidden_states=text,
                             return_dict=False)[0]
        v = v[1:] + guidance * (v[:1] - v[1:])
        x = pin(scheduler.step(v, t, x, return_dict=False)[0])
    return x


def _by_sigma(sigmas, scores_at) -> list[NoiseRestoration]:
    """One summarised row per noise level; `scores_at(sigma)` scores every case restored from it."""
    from .score import summarize

    rows = []
    for sigma in sigmas:
        summary = summarize(scores_at(sigma))
        rows.append(NoiseRestoration(sigma, summary.mean, summary.per_category, summary.kinds))
    return rows


@torch.no_grad()
def restore_from_noise(pipe, frame: np.ndarray, caption: str, sigma: float, seed: int, steps: int = 15,
                       guidance: float = 4.0) -> np.ndarray:
    """`frame` [64, 64, 3] uint8 encoded by the pipeline's VAE, noised to `sigma`, denoised with
    classifier-free guidance (negative prompt " ", as the anchor source samples) from the first step of
    the pipeline's own `steps`-step schedule at or below `sigma`, decoded: [64, 64, 3] uint8.

    A sigma below the schedule's last step runs no step. sigma = 1 is the pipeline's own sampling (from pure noise; the same noise gives the same image as
    `pipe(..., latents=noise)`); sigma = 0 runs no step (the VAE's round trip)."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    pixels = torch.from_numpy(frame).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None]
    x0 = (vae.encode(pixels).latent_dist.mode() - mean) / std
    scheduler, start, s0 = _schedule_from(pipe, steps, sigma)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x = (1 - s0) * x0 + s0 * noise
    if start < steps:
        x = _guided_steps(pipe, scheduler, start, x, caption, " ", guidance, lambda t, x: t.expand(2))
    image = vae.decode(x * std + mean).sample[0, :, 0].clamp(-1, 1)
    return ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def noise_restoration(pipe, sigmas=(0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0), limit: int = 3,
                      seeds: tuple[int, ...] = (0,), steps: int = 15, guidance: float = 4.0) -> list[NoiseRestoration]:
    """The frame-0 score of restoring MiniCompBench's reference first frames (`reference_clip`, the
    ladder's rendered rung) from each noise level; the first `limit` prompts per category."""
    from .grammar import first_frame_caption
    from .render import reference_clip
    from .score import score_first_frame
    from .suite import load_suite

    # (prompt, caption, true first frame, seed), rendered once for every sigma
    cases = [(item.prompt, first_frame_caption(item.prompt), reference_clip(item.prompt, seed)[0], seed)
             for item in load_suite() if item.index <= limit for seed in seeds]
    return _by_sigma(sigmas, lambda sigma: [
        score_first_frame(prompt, restore_from_noise(pipe, frame, caption, sigma, seed, steps, guidance))
        for prompt, caption, frame, seed in cases])


@torch.no_grad()
def animate_from_noise(pipe, clip: np.ndarray, prompt: str, sigma: float, seed: int, steps: int = 15,
                       guidance: float = 4.0) -> np.ndarray:
    """`clip` [17, 64, 64, 3] uint8 encoded by the anchored video pipeline's VAE; latent frames 1-4 noised to
    `sigma` while frame 0 stays the clean anchor (timestep 0), denoised with classifier-free guidance (negative
    prompt "", as `mini` samples) from the first step of the `steps`-step schedule at or below `sigma`,
    decoded: [17, 64, 64, 3] float in [0, 1]. sigma = 1 animates the true first frame from pure noise."""
    pixels = torch.from_numpy(clip).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    x0 = pipe.encode_video(pixels)
    scheduler, start, s0 = _schedule_from(pipe, steps, sigma)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x = torch.cat([x0[:, :, :1], (1 - s0) * x0[:, :, 1:] + s0 * noise[:, :, 1:]], dim=2)
    if start < steps:
        x = _guided_steps(pipe, scheduler, start, x, prompt, "", guidance,
                          lambda t, x: pipe.token_timesteps(t, x, anchored=True).expand(2, -1),
                          pin=lambda x: torch.cat([x0[:, :, :1], x[:, :, 1:]], dim=2))  # as AnchoredWanPipeline
    return pipe.decode_latents(x, "np")[0]


def video_noise_restoration(pipe, sigmas=(0.0, 0.4, 0.6, 0.8, 0.9, 1.0), limit: int = 2,
                            seeds: tuple[int, ...] = (0, 1), steps: int = 15,
                            guidance: float = 4.0) -> list[NoiseRestoration]:
    """The whole-video score of animating MiniCompBench's reference clips from each noise level (frame 0 the
    clean anchor throughout); the first `limit` prompts per category."""
    from .render import reference_clip
    from .score import score_video
    from .suite import load_suite

    cases = [(item.prompt, reference_clip(item.prompt, seed), seed)
             for item in load_suite() if item.index <= limit for seed in seeds]
    return _by_sigma(sigmas, lambda sigma: [
        score_video(prompt, animate_from_noise(pipe, clip, prompt, sigma, seed, steps, guidance))
        for prompt, clip, seed in cases])


@dataclass
class FitGap:
    sigma: float
    train: float  # mean flow-matching loss on training clips
    fresh: float  # on clips drawn from another data seed

    @property
    def ratio(self) -> float:
        return self.fresh / self.train


def _normalised_latents(vae, clips: np.ndarray) -> torch.Tensor:
    """Clips [N, 17, 64, 64, 3] uint8 -> latents as the transformers see them (posterior mode, normalised)."""
    from .stages import to_pixels

    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = torch.cat([vae.encode(to_pixels(clips[b:b + 16])).latent_dist.mode() for b in range(0, len(clips), 16)])
    return (z - mean) / std


def _clip_batch(pipe, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised latents and text embeddings (padded to 512, as sampling pads them) of dataset rows."""
    from .stages import render_clip

    with torch.no_grad():
        text, _ = pipe.encode_prompt([r["caption"] for r in rows], do_classifier_free_guidance=False,
                                     max_sequence_length=models.MAX_SEQUENCE_LENGTH)
    return _normalised_latents(pipe.vae, np.stack([render_clip(r) for r in rows])), text


def _flow_loss(transformer, z: torch.Tensor, text: torch.Tensor, sigma: float, seed: int) -> float:
    from fvg.families.flow_matching import noise_batch

    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    losses = []
    for b in range(0, len(z), 16):
        n = len(z[b:b + 16])
        nb = noise_batch(z[b:b + 16], torch.full((n,), sigma), noise[b:b + 16], torch.zeros(n, dtype=torch.bool))
        with torch.no_grad():
            pred = transformer(hidden_states=nb.model_input, timestep=nb.timestep,
                               encoder_hidden_states=text[b:b + 16], return_dict=False)[0]
        losses.append((pred - nb.target).pow(2).mean(dim=(1, 2, 3, 4)))
    return float(torch.cat(losses).mean())


def fit_gap(pipe, data_seed: int, num_clips: int, clips: int = 112, fresh_seed: int | None = None,
            sigmas=(0.3, 0.6, 0.8, 0.9, 1.0)) -> tuple[list[FitGap], int]:
    """The T2V base's loss on its first `clips` training clips against `clips` fresh ones (drawn from
    `fresh_seed`, by default data_seed + 777), per sigma, and how many fresh captions are training captions
    too. `pipe`: a Wan pipeline holding the base without LoRA."""
    from .dataset import clip_prompt, clip_row

    fresh_seed = data_seed + 777 if fresh_seed is None else fresh_seed
    if fresh_seed == data_seed:
        raise ValueError("the fresh clips need another data seed than the training set's")
    train = [clip_row(i, data_seed)[0] for i in range(min(clips, num_clips))]
    fresh = [clip_row(i, fresh_seed)[0] for i in range(len(train))]
    seen = {str(clip_prompt(i, data_seed)) for i in range(num_clips)}
    sets = {"train": _clip_batch(pipe, train), "fresh": _clip_batch(pipe, fresh)}
    gaps = []
    for i, sigma in enumerate(sigmas):
        loss = {name: _flow_loss(pipe.transformer, z, text, sigma, seed=i) for name, (z, text) in sets.items()}
        gaps.append(FitGap(sigma, loss["train"], loss["fresh"]))
    return gaps, sum(row["caption"] in seen for row in fresh)


SAMPLED_FRAMES = (0, 4, 8, 12, 16)  # frame 0, then the last frame of each latent frame's chunk


@dataclass
class LostObjects:
    label: str  # a configuration or ladder rung of the bench
    objects: int  # single objects checked in the last frame
    reasons: dict[str, int]  # `score.why_missing`'s reason -> objects, most frequent first
    found: dict[int, float]  # frame -> share of the single objects that keep their colour found there


def lost_objects(bench: Path) -> list[LostObjects]:
    """`why_missing` over every video of an `fvg bench mini` folder (its scores.jsonl), per label, and where
    in the video objects go missing: the share of single objects whose colour never changes (no "turns")
    found, as a region of their colour and shape, at frames 0, 4, 8, 12 and 16."""
    from collections import Counter

    from fvg.eval.bench_compare import bench_rows
    from fvg.io import read_mp4

    from .grammar import parse_prompt
    from .score import find_regions, why_missing

    counts: dict[str, Counter] = {}
    objects: Counter = Counter()
    found: dict[str, list[np.ndarray]] = {}
    for row in bench_rows(bench):
        p = parse_prompt(row["prompt"])
        frames = read_mp4(Path(bench) / row["video"])
        objects[row["mode"]] += sum(o.count == 1 for o in p.objects)
        counts.setdefault(row["mode"], Counter()).update(why_missing(p, frames))
        regions = [{(r.color, r.shape) for r in find_regions(frames[t])} for t in SAMPLED_FRAMES]
        found.setdefault(row["mode"], []).extend(
            np.array([(o.color, o.shape) in at for at in regions], float) for o, e in zip(p.objects, p.events)
            if o.count == 1 and (e is None or e.kind != "turns"))
    return [LostObjects(label, objects[label], dict(c.most_common()),
                        dict(zip(SAMPLED_FRAMES, np.mean(found[label], axis=0).round(4).tolist()))
                        if found[label] else {})  # every single object turns colour, or none is single
            for label, c in counts.items()]


@dataclass
class StillCode:
    frame: int  # a latent frame after the first
    mse: float  # its mean squared difference from latent frame 0 (normalised latents)
    linear_r2: float  # the share of its variance that a per-pixel affine map of latent frame 0 explains


def still_code(vae, clips: int = 64, seed: int = 777) -> list[StillCode]:
    """How differently the VAE codes one unchanging scene in latent frame 0 (frame 0 encoded alone) and in
    the later latent frames (4-frame chunks through the causal cache). Still clips (each a dataset clip's
    frame 0 repeated) are encoded and normalised as the transformers see them. A video model anchored on
    latent frame 0 has to translate this code into the other before it can carry an object forward: where
    the two agree, carrying is a copy."""
    from .dataset import clip_row
    from .stages import render_clip

    frames = np.stack([render_clip(clip_row(i, seed)[0])[:1] for i in range(clips)])
    z = _normalised_latents(vae, np.repeat(frames, 17, axis=1))
    per_pixel = z.permute(0, 2, 3, 4, 1)  # [N, F, h, w, C]
    x = per_pixel[:, 0].reshape(-1, z.shape[1])
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    out = []
    for k in range(1, z.shape[2]):
        y = per_pixel[:, k].reshape(-1, z.shape[1])
        fit = x1 @ torch.linalg.lstsq(x1, y).solution
        r2 = 1 - float((fit - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        out.append(StillCode(k, float((z[:, :, k] - z[:, :, 0]).pow(2).mean()), r2))
    return out


@dataclass
class VaeRung:
    mean: float  # the MiniWorld score over every (prompt, seed)
    per_category: dict[str, float]
    videos: int


def vae_rung(vae, seeds: tuple[int, ...] = (0, 1, 2), limit: int | None = None) -> VaeRung:
    """The quality ladder's VAE rung (`fvg.eval.bench`'s `vae` videos) for `vae`: each MiniCompBench prompt's
    reference clip per seed (the first `limit` prompts per category; all: the bench's), round-tripped, written
    as an MP4 (its compression is part of what the bench scores) and scored from the file."""
    import tempfile

    from fvg.eval.bench import vae_round_trip
    from fvg.io import write_mp4

    from .render import reference_clip
    from .score import score_video
    from .spec import FPS
    from .suite import load_suite

    by_category: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for item in load_suite():
            for seed in seeds if limit is None or item.index <= limit else ():
                path = Path(tmp) / f"{item.category}-{item.index}-{seed}.mp4"
                write_mp4(path, vae_round_trip(vae, reference_clip(item.prompt, seed)), fps=FPS)
                by_category.setdefault(item.category, []).append(score_video(item.prompt, path).score)
    scores = [s for v in by_category.values() for s in v]
    return VaeRung(float(np.mean(scores)), {c: float(np.mean(v)) for c, v in by_category.items()}, len(scores))
