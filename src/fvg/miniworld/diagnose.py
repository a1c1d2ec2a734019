"""Measurements behind the `mini` recipe (docs/miniworld.md, "v2 diagnosis").

    fvg miniworld diagnose --what text,padding

* `text`: does the frozen text encoder tell word order apart? Wan's cross-attention has no
  positions over text tokens: it sees the encoder's output as a set. So "A left of B" and "B left
  of A" (the same words) differ for the DiT only through the encoder's context. Measured as the
  distance between the two prompts' token sets (each token matched to its nearest counterpart,
  Hungarian matching, relative to the mean token norm), against prompts that differ in one word.
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
    """The shipped encoder, and v2's recipe (the same seed, relative biases scaled by 10)."""
    from transformers import UMT5EncoderModel

    tokenizer = models.build_tokenizer()
    return {"shipped (v1)": UMT5EncoderModel.from_pretrained(str(models.video_dir(weights) / "text_encoder")).eval(),
            "v2 recipe": models.build_text_encoder(models.TextConfig(), len(tokenizer))}


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
