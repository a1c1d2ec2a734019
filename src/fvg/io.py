"""Files fvg reads and writes: MP4 video, PNG images, JSON records, all written atomically.

Every writer goes through `atomic_path`: the data lands in a temporary file beside the
target and is renamed over it only once complete, so an interrupted run never leaves a
half-written output that a later resume would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image


_UMASK = os.umask(0)
os.umask(_UMASK)


class FvgError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real extension last: encoders (PyAV, PIL) pick the format from it.
    suffix = suffix if suffix is not None else target.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should be ordinary
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open a PNG/JPEG/WebP image as RGB, with a clear error for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FvgError(f"anchor image not found: {path}")
    try:
        with Image.open(path) as img:
            if img.format not in {"PNG", "JPEG", "WEBP"}:
                raise FvgError(f"unsupported image format {img.format} in {path} (use PNG, JPEG or WebP)")
            img.load()
            return img.convert("RGB")
    except FvgError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise FvgError(f"cannot read image {path}: {exc}") from None


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
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
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


def read_jsonl(path: Path) -> list[dict]:
    """The JSON object of each non-blank line; a bad line is an FvgError naming file and line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise FvgError(f"{path}:{number} is not valid JSON") from None
    return rows


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
