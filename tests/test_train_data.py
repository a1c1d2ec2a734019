"""Training data: the three layouts, skipping bad clips, frame sampling, and the latent cache."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fvg.io import FvgError, write_mp4
from fvg.train.config import TrainConfig
from fvg.train.data import CachedClips, ClipError, build_cache, cache_key, find_clips, load_clip
from fvg.train.synthetic import write_synthetic_dataset

SHAPE = dict(height=32, width=32, num_frames=9, fps=8, max_sequence_length=16)


# accelerate keeps process-wide singletons; every test here starts from a fresh one.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def pipe():
    from fvg.families.wan import load_wan_pipeline

    return load_wan_pipeline("builtin:tiny-wan", torch.float32)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture
def train_log(caplog):
    logger = logging.getLogger("fvg.train")
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("layout", ["jsonl", "csv", "txt"])
def test_layouts(tmp_path, layout):
    paths = write_synthetic_dataset(tmp_path, num_clips=3, num_frames=9, size=32, layout=layout)
    clips, skipped = find_clips(tmp_path)
    assert [c.path for c in clips] == paths and not skipped
    assert all(c.caption.startswith("a ") and " square moves " in c.caption for c in clips)
    if layout != "txt":  # the metadata file itself is accepted too
        assert find_clips(tmp_path / f"metadata.{layout}")[0] == clips


def test_custom_columns_and_missing_columns(tmp_path):
    write_synthetic_dataset(tmp_path, num_clips=2, num_frames=9, size=32)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"path": r["video"], "text": r["caption"]}) + "\n"
                                                     for r in rows))
    with pytest.raises(FvgError, match="no column.*video.*video_column"):
        find_clips(tmp_path)
    assert len(find_clips(tmp_path, video_column="path", caption_column="text")[0]) == 2
    with pytest.raises(FvgError, match="not found"):
        find_clips(tmp_path / "elsewhere")


def test_frames_are_sampled_by_time_and_centre_cropped(tmp_path):
    # 16 fps source, each frame's brightness = its index * 10; 48 wide so the crop matters
    frames = np.zeros((20, 32, 48, 3), np.uint8)
    for i in range(20):
        frames[i] = i * 10
    frames[:, :, :8] = 255  # a bar on the left edge, cut by the centre crop
    write_mp4(tmp_path / "a.mp4", frames, fps=16)
    out = load_clip(tmp_path / "a.mp4", num_frames=5, fps=8, height=32, width=32)
    assert out.shape == (5, 32, 32, 3)
    centre = out[:, 12:20, 12:20].mean(axis=(1, 2, 3))
    assert np.allclose(centre, [0, 20, 40, 60, 80], atol=4)  # source frames 0, 2, 4, 6, 8
    assert out[:, :, 0].mean() < 200  # the bar was cropped away
    with pytest.raises(ClipError, match="too short"):
        load_clip(tmp_path / "a.mp4", num_frames=13, fps=8, height=32, width=32)


def test_bad_clips_are_skipped_with_a_reason(tmp_path, pipe, accelerator, train_log):
    write_synthetic_dataset(tmp_path, num_clips=3, num_frames=9, size=32)
    (tmp_path / "clips" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 10)
    write_mp4(tmp_path / "clips" / "short.mp4", np.zeros((3, 32, 32, 3), np.uint8), fps=8)
    with (tmp_path / "metadata.jsonl").open("a") as f:
        for name, caption in [("corrupt", "a red square"), ("short", "a blue square"), ("gone", "a cyan square"),
                              ("0000", "")]:
            f.write(json.dumps({"video": f"clips/{name}.mp4", "caption": caption}) + "\n")
    clips, skipped = find_clips(tmp_path)
    assert len(clips) == 5
    assert {(p.split("/")[-1], r) for p, r in skipped} == {("gone.mp4", "file missing"), ("0000.mp4", "no caption")}
    cfg = TrainConfig(data=str(tmp_path), cache_dir=str(tmp_path / "cache"), **SHAPE)
    index = build_cache(cfg, clips, pipe, accelerator)
    reasons = {p.split("/")[-1]: r for p, r in index["skipped"]}
    assert reasons.keys() == {"corrupt.mp4", "short.mp4"}
    assert reasons["corrupt.mp4"].startswith("cannot decode") and reasons["short.mp4"].startswith("too short")
    assert len(index["entries"]) == 3


def test_latent_cache_is_built_once_and_reused(tmp_path, pipe, accelerator, train_log, monkeypatch):
    write_synthetic_dataset(tmp_path / "data", num_clips=3, num_frames=9, size=32)
    cfg = TrainConfig(data=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), **SHAPE)
    clips, _ = find_clips(cfg.data)
    first = build_cache(cfg, clips, pipe, accelerator)
    assert not first["hit"] and "latent cache hit" not in train_log.text

    import fvg.train.data as data

    monkeypatch.setattr(data, "encode_clip", lambda *a: pytest.fail("re-encoded a cached clip"))
    second = build_cache(cfg, clips, pipe, accelerator)
    assert second["hit"] and "latent cache hit" in train_log.text
    assert second["entries"] == first["entries"]
    # anything the latents depend on changes the key
    assert cache_key(cfg.replace(height=48), clips) != first["key"]
    assert cache_key(cfg.replace(model="other"), clips) != first["key"]
    (tmp_path / "data" / "metadata.jsonl").write_text(
        (tmp_path / "data" / "metadata.jsonl").read_text().replace("square", "circle", 1))
    assert cache_key(cfg, find_clips(cfg.data)[0]) != first["key"]


def test_cached_tensors_match_what_inference_sees(tmp_path, pipe, accelerator):
    write_synthetic_dataset(tmp_path / "data", num_clips=2, num_frames=9, size=32)
    cfg = TrainConfig(data=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), **SHAPE)
    clips, _ = find_clips(cfg.data)
    index = build_cache(cfg, clips, pipe, accelerator)
    item = CachedClips(index, index["entries"], cfg.max_sequence_length)[1]
    assert item["latent"].shape == (16, 3, 4, 4) and item["text"].shape == (16, 32)
    # latent frame 0 of the clip is exactly the anchor latent AnchoredWanPipeline injects at inference
    first = load_clip(clips[1].path, 1, cfg.fps, cfg.height, cfg.width)[0]
    assert torch.equal(item["latent"][:, :1], pipe.encode_anchor(Image.fromarray(first), 32, 32)[0])
    # the text embedding is the pipeline's own, zero padding included (batched encoding: float-level equal)
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(clips[1].caption, do_classifier_free_guidance=False, max_sequence_length=16)
    torch.testing.assert_close(item["text"], expected[0], rtol=0, atol=1e-5)
    assert torch.equal(item["text"] == 0, expected[0] == 0)


def test_miniworld_dataset_is_read_as_is(tmp_path):
    from fvg.miniworld.dataset import write_dataset

    write_dataset(tmp_path, num_clips=2, seed=0)
    clips, skipped = find_clips(tmp_path)
    assert len(clips) == 2 and not skipped
    assert load_clip(clips[0].path, num_frames=17, fps=8, height=64, width=64).shape == (17, 64, 64, 3)
