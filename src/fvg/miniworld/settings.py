"""Every setting of a `mini` training run (RUN/settings.json): the `full` and `tiny` profiles, `--set`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fvg.io import FvgError, conform, write_json

from . import models
from .models import MiniConfig


T2V_SHIP_DTYPES = ("float32", "float16")


def lora_warmup_steps(steps: int) -> int:
    """The warmup of a LoRA training phase of `steps` steps (both lora-stage phases)."""
    return min(50, steps)


@dataclass
class RunSettings:
    """Every setting of a `mini` training run. `profile` picks the defaults; `--set` overrides."""

    profile: str = "full"
    seed: int = 0
    # data
    num_clips: int = 8000
    lora_clips: int = 4000  # v6 (v5: 1000): the LoRA stage's subset (fvg.train re-encodes these from the MP4s)
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
    # A trained AutoencoderKLWan directory to use instead of training one (its path is recorded in
    # vae/DONE.json), e.g. src/fvg/weights/mini/video/vae: a recipe change after the VAE need not
    # retrain it. Its architecture must be `model.vae`'s. Empty: train it.
    vae_source: str = ""
    # The still-scene fine-tune, a second phase of the vae stage (vae/still/, from the first phase's VAE). The VAE
    # codes frame 0 alone and later frames in 4-frame chunks, and learns two codes for one unchanging scene
    # (`diagnose --what still-code`: MSE 1.4-2.0 between them), so a video model anchored on latent frame 0 must
    # translate the anchor before it can carry it. Each step reconstructs `vae_batch` moving and `vae_batch`
    # still crops (one frame held) and pulls the still crops' later latent frames toward latent frame 0
    # (detached), with weight `vae_still_weight`. 0 steps: no second phase (the v1-v9 recipe). The v10 screen
    # (900 steps at 2e-4, docs/miniworld.md): weight 0.01 divides the still code by 7.6 at no VAE-rung cost
    # beyond the fine-tune's own (0.911 against 0.915 without the term); 0.1, the pilot's, costs 0.056 more.
    vae_still_steps: int = 0
    vae_still_lr: float = 2e-4
    vae_still_weight: float = 0.01
    # diffusion transformers (flow matching, fvg.families.flow_matching)
    # v8: the 8-layer anchor model's one cosine (v6-v7: 26000 on 4 layers, v4: 18000, v3: 12000, v1: 10000)
    anchor_steps: int = 20000
    anchor_batch: int = 32  # 32 first frames of 64 tokens (patch 2)
    # v3: 1e-3 (v1: 5e-4), with zero-initialised residual branches and logit-normal sigmas (the three
    # were measured together: docs/miniworld.md, "What moved the anchor model")
    anchor_lr: float = 1e-3
    # v3: 5000 x 16 clips x 320 tokens = 25.6M token-steps, at least the anchor model's 12000 x 32 x 64
    # = 24.6M (the baseline gets at least the anchor model's compute); v1: 6000 (at 5e-4).
    t2v_steps: int = 11000  # v5-v11 (v4: 8000, v3: 5000): 56.3M token-steps, the anchor model's 41.0M (v6: 53.2M)
    t2v_batch: int = 16
    t2v_lr: float = 1e-3
    # v4 continued v3's finished stages, v5 v4's T2V stage and v6 v4's anchor stage: each ran its warmup +
    # cosine to the first total listed here, then resumed with the cosine stretched to the next total (the LR
    # rises again at that step: a warm restart), the last time to `*_steps`. A fresh run follows the same
    # schedule (`fvg.miniworld.loop.lr_at`); empty: one cosine over the whole stage. To continue a finished
    # stage: append its `*_steps`, then raise them. v7's 8-layer T2V base and v8's 8-layer anchor model were
    # trained fresh: one cosine each (v6's 4-layer anchor model: [12000, 18000]).
    anchor_extended_from: list[int] = field(default_factory=list)
    t2v_extended_from: list[int] = field(default_factory=list)
    # The share of T2V-stage batches trained anchored (latent frame 0 clean, as the anchor LoRA trains). 0 keeps
    # the T2V base a plain text-to-video model, the fair baseline; a pilot that measures the video stage alone
    # without a LoRA stage (the first-frame rung with `--set lora=`) sets 1.
    t2v_p_anchor: float = 0.0
    warmup_steps: int = 200
    # How the transformer stages draw sigma before Wan's shift (fvg.families.flow_matching.SigmaSampler):
    # "logit_normal" (v3, SD3's choice) puts more of the training on mid noise, where the layout is
    # decided (docs/miniworld.md, the noise diagnosis); "uniform" (v1, v2) follows the sampler's grid.
    sigma_sampling: str = "logit_normal"
    sigma_logit_mean: float = 0.0
    sigma_logit_std: float = 1.0
    caption_dropout: float = 0.1  # empty prompt, so classifier-free guidance works
    # Text embeddings are zero-padded to this many tokens, as WanPipeline pads them at inference
    # (its max_sequence_length, 512 unless the caller passes another): the padded keys act as an
    # attention sink whose weight depends on their count, so training and sampling must agree.
    text_tokens: int = models.MAX_SEQUENCE_LENGTH
    ema_decay: float = 0.999
    # lora (fvg.train)
    lora_steps: int = 6000  # v12, the paper's count (v5-v11: 3000, v4: 1000); on 4000 clips since v6 (`lora_clips`)
    lora_batch: int = 8
    lora_rank: int = 16
    lora_lr: float = 5e-4
    # the last N steps anneal the rate to zero (fvg.train's warmup_stable_decay); 0: constant after the warmup
    lora_decay_steps: int = 0
    # then grow the LoRA to this rank (fvg.train's init_lora: the extra ranks start at zero, so it starts as the
    # trained LoRA) and train it `lora_grow_steps` more, at the same rate and data; 0, 0: no growth
    lora_grow_rank: int = 0
    lora_grow_steps: int = 0
    p_anchor: float = 1.0  # fvg.train's default: every sample anchored, as in the paper
    # fvg.train's caption_dropout: the share of samples trained on the empty caption, so that guidance's
    # unconditional branch (the empty negative prompt, anchor pinned) is something the LoRA learnt too
    lora_caption_dropout: float = 0.0
    lora_sigma_sampling: str = "uniform"  # fvg.train's timestep_sampling (uniform or logit_normal), then the shift
    lora_sigma_logit_mean: float = 0.0  # logit_normal's mean: above 0 trains more at high noise
    # export: the dtype the T2V base's transformer is stored in. "float16" halves its bytes (v15's dim-256 base is
    # 36.3 MB in float32, past the 40 MB all weights may take); diffusers loads it into float32 (its default dtype)
    # and it runs there, so only the stored values are rounded (10 mantissa bits); the modules the class keeps in
    # float32 (`_keep_in_fp32_modules`: norms, time embedding) stay float32. Measured on v12 (BENCHMARKS.md,
    # "Shipping the T2V base in float16"): factorized@15 +0.009, the true first frame +0.005; the anchor model,
    # rounded too, lost 0.008 as stills, so it and the VAEs, text encoder and LoRA stay float32 (they fit).
    t2v_ship_dtype: str = "float32"
    # bookkeeping
    checkpoint_every: int = 250
    log_every: int = 10
    encode_batch: int = 16
    model: MiniConfig = field(default_factory=MiniConfig)

    def __post_init__(self):
        for name in ("sigma_sampling", "lora_sigma_sampling"):
            if getattr(self, name) not in ("uniform", "logit_normal"):
                raise FvgError(f"unknown {name} '{getattr(self, name)}' (uniform or logit_normal)")
        if self.t2v_ship_dtype not in T2V_SHIP_DTYPES:
            raise FvgError(f"unknown t2v_ship_dtype '{self.t2v_ship_dtype}' ({' or '.join(T2V_SHIP_DTYPES)})")
        for name in ("anchor", "t2v"):
            totals, steps = getattr(self, f"{name}_extended_from"), getattr(self, f"{name}_steps")
            if not isinstance(totals, list) or any(not isinstance(t, int) for t in totals) or \
                    [*totals, steps] != sorted(set([*totals, steps])) or (totals and totals[0] <= 0):
                raise FvgError(f"{name}_extended_from must list earlier totals in increasing order, each positive "
                               f"and below {name}_steps ({steps}), got {totals}")
        after_warmup = self.lora_steps - lora_warmup_steps(self.lora_steps)
        if not 0 <= self.lora_decay_steps <= after_warmup:
            raise FvgError(f"lora_decay_steps must be in [0, {after_warmup}] "
                           f"(lora_steps after the warmup), got {self.lora_decay_steps}")
        if (self.lora_grow_rank, self.lora_grow_steps) != (0, 0) and not (self.lora_grow_rank > self.lora_rank and self.lora_grow_steps > 0):
            raise FvgError(f"lora_grow_rank and lora_grow_steps go together: a rank above lora_rank "
                           f"({self.lora_rank}) and a positive step count, or both 0; got {self.lora_grow_rank} and "
                           f"{self.lora_grow_steps}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        # runs made before v3 recorded no sigma sampling (they drew uniformly), before v4 no extension, before
        # v7 no LoRA caption dropout or LoRA sigma sampling (fvg.train's defaults then: none, uniform), before
        # v13 no LoRA decay (a constant rate), before v14 no LoRA growth, before v15 no ship dtype (float32)
        d = {"sigma_sampling": "uniform", "anchor_extended_from": [], "t2v_extended_from": [],
             "lora_caption_dropout": 0.0, "lora_sigma_sampling": "uniform", "lora_sigma_logit_mean": 0.0,
             "lora_decay_steps": 0, "lora_grow_rank": 0, "lora_grow_steps": 0, "t2v_ship_dtype": "float32", **d}
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
                       anchor_extended_from=[], t2v_extended_from=[],
                       lora_steps=2, lora_batch=2, lora_rank=4, checkpoint_every=2, log_every=1, encode_batch=4,
                       model=models.tiny_config())


def v1_settings() -> RunSettings:
    """The recipe of the shipped v1 weights (their manifest.json holds the same settings)."""
    return RunSettings(profile="v1", anchor_steps=10000, anchor_lr=5e-4, t2v_steps=6000, t2v_lr=5e-4,
                       anchor_extended_from=[], t2v_extended_from=[],
                       sigma_sampling="uniform", model=models.v1_config())


PROFILES: dict[str, Callable[[], RunSettings]] = {"full": RunSettings, "v1": v1_settings, "tiny": tiny_settings}

# The settings that only one trained stage reads (dotted keys; a key names its whole sub-table). A stage reused
# from an export (`fvg.miniworld.reuse`) lets a run differ from that export only in the settings of the stages
# it does not reuse; every other setting shapes the data, the latents or more than one model. The VAE's settings
# are not compared at all: its tensors are.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "vae": ("vae_clips", "vae_steps", "vae_batch", "vae_frames", "vae_crop", "vae_lr", "vae_kl",
            "vae_object_weight", "vae_first_frame_weight", "vae_source", "vae_still_steps", "vae_still_lr",
            "vae_still_weight", "model.vae"),
    "anchor": ("anchor_steps", "anchor_batch", "anchor_lr", "anchor_extended_from", "model.anchor"),
    "t2v": ("t2v_steps", "t2v_batch", "t2v_lr", "t2v_extended_from", "t2v_p_anchor", "model.t2v"),
    "lora": ("lora_clips", "lora_steps", "lora_batch", "lora_rank", "lora_lr", "lora_decay_steps", "lora_grow_rank",
             "lora_grow_steps", "p_anchor", "lora_caption_dropout", "lora_sigma_sampling", "lora_sigma_logit_mean"),
}
BOOKKEEPING_SETTINGS = ("profile", "checkpoint_every", "log_every", "encode_batch")  # no effect on any weight


def flat_settings(d: dict, prefix: str = "") -> dict:
    """A settings dict with nested tables flattened to dotted keys (`model.t2v.num_layers`)."""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
        if old is not None:
            try:
                value = conform(value, (type(old),))
            except ValueError:
                raise FvgError(f"mini training setting '{key}' expects {type(old).__name__}, got {value!r}") from None
        target[parts[-1]] = value
    return RunSettings.from_dict(d)


def require_run(out: Path, hint: str = "") -> None:
    """Refuse, in one line, a folder that is no mini training run (no settings.json): a mistyped --out would
    otherwise be created, or read as a run with nothing done."""
    if not (Path(out) / "settings.json").is_file():
        raise FvgError(f"{out} is not a mini training run (no settings.json){hint}")


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
