"""Local metrics: sanity of PSNR/SSIM/motion/CLIP consistency, and `fvg eval score` on real files."""

import json

import numpy as np
import pytest

from fvg.eval.cli import main
from fvg.eval.metrics import (PSNR_CAP, ClipScorer, anchor_fidelity, motion_amount, parse_metrics, psnr,
                              save_tiny_clip, ssim)
from fvg.io import FvgError, save_image, write_mp4


def _texture(h=64, w=64, seed=0) -> np.ndarray:
    """A smooth random RGB image: optical flow needs texture to track."""
    cv2 = pytest.importorskip("cv2", reason="opencv is not installed: pip install 'fvg[eval]'")

    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)
    return cv2.normalize(cv2.GaussianBlur(noise, (9, 9), 2.5), None, 0, 255, cv2.NORM_MINMAX)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_psnr_and_ssim():
    a = _texture()
    assert psnr(a, a) == PSNR_CAP and ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + np.random.default_rng(1).normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert 15 < psnr(a, noisy) < 30
    assert 0 < ssim(a, noisy) < 0.95
    assert ssim(a, noisy) == pytest.approx(ssim(noisy, a))
    checker = np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((8, 8)))[..., None].astype(np.uint8)
    assert ssim(checker, 255 - checker) < -0.3  # inverted structure
    # MSE 100 -> 10 log10(255^2 / 100)
    assert psnr(np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 10, np.uint8)) == pytest.approx(28.1308, abs=1e-3)
    with pytest.raises(ValueError):
        ssim(a, a[:32])


def test_ssim_matches_a_scipy_reference():
    """Wang et al.'s definition, computed with scipy's Gaussian filter (window 11 = truncate 3.5 x sigma 1.5)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    a = _texture(40, 48, seed=2).astype(np.float64)
    b = np.round(np.clip(a + np.random.default_rng(3).normal(0, 15, a.shape), 0, 255))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(3):
        x, y = a[..., ch], b[..., ch]
        f = lambda img: ndimage.gaussian_filter(img, 1.5, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cov = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(m[5:-5, 5:-5].mean())  # the window fits inside the image only there
    assert ssim(a.astype(np.uint8), b.astype(np.uint8)) == pytest.approx(float(np.mean(values)), abs=1e-9)


def test_motion_zero_for_still_and_positive_for_shift():
    frame = _texture()
    still = np.stack([frame] * 5)
    assert motion_amount(still) == pytest.approx(0.0, abs=1e-4)
    shifted = np.stack([np.roll(frame, 2 * t, axis=1) for t in range(5)])
    assert motion_amount(shifted) == pytest.approx(2.0, rel=0.25)  # 2 px per frame
    # measured in original pixels even when flow runs on a downscaled copy
    big = np.stack([np.roll(_texture(128, 128), 4 * t, axis=1) for t in range(3)])
    assert motion_amount(big, max_side=64) == pytest.approx(4.0, rel=0.3)


def test_clip_consistency_and_similarity(clip_dir, monkeypatch):
    scorer = ClipScorer.load(str(clip_dir), device="cpu")
    frame = _texture()
    still = scorer.scores("a red circle", np.stack([frame] * 4))
    assert still["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= still["clip_score"] <= 1.0
    changing = scorer.scores("a red circle", np.stack([_texture(seed=s) for s in range(4)]))
    assert changing["temporal_consistency"] < still["temporal_consistency"]
    with pytest.raises(FvgError, match="not found"):
        ClipScorer.load(str(clip_dir.parent / "missing-clip"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FvgError, match="not available offline"):  # a hub id that is not in the cache
        ClipScorer.load("openai/clip-vit-base-patch32")
    with pytest.raises(FvgError, match="need a CLIP model"):
        parse_metrics("clip,motion", None)


def test_anchor_fidelity_when_frame0_is_the_anchor():
    anchor = _texture()
    frames = np.stack([anchor] + [_texture(seed=s) for s in range(1, 5)])
    fid = anchor_fidelity(frames, anchor)
    assert fid == {"anchor_psnr": PSNR_CAP, "anchor_ssim": pytest.approx(1.0)}
    other = anchor_fidelity(frames[1:], anchor)
    assert other["anchor_psnr"] < 30 and other["anchor_ssim"] < 0.5
    assert anchor_fidelity(frames, anchor[::2, ::2])["anchor_ssim"] > 0.8  # anchors are resized to the frame


def _write_run(out, rows):
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_score_command_on_hand_made_run(tmp_path, clip_dir):
    pytest.importorskip("cv2", reason="the motion metric needs opencv: pip install 'fvg[eval]'")
    """Anchored video (frame 0 = anchor) vs a moving baseline, and a MiniWorld prompt scored exactly."""
    from fvg.miniworld import load_suite, render_video, sample_scene

    out = tmp_path / "run"
    anchor = _texture()
    anchored = np.stack([anchor] * 9)
    moving = np.stack([np.roll(anchor, 2 * t, axis=1) for t in range(9)])
    write_mp4(out / "factorized/seed0/set/0001.mp4", anchored, fps=8)
    write_mp4(out / "t2v/seed0/set/0001.mp4", moving, fps=8)
    write_mp4(out / "t2v/seed0/set/0003.mp4", moving, fps=8)
    save_image(out / "records/factorized/seed0/set/0001/anchor.png", anchor)
    mini = load_suite()[0]
    video = render_video(sample_scene(mini.prompt, np.random.default_rng(0)))
    write_mp4(out / "t2v/seed0/consistent_attr/0001.mp4", video, fps=8)
    base = {"suite": "file", "index": 1, "sample": 0, "seed": 0, "status": "generated"}
    _write_run(out, [
        {**base, "category": "set", "prompt": "a red circle", "mode": "factorized",
         "video": "factorized/seed0/set/0001.mp4", "anchor": "records/factorized/seed0/set/0001/anchor.png"},
        {**base, "category": "set", "prompt": "a red circle", "mode": "t2v", "video": "t2v/seed0/set/0001.mp4",
         "anchor": None},
        {**base, "category": "consistent_attr", "prompt": mini.prompt, "mode": "t2v",
         "video": "t2v/seed0/consistent_attr/0001.mp4", "anchor": None},
        {**base, "category": "set", "index": 2, "prompt": "x", "mode": "t2v", "video": "t2v/seed0/set/0002.mp4",
         "status": "failed"},
        {**base, "category": "set", "index": 3, "prompt": mini.prompt, "mode": "t2v",  # 9 frames: not MiniWorld's
         "video": "t2v/seed0/set/0003.mp4", "anchor": None},
    ])
    assert main(["score", str(out), "--clip", str(clip_dir)]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    fac, t2v, mw, wrong_size = (r["metrics"] for r in rows)
    assert "minicompbench" not in wrong_size and "17 frames" in rows[3]["notes"]["minicompbench"]
    assert fac["anchor_psnr"] > 28 and fac["anchor_ssim"] > 0.9, fac  # H.264 (CRF 12, yuv420p) keeps frame 0 close
    assert "anchor_psnr" not in t2v
    assert fac["motion"] < 0.1 < 1.0 < t2v["motion"]
    assert fac["temporal_consistency"] > t2v["temporal_consistency"]
    assert mw["minicompbench"] == 1.0 and "minicompbench" not in fac
    assert rows[0]["mode"] == "factorized" and rows[0]["category"] == "set" and rows[0]["source"] == "fvg"
    # rescoring reuses unchanged rows; a changed video is scored again
    stamp = (out / "scores.jsonl").stat().st_mtime_ns
    write_mp4(out / "t2v/seed0/set/0001.mp4", anchored, fps=8)
    assert main(["score", str(out), "--clip", str(clip_dir)]) == 0
    again = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert again[0] == rows[0] and again[1]["metrics"]["motion"] < 0.1
    assert (out / "scores.jsonl").stat().st_mtime_ns != stamp
    assert main(["score", str(tmp_path / "nothing")]) == 2


def test_anchor_fidelity_is_high_for_the_anchored_mode_on_tiny():
    """The tiny preset's VAE is random, so frame 0 cannot look like the anchor image itself; what the
    method guarantees is that frame 0 is the anchor's latent, decoded. Wan's causal VAE decodes frame 0
    from latent frame 0 alone, so frame 0 equals the VAE reconstruction of the anchor."""
    from fvg.io import to_uint8
    from fvg.pipeline import FactorizedPipeline

    pipe = FactorizedPipeline.from_preset("tiny")
    prompt = "a red circle moves right"
    factorized = pipe(prompt, mode="factorized", seed=0, steps=2)
    t2v = pipe(prompt, mode="t2v", seed=0, steps=2)
    video_pipe = pipe.video_pipe
    reconstruction = to_uint8(video_pipe.decode_latents(video_pipe.encode_anchor(factorized.anchor.image, 32, 32))[0])
    anchored = anchor_fidelity(factorized.frames, reconstruction[0])
    plain = anchor_fidelity(t2v.frames, reconstruction[0])
    assert anchored["anchor_psnr"] > 45 and anchored["anchor_ssim"] > 0.99
    assert plain["anchor_psnr"] < anchored["anchor_psnr"] - 15 and plain["anchor_ssim"] < 0.9
