"""The anchor-LoRA training loop: peft LoRA on Wan's transformer(s), driven by accelerate.

CogVideoX models (`family = "cogvideox"`, docs/cogvideox.md) train through the same loop with the
v-prediction objective of `fvg.train.cogvideox` instead of flow matching.

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

import datetime as _dt
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
from fvg.train.config import TrainConfig, resolve_family
from fvg.train.data import CachedClips, build_cache, collate, find_clips
from fvg.train.export import lora_stem, read_lora, write_lora
from fvg.train.objective import SigmaSampler, draw_batch, masked_flow_loss, step_generator, step_seed
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
        )

    def _load_pipeline(self, weight_dtype):
        if self.pipe is not None:
            self.family = getattr(self.pipe, "fvg_family", "wan")
            return self.pipe
        self.family = resolve_family(self.cfg.model, self.cfg.family)
        if self.family == "cogvideox":
            from fvg.animate.loading import load_cogvideox_pipeline

            return load_cogvideox_pipeline(self.cfg.model, weight_dtype)
        from fvg.animate.loading import load_wan_pipeline

        return load_wan_pipeline(self.cfg.model, weight_dtype, self.cfg.flow_shift)

    def _cogvideox_setup(self, pipe):
        """CogVideoX: text length and LoRA targets in CogVideoX's terms, the v-prediction step function."""
        from fvg.train import cogvideox as cog

        cfg = self.cfg
        changes = {}
        text_len = min(cfg.max_sequence_length, pipe.transformer.config.max_text_seq_length)
        if text_len != cfg.max_sequence_length:
            changes["max_sequence_length"] = text_len  # CogVideoX was trained on 226 T5 tokens
        targets = [t.replace("ffn.net.", "ff.net.") if t.startswith("ffn.net.") else t for t in cfg.target_modules]
        if targets != list(cfg.target_modules):
            changes["target_modules"] = targets  # CogVideoX's feed-forward is `ff`, Wan's `ffn`
        if changes:
            log.info("CogVideoX: %s", ", ".join(f"{k} = {v}" for k, v in changes.items()))
            self.cfg = cfg = cfg.replace(**changes)
        self.shift = None
        scheduler = pipe.scheduler
        if scheduler.config.get("prediction_type") != "v_prediction":
            raise FvgError(f"CogVideoX training expects a v-prediction scheduler, got "
                           f"{scheduler.config.get('prediction_type')}")
        sampler = cog.TimestepSampler(scheduler.config.num_train_timesteps)
        patch_t = pipe.transformer.config.patch_size_t
        latent_frames = (cfg.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        if cfg.p_anchor > 0:
            try:
                cog.anchor_layout(latent_frames, patch_t)
            except ValueError as exc:
                raise FvgError(f"num_frames = {cfg.num_frames}: {exc}") from None
        rotary = None
        if pipe.transformer.config.use_rotary_positional_embeddings:
            rotary = pipe._prepare_rotary_positional_embeddings(
                cfg.height, cfg.width, cog.padded_frames(latent_frames, patch_t), self.accelerator.device)

        def step_loss(model, batch, generator, weight_dtype):
            acc = self.accelerator
            nb = cog.draw_batch(scheduler, batch["latent"].to(acc.device), batch["anchor"].to(acc.device), sampler,
                                cfg.p_anchor, generator, patch_t)
            with acc.autocast():
                pred = model(hidden_states=nb.model_input.to(weight_dtype), timestep=nb.timestep,
                             encoder_hidden_states=batch["text"].to(acc.device, weight_dtype),
                             image_rotary_emb=rotary, return_dict=False)[0]
            return cog.masked_v_loss(pred, nb.target, nb.frame_weight)

        return sampler, step_loss

    def _samplers(self, pipe, experts: list[str]) -> list[SigmaSampler]:
        cfg = self.cfg
        sched = pipe.scheduler.config
        shift = cfg.flow_shift or sched.get("flow_shift") or sched.get("shift") or 1.0
        self.shift = float(shift)
        base = SigmaSampler(self.shift, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std)
        if getattr(pipe, "transformer_2", None) is None:
            return [base]
        if pipe.config.boundary_ratio not in (None, cfg.boundary_ratio):
            log.warning("model's boundary_ratio %s overridden by the config's %s", pipe.config.boundary_ratio,
                        cfg.boundary_ratio)
        pipe.register_to_config(boundary_ratio=cfg.boundary_ratio)  # validation switches experts there too
        ranges = {"transformer": (cfg.boundary_ratio, 1.0), "transformer_2": (0.0, cfg.boundary_ratio)}
        return [base.restrict(*ranges[name]) for name in experts]

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
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        cast_training_params(model, torch.float32)  # LoRA weights train in fp32 under bf16 autocast
        model.train()

    # -- checkpoints ---------------------------------------------------------------------------

    def _lora_states(self) -> list[dict[str, torch.Tensor]]:
        """PEFT state dicts of the trained experts; a collective call under FSDP / ZeRO-3."""
        from peft import get_peft_model_state_dict

        acc = self.accelerator
        return [get_peft_model_state_dict(acc.unwrap_model(m), state_dict=acc.get_state_dict(m)) for m in self.models]

    def _lora_info(self, step: int) -> dict:
        cfg = self.cfg
        info = {"rank": cfg.rank, "alpha": cfg.alpha, "base_model": cfg.model, "steps": step,
                "data_hash": self.data_hash, "p_anchor": cfg.p_anchor, "flow_shift": self.shift,
                "target_modules": list(cfg.target_modules),
                "method": "anchor LoRA: clean latent frame 0 at timestep 0 (Factorized Video Generation)"}
        if self.family == "cogvideox":
            info["family"] = "cogvideox"
            info["method"] = ("anchor LoRA: clean first temporal patch (anchor latent twice) at timestep 0, "
                              "v-prediction (Factorized Video Generation)")
        return info

    @property
    def lora_formats(self) -> tuple[str, ...]:
        return ("diffusers",) if self.family == "cogvideox" else ("diffusers", "wan")

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
                write_lora(state, path, expert, self.lora_config, self._lora_info(step), formats=("diffusers",))
            write_json(path / STATE_FILE, {
                "step": step, "epoch": position[0], "epoch_offset": position[1],
                "num_processes": acc.num_processes, "batch_size": self.cfg.batch_size,
                "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps, "train_clips": self.num_train,
                "experts": self.experts, "data_hash": self.data_hash, "config": self.cfg.to_dict(),
                "family": self.family,
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
        from accelerate.utils import DistributedType, set_seed
        from diffusers.optimization import get_scheduler

        cfg, started = self.cfg, time.perf_counter()
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        acc = self.accelerator = self._accelerator()
        set_seed(cfg.seed)  # identical LoRA initialisation on every process
        weight_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32

        tick = time.perf_counter()
        pipe = self._load_pipeline(weight_dtype)
        pipe.set_progress_bar_config(disable=True)
        self.experts = experts_to_train(pipe, cfg.expert)
        if len(self.experts) > 1 and acc.distributed_type == DistributedType.DEEPSPEED:
            raise FvgError("DeepSpeed trains one model per run: train expert = 'transformer' and 'transformer_2' "
                           "in two runs, or use FSDP for expert = 'both'")
        cog_step = None
        if self.family == "cogvideox":
            cog_sampler, cog_step = self._cogvideox_setup(pipe)
            cfg = self.cfg
            samplers = [cog_sampler]
        else:
            samplers = self._samplers(pipe, self.experts)
        self.pipe_boundary = pipe.config.boundary_ratio if getattr(pipe, "transformer_2", None) is not None else None
        self.timings["load_model"] = time.perf_counter() - tick

        # Data: find clips, encode them once (or reuse the cache), hold some out for validation.
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

        # Validation inputs are encoded now, so the text encoder can be dropped for training.
        items: list[validation.ValidationItem] = []
        negative = None
        if cfg.validation_every > 0:
            if cfg.validation_prompts:
                anchors = [validation.anchor_from_file(a, cfg) for a in cfg.validation_anchors]
                if not anchors:
                    raise FvgError("validation_prompts need validation_anchors (an image or video each)")
                items = [validation.ValidationItem(p, a, s) for p, a, s in
                         zip(cfg.validation_prompts, anchors, cfg.validation_anchors)]
            elif use_holdout:
                items = validation.held_out_items(entries[-holdout:], cfg)
            pipe.vae.to(acc.device)
            pipe.text_encoder.to(acc.device)
            negative = validation.prepare(pipe, items, cfg, acc.device)
        pipe.text_encoder = None  # frozen, and its outputs are cached: free its memory (UMT5-XXL is 11 GB)
        if not items:
            pipe.vae.to("cpu")  # only validation decodes

        # LoRA on the trained expert(s); an untrained second expert waits on the CPU until validation.
        self.models = [getattr(pipe, name) for name in self.experts]
        self.expert_of = {id(m): name for m, name in zip(self.models, self.experts)}
        for model in self.models:
            self._add_lora(model)
        self.lora_config = self.models[0].peft_config["default"].to_dict()
        frozen = [getattr(pipe, n) for n in ("transformer", "transformer_2")
                  if getattr(pipe, n, None) is not None and n not in self.experts]
        for model in frozen:
            model.requires_grad_(False).to("cpu")
        params = [p for m in self.models for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        # Not passed to prepare(): accelerate would step it once per process per step.
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                     num_training_steps=cfg.max_steps)
        *self.models, optimizer = acc.prepare(*self.models, optimizer)
        acc.register_for_checkpointing(lr_scheduler)
        self._register_hooks()
        step, position, resumed_from = self._resume()

        if acc.is_main_process:
            trainable = sum(p.numel() for p in params)
            log.info("training %s: %d LoRA parameters, %d clips (%d held out), %d process(es)",
                     "+".join(self.experts), trainable, self.num_train, holdout if use_holdout else 0,
                     acc.num_processes)
        acc.init_trackers("fvg-train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                for k, v in cfg.to_dict().items()})

        def validate(at_step: int) -> None:
            if not items:
                return
            tick = time.perf_counter()
            for model in frozen:
                model.to(acc.device)
            for model in self.models:
                model.eval()
            out = validation.run_validation(pipe, items, negative, cfg, at_step, acc)
            for model in self.models:
                model.train()
            for model in frozen:
                model.to("cpu")
            self.timings["validation"] = self.timings.get("validation", 0.0) + time.perf_counter() - tick
            if out is not None:
                log.info("validation samples: %s", out)

        # The loop.
        losses: list[float] = []
        start_step, last_ckpt, last_val = step, step, step
        batches = self._batches(dataset, position)
        micro = step * cfg.gradient_accumulation_steps
        p_high = samplers[0].mass() / (samplers[0].mass() + samplers[1].mass()) if len(samplers) == 2 else 1.0
        patch = acc.unwrap_model(self.models[0]).config.patch_size if cog_step is None else None
        train_time, tick = 0.0, time.perf_counter()
        with _progress(acc.is_main_process) as progress:
            task = progress.add_task("train", total=cfg.max_steps, completed=step, loss="-", rate="-")
            while step < cfg.max_steps:
                # Two experts trained together: one expert per optimiser step, chosen with the same
                # draw on every process and in proportion to its share of the sigma distribution.
                e = 0 if len(self.models) == 1 or torch.rand(1, generator=step_generator(
                    cfg.seed, 0xE7, step)).item() < p_high else 1
                model, sampler = self.models[e], samplers[e]
                step_losses = []
                for _ in range(cfg.gradient_accumulation_steps):
                    batch, position = next(batches)
                    torch.manual_seed(step_seed(cfg.seed, 0xD0, micro, acc.process_index))  # LoRA dropout
                    with acc.accumulate(*self.models):
                        if cog_step is not None:  # CogVideoX: v-prediction (fvg.train.cogvideox)
                            loss = cog_step(model, batch, step_generator(cfg.seed, micro, acc.process_index),
                                            weight_dtype)
                        else:
                            nb = draw_batch(batch["latent"].to(acc.device), sampler, cfg.p_anchor,
                                            step_generator(cfg.seed, micro, acc.process_index), patch)
                            with acc.autocast():
                                pred = model(hidden_states=nb.model_input.to(weight_dtype), timestep=nb.timestep,
                                             encoder_hidden_states=batch["text"].to(acc.device, weight_dtype),
                                             return_dict=False)[0]
                            loss = masked_flow_loss(pred, nb.target, nb.frame_weight)
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.max_grad_norm > 0:
                            acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    step_losses.append(loss.detach())
                    micro += 1
                lr_scheduler.step()
                step += 1
                mean_loss = acc.reduce(torch.stack(step_losses).mean(), reduction="mean").item()
                check_finite_loss(mean_loss, step, lr_scheduler.get_last_lr()[0])
                losses.append(mean_loss)
                train_time += time.perf_counter() - tick
                if step == start_step + 1:
                    self.timings["first_step"] = train_time  # lazy initialisation: kept out of the throughput
                rate = (step - start_step) / train_time
                progress.update(task, completed=step, loss=f"{mean_loss:.4f}", rate=f"{rate:.2f}")
                acc.log({"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "epoch": position[0],
                         "expert": e}, step=step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self._save_checkpoint(step, position)
                    last_ckpt = step
                if cfg.validation_every and step % cfg.validation_every == 0:
                    validate(step)
                    last_val = step
                tick = time.perf_counter()
        batches.close()
        self.timings["train_loop"] = train_time
        if last_ckpt != step:
            self._save_checkpoint(step, position)
        if cfg.validation_every and last_val != step:
            validate(step)

        # Export, a consistency check across processes, and the run record.
        tick = time.perf_counter()
        states = self._lora_states()
        lora_files: dict[str, Path] = {}
        if acc.is_main_process:
            for expert, state in zip(self.experts, states):
                for fmt, path in write_lora(state, self.output / "lora", expert, self.lora_config,
                                            self._lora_info(step), formats=self.lora_formats).items():
                    lora_files[f"{expert}.{fmt}"] = path
        self.timings["export"] = time.perf_counter() - tick
        digests = self._rank_digests()
        self.timings["total"] = time.perf_counter() - started
        record = {}
        if acc.is_main_process:
            record = self._record(created, resumed_from, start_step, step, losses, index, clips, skipped,
                                  train_entries, lora_files, digests)
            write_json(self.output / "run.json", record)
            log.info("done: step %d, LoRA in %s", step, self.output / "lora")
        acc.end_training()
        return TrainResult(self.output, lora_files, step, losses, record)

    def _rank_digests(self) -> list[str] | None:
        """With replicated weights (DDP), every process must end with the same LoRA: check it."""
        from accelerate.utils import DistributedType, gather_object

        acc = self.accelerator
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return None  # sharded: each process holds a different slice
        digests = gather_object([lora_digest([acc.unwrap_model(m) for m in self.models])])
        if len(set(digests)) > 1:
            log.error("LoRA weights differ between processes: %s", digests)
        return digests

    def _record(self, created, resumed_from, start_step, step, losses, index, clips, skipped, train_entries,
                lora_files, digests) -> dict:
        from fvg.pipeline import package_versions

        cfg, acc = self.cfg, self.accelerator
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps * acc.num_processes
        steps, loop = step - start_step, self.timings.get("train_loop", 0.0)
        steady = steps > 1  # steady state: without the first step's warm-up
        if steady:
            steps, loop = steps - 1, loop - self.timings["first_step"]
        return {
            "fvg_train_run": 1, "created": created, "command": sys.argv,
            "config": cfg.to_dict(),
            "resolved": {"family": self.family, "flow_shift": self.shift, "experts": self.experts,
                         "boundary_ratio": self.pipe_boundary,
                         "lora_config": json.loads(json.dumps(self.lora_config, default=str))},
            "distributed": {"type": str(acc.distributed_type), "num_processes": acc.num_processes,
                            "mixed_precision": cfg.mixed_precision, "device": str(acc.device)},
            "data": {"clips_found": len(clips), "clips_cached": len(index["entries"]),
                     "clips_trained": len(train_entries),
                     "skipped": [{"path": p, "reason": r} for p, r in skipped], "data_hash": self.data_hash,
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
