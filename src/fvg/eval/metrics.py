"""Local video metrics: cheap stand-ins for the official evaluators' heavy stacks.

- `clip_score`: cosine similarity of the prompt's CLIP text embedding and the mean of the
  frames' (normalised) CLIP image embeddings: does the video show what the prompt says.
- `anchor_psnr`, `anchor_ssim`: frame 0 against the anchor image (factorized videos only):
  how faithfully the video starts from its planned first frame.
- `temporal_consistency`: mean cosine similarity of adjacent frames' CLIP image embeddings:
  1 for a still video, lower when content flickers or changes identity.
- `motion`: mean Farnebäck optical-flow magnitude between adjacent frames, in pixels of the
  original resolution per frame: 0 for a still video. High consistency with no motion is a
  frozen video, so read the two together.
- `minicompbench`: MiniWorld's exact evaluator score in [0, 1] for MiniWorld prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fvg.io import FvgError

PSNR_CAP = 100.0  # dB for identical images, where PSNR is infinite (JSON has no infinity)
FLOW_SIZE = 256  # flow is computed with the longer side at most this: Farnebäck at 720p is ~30x slower


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, capped at PSNR_CAP."""
    _same_shape(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else float(min(PSNR_CAP, 10.0 * np.log10(255.0**2 / mse)))


def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filter over the two image axes."""
    k = len(g)
    rows = np.lib.stride_tricks.sliding_window_view(img, k, axis=0) @ g
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1) @ g


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03),
    per channel, averaged. 1 for identical images."""
    _same_shape(a, b)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {a.shape[:2]}")
    a = a.astype(np.float64).reshape(*a.shape[:2], -1)
    b = b.astype(np.float64).reshape(*b.shape[:2], -1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = _gaussian()
    values = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        mx, my = _filter(x, g), _filter(y, g)
        vx = _filter(x * x, g) - mx**2
        vy = _filter(y * y, g) - my**2
        cov = _filter(x * y, g) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(s.mean())
    return float(np.mean(values))


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")


def anchor_fidelity(frames: np.ndarray, anchor: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM of frame 0 against the anchor (resized to the frame if they differ)."""
    first = frames[0]
    if anchor.shape != first.shape:
        from PIL import Image

        anchor = np.asarray(Image.fromarray(anchor).convert("RGB").resize(first.shape[1::-1], Image.BICUBIC))
    return {"anchor_psnr": psnr(first, anchor), "anchor_ssim": ssim(first, anchor)}


def motion_amount(frames: np.ndarray, max_side: int = FLOW_SIZE) -> float:
    """Mean Farnebäck flow magnitude over adjacent frame pairs, in original pixels per frame."""
    import cv2

    if len(frames) < 2:
        return 0.0
    h, w = frames.shape[1:3]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    if scale < 1.0:
        gray = [cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in gray]
    magnitudes = []
    for prev, nxt in zip(gray, gray[1:]):
        if np.array_equal(prev, nxt):  # Farnebäck leaves ~1e-3 px of numerical noise on identical frames
            magnitudes.append(0.0)
            continue
        # OpenCV's documented example parameters: 3-level pyramid, 15 px window, 3 iterations.
        flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
    return float(np.mean(magnitudes)) / scale


def minicompbench_score(prompt: str, frames: np.ndarray) -> float | None:
    """MiniWorld's exact score, or None when the prompt is not a MiniWorld prompt."""
    from fvg.miniworld import parse_prompt, score_video

    try:
        parse_prompt(prompt)
    except ValueError:
        return None
    return float(score_video(prompt, frames).score)


@dataclass
class ClipScorer:
    """CLIP text and image towers (transformers `CLIPModel` + processor) from a folder or hub id."""

    model: object
    processor: object
    device: str = "cpu"
    batch_size: int = 32

    @classmethod
    def load(cls, name: str, device: str | None = None) -> "ClipScorer":
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from fvg.io import load_or_explain

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = Path(name).expanduser()
        if (name.startswith((".", "/", "~")) or name.count("/") > 1) and not path.is_dir():
            raise FvgError(f"CLIP model folder not found: {name}")  # clearly a path: no hub look-up
        name = str(path) if path.is_dir() else name
        # the local folder or hub cache first, with one actionable line when offline
        model = load_or_explain(CLIPModel.from_pretrained, name)
        processor = load_or_explain(CLIPProcessor.from_pretrained, name)
        return cls(model.to(device).eval(), processor, device)

    def image_embeddings(self, frames: np.ndarray):
        """Unit-norm image embeddings [T, D] of uint8 frames [T, H, W, 3]."""
        import torch

        chunks = []
        with torch.no_grad():
            for i in range(0, len(frames), self.batch_size):
                inputs = self.processor(images=list(frames[i:i + self.batch_size]), return_tensors="pt")
                out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
                chunks.append(_features(out))
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)

    def text_embedding(self, text: str):
        import torch

        max_len = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                               attention_mask=inputs["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(_features(out).float(), dim=-1)[0]

    def scores(self, prompt: str, frames: np.ndarray) -> dict[str, float]:
        """clip_score and temporal_consistency from one pass over the frames."""
        import torch

        images = self.image_embeddings(frames)
        video = torch.nn.functional.normalize(images.mean(0), dim=-1)
        clip = float(video @ self.text_embedding(prompt))
        consistency = float((images[1:] * images[:-1]).sum(-1).mean()) if len(images) > 1 else 1.0
        return {"clip_score": clip, "temporal_consistency": min(1.0, consistency)}


def _features(out):
    # transformers 5 returns a model output whose pooler_output holds the projected features.
    return out if hasattr(out, "shape") else out.pooler_output


METRICS = ("clip", "consistency", "motion", "anchor", "minicompbench")  # names for --metrics
ROW_KEYS = ("suite", "category", "index", "sample", "prompt", "mode", "seed", "video")


def default_metrics(clip: str | None) -> list[str]:
    """Everything that can run: the CLIP metrics only with a CLIP model."""
    return list(METRICS) if clip else ["motion", "anchor", "minicompbench"]


def parse_metrics(text: str | None, clip: str | None) -> list[str]:
    if not text:
        return default_metrics(clip)
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise FvgError(f"unknown metric(s) {', '.join(unknown)} (choose from: {', '.join(METRICS)})")
    if not clip and {"clip", "consistency"} & set(names):
        raise FvgError("metrics clip and consistency need a CLIP model: pass --clip PATH_OR_ID")
    return names


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def score_video_entry(entry: dict, out: Path, metrics: list[str], scorer: ClipScorer | None
                      ) -> tuple[dict[str, float], dict[str, str]]:
    """Every requested metric that applies to one manifest entry's video, and why any was left out."""
    from fvg.io import read_mp4

    frames = read_mp4(out / entry["video"])
    values: dict[str, float] = {}
    notes: dict[str, str] = {}
    if scorer is not None and {"clip", "consistency"} & set(metrics):
        clip = scorer.scores(entry["prompt"], frames)
        values.update({k: v for k, v in clip.items()
                       if (k == "clip_score" and "clip" in metrics) or (k == "temporal_consistency" and
                                                                         "consistency" in metrics)})
    if "motion" in metrics:
        values["motion"] = motion_amount(frames)
    if "anchor" in metrics and entry.get("anchor") and (out / entry["anchor"]).is_file():
        from PIL import Image

        with Image.open(out / entry["anchor"]) as img:
            values.update(anchor_fidelity(frames, np.asarray(img.convert("RGB"))))
    if "minicompbench" in metrics:
        try:
            score = minicompbench_score(entry["prompt"], frames)
        except FvgError as exc:  # e.g. a MiniWorld prompt rendered by a model with another frame size
            notes["minicompbench"] = str(exc)
        else:
            if score is not None:
                values["minicompbench"] = score
    return values, notes


@dataclass
class ScoreSummary:
    scored: int
    reused: int  # rows kept from an earlier score run: same video file, same metrics
    missing: int  # failed or absent videos
    path: Path
    notes: list[str]  # distinct reasons a metric was left out, "metric: reason"


def score_run(out: Path, scores_path: Path, metrics: list[str], clip: str | None = None,
              device: str | None = None, rescore: bool = False, on_video=None,
              checkpoint_every: int = 50) -> ScoreSummary:
    """Score every video of `out/manifest.jsonl` into a JSONL file, one row per video.

    Rows of an earlier run are reused when the video's size and mtime are unchanged and they
    hold the requested metrics, and the file is rewritten every `checkpoint_every` videos, so
    an interrupted scoring run resumes where it stopped.
    """
    from fvg.io import write_text

    from fvg.io import read_jsonl

    from .generate import MANIFEST, read_manifest

    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise FvgError(f"no {MANIFEST} in {out}: run `fvg eval generate --out {out}` first")
    entries = read_manifest(out)
    # Rows of an earlier scoring run are reused only when they are well formed (else rescored).
    old = {} if rescore or not scores_path.is_file() else {
        r["video"]: r for r in read_jsonl(scores_path)
        if isinstance(r.get("video"), str) and isinstance(r.get("metrics_run"), list)
        and all(isinstance(m, str) for m in r["metrics_run"])}
    scorer = ClipScorer.load(clip, device) if clip and {"clip", "consistency"} & set(metrics) else None
    rows: list[dict] = []
    scored = reused = missing = 0

    def flush() -> None:
        write_text(scores_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    notes: dict[str, None] = {}
    for entry in entries:
        video = out / entry["video"]
        if entry.get("status") == "failed" or not video.is_file():
            missing += 1
        else:
            stat, prev = _stat(video), old.get(entry["video"])
            if prev and prev.get("video_stat") == stat and set(metrics) <= set(prev.get("metrics_run", [])):
                rows.append(prev)
                reused += 1
            else:
                values, left_out = score_video_entry(entry, out, metrics, scorer)
                rows.append({"source": "fvg", **{k: entry.get(k) for k in ROW_KEYS}, "metrics": values,
                             "notes": left_out, "metrics_run": sorted(metrics), "video_stat": stat})
                notes.update(dict.fromkeys(f"{k}: {v}" for k, v in left_out.items()))
                scored += 1
                if scored % checkpoint_every == 0:
                    flush()
        if on_video:
            on_video(entry)
    flush()
    return ScoreSummary(scored, reused, missing, scores_path, list(notes))


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A random tiny CLIP (model, character-level tokenizer, image processor) built offline and saved
    with save_pretrained: `fvg eval score --clip PATH` smoke tests without a model hub. Its scores are noise."""
    import string

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = string.ascii_lowercase + string.digits
    vocab = {c: i for i, c in enumerate(chars)}
    vocab |= {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    bos, eos = len(vocab), len(vocab) + 1
    vocab |= {"<|startoftext|>": bos, "<|endoftext|>": eos}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
