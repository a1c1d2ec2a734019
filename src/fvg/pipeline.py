"""`FactorizedPipeline`: plan -> anchor -> animate, and the two baselines, behind one call.

    pipe = FactorizedPipeline.from_preset("wan2.2-5b")
    out = pipe("a leaf turns from green to red", mode="factorized", seed=0)
    out.save("runs/leaf")  # video.mp4, anchor.png, candidates/, plan.json, run.json

Models load lazily on first use, so planning alone never loads a video model. Modes share
the seed's initial noise (paired comparisons): `t2v` animates the prompt, `upsampled`
animates the planner's detailed prompt, `factorized` plans the first frame, renders it
and animates the original prompt anchored to it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from fvg.anchor import VIDEO_STYLE, AnchorResult, DiffusersAnchorSource, FileAnchorSource, fit_to_resolution
from fvg.animate.loading import (count_experts, default_device, load_expert_loras, resolve_dtype, resolve_lora_2,
                                 set_anchor_lora)
from fvg.families import family_of, get_family
from fvg.families.cpu_vae import CpuVaeKernels
from fvg.io import FvgError, check_image_size, save_image, sweep_stale_temps, to_rgb, to_uint8, write_json, write_mp4
from fvg.parallel import broadcast_from_main, init_context_parallel, is_main_process, split_anchor_model
from fvg.plan import Plan, make_planner
from fvg.provenance import package_versions, utc_timestamp
from fvg.presets import DEFAULT_PRESET, Preset, get_preset, validate_mode
from fvg.residency import StageResidency
from fvg.speed import MagCacheKey, SpeedOptions, apply_speed, validate_speed
from fvg.weight_storage import WeightStorage, refuse_for_builtin, store_denoisers_in_fp8

# progress(stage, step, total): stage is "plan", "anchor", "animate" or "decode"
ProgressFn = Callable[[str, int, int], None]


@dataclass
class FactorizedOutput:
    frames: np.ndarray  # [T, H, W, 3] uint8
    mode: str
    prompt: str
    video_prompt: str  # what the video model was given
    seed: int
    steps: int
    fps: int
    plan: Plan | None
    anchor: AnchorResult | None
    timings: dict[str, float]
    settings: dict
    warnings: list[str] = field(default_factory=list)

    def run_record(self) -> dict:
        return {
            "fvg_run": 1,
            "created": utc_timestamp(),
            "prompt": self.prompt,
            "mode": self.mode,
            "video_prompt": self.video_prompt,
            "seed": self.seed,
            "steps": self.steps,
            "frames": list(self.frames.shape),
            "anchor": None if self.anchor is None else {
                "source": self.anchor.source, "model": self.anchor.model, "caption": self.anchor.caption,
                "selected": self.anchor.selected, "seeds": [c.seed for c in self.anchor.candidates],
                "settings": self.anchor.settings,
            },
            "planner": None if self.plan is None else {"backend": self.plan.backend, "model": self.plan.model,
                                                        "template_version": self.plan.template_version},
            "settings": self.settings,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "warnings": self.warnings,
            "versions": package_versions(),
        }

    def save(self, out_dir: str | Path, stem: str | None = None) -> Path:
        """Write the video, anchor, candidates, plan and run record, each atomically, run record last
        (its presence marks a complete run). Under context parallelism only rank 0 writes (every rank holds
        the same video); the others return the path it writes. Without `stem`: out_dir/video.mp4, anchor.png,
        candidates/NN.png, plan.json, run.json. With `stem` (batches): out_dir/<stem>.mp4,
        <stem>.anchor.png, <stem>.candidates/NN.png, <stem>.plan.json, <stem>.run.json.

        An older run's record there is removed first, so its files never pass for this run's;
        what an older run wrote and this one does not (a plan, extra candidates) goes too. If a
        write fails, this run's files are removed again (no video without its record) and the
        failure is one FvgError line.
        """
        out_dir = Path(out_dir)
        paths = output_paths(out_dir, stem)
        if not is_main_process():
            return paths["video"]
        sweep_stale_temps(out_dir)
        sweep_stale_temps(paths["candidates"])
        written: list[Path] = []
        try:
            paths["run"].unlink(missing_ok=True)
            for stale in self._stale_outputs(paths):
                stale.unlink()
            written.append(paths["video"])
            write_mp4(paths["video"], self.frames, fps=self.fps)
            if self.anchor is not None:
                written.append(paths["anchor"])
                save_image(paths["anchor"], self.anchor.image)
                for i, cand in enumerate(self.anchor.candidates):
                    written.append(paths["candidates"] / f"{i:02d}.png")
                    save_image(written[-1], cand.image)
            if self.plan is not None:
                written.append(paths["plan"])
                write_json(paths["plan"], self.plan.to_dict())
            write_json(paths["run"], self.run_record())
        except OSError as exc:
            for path in written:
                path.unlink(missing_ok=True)
            with_name = f" ({exc.filename})" if exc.filename else ""
            raise FvgError(f"cannot write the outputs in {out_dir}: {exc.strerror or exc}{with_name}") from None
        return paths["video"]

    def _stale_outputs(self, paths: dict[str, Path]) -> list[Path]:
        """Files an older run left at these paths that this run will not overwrite."""
        stale = [] if self.anchor is not None or not paths["anchor"].is_file() else [paths["anchor"]]
        if self.plan is None and paths["plan"].is_file():
            stale.append(paths["plan"])
        keep = {f"{i:02d}.png" for i in range(len(self.anchor.candidates) if self.anchor else 0)}
        if paths["candidates"].is_dir():
            stale += [p for p in paths["candidates"].glob("[0-9][0-9].png") if p.name not in keep]
        return stale


def output_paths(out_dir: Path, stem: str | None = None) -> dict[str, Path]:
    if stem is None:
        return {"video": out_dir / "video.mp4", "anchor": out_dir / "anchor.png",
                "candidates": out_dir / "candidates", "plan": out_dir / "plan.json", "run": out_dir / "run.json"}
    return {"video": out_dir / f"{stem}.mp4", "anchor": out_dir / f"{stem}.anchor.png",
            "candidates": out_dir / f"{stem}.candidates", "plan": out_dir / f"{stem}.plan.json",
            "run": out_dir / f"{stem}.run.json"}


MAX_SIDE, MAX_FRAMES = 4096, 1025  # video size limits (Wan2.2 trains at most 1280 px and 121 frames)
MAX_SEED = 2**32 - 1  # numpy's limit; torch takes more, but one range for every seed keeps runs portable


def validate_seed(seed: int, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise FvgError(f"{what} must be an integer from 0 to {MAX_SEED}, got {seed}")
    return seed


def validate_device(device: str) -> str:
    """FvgError unless `device` names a device torch has here ("cuda:7" on a one-GPU or CPU machine)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FvgError(f"unknown device '{device}': {' '.join(str(exc).split())}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FvgError(f"device '{device}' is not available: this torch build sees no CUDA GPU")
        if parsed.index is not None and parsed.index >= count:
            raise FvgError(f"device '{device}' is not available: {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise FvgError(f"device '{device}' is not available on this machine")
    elif parsed.type not in {"cpu", "cuda", "mps"}:
        raise FvgError(f"device '{device}' is not supported (use cpu, cuda, cuda:N or mps)")
    return device


def validate_call(seed: int, num_candidates: int, selected: int, steps: int | None,
                  guidance_scale: float | None) -> None:
    """The per-video settings, checked before any model runs (the CLI calls it before loading them)."""
    if not isinstance(num_candidates, int) or not 1 <= num_candidates <= 64:
        raise FvgError(f"the number of anchor candidates must be from 1 to 64, got {num_candidates}")
    if not isinstance(selected, int) or not 0 <= selected < num_candidates:
        raise FvgError(f"--select must be from 0 to {num_candidates - 1} (of {num_candidates} candidates), "
                       f"got {selected}")
    validate_seed(seed)
    validate_seed(seed + num_candidates - 1, f"seed + candidates - 1 (candidate {num_candidates - 1}'s seed)")
    if steps is not None and steps < 1:
        raise FvgError(f"steps must be at least 1, got {steps}")
    if steps is not None and steps > 10_000:
        raise FvgError(f"steps must be at most 10000, got {steps}")
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise FvgError(f"guidance must be a finite number >= 0, got {guidance_scale}")


def _load_loras_explained(pipe, lora: str | None, lora_2: str | None, model: str) -> None:
    """`load_expert_loras` with diffusers' multi-line "size mismatch" log silenced and its error
    turned into one line naming the first mismatching weight."""
    import logging

    from fvg.animate.lora import explain_shape_mismatch

    diffusers_logger = logging.getLogger("diffusers.loaders.peft")  # logs the whole error before raising it
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.CRITICAL)
    try:
        load_expert_loras(pipe, lora, lora_2)
    except FvgError as exc:
        cause = exc.__cause__ or exc.__context__
        for path in dict.fromkeys(filter(None, (lora, lora_2))):
            explained = explain_shape_mismatch(path, model, str(cause)) if cause is not None else None
            if explained is not None:
                raise FvgError(explained) from None
        raise
    finally:
        diffusers_logger.setLevel(level)


class FactorizedPipeline:
    """The three stages of Factorized Video Generation, loaded from a preset.

    Models load on the host when first needed; each stage's models go to the device only while
    that stage runs (`fvg.residency`), in the memory mode `memory` (auto, gpu, model-offload,
    group-offload, sequential). `cpu_offload=True` is the older spelling of `memory="model-offload"`.
    `storage` stores the denoisers in fp8, quantizes them or loads GGUF transformers (`fvg.weight_storage`).
    `attention_backend`, `compile` and `cache` are the video stage's speed options (`fvg.speed`);
    `context_parallel=N` (under `torchrun --nproc-per-node N`) splits each video's sequence over the N
    processes with `context_parallel_mode` "ulysses" or "ring" attention (`fvg.parallel`).
    """

    def __init__(self, preset: Preset, device: str | None = None, dtype: str | torch.dtype | None = None,
                 cpu_offload: bool = False, vae_tiling: bool | None = None, planner_options: dict | None = None,
                 memory: str = "auto", storage: WeightStorage | None = None, attention_backend: str | None = None,
                 compile: bool = False, cache: str = "none", context_parallel: int = 1,
                 context_parallel_mode: str = "ulysses"):
        self.preset = preset
        self.speed = validate_speed(SpeedOptions(attention_backend, compile, cache, context_parallel,
                                                 context_parallel_mode))
        self.family = get_family(preset.family)
        if preset.still_strength is not None:
            if not self.family.still_start:
                raise FvgError(f"still_strength applies to Wan-family pipelines, not {self.family.label}")
            if not 0.0 < preset.still_strength <= 1.0:
                raise FvgError(f"still_strength must be in (0, 1], got {preset.still_strength}")
        self.device = validate_device(device) if device else default_device()
        if self.speed.context_parallel > 1:  # joins torchrun's process group; each rank its own GPU
            self.device = init_context_parallel(self.speed.context_parallel, self.device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.memory = "model-offload" if cpu_offload and memory == "auto" else memory
        self.storage = (storage or WeightStorage()).validate(self.device)
        self.storage.check_memory_mode(self.memory, "--cpu-offload" if self.memory != memory else None)
        # Decoding 704p and larger videos in one piece needs tens of GiB: tile there unless told otherwise.
        self.vae_tiling = preset.height * preset.width >= 704 * 1280 if vae_tiling is None else vae_tiling
        self.planner_options = dict(planner_options or {})
        self.residency = StageResidency(self.device, self.memory, failing_modes=self.storage.failing_memory_modes)
        if self.memory == "auto" and self.device.startswith("cuda"):
            self._plan_auto_modes()
        self._planner = None
        self._anchor_source = None
        self._video_pipe = None
        self._speed = None  # the speed options applied to the video pipeline (`fvg.speed.SpeedSession`)
        self._anchor_split: bool | None = None  # context parallelism: whether the anchor model is split too

    def _plan_auto_modes(self) -> None:
        """`auto` on a GPU: each stage's mode from `fvg memory`'s estimate (exact model sizes, as stored
        with this run's fp8/quantization/GGUF options; activations at this resolution) and the free device
        memory; without an estimate (a checkpoint with no config fvg knows and none on disk yet) each
        stage decides when it first runs, from its loaded weights."""
        from fvg.memory import estimate, stage_modes

        try:
            est = estimate(self.preset, self.dtype, storage=self.storage, vae_tiling=self.vae_tiling)
        except FvgError:
            return
        free, _total = torch.cuda.mem_get_info(torch.device(self.device))
        modes, together = stage_modes(est, free)
        self.residency.modes.update(modes)
        self.residency.keep_resident = together

    @property
    def cpu_offload(self) -> bool:
        return self.memory == "model-offload"

    @classmethod
    def from_preset(cls, name: str = DEFAULT_PRESET, *, device: str | None = None, dtype: str | torch.dtype | None = None,
                    cpu_offload: bool = False, vae_tiling: bool | None = None, planner_options: dict | None = None,
                    memory: str = "auto", storage: WeightStorage | None = None,
                    attention_backend: str | None = None, compile: bool = False, cache: str = "none",
                    context_parallel: int = 1, context_parallel_mode: str = "ulysses",
                    **overrides) -> "FactorizedPipeline":
        """`overrides` are preset fields (video_model, lora, height, num_frames, planner, ...)."""
        from fvg.animate.lora import check_lora_file

        preset = get_preset(name, **overrides)
        get_family(preset.family).check_shape(preset.height, preset.width, preset.num_frames)
        if not 1 <= preset.fps <= 240:
            raise FvgError(f"fps must be from 1 to 240, got {preset.fps}")
        # Beyond every published model's size and any one GPU: a typo, refused before anything loads.
        if max(preset.height, preset.width) > MAX_SIDE or preset.num_frames > MAX_FRAMES:
            raise FvgError(f"{preset.height}x{preset.width}x{preset.num_frames} is too large: at most {MAX_SIDE} "
                           f"pixels a side and {MAX_FRAMES} frames")
        experts = count_experts(preset.video_model)  # the LoRA choice fails here, before any model loads
        if experts is not None:
            preset = replace(preset, lora_2=resolve_lora_2(preset.lora, preset.lora_2, experts == 2))
        for lora in dict.fromkeys(filter(None, (preset.lora, preset.lora_2))):
            check_lora_file(lora)
        return cls(preset, device, dtype, cpu_offload, vae_tiling, planner_options, memory, storage,
                   attention_backend, compile, cache, context_parallel, context_parallel_mode)

    # -- stages, each usable alone -------------------------------------------------------------

    @property
    def planner(self):
        if self._planner is None:
            options = {"model": self.preset.planner_model, **self.planner_options}
            self._planner = make_planner(self.preset.planner, **options)
        return self._planner

    @property
    def anchor_source(self) -> DiffusersAnchorSource:
        if self._anchor_source is None:
            p = self.preset
            if p.anchor_model is None:
                raise FvgError(f"preset '{p.name}' has no text-to-image model: pass an anchor image")
            kwargs = dict(steps=p.anchor_steps, guidance_scale=p.anchor_guidance, native_area=p.anchor_area)
            if p.anchor_model == "builtin:tiny-qwen-image":
                from fvg.tiny import tiny_qwen_image_pipeline

                refuse_for_builtin(self.storage.for_anchor(), p.anchor_model)
                pipe = tiny_qwen_image_pipeline()
                if self.storage.weights == "fp8":
                    store_denoisers_in_fp8(pipe)
                self._anchor_source = DiffusersAnchorSource(pipe, model_id=p.anchor_model, **kwargs)
            else:  # loaded on the host: `make_anchor` places it for the anchor stage only
                self._anchor_source = DiffusersAnchorSource.from_pretrained(
                    p.anchor_model, dtype=self.dtype, device="cpu", storage=self.storage.for_anchor(), **kwargs)
            # a one-frame video model (`mini`'s anchor model) is batched as the video model is; a text-to-image
            # pipeline (Qwen-Image, FLUX, ...) guides as its own code does
            if p.batch_guidance and self._anchor_source.style is VIDEO_STYLE:
                source = self._anchor_source
                pipe, call_kwargs = family_of(source.pipe).guidance_batching(source.pipe)
                self._anchor_source = DiffusersAnchorSource(pipe, model_id=source.model_id, call_kwargs=call_kwargs,
                                                            **kwargs)
            if self.speed.context_parallel > 1:  # the anchor model splits too where diffusers can (else it runs whole)
                self._anchor_split = split_anchor_model(self._anchor_source.pipe, self.speed.context_parallel)
            if p.compact_text:  # `mini`'s anchor model is a one-frame Wan
                family_of(self._anchor_source.pipe).compact_text_padding(self._anchor_source.pipe)
            if p.cpu_vae_kernels:
                CpuVaeKernels(self._anchor_source.pipe.vae)
        return self._anchor_source

    @property
    def video_pipe(self):
        if self._video_pipe is None:
            p = self.preset
            pipe = self.family.load_pipeline(p.video_model, self.dtype, p.flow_shift, storage=self.storage)
            two_experts = getattr(pipe, "transformer_2", None) is not None
            self.preset = p = replace(p, lora_2=resolve_lora_2(p.lora, p.lora_2, two_experts))
            _load_loras_explained(pipe, p.lora, p.lora_2, p.video_model)
            if self.storage.weights == "fp8":  # after the LoRA (kept in the run dtype), before any offload hook
                store_denoisers_in_fp8(pipe, self.dtype)
            pipe.set_progress_bar_config(disable=True)
            if self.vae_tiling:
                pipe.vae.enable_tiling()
            if self.speed.context_parallel > 1:  # a shape the ranks cannot split fails before any compute
                self.family.check_context_parallel(pipe, p.height, p.width, p.num_frames,
                                                   self.speed.context_parallel, self.speed.context_parallel_mode)
            self._speed = apply_speed(pipe, self.speed, self.family)  # after the anchored pipeline swapped classes
            if p.compact_text:  # after apply_speed: it checks the attention backend apply_speed set
                self.family.compact_text_padding(pipe)
            if p.cpu_vae_kernels:
                CpuVaeKernels(pipe.vae)
            self._video_pipe = pipe  # on the host until the animate stage places it
        return self._video_pipe

    def load(self, mode: str = "factorized", anchor_model: bool = True) -> "FactorizedPipeline":
        """Load what `mode` needs now, on the host, so a missing checkpoint fails before any compute
        is spent; nothing is placed on the device until its stage runs."""
        validate_mode(mode)
        if mode != "t2v":
            self.planner
        if mode == "factorized" and anchor_model:
            self.anchor_source
        self.video_pipe
        return self

    def plan(self, prompt: str) -> Plan:
        planner = self.planner
        if hasattr(planner, "loaded_model") and not planner.cached(prompt):  # a local LLM computes
            self.residency.enter("plan", planner)
        return planner.plan(prompt)

    def make_anchor(self, caption: str, seed: int = 0, num_candidates: int = 1, selected: int = 0,
                    progress: ProgressFn | None = None) -> AnchorResult:
        p = self.preset
        report = (lambda i, n: progress("anchor", i, n)) if progress else None
        source = self.anchor_source
        self.residency.enter("anchor", source.pipe)
        return source(caption, p.height, p.width, num_candidates, seed, selected, progress=report)

    def anchor_from_image(self, image: str | Path | Image.Image) -> AnchorResult:
        if isinstance(image, Image.Image):
            from fvg.anchor import AnchorCandidate

            check_image_size(image.width, image.height)
            fitted = fit_to_resolution(to_rgb(image), self.preset.height, self.preset.width)
            return AnchorResult([AnchorCandidate(fitted, None)], source="file", model="<image>")
        return FileAnchorSource()(image, self.preset.height, self.preset.width)

    def animate(self, prompt: str, anchor: Image.Image | None, seed: int, steps: int,
                guidance_scale: float | None = None, progress: ProgressFn | None = None) -> np.ndarray:
        p = self.preset
        pipe = self.video_pipe
        if self.speed.context_parallel > 1:  # every rank animates rank 0's prompt and anchor: a sampled plan or a
            prompt, anchor = broadcast_from_main((prompt, anchor))  # GPU kernel may differ per rank, chunks must not
        self.residency.enter("animate", pipe)
        callback = None
        if progress is not None:
            def callback(_pipe, i, _t, kwargs):
                progress("animate", i + 1, _pipe.num_timesteps)  # fewer than `steps` from a still start
                return {}
        # The anchor LoRA serves the anchored mode; the baselines are the plain base model, as in the paper.
        set_anchor_lora(pipe, anchor is not None, fuse=self._fuses_lora())
        kwargs = self.family.call_arguments(pipe, p, anchored=anchor is not None)
        cache_key = MagCacheKey(p.video_model, (p.lora, p.lora_2), anchor is not None, steps,
                                kwargs.get("still_strength"))
        with self._speed.sampling(cache_key):
            result = pipe(
                prompt=prompt, negative_prompt=p.negative_prompt or None, anchor=anchor,
                height=p.height, width=p.width, num_frames=p.num_frames, num_inference_steps=steps,
                guidance_scale=p.guidance_scale if guidance_scale is None else guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                callback_on_step_end=callback, **kwargs,
            )
        return to_uint8(result.frames[0])

    def check_still_start(self, mode: str, steps: int | None) -> None:
        """A still start runs the last int(steps * still_strength) steps of a factorized video: refuse none
        (the CLI calls it before any model loads)."""
        steps = self.preset.steps_for(mode) if steps is None else steps
        still = self.preset.still_strength
        if mode == "factorized" and still is not None and int(steps * still) == 0:
            raise FvgError(f"still_strength {still} leaves none of {steps} steps to run: raise it or the steps")

    def _fuses_lora(self) -> bool:
        """The preset's `fuse_lora`, where merging is safe: native weights (not fp8-stored, quantized or
        GGUF, which a merge would corrupt or cannot take) and a video model placed whole (group offloading
        streams copies of the weights that a merge would not reach)."""
        return (self.preset.fuse_lora and self.storage.is_default
                and self.residency.modes.get("animate") in ("gpu", "model-offload"))

    # -- the whole method ----------------------------------------------------------------------

    def __call__(self, prompt: str, mode: str = "factorized", seed: int = 0, steps: int | None = None,
                 anchor_image: str | Path | Image.Image | AnchorResult | None = None, num_candidates: int = 1,
                 selected: int = 0, guidance_scale: float | None = None, plan: Plan | None = None,
                 progress: ProgressFn | None = None) -> FactorizedOutput:
        validate_mode(mode)
        if not isinstance(prompt, str) or not prompt.strip():
            raise FvgError("prompt is empty")
        prompt = prompt.strip()
        if anchor_image is not None and mode != "factorized":
            raise FvgError(f"an anchor image only applies to mode 'factorized', not '{mode}'")
        validate_call(seed, num_candidates, selected, steps, guidance_scale)
        steps = self.preset.steps_for(mode) if steps is None else steps
        self.check_still_start(mode, steps)
        timings: dict[str, float] = {}
        warnings: list[str] = []

        anchor = None
        if mode != "t2v" and anchor_image is None and plan is None:
            start = time.perf_counter()
            plan = self.plan(prompt)
            timings["plan"] = time.perf_counter() - start
            if progress:
                progress("plan", 1, 1)
        if plan is not None:
            warnings += plan.warnings
        if mode == "factorized":
            start = time.perf_counter()
            if isinstance(anchor_image, AnchorResult):  # chosen earlier, e.g. among candidates in the studio
                anchor = anchor_image
                if anchor.image.size != (self.preset.width, self.preset.height):
                    raise FvgError(f"the anchor is {anchor.image.width}x{anchor.image.height} but preset "
                                   f"'{self.preset.name}' makes {self.preset.width}x{self.preset.height} videos: "
                                   "generate or upload it again")
            elif anchor_image is not None:
                anchor = self.anchor_from_image(anchor_image)
            else:
                anchor = self.make_anchor(plan.first_frame_caption, seed, num_candidates, selected, progress)
            timings["anchor"] = time.perf_counter() - start
            if self.preset.needs_lora and not self.preset.lora:
                warnings.append(f"{self.preset.video_model} is a text-to-video model that was not trained to "
                                "respect an anchor: load an anchor LoRA (lora=..., see `fvg train`)")

        video_prompt = plan.upsampled_prompt if mode == "upsampled" else prompt
        start = time.perf_counter()
        frames = self.animate(video_prompt, anchor.image if anchor else None, seed, steps, guidance_scale, progress)
        timings["animate"] = time.perf_counter() - start
        timings["total"] = sum(timings.values())
        settings = {
            "preset": self.preset.name, **asdict(self.preset),
            "guidance_scale": self.preset.guidance_scale if guidance_scale is None else guidance_scale,
            "device": self.device, "dtype": str(self.dtype).removeprefix("torch."),
            "memory": self.memory, "memory_modes": dict(self.residency.modes), "vae_tiling": self.vae_tiling,
            "weights": self.storage.record(),
            "lora_fused": bool(anchor is not None and self.preset.lora and self._fuses_lora()),
            **self.speed.settings(),
        }
        if self.speed.context_parallel > 1 and anchor is not None and anchor.source != "file":
            settings["context_parallel"]["anchor_split"] = self._anchor_split
        if self.speed.cache == "magcache":  # "measured" (this video ran uncached) or the ratio file used
            settings["cache_calibration"] = self._speed.last_calibration
        return FactorizedOutput(frames, mode, prompt, video_prompt, seed, steps, self.preset.fps, plan, anchor,
                                timings, settings, warnings)
