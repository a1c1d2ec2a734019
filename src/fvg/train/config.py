"""`TrainConfig`: every setting of an anchor-LoRA run, read from TOML with CLI overrides.

A TOML file may be flat (`rank = 256`) or grouped in tables for readability
(`[lora] rank = 256`): table names are only labels, the keys inside must be fields.
Unknown keys are an error rather than a silent no-op, since a typo like `learning_rte`
would otherwise train with the default. Relative paths are relative to the working
directory, like every other fvg path.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvg.families import check_video_shape, family_names
from fvg.io import FvgError, cache_dir, conform

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` package
    import tomli as tomllib

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
EXPERTS = ("transformer", "transformer_2", "both")
FAMILIES = ("auto", *family_names())
# diffusers' get_scheduler names, and transformers' warmup-stable-decay (the last `lr_decay_steps` steps anneal the
# rate to zero with a cosine; before them it is constant_with_warmup's, so a constant run continues into one)
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                "warmup_stable_decay")


def default_cache_dir() -> str:
    return str(cache_dir("train-latents", override_env="FVG_TRAIN_CACHE"))


@dataclass
class TrainConfig:
    # model and data
    model: str = "builtin:tiny-wan"  # diffusers Wan checkpoint (hub id in the HF cache, or a local dir)
    family: str = "auto"  # a `fvg.families` name, or "auto": from the model id / model_index.json (`family_of`)
    data: str = ""  # folder of clips + .txt captions, or a folder/file with metadata.csv / metadata.jsonl
    video_column: str = "video"
    caption_column: str = "caption"
    output_dir: str = "runs/anchor-lora"
    cache_dir: str = field(default_factory=default_cache_dir)
    height: int = 480
    width: int = 832
    num_frames: int = 81  # 4n+1
    fps: int = 16  # clips are resampled to this frame rate before taking num_frames frames
    max_sequence_length: int = 512  # text tokens, as WanPipeline pads them at inference
    num_workers: int = 2  # dataloader workers reading the latent cache
    # LoRA
    rank: int = 256  # the paper's rank
    alpha: float = 256.0  # scale = alpha / rank; the paper does not state alpha, alpha = rank keeps scale 1
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # a LoRA file written by fvg train (diffusers keys) to start from instead of PEFT's zero adapter; a file of
    # lower rank fills the first ranks and the others start at zero, so step 0 is the file's model ("growing" a LoRA)
    init_lora: str = ""
    # objective
    p_anchor: float = 1.0  # probability that a sample is anchored (the paper anchors every sample)
    # share of samples trained on the empty caption, so that classifier-free guidance's unconditional branch
    # (the empty negative prompt, with the anchor pinned) is something the LoRA learnt too (finetrainers'
    # caption_dropout_p); 0: every sample keeps its caption
    caption_dropout: float = 0.0
    flow_shift: float | None = None  # None: the checkpoint scheduler's flow_shift (Wan2.1: 3.0 at 480p)
    timestep_sampling: str = "uniform"  # "uniform" or "logit_normal", before the shift
    logit_mean: float = 0.0
    logit_std: float = 1.0
    expert: str = "transformer"  # Wan2.2-A14B: "transformer" (high noise), "transformer_2" (low noise), "both"
    boundary_ratio: float = 0.875  # A14B T2V expert switch, t >= boundary * 1000 -> high-noise expert
    # optimisation
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 100
    lr_decay_steps: int = 0  # warmup_stable_decay only: the annealed tail
    max_steps: int = 6000
    batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # "no" or "bf16"
    gradient_checkpointing: bool = True
    seed: int = 0
    # checkpoints, validation, logging
    checkpoint_every: int = 500
    checkpoints_keep: int = 3
    validation_every: int = 500  # 0 disables validation
    validation_prompts: list[str] = field(default_factory=list)
    validation_anchors: list[str] = field(default_factory=list)  # images, or videos (first frame), one per prompt
    validation_holdout: int = 2  # clips kept out of training to validate on when no prompts are given
    validation_steps: int = 15  # the paper's factorized sampling holds up at 15 steps
    validation_guidance: float = 5.0
    log_with: str = "tensorboard"  # or "none"

    def validate(self) -> "TrainConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise FvgError(msg)

        for name, value in dataclasses.asdict(self).items():  # inf/nan parse as floats from TOML, YAML, --set
            need(not isinstance(value, float) or math.isfinite(value),
                 f"training setting '{name}' must be a finite number, got {value}")
        need(bool(self.data), "no training data: set `data` in the config or pass --data")
        need(self.num_frames >= 5, f"num_frames must be 4n+1 with n >= 1 (e.g. 17, 49, 81), got {self.num_frames}")
        check_video_shape(self.height, self.width, self.num_frames)  # the family's own rule: at training start
        need(self.fps > 0, f"fps must be positive, got {self.fps}")
        need(self.family in FAMILIES, f"family must be one of {', '.join(FAMILIES)}, got '{self.family}'")
        need(self.rank > 0 and self.alpha > 0, "rank and alpha must be positive")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(bool(self.target_modules), "target_modules is empty")
        need(not self.init_lora or Path(self.init_lora).is_file(), f"init_lora: no such file: {self.init_lora}")
        need(not self.init_lora or self.expert != "both",
             "init_lora starts one expert: train expert 'transformer' or 'transformer_2', one run each")
        need(0.0 <= self.p_anchor <= 1.0, f"p_anchor must be in [0, 1], got {self.p_anchor}")
        need(0.0 <= self.caption_dropout < 1.0, f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        need(self.flow_shift is None or self.flow_shift > 0, "flow_shift must be positive")
        need(self.timestep_sampling in ("uniform", "logit_normal"),
             f"timestep_sampling must be 'uniform' or 'logit_normal', got '{self.timestep_sampling}'")
        need(self.logit_std > 0, "logit_std must be positive")
        need(self.expert in EXPERTS, f"expert must be one of {', '.join(EXPERTS)}, got '{self.expert}'")
        need(0.0 < self.boundary_ratio < 1.0, "boundary_ratio must be in (0, 1)")
        need(self.learning_rate > 0 and self.weight_decay >= 0, "learning_rate must be > 0, weight_decay >= 0")
        need(self.lr_scheduler in LR_SCHEDULES,
             f"lr_scheduler must be one of {', '.join(LR_SCHEDULES)}, got '{self.lr_scheduler}'")
        need(self.lr_warmup_steps >= 0, "lr_warmup_steps must be >= 0")
        if self.lr_scheduler == "warmup_stable_decay":
            need(0 < self.lr_decay_steps <= self.max_steps - self.lr_warmup_steps,
                 f"warmup_stable_decay needs 0 < lr_decay_steps <= max_steps - lr_warmup_steps "
                 f"({self.max_steps - self.lr_warmup_steps}), got {self.lr_decay_steps}")
        else:
            need(self.lr_decay_steps == 0, f"lr_decay_steps is read by warmup_stable_decay only, not "
                                           f"'{self.lr_scheduler}'")
        need(self.max_steps > 0 and self.batch_size > 0 and self.gradient_accumulation_steps > 0,
             "max_steps, batch_size and gradient_accumulation_steps must be positive")
        need(self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0 disables clipping)")
        need(self.mixed_precision in ("no", "bf16"), f"mixed_precision must be 'no' or 'bf16', got "
                                                     f"'{self.mixed_precision}'")
        need(self.checkpoint_every >= 0 and self.validation_every >= 0, "checkpoint/validation intervals must be >= 0")
        need(self.checkpoints_keep >= 1, "checkpoints_keep must be >= 1")
        need(not self.validation_anchors or len(self.validation_anchors) == len(self.validation_prompts),
             "validation_anchors needs one anchor per validation prompt")
        need(self.validation_holdout >= 0 and self.validation_steps > 0, "validation_holdout >= 0, "
                                                                          "validation_steps > 0")
        need(self.log_with in ("tensorboard", "none"), f"log_with must be 'tensorboard' or 'none', got "
                                                       f"'{self.log_with}'")
        need(self.num_workers >= 0 and self.max_sequence_length > 0, "num_workers >= 0, max_sequence_length > 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return coerce(self, changes)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce(base: TrainConfig, values: dict[str, Any], origin: str = "") -> TrainConfig:
    """`base` with `values` applied; unknown keys and wrong types become FvgErrors naming them."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise FvgError(f"unknown training setting(s){origin}: {', '.join(unknown)}")
    default = TrainConfig()
    checked = {}
    for key, value in values.items():
        if value is None:
            if key == "flow_shift":
                checked[key] = None
            continue
        expected = getattr(default, key)
        kind = float if key == "flow_shift" else type(expected)
        try:
            value = conform(str(value) if isinstance(value, Path) else value, (kind,))
            ok = kind is not list or all(isinstance(v, str) for v in value)
        except ValueError:
            ok = False
        if not ok:
            raise FvgError(f"training setting '{key}'{origin} has the wrong type: {value!r} "
                           f"(expected {type(expected).__name__ if expected is not None else 'float'})")
        checked[key] = value
    return dataclasses.replace(base, **checked)


def _flatten(table: dict[str, Any], path: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):  # no setting is a table, so a table is always a label
            for inner, inner_value in _flatten(value, f"{path}{key}.").items():
                if inner in flat:
                    raise FvgError(f"training setting '{inner}' is given twice in {path.rstrip('.') or 'the file'}")
                flat[inner] = inner_value
        elif key in flat:
            raise FvgError(f"training setting '{key}' is given twice")
        else:
            flat[key] = value
    return flat


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the TOML file, then `overrides` (CLI flags; None values are ignored)."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FvgError(f"training config not found: {path}")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise FvgError(f"cannot parse {path}: {exc}") from None
        cfg = coerce(cfg, _flatten(table, ""), origin=f" in {path}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    return coerce(cfg, overrides).validate()


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs, values in TOML syntax (`rank=8`, `target_modules=["to_q"]`, `model="x"`).
    A bare word that is not valid TOML is taken as a string (`--set lr_scheduler=cosine`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise FvgError(f"--set expects key=value, got '{item}'")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out
