"""Stage 2: anchors from a diffusers text-to-image pipeline or from the user's file."""

import numpy as np
import pytest
from PIL import Image

from fvg.anchor import DiffusersAnchorSource, FileAnchorSource, fit_to_resolution, generation_size
from fvg.io import FvgError
from fvg.tiny import tiny_qwen_image_pipeline


@pytest.fixture(scope="module")
def qwen_image_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen-image")
    tiny_qwen_image_pipeline().save_pretrained(path)
    return path


def test_autopipeline_loads_qwen_image_and_keeps_every_candidate(qwen_image_dir):
    source = DiffusersAnchorSource.from_pretrained(str(qwen_image_dir), dtype=None, steps=2,
                                                   guidance_scale=1.0, native_area=64 * 48)
    assert type(source.pipe).__name__ == "QwenImagePipeline"
    result = source("a red circle on the left", height=32, width=48, num_candidates=3, seed=10, selected=2)
    assert [c.seed for c in result.candidates] == [10, 11, 12]
    assert all(c.image.size == (48, 32) for c in result.candidates)
    assert result.image is result.candidates[2].image
    assert result.settings["generation_size"] == [48, 64]  # the video's 2:3 aspect at the native area
    again = source("a red circle on the left", height=32, width=48, num_candidates=1, seed=11)
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(result.candidates[1].image))


def test_loader_follows_the_dir_and_a_video_pipeline_skips_the_auto_tables(qwen_image_dir, tmp_path):
    import json
    import subprocess
    import sys

    wan_dir = tmp_path / "one-frame-wan"
    wan_dir.mkdir()
    (wan_dir / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    other_dir = tmp_path / "not-in-the-tables"
    other_dir.mkdir()
    (other_dir / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    probe = (
        "import sys\n"
        "from fvg.anchor import _pipeline_loader\n"
        "names = [_pipeline_loader(p).__name__ for p in sys.argv[1:]]\n"
        "print(*names, 'diffusers.pipelines.auto_pipeline' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe, str(wan_dir)], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["DiffusionPipeline", "False"]
    run = subprocess.run([sys.executable, "-c", probe, str(qwen_image_dir), str(other_dir), "some-org/some-model"],
                         capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["AutoPipelineForText2Image", "DiffusionPipeline", "AutoPipelineForText2Image",
                                  "True"]


def test_candidate_selection_is_validated(qwen_image_dir):
    source = DiffusersAnchorSource.from_pretrained(str(qwen_image_dir), dtype=None, steps=1)
    with pytest.raises(FvgError, match="out of range"):
        source("x", 32, 32, num_candidates=2, selected=2)
    with pytest.raises(FvgError, match="at least 1"):
        source("x", 32, 32, num_candidates=0)


def test_missing_model_offline_names_the_weights(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FvgError, match="not available offline.*hf download no-such-org/no-such-model"):
        DiffusersAnchorSource.from_pretrained("no-such-org/no-such-model")


def test_fit_covers_then_centre_crops():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 50, 100))  # a blue band on the left, cropped away
    fitted = fit_to_resolution(image, 64, 64)
    assert fitted.size == (64, 64)
    assert np.abs(np.asarray(fitted)[:, 0].astype(int) - (255, 0, 0)).max() < 16
    assert generation_size(480, 832, None) == (480, 832)
    h, w = generation_size(480, 832, 1328 * 1328)
    assert h % 16 == 0 and w % 16 == 0 and abs(h / w - 480 / 832) < 0.02


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_file_source_reads_png_jpeg_webp(tmp_path, fmt):
    path = tmp_path / f"anchor.{fmt.lower()}"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(path, format=fmt)
    result = FileAnchorSource()(path, 32, 32)
    assert result.image.size == (32, 32) and result.source == "file" and result.candidates[0].seed is None


def test_file_source_rejects_corrupt_missing_and_other_formats(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(FvgError, match="cannot read image"):
        FileAnchorSource()(corrupt, 32, 32)
    with pytest.raises(FvgError, match="not found"):
        FileAnchorSource()(tmp_path / "nope.png", 32, 32)
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (8, 8)).save(gif)
    with pytest.raises(FvgError, match="unsupported image format GIF"):
        FileAnchorSource()(gif, 32, 32)
