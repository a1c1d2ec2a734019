"""Files fvg reads and writes: MP4 video, PNG images, JSON records, all written atomically.

Every writer goes through `atomic_path`: the data lands in a temporary file beside the
target and is renamed over it only once complete, so an interrupted run never leaves a
half-written output that a later resume would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image


_UMASK = os.umask(0)
os.umask(_UMASK)

# Temporary files are named `.<stem>.<host>-<pid>.<random>.tmp<suffix>`: a later run can tell its own
# leftovers (this host, a process that no longer exists) from files another live process is writing.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(r"^\..+?\.(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.)?[^.]+\.tmp(?:\.[^.]+)?$")
LEGACY_TEMP_AGE_S = 3600  # temp files without an owner (older fvg) are swept once this old


class FvgError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


def conform(value: Any, kinds: tuple[type, ...]) -> Any:
    """`value` read as a setting of one of `kinds` (bool, int, float, str, list, dict), or ValueError. The one
    rule of every `--set`-style override (presets, training configs, mini runs): an int where a float is
    expected becomes that float (`guidance_scale=1`), and a bool is never a number."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    for kind in kinds:
        if kind is float and number:
            return float(value)
        if kind is int and number and isinstance(value, int):
            return value
        if kind in (bool, str, list, dict) and isinstance(value, kind):
            return value
    raise ValueError(f"{value!r} is not a {' or '.join(k.__name__ for k in kinds)}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real extension last: encoders (PyAV, PIL) pick the format from it.
    suffix = suffix if suffix is not None else target.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.{_HOST}-{os.getpid()}.", suffix=f".tmp{suffix}",
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should be ordinary
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporary files that killed fvg processes left in `folder` (see `atomic_path`).

    Only files of this host whose process is gone (or, for unowned files of older versions, that
    are over an hour old) are removed: a live writer beside us, even another fvg run sharing the
    folder, keeps its files. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*"):
        match = _TEMP_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        if match.group("pid") is not None:
            if match.group("host") != _HOST or int(match.group("pid")) == os.getpid() \
                    or _pid_alive(int(match.group("pid"))):
                continue
        else:
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime < LEGACY_TEMP_AGE_S:
                    continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """FvgError unless `path` is, or can become, a writable folder; creates nothing.

    Called before any model loads, so a typo costs nothing. Writability is probed with a real
    temporary file in the nearest existing folder (permission bits say nothing for root or on a
    read-only mount); the probe is removed at once.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FvgError(f"{what} {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise FvgError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fvg-write-probe.", dir=existing)
    except OSError as exc:
        raise FvgError(f"{what} {path} is not writable: {exc.strerror or exc} ({existing})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """FvgError unless a file can be written at `path` (an existing folder there is an error)."""
    path = Path(path)
    if path.is_dir():
        raise FvgError(f"{what} {path} is a folder, not a file")
    check_output_dir(path.parent, what=f"{what} {path}: folder")
    return path


def read_prompt_lines(path: str | os.PathLike, allow_empty: bool = False) -> list[str]:
    """The prompts of a text file, one per line, for `fvg generate --prompts` and `fvg eval generate`.

    Decisions: UTF-8 only (a UTF-8 byte-order mark is dropped, UTF-16 and other encodings are
    refused with a hint); lines end at "\n" or "\r\n" only, never at U+2028, form feeds or the
    other separators `str.splitlines` knows, so video N is line N of the file as editors number
    it; blank lines at the end are ignored, a blank line in the middle is an error (skipping it
    would shift every later video number); NUL bytes mean the file is not text.
    """
    path = Path(path)
    if not path.is_file():
        raise FvgError(f"prompt file not found: {path}" if not path.exists() else f"{path} is not a file")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FvgError(f"{path} is UTF-16 text: save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FvgError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                       "save it as UTF-8") from None
    if "\0" in text:
        raise FvgError(f"{path} is not a text file (it contains NUL bytes)")
    lines = [line.removesuffix("\r").strip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines and not allow_empty:
        raise FvgError(f"prompt file {path} has no prompts")
    for number, line in enumerate(lines, start=1):
        if not line:
            raise FvgError(f"{path}:{number} is empty: videos are numbered by line, remove the blank line")
    return lines


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def save_image(path: str | os.PathLike, image: Image.Image | np.ndarray) -> None:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(to_uint8(image))
    with atomic_path(path) as tmp:
        image.save(tmp)


MAX_IMAGE_PIXELS = 64_000_000  # an 8000 x 8000 photo; far above any video model's frame
MAX_IMAGE_ASPECT = 8.0  # wider than 8:1 either way cannot cover a video frame without absurd upscaling


def check_image_size(width: int, height: int, name: str = "the image") -> None:
    """FvgError for an image too large or too thin to fit to a video frame.

    Checked before decoding and before any resize: a 1 x 2,000,000 PNG of 8 kB would otherwise be
    scaled to cover the frame, some 8 GB of pixels.
    """
    if width < 1 or height < 1:
        raise FvgError(f"{name} is empty ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise FvgError(f"{name} is {width}x{height}: more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels")
    if max(width / height, height / width) > MAX_IMAGE_ASPECT:
        raise FvgError(f"{name} is {width}x{height}: its aspect ratio is beyond {MAX_IMAGE_ASPECT:g}:1")


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, upright: EXIF orientation applied, 16-bit grey scaled (not clipped).

    PIL's `convert("RGB")` clips 16-bit grey ("I;16", "I") at 255, so a 16-bit PNG turned white.
    """
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image) or image
    if image.mode in {"I", "I;16", "I;16L", "I;16B", "I;16N"}:
        grey = np.asarray(image, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(to_uint8(np.asarray(image, dtype=np.float32)), mode="L")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open a PNG/JPEG/WebP image as upright 8-bit RGB, with a clear error for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FvgError(f"anchor image not found: {path}")
    try:
        with Image.open(path) as img:
            if img.format not in {"PNG", "JPEG", "WEBP"}:
                raise FvgError(f"unsupported image format {img.format} in {path} (use PNG, JPEG or WebP)")
            check_image_size(img.width, img.height, f"image {path}")  # from the header, before decoding
            img.load()
            return to_rgb(img)
    except FvgError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise FvgError(f"cannot read image {path}: {' '.join(str(exc).split())}") from None


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (diffusers' `output_type="np"`) or uint8 frames, as uint8."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, crf: int = 12) -> None:
    """Encode `frames` ([T, H, W, 3], uint8 or float in [0, 1]) as H.264 yuv420p MP4.

    A low CRF keeps palette colours close to their values: MiniWorld's evaluator matches
    decoded pixels to the nearest palette colour.
    """
    import av

    frames = to_uint8(np.asarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape [T, H, W, 3], got {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {height}x{width}")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in frames:
                # Converted to yuv420p here, one frame at a time: left to the encoder (PyAV's reformatter that
                # lives with the codec context), the same frames encoded twice in one process could decode
                # up to 13 levels apart, so a video depended on what the process had encoded before, not
                # only on its seed (tests/test_video_io.py).
                yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
                for packet in stream.encode(yuv):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode a video into uint8 RGB frames [T, H, W, 3]."""
    import av

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as exc:
        raise FvgError(f"cannot decode video {path}: {exc}") from None
    if not frames:
        raise FvgError(f"video {path} has no frames")
    return np.stack(frames)


def mp4_is_valid(path: str | os.PathLike, num_frames: int | None = None) -> bool:
    """True when `path` decodes (to `num_frames` frames, if given): used to resume batches."""
    try:
        frames = read_mp4(path)
    except FvgError:
        return False
    return num_frames is None or len(frames) == num_frames


@contextlib.contextmanager
def _without_loading_bars() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def load_or_explain(loader: Callable[..., Any], model_id: str, **kwargs) -> Any:
    """Call a `from_pretrained`; turn "not on disk and no hub" into one actionable line.

    The local cache is tried first: it answers at once, while a hub that cannot be reached
    may take many seconds of retries to fail.
    """
    from huggingface_hub import constants

    if Path(model_id).is_absolute() and not Path(model_id).exists():
        hint = ""
        if "weights/mini" in Path(model_id).as_posix():
            hint = (": the mini preset's weights are not in this checkout yet; train them with "
                    "`fvg miniworld train --out runs/mini --stage all --resume` (docs/miniworld.md)")
        raise FvgError(f"model directory not found: {model_id}{hint}")
    if Path(model_id).exists():
        try:
            with _without_loading_bars():  # nothing to download: per-component bars are only noise
                return loader(model_id, **kwargs)
        except (OSError, ValueError) as exc:
            raise FvgError(f"cannot load {model_id}: {str(exc).splitlines()[0]}") from None
    try:
        return loader(model_id, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        if constants.HF_HUB_OFFLINE:
            raise FvgError(_offline_message(model_id)) from None
    try:
        return loader(model_id, **kwargs)
    except (OSError, ValueError):
        raise FvgError(_offline_message(model_id)) from None


def _offline_message(model_id: str) -> str:
    return (f"weights for '{model_id}' are not available offline: download them on a machine with internet "
            f"(`hf download {model_id}`, then copy the cache or set HF_HOME), or pass a local directory instead")


def read_text_file(path: Path, what: str = "file") -> str:
    """A UTF-8 text file's contents; FvgError (one line) for a missing, unreadable or binary file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FvgError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise FvgError(f"{path} is a folder, not a {what}") from None
    except OSError as exc:
        raise FvgError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\0" in data:
        raise FvgError(f"{path} is a binary file, not a {what}")
    try:
        return data.decode("utf-8-sig")  # tolerate a BOM: editors on Windows add one
    except UnicodeDecodeError:
        raise FvgError(f"{path} is not UTF-8 text, not a {what}") from None


def parse_json(text: str, where: str):
    """JSON text as Python values; FvgError for anything `json` cannot turn into a value: syntax errors,
    nesting deep enough to exhaust the recursion limit, integers too long to convert."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FvgError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise FvgError(f"{where} is not usable JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's conversion limit
        raise FvgError(f"{where} is not usable JSON: {str(exc).splitlines()[0][:120]}") from None


def read_json_object(path: Path, what: str = "JSON file") -> dict:
    """A file holding one JSON object; FvgError naming the problem otherwise."""
    data = parse_json(read_text_file(path, what), str(path))
    if not isinstance(data, dict):
        raise FvgError(f"{path} is not a {what}: expected a JSON object, found {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file, one per line; FvgError naming the first bad line (or a binary,
    non-UTF-8 or unreadable file). Lines are split on '\\n' only: JSON escapes every other line break."""
    rows = []
    for number, line in enumerate(read_text_file(path, "JSONL file").split("\n"), start=1):
        if line.strip():
            row = parse_json(line, f"{path}:{number}")
            if not isinstance(row, dict):
                raise FvgError(f"{path}:{number} is not a JSON object")
            rows.append(row)
    return rows


_COMPBENCH_PROMPT_FILE = re.compile(r"^(\d+)_(.+)$")


def compbench_prompt_file(stem: str) -> tuple[int, str] | None:
    """(N, category) of a T2V-CompBench prompt file's stem `N_<category>` (e.g. 1_consistent_attr),
    else None. The category names the folder its videos go in: the one rule every layout uses."""
    m = _COMPBENCH_PROMPT_FILE.match(stem)
    return (int(m.group(1)), m.group(2)) if m else None


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of a benchmark suite: T2V-CompBench, VBench 2.0, MiniCompBench or a prompt file.

    One type for `fvg.miniworld` and `fvg.eval`, so it lives below both. Decision: `category` is
    the name the benchmark's own evaluator uses, which is also the folder its videos go in: the
    T2V-CompBench category (a prompt file's stem without `N_`, `compbench_prompt_file`), the
    VBench dimension, or a plain prompt file's stem. MiniWorld's grammar names one category
    differently (`spatial` for the `spatial_relationship` folder); `fvg.miniworld.suite.spec_category`
    maps a prompt to the grammar's name where MiniWorld needs it, so `category` means one thing.
    """

    category: str  # evaluator's category = folder name
    index: int  # 1-based position in its category, prompt-file order
    prompt: str  # the original prompt: what names the video and what is scored
    samples: int = 1  # VBench: videos per prompt; compbench layouts: one per seed

    @property
    def video_path(self) -> str:
        """`<category>/0001.mp4`: its video in T2V-CompBench's layout (4 digits, 1-based), relative to
        the folder of one mode and seed."""
        return f"{self.category}/{self.index:04d}.mp4"


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of `text`: lower-case ASCII words joined by "-", at most `limit` characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "run"


def run_name(prompt: str) -> str:
    """The default folder name of a run: local time, then the prompt's slug (20260131-120000-a-red-circle)."""
    return f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{slug(prompt)}"


def cache_dir(name: str, override_env: str | None = None) -> Path:
    """fvg's cache folder `name`: `$<override_env>` if set, else `$FVG_CACHE_DIR/<name>`, else
    `~/.cache/fvg/<name>`. The one rule for every cache (plans, training latents)."""
    if override_env and os.environ.get(override_env):
        return Path(os.environ[override_env]).expanduser()
    root = os.environ.get("FVG_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "fvg") / name


# The dtype names fvg accepts (CLI flags, planner options) -> torch's attribute names.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
