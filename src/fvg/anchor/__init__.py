"""Stage 2: the anchor, the video's first frame, rendered from the plan's first-frame caption.

Two sources. `DiffusersAnchorSource` runs any diffusers text-to-image pipeline (Qwen-Image
as in the paper, FLUX, SDXL, SD3 through `AutoPipelineForText2Image`, or a one-frame Wan
model such as MiniWorld's) and keeps every candidate with its seed. `FileAnchorSource`
takes the user's own image. Either way the anchor is fitted to the video resolution
(scaled to cover, then centre-cropped) so that it encodes to exactly one latent frame.

Each text-to-image family takes its guidance differently (`anchor_call_style`): Qwen-Image
runs true classifier-free guidance (`true_cfg_scale` with the negative prompt " ", as its
reference code); FLUX.1 takes `guidance_scale` as the distilled guidance embedding and runs
one pass per step (its `true_cfg_scale` stays off: true CFG would double the cost and leave
the distribution the model was distilled on); SD3 and SDXL run CFG through `guidance_scale`
with their own empty negative prompt. Families are told apart by pipeline class, never by
call parameters (FLUX's `__call__` also has `true_cfg_scale`). Any other class gets
`guidance_scale` if its `__call__` takes one, else its own defaults.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fvg.io import FvgError, load_image, load_or_explain


@dataclass
class AnchorCandidate:
    image: Image.Image  # already at the video resolution
    seed: int | None  # None for a user-supplied image


@dataclass
class AnchorResult:
    candidates: list[AnchorCandidate]
    selected: int = 0
    source: str = "diffusers"
    model: str | None = None
    caption: str | None = None
    settings: dict = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return self.candidates[self.selected].image


def fit_to_resolution(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale `image` to cover height x width, then centre-crop: no stretching, no borders."""
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def generation_size(height: int, width: int, area: int | None, multiple: int = 16) -> tuple[int, int]:
    """The text-to-image resolution: the video's aspect ratio at the model's native pixel area."""
    if area is None:
        return height, width
    aspect = height / width
    gen_h = max(multiple, round(math.sqrt(area * aspect) / multiple) * multiple)
    gen_w = max(multiple, round(math.sqrt(area / aspect) / multiple) * multiple)
    return gen_h, gen_w


class FileAnchorSource:
    """The user's own first frame (PNG, JPEG or WebP)."""

    name = "file"

    def __call__(self, path: str | Path, height: int, width: int) -> AnchorResult:
        image = fit_to_resolution(load_image(path), height, width)
        return AnchorResult([AnchorCandidate(image, None)], source="file", model=str(path))


def _pipeline_loader(model_id: str):
    """`DiffusionPipeline` for a local diffusers dir whose pipeline class AutoPipelineForText2Image cannot
    resolve (MiniWorld's anchor model, a one-frame WanPipeline), else `AutoPipelineForText2Image`.

    A video pipeline (its `__call__` takes `num_frames`) is recognised by its own class, so the mini preset
    never imports diffusers' auto-pipeline tables (about 1 s of every `fvg generate`, which loads a dozen
    pipeline modules it does not use); other names are looked up in those tables."""
    import json

    import diffusers

    index = Path(model_id) / "model_index.json"
    name = ""
    if index.is_file():
        try:
            name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        except (OSError, ValueError):
            pass  # unreadable: treated as a hub id
    if not name:
        return diffusers.AutoPipelineForText2Image
    named = getattr(diffusers, name, None)
    if named is not None and "num_frames" in inspect.signature(named.__call__).parameters:
        return diffusers.DiffusionPipeline
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    if name in {cls.__name__ for cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values()}:
        return diffusers.AutoPipelineForText2Image
    return diffusers.DiffusionPipeline


@dataclass(frozen=True)
class AnchorCallStyle:
    """How one text-to-image family takes the anchor's guidance scale."""

    family: str  # recorded in the anchor settings of every run
    guidance_arg: str | None  # the `__call__` argument that gets the scale; None: the pipeline's default
    negative_prompt: bool = False  # true CFG that needs a negative prompt (Qwen-Image)


QWEN_IMAGE_STYLE = AnchorCallStyle("qwen-image", "true_cfg_scale", negative_prompt=True)
FLUX_STYLE = AnchorCallStyle("flux", "guidance_scale")  # distilled guidance, one pass per step
SD3_STYLE = AnchorCallStyle("sd3", "guidance_scale")
SDXL_STYLE = AnchorCallStyle("sdxl", "guidance_scale")
VIDEO_STYLE = AnchorCallStyle("one-frame-video", "guidance_scale")  # e.g. MiniWorld's one-frame Wan model


def anchor_call_style(pipe) -> AnchorCallStyle:
    """The call style of `pipe`'s family, by class (subclasses included); see the module docstring."""
    from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    for cls, style in ((QwenImagePipeline, QWEN_IMAGE_STYLE), (FluxPipeline, FLUX_STYLE),
                       (StableDiffusion3Pipeline, SD3_STYLE), (StableDiffusionXLPipeline, SDXL_STYLE)):
        if isinstance(pipe, cls):
            return style
    params = inspect.signature(type(pipe).__call__).parameters
    if "num_frames" in params:
        return VIDEO_STYLE
    guidance = "guidance_scale" if "guidance_scale" in params else None
    return AnchorCallStyle(f"other:{type(pipe).__name__}", guidance)


class DiffusersAnchorSource:
    """Any diffusers text-to-image pipeline, called with the first-frame caption."""

    name = "diffusers"

    def __init__(self, pipe, model_id: str | None = None, steps: int = 50, guidance_scale: float = 4.0,
                 native_area: int | None = None, negative_prompt: str = " ", call_kwargs: dict | None = None):
        """`call_kwargs`: extra keyword arguments of every pipeline call (recorded in the anchor's settings),
        e.g. `batch_guidance` for a one-frame Wan model (`ModelFamily.guidance_batching`)."""
        self.pipe = pipe
        self.call_kwargs = dict(call_kwargs or {})
        self.model_id = model_id
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.native_area = native_area
        self.negative_prompt = negative_prompt
        self.style = anchor_call_style(pipe)
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, model_id: str, dtype: torch.dtype | None = torch.bfloat16, device: str = "cpu",
                        storage=None, **kwargs) -> "DiffusersAnchorSource":
        """`storage` (`fvg.weight_storage.WeightStorage`): `--quantize` quantizes the T2I transformer and
        text encoder while loading, `--weights fp8` stores the transformer in fp8 (no GGUF here)."""
        from fvg.weight_storage import from_pretrained_arguments, store_denoisers_in_fp8

        loader = _pipeline_loader(model_id)
        pipe = load_or_explain(loader.from_pretrained, model_id, dtype=dtype,
                               **from_pretrained_arguments(storage and storage.for_anchor(), model_id, dtype))
        if storage is not None and storage.weights == "fp8":
            store_denoisers_in_fp8(pipe, dtype)
        return cls(pipe.to(device), model_id=model_id, **kwargs)

    def _generate_one(self, caption: str, height: int, width: int, seed: int) -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(seed)
        kwargs = dict(prompt=caption, height=height, width=width, num_inference_steps=self.steps,
                      generator=generator, **self.call_kwargs)
        if self.style.guidance_arg is not None:
            kwargs[self.style.guidance_arg] = self.guidance_scale
        if self.style.negative_prompt and self.guidance_scale > 1:  # true CFG runs only with a negative prompt
            kwargs.update(negative_prompt=self.negative_prompt)
        if self.style is VIDEO_STYLE:
            frame = self.pipe(**kwargs, num_frames=1, output_type="np").frames[0][0]
            return Image.fromarray((np.clip(frame, 0, 1) * 255 + 0.5).astype(np.uint8))
        return self.pipe(**kwargs, output_type="pil").images[0]

    def __call__(self, caption: str, height: int, width: int, num_candidates: int = 1, seed: int = 0,
                 selected: int = 0, progress=None) -> AnchorResult:
        if num_candidates < 1:
            raise FvgError(f"num_candidates must be at least 1, got {num_candidates}")
        if not 0 <= selected < num_candidates:
            raise FvgError(f"selected candidate {selected} is out of range for {num_candidates} candidates")
        gen_h, gen_w = generation_size(height, width, self.native_area)
        candidates = []
        for i in range(num_candidates):
            image = self._generate_one(caption, gen_h, gen_w, seed + i)
            candidates.append(AnchorCandidate(fit_to_resolution(image, height, width), seed + i))
            if progress is not None:
                progress(i + 1, num_candidates)
        settings = {"steps": self.steps, "guidance_scale": self.guidance_scale, "generation_size": [gen_h, gen_w],
                    "call_style": self.style.family, "guidance_arg": self.style.guidance_arg}
        if self.call_kwargs:
            settings["call_kwargs"] = dict(self.call_kwargs)
        return AnchorResult(candidates, selected, "diffusers", self.model_id, caption, settings)
