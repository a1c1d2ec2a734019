"""The anchor-LoRA training loop: peft LoRA on a video model's transformer(s), driven by accelerate.

The model's family (`fvg.families`) supplies loading, the caption and clip encoding, the objective
(Wan: flow matching, CogVideoX: v-prediction) and the LoRA key formats; the loop is the same for all.

accelerate provides everything multi-process (DDP by default; FSDP or DeepSpeed through an
accelerate config), mixed precision, gradient accumulation and checkpoint state. The data
order and every random draw of a step derive from (seed, step, rank) rather than from a
running RNG, so `resume="latest"` continues exactly where an interrupted run stopped:
the LoRA, optimiser, LR schedule and data position come from the checkpoint, the rest is
recomputed.

Layout of `output_dir`:
    lora/anchor_lora.safetensors        diffusers keys (+ anchor_lora_wan.safetensors, original keys)
    checkpoints/step_XXXXXX/            accelerate state + LoRA + trainer_state.json (last K kept)
    validation/step_XXXXXX/NN.mp4       factorized samples for held-out prompts and anchors
    logs/                               TensorBoard
    run.json                            settings, versions, data summary, timings, throughput
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from fvg.io import FvgError, sweep_stale_temps, write_json
from fvg.provenance import package_versions, utc_timestamp
from fvg.families import TrainingObjective, family_of, resolve_family
from fvg.train.config import TrainConfig
from fvg.train.data import CachedClips, build_cache, collate, drop_captions, encode_captions, find_clips, pad_text
from fvg.train.export import lora_stem, read_lora, start_from_lora, write_lora
from fvg.train.distributed import (ExpertCall, ExpertPair, deepspeed_plugin_from_env, keep_on_host, lora_state_dict,
                                   needs_expert_pair, resolve_wrap_classes)
from fvg.train.seeds import step_generator, step_seed
from fvg.train import validation

log = logging.getLogger("fvg.train")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
# Settings that may change between a run and its resumption without changing what is learnt.
RESUMABLE_CHANGES = {"output_dir", "cache_dir", "max_steps", "checkpoint_every", "checkpoints_keep", "validation_every",
                     "validation_steps", "validation_guidance", "num_workers", "log_with"}


@dataclass
class TrainResult:
    output_dir: Path
    lora_files: dict[str, Path]
    step: int
    losses: list[float] = field(default_factory=list)  # per optimiser step of this run, mean over processes
    record: dict = field(default_factory=dict)


@dataclass
class RunData:
    """The data stage's results: what was found, cached, trained on and held out for validation."""

    clips: list
    skipped: list[tuple[str, str]]  # (path, reason)
    index: dict  # the latent cache's index (`build_cache`)
    train_entries: list[dict]
    held_out: list[dict]
    dataset: CachedClips


@dataclass
class Optimisation:
    params: list  # the trained LoRA parameters
    optimizer: object
    lr_scheduler: object


def check_finite_loss(loss: float, step: int, lr: float) -> None:
    """Stop a diverged run with one line: a NaN or inf loss means NaN LoRA weights from here on, and
    exporting them would make black videos. Every process sees the same reduced loss, so all stop."""
    if not torch.isfinite(torch.tensor(loss)):
        raise FvgError(f"training diverged at step {step}: the loss is {loss} (learning rate {lr:g}); "
                       "no LoRA exported, earlier checkpoints are kept: lower learning_rate or check the data")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json is written last), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def make_lr_scheduler(cfg: TrainConfig, optimizer):
    """The config's LR schedule: diffusers' `get_scheduler`, or transformers' warmup-stable-decay.

    warmup_stable_decay's warmup and stable phase are constant_with_warmup's step for step, and a LambdaLR
    checkpoint holds its step and base rate, not its rate function, so a run trained with constant_with_warmup
    resumes into it with a larger `max_steps` and anneals over the new steps as if planned from the start."""
    if cfg.lr_scheduler == "warmup_stable_decay":
        from transformers.optimization import get_wsd_schedule

        return get_wsd_schedule(optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_decay_steps=cfg.lr_decay_steps,
                                num_training_steps=cfg.max_steps, decay_type="cosine")
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.max_steps)


def find_checkpoint(output_dir: str | Path, resume: str) -> Path | None:
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FvgError(f"cannot resume: {path} is not a complete training checkpoint")
    return path


def experts_to_train(pipe, expert: str) -> list[str]:
    if getattr(pipe, "transformer_2", None) is None:
        if expert != "transformer":
            raise FvgError(f"expert '{expert}' needs a two-expert model (Wan2.2-A14B); this one has one transformer")
        return ["transformer"]
    return ["transformer", "transformer_2"] if expert == "both" else [expert]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=step_generator(seed, 0x5EED, epoch)).tolist()


def lora_digest(models) -> str:
    h = hashlib.sha256()
    for model in models:
        for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class Trainer:
    """One training run. `pipe` (an `AnchoredWanPipeline`) replaces loading `cfg.model`, which then
    only names it (in the cache key and the LoRA metadata: give each such model its own name).
    The run takes the pipeline over: it adds adapters and drops the text encoder."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, pipe=None):
        self.cfg = cfg.validate()
        self.resume = resume
        self.pipe = pipe
        self.output = Path(cfg.output_dir)
        self.timings: dict[str, float] = {}

    # -- setup -------------------------------------------------------------------------------

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        log_with = "tensorboard" if self.cfg.log_with == "tensorboard" else None
        if log_with:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                log.warning("tensorboard is not installed (pip install 'fvg[train]'): logging disabled")
                log_with = None
        return Accelerator(
            mixed_precision=self.cfg.mixed_precision,
            gradient_accumulation_steps=self.cfg.gradient_accumulation_steps,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output), logging_dir=str(self.output / "logs")),
            deepspeed_plugin=deepspeed_plugin_from_env(self.cfg),  # None unless launched with DeepSpeed
        )

    def _load_pipeline(self, weight_dtype):
        if self.pipe is not None:
            self.family = family_of(self.pipe)
            return self.pipe
        self.family = resolve_family(self.cfg.model, self.cfg.family)
        return self.family.load_pipeline(self.cfg.model, weight_dtype, self.cfg.flow_shift,
                                         devices=self._load_devices())

    def _load_devices(self) -> dict[str, torch.device]:
        """Where to load components straight to: with replicated weights (one process, DDP) the trained
        expert(s) and the text encoder go from their files onto this process's device, in the run's dtype,
        with no host copy (N processes would otherwise hold N host copies). A frozen second expert and the
        VAE load on the host. Under FSDP and DeepSpeed everything loads on the host: they shard from there,
        and only each process's shard reaches its device."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.device.type == "cpu" or acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return {}
        experts = ["transformer", "transformer_2"] if self.cfg.expert == "both" else [self.cfg.expert]
        return {name: acc.device for name in (*experts, "text_encoder")}

    def _objective(self, pipe, weight_dtype) -> TrainingObjective:
        """The family's objective, after the settings it changes into its own terms (text length, LoRA modules)."""
        self.family.check_shape(self.cfg.height, self.cfg.width, self.cfg.num_frames)
        changes = self.family.adapt_train_config(self.cfg, pipe)
        if changes:
            log.info("%s: %s", self.family.label, ", ".join(f"{k} = {v}" for k, v in changes.items()))
            self.cfg = self.cfg.replace(**changes)
        acc = self.accelerator
        objective = self.family.training_objective(pipe, self.cfg, self.experts, acc.device, acc.autocast,
                                                   weight_dtype)
        self.shift = objective.flow_shift
        return objective

    def _add_lora(self, model) -> None:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        cfg = self.cfg
        model.requires_grad_(False)
        try:
            model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                         init_lora_weights=True, target_modules=list(cfg.target_modules)))
        except ValueError as exc:
            raise FvgError(f"cannot add the LoRA: {str(exc).splitlines()[0]}") from None
        if cfg.init_lora:  # a resumed run then loads its checkpoint's LoRA over this
            rank = start_from_lora(model, cfg.init_lora, cfg.alpha)
            log.info("LoRA starts from %s (rank %d in rank %d)", cfg.init_lora, rank, cfg.rank)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        cast_training_params(model, torch.float32)  # LoRA weights train in fp32 under bf16 autocast
        model.train()

    # -- checkpoints ---------------------------------------------------------------------------

    def _lora_states(self) -> list[dict[str, torch.Tensor]]:
        """PEFT state dicts of the trained experts, gathering only the LoRA tensors (`lora_state_dict`);
        a collective call under FSDP / ZeRO-3."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        zero3 = acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3
        return [lora_state_dict(expert, zero3=zero3) for expert in self.experts_unwrapped]

    def _lora_info(self, step: int) -> dict:
        cfg = self.cfg
        return self.family.lora_info({
            "rank": cfg.rank, "alpha": cfg.alpha, "base_model": cfg.model, "steps": step, "data_hash": self.data_hash,
            "p_anchor": cfg.p_anchor, "flow_shift": self.shift, "target_modules": list(cfg.target_modules)})

    def _register_hooks(self) -> None:
        from peft import set_peft_model_state_dict

        acc = self.accelerator

        def save_hook(models, weights, output_dir):
            # DDP / one process: the LoRA file written by _save_checkpoint is the model state; skip the
            # full weights accelerate would write. (FSDP / DeepSpeed save their own shards: `weights` is empty.)
            weights.clear()

        def load_hook(models, input_dir):
            while models:
                model = acc.unwrap_model(models.pop())
                expert = self.expert_of[id(model)]
                tensors, _, _ = read_lora(Path(input_dir) / f"{lora_stem(expert)}.safetensors")
                result = set_peft_model_state_dict(model, tensors, adapter_name="default")
                unexpected = getattr(result, "unexpected_keys", None)
                if unexpected:
                    raise FvgError(f"checkpoint LoRA does not fit the model: unexpected keys {unexpected[:3]}")

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def _save_checkpoint(self, step: int, position: tuple[int, int]) -> Path:
        acc = self.accelerator
        path = self.output / CHECKPOINTS / f"step_{step:06d}"
        if acc.is_main_process:
            sweep_stale_temps(self.output / CHECKPOINTS, recursive=True)  # what killed runs left
        acc.save_state(str(path))
        states = self._lora_states()
        if acc.is_main_process:
            for expert, state in zip(self.experts, states):
                write_lora(state, path, expert, self.lora_config, self._lora_info(step))
            write_json(path / STATE_FILE, {
                "step": step, "epoch": position[0], "epoch_offset": position[1],
                "num_processes": acc.num_processes, "batch_size": self.cfg.batch_size,
                "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps, "train_clips": self.num_train,
                "experts": self.experts, "data_hash": self.data_hash, "config": self.cfg.to_dict(),
                "family": self.family.name,
            })
            for old in checkpoint_dirs(self.output)[:-self.cfg.checkpoints_keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def _resume(self) -> tuple[int, tuple[int, int], str | None]:
        if not self.resume:
            return 0, (0, 0), None
        path = find_checkpoint(self.output, self.resume)
        if path is None:
            log.info("no checkpoint in %s: starting from step 0", self.output / CHECKPOINTS)
            return 0, (0, 0), None
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        changed = sorted(k for k, v in state["config"].items()
                         if k not in RESUMABLE_CHANGES and self.cfg.to_dict().get(k) != v)
        if changed:
            log.warning("resuming with changed settings: %s", ", ".join(changed))
        if state["experts"] != self.experts:
            raise FvgError(f"checkpoint {path} trained {state['experts']}, this run trains {self.experts}")
        same_layout = (state["num_processes"], state["batch_size"], state["train_clips"]) == (
            self.accelerator.num_processes, self.cfg.batch_size, self.num_train)
        if not same_layout:
            log.warning("processes, batch size or data changed since the checkpoint: the data order continues "
                        "from the same epoch and sample offset, but the run is no longer bit-identical")
        self.accelerator.load_state(str(path))
        log.info("resumed from %s (step %d)", path, state["step"])
        return state["step"], (state["epoch"], state["epoch_offset"]), str(path)

    # -- data ----------------------------------------------------------------------------------

    def _batches(self, dataset, position: tuple[int, int]) -> Iterator[tuple[dict, tuple[int, int]]]:
        """Micro-batches for this process from `position` = (epoch, offset into that epoch's order) on.

        Each micro-step consumes batch_size * num_processes consecutive samples of the epoch's
        seeded permutation, rank r taking its slice; the tail that does not fill one is dropped.
        """
        acc, bs = self.accelerator, self.cfg.batch_size
        n, per = len(dataset), bs * acc.num_processes
        epoch, offset = position
        if offset + per > n:
            epoch, offset = epoch + 1, 0
        while True:
            order = epoch_order(n, self.cfg.seed, epoch)
            starts = list(range(offset, n - per + 1, per))
            sampler = [order[s + acc.process_index * bs: s + (acc.process_index + 1) * bs] for s in starts]
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                                                 collate_fn=collate, pin_memory=acc.device.type == "cuda")
            for start, batch in zip(starts, loader):
                nxt = start + per
                yield batch, ((epoch, nxt) if nxt + per <= n else (epoch + 1, 0))
            epoch, offset = epoch + 1, 0

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        from accelerate.utils import set_seed

        started, created = time.perf_counter(), utc_timestamp()
        acc = self.accelerator = self._accelerator()
        set_seed(self.cfg.seed)  # identical LoRA initialisation on every process
        weight_dtype = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else torch.float32
        pipe, objective = self._setup_model(weight_dtype)
        data = self._setup_data(pipe)
        self.empty_text = self._empty_caption(pipe)
        self._setup_validation(pipe, data.held_out)
        optim = self._setup_lora(pipe)
        step, position, resumed_from = self._resume()
        if acc.is_main_process:
            log.info("training %s: %d LoRA parameters, %d clips (%d held out), %d process(es)",
                     "+".join(self.experts), sum(p.numel() for p in optim.params), self.num_train,
                     len(data.held_out), acc.num_processes)
        acc.init_trackers("fvg-train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                for k, v in self.cfg.to_dict().items()})
        start_step = step
        losses, step = self._train(objective, data.dataset, optim, step, position)
        lora_files = self._export(step)
        digests = self._rank_digests()
        self.timings["total"] = time.perf_counter() - started
        record = {}
        if acc.is_main_process:
            record = self._record(created, resumed_from, start_step, step, losses, data, lora_files, digests)
            write_json(self.output / "run.json", record)
            log.info("done: step %d, LoRA in %s", step, self.output / "lora")
        acc.end_training()
        return TrainResult(self.output, lora_files, step, losses, record)

    def _setup_model(self, weight_dtype) -> tuple[object, TrainingObjective]:
        """The pipeline, the experts to train and the family's objective."""
        from accelerate.utils import DistributedType

        tick = time.perf_counter()
        pipe = self.pipe = self._load_pipeline(weight_dtype)
        pipe.set_progress_bar_config(disable=True)
        self.experts = experts_to_train(pipe, self.cfg.expert)
        if len(self.experts) > 1 and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise FvgError("DeepSpeed trains one model per run: train expert = 'transformer' and 'transformer_2' "
                           "in two runs, or use FSDP for expert = 'both'")
        objective = self._objective(pipe, weight_dtype)
        self.pipe_boundary = pipe.config.boundary_ratio if getattr(pipe, "transformer_2", None) is not None else None
        self.timings["load_model"] = time.perf_counter() - tick
        return pipe, objective

    def _setup_data(self, pipe) -> RunData:
        """Find clips, encode them once (or reuse the cache), hold some out for validation."""
        cfg, acc = self.cfg, self.accelerator
        tick = time.perf_counter()
        clips, dropped = find_clips(cfg.data, cfg.video_column, cfg.caption_column)
        index = build_cache(cfg, clips, pipe, acc)
        skipped = dropped + [tuple(s) for s in index["skipped"]]
        if acc.is_main_process:
            for path, reason in skipped:
                log.warning("skipped %s: %s", path, reason)
        entries = index["entries"]
        holdout = min(cfg.validation_holdout, max(len(entries) - 1, 0))
        use_holdout = cfg.validation_every > 0 and not cfg.validation_prompts and holdout > 0
        train_entries = entries[:-holdout] if use_holdout else entries
        self.num_train, self.data_hash = len(train_entries), index["data_hash"]
        if len(train_entries) < cfg.batch_size * acc.num_processes:
            raise FvgError(f"{len(train_entries)} usable training clips, fewer than batch_size x processes "
                           f"({cfg.batch_size} x {acc.num_processes}); {len(skipped)} skipped")
        dataset = CachedClips(index, train_entries, cfg.max_sequence_length)
        self.timings["data_cache"] = time.perf_counter() - tick
        return RunData(clips, skipped, index, train_entries, entries[-holdout:] if use_holdout else [], dataset)

    def _empty_caption(self, pipe) -> torch.Tensor | None:
        """The empty caption's embedding, padded as the cache's are, for caption dropout (None without it).
        Encoded now, while the text encoder is still loaded; the unconditional branch of guidance at
        sampling time encodes the same empty negative prompt."""
        if self.cfg.caption_dropout <= 0:
            return None
        pipe.text_encoder.to(self.accelerator.device)
        length = self.cfg.max_sequence_length
        return pad_text(encode_captions(pipe, [""], length, self.accelerator.device)[0], length).cpu()

    def _setup_validation(self, pipe, held_out: list[dict]) -> None:
        """Encode the validation inputs now, so the text encoder can be dropped for training."""
        cfg, acc = self.cfg, self.accelerator
        self.validation_items: list[validation.ValidationItem] = []
        self.validation_negative = None
        if cfg.validation_every > 0:
            if cfg.validation_prompts:
                anchors = [validation.anchor_from_file(a, cfg) for a in cfg.validation_anchors]
                if not anchors:
                    raise FvgError("validation_prompts need validation_anchors (an image or video each)")
                self.validation_items = [validation.ValidationItem(p, a, s) for p, a, s in
                                         zip(cfg.validation_prompts, anchors, cfg.validation_anchors)]
            elif held_out:
                self.validation_items = validation.held_out_items(held_out, cfg)
            pipe.vae.to(acc.device)
            pipe.text_encoder.to(acc.device)
            self.validation_negative = validation.prepare(pipe, self.validation_items, cfg, acc.device)
        pipe.text_encoder = None  # frozen, and its outputs are cached: free its memory (UMT5-XXL is 11 GB)
        if not self.validation_items:
            pipe.vae.to("cpu")  # only validation decodes

    def _setup_lora(self, pipe) -> Optimisation:
        """LoRA on the trained expert(s), the optimiser and LR schedule, all prepared by accelerate.

        Two experts under FSDP2 are prepared as one `ExpertPair` (accelerate's FSDP2 takes one model;
        `fvg.train.distributed` says why a pair rather than one expert after the other). An untrained
        second expert stays on the host for good: validation streams it block by block (`keep_on_host`)."""
        from accelerate.utils import DistributedType

        cfg, acc = self.cfg, self.accelerator
        self.experts_unwrapped = [getattr(pipe, name) for name in self.experts]
        self.expert_of = {id(m): name for m, name in zip(self.experts_unwrapped, self.experts)}
        for model in self.experts_unwrapped:
            self._add_lora(model)
        self.lora_config = self.experts_unwrapped[0].peft_config["default"].to_dict()
        self.frozen = [getattr(pipe, n) for n in ("transformer", "transformer_2")
                       if getattr(pipe, n, None) is not None and n not in self.experts]
        for model in self.frozen:
            model.requires_grad_(False).to("cpu")
            keep_on_host(model, acc.device)
        params = [p for m in self.experts_unwrapped for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        # Not passed to prepare(): accelerate would step it once per process per step.
        lr_scheduler = make_lr_scheduler(cfg, optimizer)
        fsdp_plugin = getattr(acc.state, "fsdp_plugin", None)
        pair = needs_expert_pair(acc.distributed_type, getattr(fsdp_plugin, "fsdp_version", None), len(self.experts))
        if fsdp_plugin is not None and acc.distributed_type == DistributedType.FSDP:
            resolve_wrap_classes(fsdp_plugin, self.experts_unwrapped, separately=pair)
        if pair:
            pair, optimizer = acc.prepare(ExpertPair(self.experts_unwrapped), optimizer)
            self.prepared = [pair]
            self.callers = [ExpertCall(pair, i) for i in range(len(self.experts))]
        else:
            *self.prepared, optimizer = acc.prepare(*self.experts_unwrapped, optimizer)
            self.callers = list(self.prepared)
        # FSDP2 replaced the parameters by sharded ones (and switched the optimiser to them): clipping must
        # see those, or it would clip the dropped originals, whose gradients stay None.
        params = [p for m in self.prepared for p in m.parameters() if p.requires_grad]
        acc.register_for_checkpointing(lr_scheduler)
        self._register_hooks()
        return Optimisation(params, optimizer, lr_scheduler)

    def _validate(self, at_step: int) -> None:
        if not self.validation_items:
            return
        acc, tick = self.accelerator, time.perf_counter()
        for model in self.prepared:  # the frozen expert is not moved: it streams from the host (`keep_on_host`)
            model.eval()
        out = validation.run_validation(self.pipe, self.validation_items, self.validation_negative, self.cfg,
                                        at_step, acc)
        for model in self.prepared:
            model.train()
        self.timings["validation"] = self.timings.get("validation", 0.0) + time.perf_counter() - tick
        if out is not None:
            log.info("validation samples: %s", out)

    # -- the loop ------------------------------------------------------------------------------

    def _train(self, objective: TrainingObjective, dataset, optim: Optimisation, step: int,
               position: tuple[int, int]) -> tuple[list[float], int]:
        """Optimiser steps up to max_steps, with checkpoints and validation; the loss of each step."""
        cfg, acc = self.cfg, self.accelerator
        losses: list[float] = []
        start_step, last_ckpt, last_val = step, step, step
        batches = self._batches(dataset, position)
        micro = step * cfg.gradient_accumulation_steps
        train_time, tick = 0.0, time.perf_counter()
        with _progress(acc.is_main_process) as progress:
            task = progress.add_task("train", total=cfg.max_steps, completed=step, loss="-", rate="-")
            while step < cfg.max_steps:
                e = self._pick_expert(objective.samplers, step)
                mean_loss, position = self._optimiser_step(objective, e, batches, optim, micro)
                micro += cfg.gradient_accumulation_steps
                step += 1
                check_finite_loss(mean_loss, step, optim.lr_scheduler.get_last_lr()[0])
                losses.append(mean_loss)
                train_time += time.perf_counter() - tick
                if step == start_step + 1:
                    self.timings["first_step"] = train_time  # lazy initialisation: kept out of the throughput
                rate = (step - start_step) / train_time
                progress.update(task, completed=step, loss=f"{mean_loss:.4f}", rate=f"{rate:.2f}")
                acc.log({"loss": mean_loss, "lr": optim.lr_scheduler.get_last_lr()[0], "epoch": position[0],
                         "expert": e}, step=step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self._save_checkpoint(step, position)
                    last_ckpt = step
                if cfg.validation_every and step % cfg.validation_every == 0:
                    self._validate(step)
                    last_val = step
                tick = time.perf_counter()
        batches.close()
        self.timings["train_loop"] = train_time
        if last_ckpt != step:
            self._save_checkpoint(step, position)
        if cfg.validation_every and last_val != step:
            self._validate(step)
        return losses, step

    def _pick_expert(self, samplers: list, step: int) -> int:
        """Two experts trained together: one expert per optimiser step, chosen with the same draw on
        every process and in proportion to its share of the sigma distribution."""
        if len(self.callers) == 1:
            return 0
        p_high = samplers[0].mass() / (samplers[0].mass() + samplers[1].mass())
        return 0 if torch.rand(1, generator=step_generator(self.cfg.seed, 0xE7, step)).item() < p_high else 1

    def _optimiser_step(self, objective: TrainingObjective, e: int, batches, optim: Optimisation,
                        micro: int) -> tuple[float, tuple[int, int]]:
        """One optimiser step of expert `e` over gradient_accumulation_steps micro-batches (micro-batch
        counter `micro` on): the loss averaged over micro-batches and processes, and the data position."""
        cfg, acc = self.cfg, self.accelerator
        model, sampler = self.callers[e], objective.samplers[e]
        step_losses = []
        for m in range(micro, micro + cfg.gradient_accumulation_steps):
            batch, position = next(batches)
            if self.empty_text is not None:
                batch["text"] = drop_captions(batch["text"], self.empty_text, cfg.caption_dropout,
                                              step_generator(cfg.seed, 0xCA, m, acc.process_index))
            torch.manual_seed(step_seed(cfg.seed, 0xD0, m, acc.process_index))  # LoRA dropout
            with acc.accumulate(*self.prepared):
                loss = objective.step_loss(model, sampler, batch, step_generator(cfg.seed, m, acc.process_index))
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(optim.params, cfg.max_grad_norm)
                optim.optimizer.step()
                optim.optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss.detach())
        optim.lr_scheduler.step()
        return acc.reduce(torch.stack(step_losses).mean(), reduction="mean").item(), position

    # -- export and the run record -------------------------------------------------------------

    def _export(self, step: int) -> dict[str, Path]:
        """The final LoRA(s) in the family's key formats (a collective call; the main process writes)."""
        tick = time.perf_counter()
        states = self._lora_states()
        lora_files: dict[str, Path] = {}
        if self.accelerator.is_main_process:
            for expert, state in zip(self.experts, states):
                for fmt, path in write_lora(state, self.output / "lora", expert, self.lora_config,
                                            self._lora_info(step), self.family.lora_converters).items():
                    lora_files[f"{expert}.{fmt}"] = path
        self.timings["export"] = time.perf_counter() - tick
        return lora_files

    def _rank_digests(self) -> list[str] | None:
        """With replicated weights (DDP), every process must end with the same LoRA: check it."""
        from accelerate.utils import DistributedType, gather_object

        acc = self.accelerator
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return None  # sharded: each process holds a different slice
        digests = gather_object([lora_digest(self.experts_unwrapped)])
        if len(set(digests)) > 1:
            log.error("LoRA weights differ between processes: %s", digests)
        return digests

    def _record(self, created: str, resumed_from: str | None, start_step: int, step: int, losses: list[float],
                data: RunData, lora_files: dict[str, Path], digests: list[str] | None) -> dict:
        cfg, acc, index = self.cfg, self.accelerator, data.index
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps * acc.num_processes
        steps, loop = step - start_step, self.timings.get("train_loop", 0.0)
        steady = steps > 1  # steady state: without the first step's warm-up
        if steady:
            steps, loop = steps - 1, loop - self.timings["first_step"]
        return {
            "fvg_train_run": 1, "created": created, "command": sys.argv,
            "config": cfg.to_dict(),
            "resolved": {"family": self.family.name, "flow_shift": self.shift, "experts": self.experts,
                         "boundary_ratio": self.pipe_boundary,
                         "lora_config": json.loads(json.dumps(self.lora_config, default=str))},
            "distributed": {"type": str(acc.distributed_type), "num_processes": acc.num_processes,
                            "mixed_precision": cfg.mixed_precision, "device": str(acc.device)},
            "data": {"clips_found": len(data.clips), "clips_cached": len(index["entries"]),
                     "clips_trained": len(data.train_entries),
                     "skipped": [{"path": p, "reason": r} for p, r in data.skipped], "data_hash": self.data_hash,
                     "cache": {"key": index["key"], "dir": index["root"], "hit": index["hit"]}},
            "steps": {"resumed_from": resumed_from, "start": start_step, "end": step},
            "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                     "per_step": losses},
            "throughput": {"samples_per_s": steps * per_step / loop if loop > 0 else None,
                           "steps_per_s": steps / loop if loop > 0 else None, "excludes_first_step": steady},
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "outputs": {k: str(v) for k, v in lora_files.items()},
            "lora_sha256_by_process": digests,
            "versions": package_versions(),
        }


def _progress(enabled: bool):
    """A rich progress bar with loss, it/s and ETA on the main process."""
    from rich.progress import TextColumn

    from fvg.console import progress_bar

    return progress_bar(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
                        disable=not enabled, transient=False)


def train(cfg: TrainConfig, resume: str | None = None, pipe=None) -> TrainResult:
    """Run anchor-LoRA training; see `Trainer`."""
    return Trainer(cfg, resume=resume, pipe=pipe).run()
