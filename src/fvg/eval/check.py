"""`fvg eval check OUT`: will the official evaluators read this folder as fvg means it? And their commands.

What the official scripts do with a folder (read from their code; docs/evaluation.md):

- T2V-CompBench lists a category folder (`os.listdir`), sorts it and pairs the i-th file with
  the i-th prompt of its meta_data JSON: a missing video shifts every later one onto the wrong
  prompt and a stray file is scored as a video, silently. Every script resamples a video to 16
  frames (`extract_frames(num_frames=16)`); the spatial and numeracy scripts then cut their
  per-frame rows into videos by 16, so a shorter video misassigns every later row. The scripts
  write `frames/`, `image_grid/` and `video_standard/` beside the category folders and list
  those too: entries left there by an earlier run are scored against the wrong prompts.
- Motion binding's first script extracts `total_frame // fps * 8` frames (`--total_frame`,
  `--fps`): zero for a video shorter than a second.
- VBench 2.0's standard mode lists the dimension folder without recursing, takes the file
  extension from the first entry, and raises on the first missing `<prompt[:180]>-<i>.mp4`
  (i < 20 for Diversity, < 3 otherwise). Human_Identity marks a video with fewer than 20
  judged frames after the first as invalid (-1) and divides by the number of valid videos.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from fvg.io import FvgError
from fvg.presets import MODES

from .generate import read_record
from .suites import VBENCH_DIVERSITY_SAMPLES, VBENCH_NAME_CHARS, VBENCH_SAMPLES, Suite, vbench_video_name

COMPBENCH_FRAMES = 16  # frames every T2V-CompBench script resamples a video to
HUMAN_IDENTITY_FRAMES = 21  # VBench 2.0: frame 0 plus at least 20 judged frames (mini_frame = 20)
DERIVED_FOLDERS = ("frames", "image_grid", "video_standard")  # written beside the category folders
_VIDEO = re.compile(r"^([0-9]{4})\.mp4$")
_SEED_DIR = re.compile(r"^seed([0-9]{1,18})$")

# category -> (meta_data JSON, script path under the tools folder); the run order of the README.
COMPBENCH_SCRIPTS = {
    "consistent_attr": ("consistent_attribute_binding.json", "LLaVA/llava/eval/eval_consistent_attr.py"),
    "dynamic_attr": ("dynamic_attribute_binding.json", "LLaVA/llava/eval/eval_dynamic_attr.py"),
    "action_binding": ("action_binding.json", "LLaVA/llava/eval/eval_action_binding.py"),
    "interaction": ("object_interactions.json", "LLaVA/llava/eval/eval_interaction.py"),
    "spatial_relationship": ("spatial_relationships.json", "Grounded-Segment-Anything/eval_spatial_relationships.py"),
    "numeracy": ("generative_numeracy.json", "Grounded-Segment-Anything/GroundingDINO/demo/eval_numeracy.py"),
    "motion_binding": ("motion_binding.json", "Grounded-Segment-Anything/motion_binding_seg.py"),
}


@dataclass
class CheckReport:
    videos: int = 0  # videos checked
    folders: int = 0  # category/dimension folders checked
    commands: list[str] = field(default_factory=list)  # a shell script, one line each
    notes: list[str] = field(default_factory=list)


class _Problems:
    """Collects every problem, so the one-line error can say how many there are."""

    def __init__(self):
        self.items: list[str] = []

    def add(self, text: str) -> None:
        self.items.append(text)

    def raise_any(self) -> None:
        if self.items:
            more = f" (and {len(self.items) - 1} more problem(s))" if len(self.items) > 1 else ""
            raise FvgError(self.items[0] + more)


def video_info(path: Path) -> tuple[int, float]:
    """(frame count, frames per second) from the MP4's own index, without decoding: the count OpenCV's
    CAP_PROP_FRAME_COUNT, which the official scripts use, reads too."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            rate = float(stream.average_rate or stream.guessed_rate or 0)
    except (av.error.FFmpegError, IndexError, OSError, ValueError) as exc:
        raise FvgError(f"{path} cannot be read as a video ({type(exc).__name__})") from None
    return frames, rate


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _mode_folders(out: Path) -> list[str]:
    modes = [m for m in MODES if (out / m).is_dir()]
    if not modes:
        raise FvgError(f"no video folders in {out} (expected {', '.join(MODES)}: run `fvg eval generate --out {out}`)")
    return modes


def check_compbench_folder(folder: Path, prompts: int, problems: _Problems) -> list[Path]:
    """The category folder's videos if T2V-CompBench would pair them right; problems otherwise."""
    entries = sorted(os.listdir(folder))
    stray = [e for e in entries if not (_VIDEO.fullmatch(e) and (folder / e).is_file())]
    for name in stray:
        problems.add(f"{folder / name}: a stray entry: T2V-CompBench scores every file of the folder in sorted "
                     f"order and pairs it with the prompt at that position; move it out")
    numbers = [int(e[:4]) for e in entries if e not in stray]
    if not numbers:
        problems.add(f"{folder} holds no video (the script would divide by zero)")
        return []
    for position, number in enumerate(numbers, start=1):
        if number != position:
            problems.add(f"{folder}: {position:04d}.mp4 is missing: T2V-CompBench pairs by sorted position, so "
                         f"{number:04d}.mp4 would be scored against prompt {position}; generate it "
                         f"(rerun `fvg eval generate`)")
            break
    if numbers[-1] > prompts:
        problems.add(f"{folder}: {numbers[-1]:04d}.mp4 has no prompt (the category has {prompts})")
    return [folder / f"{n:04d}.mp4" for n in numbers]


def _check_derived(seed_dir: Path, category: str, videos: list[Path], problems: _Problems) -> None:
    stems = {v.stem for v in videos}
    for derived in DERIVED_FOLDERS:
        folder = seed_dir / derived / category
        if not folder.is_dir():
            continue
        stale = sorted(e for e in os.listdir(folder) if e.split(".")[0] not in stems)
        if stale:
            problems.add(f"{folder} holds {stale[0]}, left by an earlier run of the official scripts for a video "
                         f"that is not in {category}/ now: the scripts list that folder and would score it; delete "
                         f"{folder}")


def _check_frames(videos: list[Path], minimum: int, why: str, problems: _Problems) -> dict[Path, tuple[int, float]]:
    info = {}
    for video in videos:
        try:
            info[video] = video_info(video)
        except FvgError as exc:
            problems.add(str(exc))
            continue
        if info[video][0] < minimum:
            problems.add(f"{video} has {info[video][0]} frames; {why} needs at least {minimum}")
    return info


def motion_binding_clock(out: Path, mode: str, seed_dir: Path, info: dict[Path, tuple[int, float]],
                         problems: _Problems) -> tuple[int, int] | None:
    """Motion binding's `--total_frame` and `--fps`: from the run records, checked against the videos."""
    values = set()
    for video, (frames, rate) in info.items():
        run = read_record(out / "records" / mode / seed_dir.name / "motion_binding" / video.stem / "run.json")
        settings = run.get("settings") if run else None
        shape = run.get("frames") if run else None
        if isinstance(settings, dict) and isinstance(settings.get("fps"), int) and isinstance(shape, list) and shape:
            recorded = (shape[0], settings["fps"])
            if recorded != (frames, round(rate)):
                problems.add(f"{video}: its run record says {recorded[0]} frames at {recorded[1]} fps, the video "
                             f"has {frames} at {rate:g}: a stale record or a replaced video")
                return None
            values.add(recorded)
        else:
            values.add((frames, round(rate)))  # no usable record: the video's own numbers
    if len(values) > 1:
        problems.add(f"{seed_dir / 'motion_binding'}: videos differ in frame count or fps ("
                     f"{', '.join(f'{t} frames at {f} fps' for t, f in sorted(values))}); the "
                     f"script takes one --total_frame and --fps")
        return None
    total, fps = values.pop()
    if fps < 1 or total // fps < 1:
        problems.add(f"{seed_dir / 'motion_binding'}: {total} frames at {fps} fps is under one second; motion "
                     f"binding extracts total_frame // fps * 8 frames, which would be 0")
        return None
    return total, fps


def _compbench_commands(category: str, videos: Path, results: Path, model: str, clock) -> list[str]:
    """The official commands for one category of one run (mode and seed), as the scripts' argparse reads them."""
    meta, script = COMPBENCH_SCRIPTS[category]
    meta = f'"$COMPBENCH/meta_data/{meta}"'
    out = results / category
    if category in ("consistent_attr", "dynamic_attr", "action_binding", "interaction"):
        return [f"python {script} --video-path {_q(videos / category)} --output-path {_q(out)} "
                f"--read-prompt-file {meta} --t2v-model {model}"]
    if category == "numeracy":
        return [f"python {script} --video-path {_q(videos / category)} --output-path {_q(out)} "
                f"--read-prompt-file {meta} --t2v-model {model} --output_dir {_q(out / 'boxes')}"]
    if category == "spatial_relationship":
        # eval_spatial_relationships reads depth maps at <depth_folder>/<video>/<frame>, while run_depth writes
        # them to <output_dir>/<t2v_model>/...: the depth folder passed on must include the model name.
        return [f"python Depth-Anything/run_depth.py --video-path {_q(videos / category)} "
                f"--output_dir {_q(out / 'depth')} --read-prompt-file {meta} --t2v-model {model}",
                f"python {script} --frame_folder {_q(videos / 'frames' / category)} "
                f"--depth_folder {_q(out / 'depth' / model)} --output-path {_q(out)} --read-prompt-file {meta} "
                f"--t2v-model {model} --output_dir_2d {_q(out / '2d')} --output_dir_3d {_q(out / '3d')}"]
    total, fps = clock
    tracks = (f"--video_folder {_q(videos / 'video_standard' / category)} --mask_folder {_q(out / 'seg')} "
              f"--read-prompt-file {meta} --t2v_model {model} --output_path {_q(out)} --output_dir {_q(out / 'tracks')}")
    return [f"python {script} --video_folder {_q(videos / category)} --read-prompt-file {meta} "
            f"--t2v-model {model} --total_frame {total} --fps {fps} --output_dir {_q(out / 'seg')}",
            f"python dot/eval_motion_binding_foreground.py {tracks}",
            f"python dot/eval_motion_binding_background.py {tracks}",
            f"python dot/motion_binding_score_cal.py --t2v-model {model} --output_path {_q(out)}"]


def check_compbench(out: Path, suite: Suite, compbench_dir: str, tools_dir: str) -> CheckReport:
    report, problems = CheckReport(), _Problems()
    counts = {c: sum(1 for p in suite.prompts if p.category == c) for c in suite.categories}
    official = suite.name == "t2v-compbench"
    results = out.resolve() / "official" / "t2v-compbench"
    runs: list[str] = []
    for mode in _mode_folders(out):
        seed_dirs = sorted((d for d in (out / mode).iterdir() if d.is_dir() and _SEED_DIR.match(d.name)),
                           key=lambda d: int(d.name[4:]))
        if not seed_dirs:
            report.notes.append(f"{out / mode} has no seed<N> folders")
        for seed_dir in seed_dirs:
            for category in suite.categories:
                folder = seed_dir / category
                if not folder.is_dir():
                    report.notes.append(f"no {category} videos in {seed_dir}")
                    continue
                videos = check_compbench_folder(folder, counts[category], problems)
                if 0 < len(videos) < counts[category]:
                    report.notes.append(f"{folder} holds {len(videos)} of {counts[category]} prompts: the "
                                        f"official score covers those only")
                _check_derived(seed_dir, category, videos, problems)
                info = _check_frames(videos, COMPBENCH_FRAMES, "T2V-CompBench (it resamples to 16 frames)", problems)
                clock = motion_binding_clock(out, mode, seed_dir, info, problems) \
                    if category == "motion_binding" and info else None
                report.videos += len(videos)
                report.folders += 1
                if official and not problems.items:
                    model = f"{mode}_{seed_dir.name}"
                    runs += _compbench_commands(category, seed_dir.resolve(), results, model, clock)
    problems.raise_any()
    if not report.folders:
        raise FvgError(f"no {suite.name} videos in {out} (expected {out}/<mode>/seed<S>/<category>/0001.mp4 ...)")
    if not official:
        report.notes.append(f"the official scripts score T2V-CompBench's own prompts (its meta_data/*.json); this "
                            f"folder holds {suite.name} prompts, so no commands are printed")
        return report
    report.commands = [
        "#!/usr/bin/env bash",
        f"# T2V-CompBench commands for {out.resolve()} (written by `fvg eval check`).",
        "# Run from the folder holding LLaVA/, Depth-Anything/, Grounded-Segment-Anything/ and dot/, with",
        "# T2V-CompBench's scripts copied in as its README says (Detection_eval/eval_spatial_relationships.py.py",
        "# under the name eval_spatial_relationships.py) and the type=int fix to motion_binding_seg.py's",
        "# --total_frame and --fps (docs/evaluation.md). --video-path never ends in '/': the scripts write",
        "# frames/, image_grid/ and video_standard/ beside the folder it names.",
        "set -euo pipefail",
        f"COMPBENCH=${{COMPBENCH:-{_q(compbench_dir)}}}",
        f"TOOLS=${{TOOLS:-{_q(tools_dir)}}}",
        'cd "$TOOLS"',
        *runs,
        f"fvg eval import t2v-compbench {_q(results)}/*/*.csv --to {_q(out.resolve() / 'official.jsonl')}",
    ]
    return report


def check_vbench(out: Path, suite: Suite, vbench_dir: str) -> CheckReport:
    report, problems = CheckReport(), _Problems()
    results = out.resolve() / "official" / "vbench2"
    runs: list[str] = []
    for mode in _mode_folders(out):
        for dimension in suite.categories:
            folder = out / mode / dimension
            if not folder.is_dir():
                report.notes.append(f"no {dimension} videos in {out / mode}")
                continue
            for name in sorted(os.listdir(folder)):
                if not name.endswith(".mp4") or not (folder / name).is_file():
                    problems.add(f"{folder / name}: VBench 2.0 takes the video extension from the first entry it "
                                 f"lists, so anything but MP4 files in the folder can stop it; move it out")
            expected = []
            for item in (p for p in suite.prompts if p.category == dimension):
                needed = VBENCH_DIVERSITY_SAMPLES if dimension == "Diversity" else VBENCH_SAMPLES
                for i in range(needed):
                    name = f"{item.prompt[:VBENCH_NAME_CHARS]}-{i}.mp4"
                    if vbench_video_name(item.prompt, i) != name:
                        problems.add(f"{dimension}: VBench looks for '{name[:60]}...', which cannot be a file name")
                    elif not (folder / name).is_file():
                        problems.add(f"{folder / name} is missing: VBench 2.0's standard mode stops at the first "
                                     f"missing video ({needed} per prompt in {dimension})")
                    else:
                        expected.append(folder / name)
            if dimension == "Human_Identity":
                _check_frames(expected, HUMAN_IDENTITY_FRAMES, "Human_Identity (20 judged frames after the first, "
                              "else the video is invalid)", problems)
            report.videos += len(expected)
            report.folders += 1
            runs.append(f"python evaluate.py --videos_path {_q(folder.resolve())} --dimension {dimension} "
                        f"--output_path {_q(results / mode / dimension)}")
    problems.raise_any()
    if not report.folders:
        raise FvgError(f"no VBench 2.0 videos in {out} (expected {out}/<mode>/<Dimension>/<prompt>-<i>.mp4)")
    report.commands = [
        "#!/usr/bin/env bash",
        f"# VBench 2.0 commands for {out.resolve()} (written by `fvg eval check`): one dimension folder per run,",
        "# as VBench-2.0/evaluate.sh does; evaluate.py reads vbench2/VBench2_full_info.json beside it.",
        "set -euo pipefail",
        f"VBENCH2=${{VBENCH2:-{_q(vbench_dir)}}}",
        'cd "$VBENCH2"',
        *runs,
        f"fvg eval import vbench2 {_q(results)}/*/*/*_eval_results.json --to {_q(out.resolve() / 'official.jsonl')}",
    ]
    return report


def check_run(out: Path, suite: Suite, compbench_dir: str = "/path/to/T2V-CompBench", tools_dir: str = ".",
              vbench_dir: str = "/path/to/VBench/VBench-2.0") -> CheckReport:
    if not Path(out).is_dir():
        raise FvgError(f"output folder not found: {out}")
    if suite.layout == "vbench":
        return check_vbench(Path(out), suite, vbench_dir)
    return check_compbench(Path(out), suite, compbench_dir, tools_dir)
