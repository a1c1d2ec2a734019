"""Training data: find captioned clips, decode them to the training shape, and cache their latents.

Layouts (all paths relative to the folder or metadata file):
  * a folder (searched recursively) of clips, each with a same-stem `.txt` caption (`a.mp4` + `a.txt`);
  * `metadata.jsonl` or `metadata.csv` with a video column and a caption column
    (`video`/`caption` by default; `video_column`/`caption_column` rename them), given as
    the file or as the folder holding it.

Clips are resampled to the training fps from their first frame (the anchor is a clip's
first frame), resized to cover the training resolution and centre-cropped. A clip that is
missing, undecodable or too short is skipped with its reason logged; one bad file never
stops a run.

The VAE and the text encoder are the expensive part of a step at 480p and they are frozen,
so their outputs are computed once and cached on disk as safetensors shards under a key
hashing everything they depend on (model, precision, resolution, frames, fps, text length,
and each clip's path, size, mtime and caption). A second run with the same key reuses the cache.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fvg.anchor import fit_to_resolution
from fvg.families import ModelFamily, family_of
from fvg.io import FvgError, atomic_path, write_json
from fvg.provenance import utc_timestamp

log = logging.getLogger("fvg.train")

VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v"}
CACHE_FORMAT = 1  # bump when the cached tensors change meaning
SHARD_SIZE = 32  # clips per safetensors shard


class ClipError(Exception):
    """Why one clip cannot be used (logged and skipped, never fatal)."""


@dataclass(frozen=True)
class Clip:
    path: Path
    caption: str


# -- finding clips ---------------------------------------------------------------------------------

def find_clips(data: str | Path, video_column: str = "video",
               caption_column: str = "caption") -> tuple[list[Clip], list[tuple[str, str]]]:
    """Captioned clips under `data`, and (path, reason) for every entry that was dropped."""
    data = Path(data)
    if data.is_file():
        metadata = data
    elif data.is_dir():
        metadata = next((data / n for n in ("metadata.jsonl", "metadata.csv") if (data / n).is_file()), None)
    else:
        raise FvgError(f"training data not found: {data}")
    if metadata is None:
        rows = [{"video": str(p.relative_to(data)), "caption": _read_caption(p)} for p in sorted(data.rglob("*"))
                if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()]
        root, video_column, caption_column = data, "video", "caption"
    else:
        rows, root = _read_metadata(metadata, video_column, caption_column), metadata.parent
    clips, skipped = [], []
    for row in rows:
        video, caption = str(row.get(video_column) or "").strip(), str(row.get(caption_column) or "").strip()
        path = root / video
        if not video:
            skipped.append(("<row without a video path>", "no video path"))
        elif not caption:
            skipped.append((str(path), "no caption"))
        elif not path.is_file():
            skipped.append((str(path), "file missing"))
        else:
            clips.append(Clip(path, caption))
    if not rows:
        raise FvgError(f"no clips in {data}: expected videos with .txt captions, metadata.jsonl or metadata.csv")
    return clips, skipped


def _read_caption(video: Path) -> str:
    txt = video.with_suffix(".txt")
    return txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""


def _read_metadata(path: Path, video_column: str, caption_column: str) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            raise FvgError(f"unsupported metadata file {path} (use metadata.jsonl or metadata.csv)")
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as exc:
        raise FvgError(f"cannot read {path}: {exc}") from None
    if rows and not all(isinstance(r, dict) for r in rows):
        raise FvgError(f"{path}: every line must be a JSON object")
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    missing = [c for c in (video_column, caption_column) if c not in columns]
    if rows and missing:
        raise FvgError(f"{path} has no column(s) {', '.join(missing)} (found: {', '.join(sorted(columns))}); "
                       f"set video_column / caption_column")
    return rows


# -- decoding --------------------------------------------------------------------------------------

def load_clip(path: Path, num_frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """`num_frames` frames [T, H, W, 3] uint8 at `fps` from the clip's start, resized and centre-cropped.

    Frames are picked by time (frame k is the source frame nearest k / fps), so a 30 fps clip
    trained at 16 fps moves at its real speed; sources slower than `fps` repeat frames. Resizing
    is `fit_to_resolution`, the same cover-and-crop that fits anchor images at inference.
    """
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            source_fps = float(rate) if rate else float(fps)
            wanted = [round(k * source_fps / fps) for k in range(num_frames)]
            picked: dict[int, np.ndarray] = {}
            decoded = 0
            for index, frame in enumerate(container.decode(video=0)):
                decoded = index + 1
                if index in wanted:
                    picked[index] = np.asarray(fit_to_resolution(frame.to_image(), height, width))
                if index >= wanted[-1]:
                    break
    except ClipError:
        raise
    except Exception as exc:  # PyAV raises many types for corrupt files
        raise ClipError(f"cannot decode: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if len(picked) < len(set(wanted)):
        seconds = (num_frames - 1) / fps
        raise ClipError(f"too short: {decoded} frames at {source_fps:g} fps, needs {seconds:.2f} s "
                        f"({num_frames} frames at {fps:g} fps)")
    return np.stack([picked[i] for i in wanted])


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [1, 3, T, H, W] in [-1, 1], the VAE's input."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0)
    return video.permute(3, 0, 1, 2).unsqueeze(0)


# -- the latent cache ------------------------------------------------------------------------------

def data_hash(clips: list[Clip]) -> str:
    """Identity of the data set: paths, sizes, mtimes and captions (not contents: too slow to hash)."""
    h = hashlib.sha256()
    for clip in clips:
        st = clip.path.stat()
        h.update(json.dumps([str(clip.path.resolve()), st.st_size, st.st_mtime_ns, clip.caption]).encode())
    return h.hexdigest()[:16]


def cache_key(cfg, clips: list[Clip], family: ModelFamily | None = None) -> str:
    # mixed_precision sets the text encoder's dtype (bf16 vs fp32 embeddings); the VAE always runs in fp32.
    parts = {"format": CACHE_FORMAT, "model": cfg.model, "precision": cfg.mixed_precision,
             "height": cfg.height, "width": cfg.width,
             "num_frames": cfg.num_frames, "fps": cfg.fps, "max_sequence_length": cfg.max_sequence_length,
             "data": data_hash(clips), **(family or family_of(cfg.model)).cache_key_parts()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def encode_clip(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """The clip's latent at the posterior mode as its family's pipeline sees latents (`ModelFamily.encode_clip`;
    the mode is deterministic, so it can be cached; sampling would need the variance)."""
    return family_of(pipe).encode_clip(pipe, pixels)


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int, device) -> list[torch.Tensor]:
    """The pipeline's own `encode_prompt` embeddings, as its family stores them (`ModelFamily.encode_captions`)."""
    return family_of(pipe).encode_captions(pipe, captions, max_sequence_length, device)


def pad_text(text: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([text, text.new_zeros(length - text.shape[0], text.shape[1])]) if text.shape[0] < length else text


def drop_captions(text: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Caption dropout: each sample's embedding [B, L, D] replaced by the empty caption's [L, D] with
    probability `p`, drawn on `generator` (so a resumed run drops the same samples)."""
    drop = torch.rand(text.shape[0], generator=generator) < p
    if not drop.any():
        return text
    return torch.where(drop.view(-1, 1, 1).to(text.device), empty.to(text).expand_as(text), text)


def build_cache(cfg, clips: list[Clip], pipe, accelerator) -> dict:
    """Encode every clip once (split across processes) or reuse the cache; returns its index.

    The index (`index.json`) is written last, atomically: its presence marks a complete cache,
    so an interrupted build is redone rather than half-used.
    """
    from safetensors.torch import save_file

    family = family_of(pipe)
    key = cache_key(cfg, clips, family)
    root = Path(cfg.cache_dir) / key
    index_path = root / "index.json"
    if index_path.is_file():
        if accelerator.is_main_process:
            log.info("latent cache hit: %s", root)
        return {**_load_index(index_path), "hit": True}
    if accelerator.is_main_process:
        log.info("building latent cache %s for %d clips", root, len(clips))
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    entries, skipped, shard, shard_clips, shard_no = [], [], {}, 0, 0

    def flush():
        nonlocal shard, shard_clips, shard_no
        if shard:
            with atomic_path(root / f"shard-r{rank:03d}-{shard_no:05d}.safetensors") as tmp:
                save_file(shard, str(tmp))
            shard, shard_clips, shard_no = {}, 0, shard_no + 1

    mine = list(range(rank, len(clips), world))
    for start in range(0, len(mine), 8):
        batch = []
        for i in mine[start:start + 8]:
            try:
                frames = load_clip(clips[i].path, cfg.num_frames, cfg.fps, cfg.height, cfg.width)
            except ClipError as exc:
                skipped.append((str(clips[i].path), str(exc)))
                continue
            pixels = to_pixels(frames)
            anchor = family.encode_clip_anchor(pipe, pixels)  # None unless the family caches it apart
            batch.append((i, encode_clip(pipe, pixels), anchor))
        if not batch:
            continue
        texts = encode_captions(pipe, [clips[i].caption for i, _, _ in batch], cfg.max_sequence_length, device)
        for (i, latent, anchor), text in zip(batch, texts):
            name = f"shard-r{rank:03d}-{shard_no:05d}.safetensors"
            shard[f"{i}.latent"], shard[f"{i}.text"] = latent.contiguous(), text.contiguous()
            if anchor is not None:
                shard[f"{i}.anchor"] = anchor.contiguous()
            entries.append({"index": i, "video": str(clips[i].path), "caption": clips[i].caption, "shard": name})
            shard_clips += 1
            if shard_clips >= SHARD_SIZE:
                flush()
    flush()
    write_json(root / f"part-r{rank:03d}.json", {"entries": entries, "skipped": skipped})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [json.loads((root / f"part-r{r:03d}.json").read_text()) for r in range(world)]
        index = {
            "format": CACHE_FORMAT, "key": key, "model": cfg.model, "created": utc_timestamp(),
            "shape": {"height": cfg.height, "width": cfg.width, "num_frames": cfg.num_frames, "fps": cfg.fps},
            "max_sequence_length": cfg.max_sequence_length, "data_hash": data_hash(clips),
            "entries": sorted((e for p in parts for e in p["entries"]), key=lambda e: e["index"]),
            "skipped": [s for p in parts for s in p["skipped"]],
        }
        write_json(index_path, index)
    accelerator.wait_for_everyone()
    return {**_load_index(index_path), "hit": False}


def _load_index(path: Path) -> dict:
    index = json.loads(path.read_text(encoding="utf-8"))
    index["root"] = str(path.parent)
    return index


class CachedClips(torch.utils.data.Dataset):
    """Cached (latent, padded text embedding) pairs, read lazily from the shards (memory-mapped)."""

    def __init__(self, index: dict, entries: list[dict], max_sequence_length: int):
        self.root = Path(index["root"])
        self.entries = entries
        self.max_sequence_length = max_sequence_length
        self._files: dict[str, Any] = {}  # per worker process: safe_open handles are not picklable

    def __len__(self) -> int:
        return len(self.entries)

    def _file(self, name: str):
        from safetensors import safe_open

        if name not in self._files:
            self._files[name] = safe_open(str(self.root / name), framework="pt")
        return self._files[name]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        entry = self.entries[i]
        f = self._file(entry["shard"])
        text = f.get_tensor(f"{entry['index']}.text")
        item = {"latent": f.get_tensor(f"{entry['index']}.latent"), "text": pad_text(text, self.max_sequence_length)}
        if f"{entry['index']}.anchor" in f.keys():  # `ModelFamily.encode_clip_anchor` (CogVideoX)
            item["anchor"] = f.get_tensor(f"{entry['index']}.anchor")
        return item

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
