"""The studio's controller: plain Python over the `FactorizedPipeline` API, no Gradio.

Each Gradio callback calls one method here, so the whole loop (plan -> candidates -> pick
-> animate) is testable without a browser. A `StudioSession` is shared by every browser tab:
it caches one pipeline per preset, serialises pipeline use with a lock, saves each run as a
normal run folder under `out_root` and keeps the history of runs since it started. What a
user has drafted so far (plan, candidates) is passed in and out, never stored here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fvg.anchor import AnchorResult
from fvg.io import FvgError, run_name
from fvg.pipeline import FactorizedOutput, FactorizedPipeline, ProgressFn, validate_seed
from fvg.plan import Plan
from fvg.presets import DEFAULT_PRESET, PRESETS, get_preset, validate_mode

DEFAULT_OUT = Path("outputs") / "studio"
MAX_CANDIDATES = 8
# Every request's work is bounded, so one visitor cannot hold the shared pipeline for long:
MAX_PROMPT_CHARS = 2000  # prompts and captions (real ones are under 300)
MAX_STEPS = 200  # denoising steps per video
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # one request may hold the pipeline this long; the others wait behind it
HISTORY_COLUMNS = ["time", "prompt", "mode", "preset", "seed", "steps", "seconds", "folder"]


def default_preset() -> str:
    return DEFAULT_PRESET


def studio_presets() -> list[str]:
    return list(PRESETS)


def sampling_defaults(preset: str, mode: str) -> tuple[int, float]:
    """The preset's steps for `mode` and its guidance scale: what the UI shows before any edit."""
    p = get_preset(preset)
    return p.steps_for(mode), p.guidance_scale


def _prompt(prompt: str | None, what: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise FvgError("type a prompt first")
    return _bounded(prompt.strip(), what)


def _bounded(text: str, what: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        raise FvgError(f"the {what} is {len(text)} characters long: the studio takes at most {MAX_PROMPT_CHARS}")
    return text


@dataclass
class StudioRun:
    """One finished run: its folder (a normal `FactorizedOutput.save` layout) and outputs."""

    out_dir: Path
    output: FactorizedOutput
    compare: FactorizedOutput | None  # plain T2V with the same seed, saved in out_dir/t2v/
    preset: str
    created: _dt.datetime
    seconds: float

    @property
    def video(self) -> Path:
        return self.out_dir / "video.mp4"

    @property
    def compare_video(self) -> Path | None:
        return None if self.compare is None else self.out_dir / "t2v" / "video.mp4"

    @property
    def files(self) -> list[Path]:
        """What the UI offers for download: video, anchor, plan and run record (those that exist)."""
        names = ["video.mp4", "anchor.png", "plan.json", "run.json"]
        return [self.out_dir / n for n in names if (self.out_dir / n).is_file()]

    def row(self) -> list:
        o = self.output
        return [f"{self.created:%H:%M:%S}", o.prompt, o.mode + (" + t2v" if self.compare else ""), self.preset,
                o.seed, o.steps, round(self.seconds, 1), str(self.out_dir)]


def with_deadline(progress: ProgressFn | None, seconds: float | None) -> ProgressFn | None:
    """`progress` that also stops the request once it has run `seconds`: the pipeline reports every
    denoising step and every anchor candidate, so a request ends within one step of its limit and
    frees the studio's one pipeline slot for the requests waiting behind it."""
    if seconds is None:
        return progress
    deadline = time.monotonic() + seconds

    def report(stage: str, step: int, total: int) -> None:
        if time.monotonic() > deadline:
            raise FvgError(f"the request ran longer than the studio's limit of {seconds:g} s and was stopped "
                           "(fewer steps or candidates, or a larger --request-timeout)")
        if progress is not None:
            progress(stage, step, total)
    return report


class StudioSession:
    """One studio's pipelines, runs and history. `request_timeout_s` bounds each pipeline request
    (candidates or a run, compare video included); None: no limit."""

    def __init__(self, out_root: str | Path = DEFAULT_OUT, preset: str | None = None,
                 pipeline_factory: Callable[[str], FactorizedPipeline] = FactorizedPipeline.from_preset,
                 request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S):
        if request_timeout_s is not None and not (math.isfinite(request_timeout_s) and request_timeout_s > 0):
            raise FvgError(f"--request-timeout must be a positive number of seconds, got {request_timeout_s}")
        self.request_timeout_s = request_timeout_s
        self.out_root = Path(out_root)
        self.default_preset = preset or default_preset()
        get_preset(self.default_preset)  # FvgError for an unknown preset
        self._factory = pipeline_factory
        self._pipelines: dict[str, FactorizedPipeline] = {}
        self._lock = threading.RLock()  # the models are not thread-safe: one stage at a time
        self.history: list[StudioRun] = []

    def pipeline(self, preset: str | None = None) -> FactorizedPipeline:
        preset = preset or self.default_preset
        with self._lock:
            if preset not in self._pipelines:
                self._pipelines[preset] = self._factory(preset)
            return self._pipelines[preset]

    # -- stage 1 -----------------------------------------------------------------------------

    def plan(self, prompt: str, preset: str | None = None) -> Plan:
        prompt = _prompt(prompt)
        with self._lock:
            return self.pipeline(preset).plan(prompt)

    def plan_for(self, prompt: str, preset: str | None, plan: Plan | None) -> Plan:
        """`plan` if it was made for this prompt, else a new plan."""
        if plan is not None and plan.prompt == _prompt(prompt):
            return plan
        return self.plan(prompt, preset)

    # -- stage 2 -----------------------------------------------------------------------------

    def candidates(self, caption: str, preset: str | None = None, num_candidates: int = 4, seed: int = 0,
                   progress: ProgressFn | None = None) -> AnchorResult:
        if not isinstance(caption, str) or not caption.strip():
            raise FvgError("the first-frame caption is empty: plan the prompt or write a caption")
        if not 1 <= int(num_candidates) <= MAX_CANDIDATES:
            raise FvgError(f"render between 1 and {MAX_CANDIDATES} candidates, not {num_candidates}")
        _bounded(caption.strip(), "first-frame caption")
        validate_seed(int(seed) + int(num_candidates) - 1, "anchor seed + candidates - 1")
        validate_seed(int(seed), "anchor seed")
        with self._lock:
            return self.pipeline(preset).make_anchor(caption.strip(), int(seed), int(num_candidates), 0,
                                                     with_deadline(progress, self.request_timeout_s))

    def upload(self, path: str | Path | None, preset: str | None = None) -> AnchorResult:
        """The user's own first frame, validated (PNG, JPEG or WebP) and fitted to the video size."""
        if not path:
            raise FvgError("no image was uploaded")
        path = Path(path)
        with self._lock:
            try:
                return self.pipeline(preset).anchor_from_image(path)
            except FvgError as exc:  # name the file as the user knows it, not by its upload path
                raise FvgError(str(exc).replace(str(path), path.name)) from None

    def pick(self, anchor: AnchorResult | None, index: int) -> AnchorResult:
        if anchor is None:
            raise FvgError("no anchor candidates yet: generate some or upload an image")
        index = int(index)
        if not 0 <= index < len(anchor.candidates):
            raise FvgError(f"candidate {index} does not exist: choose 0 to {len(anchor.candidates) - 1}")
        return dataclasses.replace(anchor, selected=index)

    # -- stage 3 -----------------------------------------------------------------------------

    def run(self, prompt: str, preset: str | None = None, mode: str = "factorized", seed: int = 0,
            steps: int | None = None, guidance: float | None = None, plan: Plan | None = None,
            caption: str | None = None, upsampled: str | None = None, anchor: AnchorResult | None = None,
            selected: int | None = None, compare: bool = False, progress: ProgressFn | None = None) -> StudioRun:
        """Animate and save one run. Missing earlier stages run here: no plan -> plan the prompt,
        no anchor (mode factorized) -> render one from the caption. `caption` and `upsampled`
        replace the planner's text when given (edits are recorded in run.json under settings.studio)."""
        prompt = _prompt(prompt)
        preset = preset or self.default_preset
        validate_mode(mode)
        steps = None if steps is None else int(steps)
        if steps is not None and steps > MAX_STEPS:
            raise FvgError(f"the studio runs at most {MAX_STEPS} steps, not {steps}")
        for text, what in ((caption, "first-frame caption"), (upsampled, "upsampled prompt")):
            _bounded((text or "").strip(), what)
        guidance = None if guidance is None else float(guidance)
        seed = int(seed)
        with self._lock:
            start = time.perf_counter()
            progress = with_deadline(progress, self.request_timeout_s)  # one limit for the run and its compare video
            pipe = self.pipeline(preset)
            used_plan, studio = None, {}
            if mode != "t2v":
                planned = self.plan_for(prompt, preset, plan)
                edits = {"first_frame_caption": (caption or "").strip() or planned.first_frame_caption,
                         "upsampled_prompt": (upsampled or "").strip() or planned.upsampled_prompt}
                if mode == "factorized" and anchor is not None and anchor.caption:
                    edits["first_frame_caption"] = anchor.caption  # the caption that rendered this anchor
                used_plan = dataclasses.replace(planned, **edits)
                studio = {f"{k}_edited": edits[k] != getattr(planned, k) for k in edits}
                studio.update({f"planner_{k}": getattr(planned, k) for k in edits if studio[f"{k}_edited"]})
            call = dict(mode=mode, seed=seed, steps=steps, guidance_scale=guidance, plan=used_plan,
                        progress=progress)
            if mode == "factorized" and anchor is not None:
                chosen = self.pick(anchor, anchor.selected if selected is None else selected)
                output = pipe(prompt, anchor_image=chosen, **call)  # the record keeps every candidate
            else:
                output = pipe(prompt, **call)
            if studio:
                output.settings["studio"] = studio
            compare_output = None
            if compare and mode != "t2v":
                report = (lambda stage, i, n: progress(f"t2v {stage}", i, n)) if progress else None
                compare_output = pipe(prompt, mode="t2v", seed=seed, steps=steps, guidance_scale=guidance,
                                      progress=report)
            out_dir = self._new_run_dir(prompt)
            output.save(out_dir)
            if compare_output is not None:
                compare_output.save(out_dir / "t2v")
            run = StudioRun(out_dir, output, compare_output, preset, _dt.datetime.now(),
                            time.perf_counter() - start)
            self.history.append(run)
            return run

    def history_rows(self) -> list[list]:
        return [run.row() for run in reversed(self.history)]

    def _new_run_dir(self, prompt: str) -> Path:
        base = run_name(prompt)
        self.out_root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            path = self.out_root / (base if n == 1 else f"{base}-{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
        raise FvgError(f"cannot create a run folder under {self.out_root}")
