"""The studio's Gradio UI: layout (`StudioPage`), callbacks (`Handlers`, each one `StudioSession`
call) and the events joining them (`_wire`); `build_app` assembles them, `serve` starts the server.

Per-tab drafts (the plan and the anchor candidates) live in `gr.State`; all events that touch
a pipeline share one queue slot (`concurrency_id="pipeline"`), so runs never interleave.
"""

import atexit
import contextlib
import functools
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: no calls home

import gradio as gr  # noqa: E402

from fvg.io import FvgError  # noqa: E402
from fvg.presets import MODES  # noqa: E402
from fvg.studio.session import (HISTORY_COLUMNS, MAX_CANDIDATES, StudioSession, sampling_defaults,  # noqa: E402
                                studio_presets)

log = logging.getLogger("fvg.studio")
HEAVY = dict(concurrency_id="pipeline", concurrency_limit=1)
MAX_UPLOAD = "50mb"  # per file; Gradio answers HTTP 413 beyond it
MAX_TEMP_FILES = 200  # uploads and rendered media kept in the studio's temp folder, oldest dropped first
MAX_TEMP_BYTES = 2 * 2**30
MAX_QUEUE = 32  # requests waiting for the pipeline; more are refused ("queue full") instead of piling up


class TempFolder:
    """The studio's own Gradio temp folder (uploads, gallery images, videos sent to the browser).

    Gradio's default folder is shared and never emptied: ten anonymous 40 MB uploads stayed after
    shutdown. This one is trimmed to MAX_TEMP_FILES / MAX_TEMP_BYTES while serving (anonymous
    uploads that no callback used count too) and removed when the studio stops or Python exits.
    """

    def __init__(self, every_s: float = 10.0):
        self.path = Path(tempfile.mkdtemp(prefix="fvg-studio-"))
        self._stop = threading.Event()
        atexit.register(self.remove)
        threading.Thread(target=self._trim_loop, args=(every_s,), daemon=True, name="fvg-studio-temp").start()

    def _trim_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.trim()

    def trim(self) -> int:
        """Delete the oldest files beyond the caps; returns how many went."""
        files = []
        for path in self.path.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    stat = path.stat()
                    files.append((stat.st_mtime, stat.st_size, path))
        files.sort()
        count, size, removed = len(files), sum(f[1] for f in files), 0
        for _, nbytes, path in files:
            if count <= MAX_TEMP_FILES and size <= MAX_TEMP_BYTES:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
            count, size = count - 1, size - nbytes
        return removed

    def holds(self, path: str | Path) -> bool:
        return Path(path).resolve().is_relative_to(self.path.resolve())

    def remove(self) -> None:
        self._stop.set()
        shutil.rmtree(self.path, ignore_errors=True)


def _friendly(fn):
    """Show errors as one readable line in the UI, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except FvgError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            log.exception("studio callback failed")
            raise gr.Error(f"unexpected error ({type(exc).__name__}): {exc}", print_exception=False) from None
    return wrapper


def _reporter(progress: gr.Progress):
    return lambda stage, step, total: progress((step, total), desc=f"{stage} {step}/{total}", unit="steps")


def _gallery(anchor) -> list:
    return [(c.image, f"#{i}" + ("" if c.seed is None else f" seed {c.seed}")) for i, c in enumerate(anchor.candidates)]


def _warnings(items) -> str:
    return "".join(f"\n- warning: {w}" for w in dict.fromkeys(items))


class Handlers:
    """The page's callbacks: each turns widget values into one `StudioSession` call and its result
    back into widget values (in the order of the `outputs` they are wired to in `_wire`)."""

    def __init__(self, session: StudioSession, temp: TempFolder | None = None):
        self.session, self.temp = session, temp

    @_friendly
    def plan(self, prompt, preset):
        plan = self.session.plan(prompt, preset)
        note = f"Planned with **{plan.backend}**" + (f" ({plan.model})" if plan.model else "") + "."
        return plan.first_frame_caption, plan.upsampled_prompt, note + _warnings(plan.warnings), plan

    @_friendly
    def candidates(self, prompt, caption, preset, num, anchor_seed, plan, progress=gr.Progress()):
        note = ""
        if not (caption or "").strip():
            plan = self.session.plan_for(prompt, preset, plan)
            caption, note = plan.first_frame_caption, f"Planned with **{plan.backend}**. "
        anchor = self.session.candidates(caption, preset, int(num), int(anchor_seed or 0), _reporter(progress))
        note += f"{len(anchor.candidates)} candidates from seed {int(anchor_seed or 0)}: click one to choose it."
        return (_gallery(anchor), 0, anchor.image, anchor, plan, caption,
                plan.upsampled_prompt if plan else gr.skip(), note)

    @_friendly
    def regenerate(self, prompt, caption, preset, num, anchor_seed, plan, progress=gr.Progress()):
        new_seed = int(anchor_seed or 0) + int(num)
        return (*self.candidates(prompt, caption, preset, num, new_seed, plan, progress), new_seed)

    @_friendly
    def upload(self, path, preset):
        try:
            anchor = self.session.upload(path, preset)
        finally:  # the image is in memory now (or refused): its upload copy is not needed any more
            if path and self.temp is not None and self.temp.holds(path):
                Path(path).unlink(missing_ok=True)
        return _gallery(anchor), 0, anchor.image, anchor, f"Using your image `{Path(path).name}` as the anchor."

    @_friendly
    def select(self, anchor, evt: gr.SelectData):
        anchor = self.session.pick(anchor, evt.index)
        return evt.index, anchor.image, anchor

    @_friendly
    def pick(self, index, anchor):
        anchor = self.session.pick(anchor, index)
        return anchor.image, anchor, f"Chose candidate #{anchor.selected}."

    @_friendly
    def animate(self, prompt, caption, upsampled, preset, mode, seed, steps, guidance, compare, selected, plan,
                anchor, progress=gr.Progress()):
        run = self.session.run(prompt, preset, mode, int(seed or 0), steps, guidance, plan, caption, upsampled,
                               anchor, int(selected or 0), bool(compare), _reporter(progress))
        out = run.output
        note = (f"Saved **{out.mode}** run to `{run.out_dir}` ({run.seconds:.1f} s, {out.frames.shape[0]} frames "
                f"of {out.frames.shape[2]}x{out.frames.shape[1]}, {out.steps} steps)." + _warnings(out.warnings))
        if out.settings.get("output_is_noise"):
            note += f"\n- note: preset '{out.settings['preset']}' has random weights: its output is noise"
        return (str(run.video), None if run.compare_video is None else str(run.compare_video),
                [str(p) for p in run.files], note, self.session.history_rows(),
                out.anchor.image if out.anchor else gr.skip())

    def preset_changed(self, preset, mode):
        return ([], None, None, *sampling_defaults(preset, mode),
                "Preset changed: generate the anchor candidates again (or upload an image).")

    def mode_changed(self, preset, mode):
        return sampling_defaults(preset, mode)[0]

    def history(self):
        return self.session.history_rows()


class StudioPage:
    """The page's components, created top to bottom; build it inside a `gr.Blocks` context.

    `elem_id`s are what the browser test and the screenshot address, so they stay stable."""

    def __init__(self, session: StudioSession):
        self.plan_state, self.anchor_state = gr.State(None), gr.State(None)  # per-tab drafts
        gr.Markdown("## fvg studio\nPlan the first frame, choose the anchor, animate. "
                    "Each run is saved under `" + str(session.out_root) + "`.")
        with gr.Row():
            with gr.Column(scale=3):
                self._text_inputs()
            with gr.Column(scale=2):
                self._settings(session.default_preset)
        with gr.Row():
            self._anchor_panel()
        self._results()

    def _text_inputs(self) -> None:
        self.prompt = gr.Textbox(label="Prompt", lines=1, max_lines=4, elem_id="prompt",
                                 placeholder="a red ball rolls left and knocks over a blue cup")
        self.plan_btn = gr.Button("1. Plan the first frame", elem_id="plan-btn")
        self.caption = gr.Textbox(label="First-frame caption", lines=3, elem_id="caption",
                                  info="The scene before anything moves; edit it freely, it renders the anchor.")
        self.upsampled = gr.Textbox(label="Upsampled prompt", lines=2, elem_id="upsampled",
                                    info="The detailed video prompt that mode 'upsampled' animates.")

    def _settings(self, preset: str) -> None:
        steps, guidance = sampling_defaults(preset, "factorized")
        self.preset = gr.Dropdown(studio_presets(), value=preset, label="Preset", elem_id="preset")
        self.mode = gr.Radio(list(MODES), value="factorized", label="Mode", elem_id="mode")
        with gr.Row():
            self.seed = gr.Number(0, precision=0, minimum=0, label="Video seed", elem_id="seed")
            self.steps = gr.Number(steps, precision=0, minimum=1, label="Steps", elem_id="steps")
            self.guidance = gr.Number(guidance, minimum=0, label="Guidance", elem_id="guidance")
        self.compare = gr.Checkbox(False, label="Also render plain T2V (same seed, steps, guidance) to compare",
                                   elem_id="compare")

    def _anchor_panel(self) -> None:
        with gr.Column(scale=3):
            self.gallery = gr.Gallery(label="Anchor candidates (click one to choose it)", columns=4, height=280,
                                      allow_preview=False, object_fit="contain", interactive=False,
                                      elem_id="gallery")
            with gr.Row():
                self.num = gr.Slider(1, MAX_CANDIDATES, value=4, step=1, label="Candidates", elem_id="num")
                self.anchor_seed = gr.Number(0, precision=0, minimum=0, label="Anchor seed", elem_id="anchor-seed")
            with gr.Row():
                self.gen_btn = gr.Button("2. Generate candidates", elem_id="gen-btn")
                self.regen_btn = gr.Button("Regenerate (new seeds)", elem_id="regen-btn")
                self.upload_btn = gr.UploadButton("Upload my own image", elem_id="upload-btn",
                                                  file_types=[".png", ".jpg", ".jpeg", ".webp"])
        with gr.Column(scale=2):
            self.chosen = gr.Image(label="Chosen anchor", interactive=False, height=240, elem_id="chosen")
            self.selected = gr.Number(0, precision=0, minimum=0, label="Chosen candidate #", elem_id="selected")

    def _results(self) -> None:
        self.animate_btn = gr.Button("3. Animate", variant="primary", elem_id="animate-btn")
        self.status = gr.Markdown(label="Status", elem_id="status")
        with gr.Row():
            self.video = gr.Video(label="Video", autoplay=True, loop=True, interactive=False, height=360,
                                  elem_id="video")
            self.compare_video = gr.Video(label="Plain T2V, same seed", autoplay=True, loop=True, interactive=False,
                                          height=360, visible=False, elem_id="compare-video")
        self.downloads = gr.File(label="Download: video, anchor, plan, run record", file_count="multiple",
                                 interactive=False, elem_id="downloads")
        self.history = gr.Dataframe(headers=HISTORY_COLUMNS, label="Runs since the studio started",
                                    interactive=False, wrap=True, elem_id="history")


def _wire(page: StudioPage, on: Handlers, demo: gr.Blocks) -> None:
    """Connect the page's events to the handlers. Named endpoints (`api_name`) are the public API
    (docs/studio.md); everything that touches a pipeline shares the one HEAVY queue slot."""
    p = page
    plan_io = dict(fn=on.plan, inputs=[p.prompt, p.preset], outputs=[p.caption, p.upsampled, p.status, p.plan_state],
                   **HEAVY)
    p.plan_btn.click(**plan_io, api_name="plan")
    p.prompt.submit(**plan_io, api_visibility="private")
    candidate_inputs = [p.prompt, p.caption, p.preset, p.num, p.anchor_seed, p.plan_state]
    candidate_outputs = [p.gallery, p.selected, p.chosen, p.anchor_state, p.plan_state, p.caption, p.upsampled,
                         p.status]
    p.gen_btn.click(on.candidates, candidate_inputs, candidate_outputs, api_name="candidates", **HEAVY)
    p.regen_btn.click(on.regenerate, candidate_inputs, candidate_outputs + [p.anchor_seed], api_name="regenerate",
                      **HEAVY)
    p.upload_btn.upload(on.upload, [p.upload_btn, p.preset], [p.gallery, p.selected, p.chosen, p.anchor_state,
                                                              p.status], api_name="upload", **HEAVY)
    p.gallery.select(on.select, [p.anchor_state], [p.selected, p.chosen, p.anchor_state], api_visibility="private")
    p.selected.input(on.pick, [p.selected, p.anchor_state], [p.chosen, p.anchor_state, p.status], api_name="pick")
    p.preset.change(on.preset_changed, [p.preset, p.mode],
                    [p.gallery, p.chosen, p.anchor_state, p.steps, p.guidance, p.status], api_visibility="private")
    p.mode.change(on.mode_changed, [p.preset, p.mode], [p.steps], api_visibility="private")
    p.compare.change(lambda c: gr.Video(visible=c), [p.compare], [p.compare_video], api_visibility="private")
    p.animate_btn.click(on.animate, [p.prompt, p.caption, p.upsampled, p.preset, p.mode, p.seed, p.steps, p.guidance,
                                     p.compare, p.selected, p.plan_state, p.anchor_state],
                        [p.video, p.compare_video, p.downloads, p.status, p.history, p.chosen], api_name="animate",
                        **HEAVY)
    demo.load(on.history, None, [p.history], api_visibility="private")


def build_app(session: StudioSession, temp: TempFolder | None = None) -> gr.Blocks:
    """The studio page: layout (`StudioPage`), callbacks (`Handlers`) and the events joining them (`_wire`)."""
    with gr.Blocks(title="fvg studio", analytics_enabled=False) as demo:
        _wire(StudioPage(session), Handlers(session, temp), demo)
    return demo


def serve(session: StudioSession, host: str = "127.0.0.1", port: int = 7860,
          auth: tuple[str, str] | None = None) -> gr.Blocks:
    """Build the app, queue it (one pipeline job at a time, at most MAX_QUEUE waiting) and start the
    server in a background thread; `demo.block_thread()` waits for Ctrl+C, `demo.close()` stops it
    and removes the studio's temp folder. `auth` = (user, password) puts a login page in front."""
    temp = TempFolder()
    previous = os.environ.get("GRADIO_TEMP_DIR")
    # Read by every component, the upload route and its checks, while serving: set until close().
    os.environ["GRADIO_TEMP_DIR"] = str(temp.path)

    def restore_environment():
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous

    try:
        demo = build_app(session, temp)
        demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
        session.out_root.mkdir(parents=True, exist_ok=True)
        demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, show_error=True,
                    allowed_paths=[str(session.out_root.resolve())], max_file_size=MAX_UPLOAD, ssr_mode=False,
                    auth=auth)
    except OSError as exc:
        temp.remove()
        restore_environment()
        reason = str(exc).split(". ")[0]
        raise FvgError(f"cannot start the studio on {host}:{port}: {reason} (choose another --port)") from None
    close = demo.close

    def close_and_clean(*args, **kwargs):
        try:
            return close(*args, **kwargs)
        finally:
            temp.remove()
            restore_environment()

    demo.close, demo.fvg_temp = close_and_clean, temp
    return demo
