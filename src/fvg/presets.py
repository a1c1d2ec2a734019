"""Presets: named, complete settings for one video model family and its anchor and planner.

A preset says which checkpoints to load (hub ids or local paths) and how to sample them.
Every field can be overridden (`FactorizedPipeline.from_preset(name, field=value)` or the
CLI flags). `builtin:` model ids are built in code or shipped with the package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fvg.io import FvgError, conform

MODES = ("t2v", "upsampled", "factorized")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    family: str  # a `fvg.families` name: which family loads and samples the video model
    video_model: str
    anchor_model: str | None
    height: int
    width: int
    num_frames: int
    fps: int
    guidance_scale: float
    flow_shift: float | None = None
    guidance_scale_2: float | None = None  # Wan2.2-A14B's low-noise expert
    lora: str | None = None  # the anchor LoRA (high-noise expert for A14B)
    # A14B low-noise expert: a file, "same" (`lora` in both experts) or "none" (no LoRA). Unset with `lora`
    # set: the `anchor_lora_2*` file next to it, else an error (fvg.animate.loading.resolve_lora_2).
    lora_2: str | None = None
    needs_lora: bool = False  # T2V checkpoints respect an anchor only once the anchor LoRA is loaded
    steps_factorized: int = 15  # the paper: anchored sampling holds up at 15 steps
    steps_baseline: int = 50
    negative_prompt: str = ""
    anchor_steps: int = 50
    anchor_guidance: float = 4.0
    anchor_area: int | None = None  # generate anchors at the video's aspect ratio with this many pixels
    planner: str = "rules"
    planner_model: str | None = None
    output_is_noise: bool = False
    # Sample over Wan's zero text padding through one kept row (fvg.families.text_padding): same output to
    # float rounding, faster. Off where outputs must stay bitwise equal to stock diffusers.
    compact_text: bool = False
    # Merge the anchor LoRA into the video weights while a factorized video samples (one matmul per layer
    # instead of PEFT's three; fvg.animate.loading.set_anchor_lora), restoring the saved base weights bit for
    # bit for the baselines. Costs a copy of the LoRA's layers; only with native weights and the video
    # model placed whole (gpu or model-offload). Same output to float rounding, faster.
    fuse_lora: bool = False
    # Classifier-free guidance's two predictions in one transformer call on a batch of two, in the anchor model
    # and the video model alike (`AnchoredWanPipeline(batch_guidance=True)`): faster where per-call overhead
    # dominates (small models), twice the peak activations. Same output to float rounding.
    batch_guidance: bool = False
    # The VAE's convolutions through oneDNN and Wan's RMS norm as a plain sum of squares on a CPU
    # (fvg.families.cpu_vae): PyTorch's CPU defaults are 2.5-25x slower on small VAEs. Same output to float
    # rounding; no effect on a GPU.
    cpu_vae_kernels: bool = False
    # An option, not the paper's method (Wan family): factorized sampling starts from the anchor held still,
    # noised to where the last `int(steps * still_strength)` steps begin (`AnchoredWanPipeline`); None: from noise.
    still_strength: float | None = None

    def steps_for(self, mode: str) -> int:
        return self.steps_factorized if mode == "factorized" else self.steps_baseline

    def replace(self, **overrides) -> "Preset":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise FvgError(f"unknown preset field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


QWEN_IMAGE = "Qwen/Qwen-Image"
QWEN_IMAGE_AREA = 1328 * 1328  # Qwen-Image's native pixel count
PAPER_PLANNER = "Qwen/Qwen2.5-7B-Instruct"
# What `fvg generate` runs without --preset: trained, offline, seconds on a CPU.
DEFAULT_PRESET = "mini"

# The `mini` models ship inside the package (trained by `fvg miniworld train`, docs/miniworld.md).
MINI_WEIGHTS = Path(__file__).resolve().parent / "weights" / "mini"
# Wan's reference sampling code uses this negative prompt for every T2V/TI2V model.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="wan2.1-1.3b", description="Wan2.1 T2V 1.3B + anchor LoRA, Qwen-Image anchors (the paper's Wan 1B)",
            family="wan", video_model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", anchor_model=QWEN_IMAGE,
            height=480, width=832, num_frames=81, fps=16, guidance_scale=5.0, flow_shift=3.0, needs_lora=True,
            anchor_area=QWEN_IMAGE_AREA, planner_model=PAPER_PLANNER, negative_prompt=WAN_NEGATIVE_PROMPT,
        ),
        Preset(
            name="wan2.2-5b", description="Wan2.2 TI2V 5B: anchors natively, no LoRA needed",
            family="wan", video_model="Wan-AI/Wan2.2-TI2V-5B-Diffusers", anchor_model=QWEN_IMAGE,
            height=704, width=1280, num_frames=121, fps=24, guidance_scale=5.0, flow_shift=5.0,
            anchor_area=QWEN_IMAGE_AREA, planner_model=PAPER_PLANNER, negative_prompt=WAN_NEGATIVE_PROMPT,
        ),
        Preset(
            name="wan2.2-a14b", description="Wan2.2 T2V A14B (two experts) + anchor LoRA on both experts",
            family="wan", video_model="Wan-AI/Wan2.2-T2V-A14B-Diffusers", anchor_model=QWEN_IMAGE,
            height=480, width=832, num_frames=81, fps=16, guidance_scale=4.0, guidance_scale_2=3.0,
            flow_shift=12.0, needs_lora=True, anchor_area=QWEN_IMAGE_AREA, planner_model=PAPER_PLANNER, negative_prompt=WAN_NEGATIVE_PROMPT,
        ),
        Preset(
            name="cogvideox1.5-5b", description="CogVideoX1.5 T2V 5B + anchor LoRA (docs/cogvideox.md)",
            family="cogvideox", video_model="THUDM/CogVideoX1.5-5B", anchor_model=QWEN_IMAGE,
            height=768, width=1360, num_frames=81, fps=16, guidance_scale=6.0, needs_lora=True,
            anchor_area=QWEN_IMAGE_AREA, planner_model=PAPER_PLANNER,
        ),
        Preset(
            name="mini", description="MiniWorld models trained on 2 CPU cores (docs/miniworld.md): real output, offline",
            family="wan", video_model=str(MINI_WEIGHTS / "video"), anchor_model=str(MINI_WEIGHTS / "anchor"),
            lora=str(MINI_WEIGHTS / "anchor_lora.safetensors"), height=64, width=64, num_frames=17, fps=8,
            guidance_scale=4.0, needs_lora=True, steps_factorized=15, steps_baseline=50, anchor_steps=15,
            anchor_guidance=4.0, compact_text=True, fuse_lora=True, batch_guidance=True, cpu_vae_kernels=True,
        ),
        Preset(
            name="tiny", description="random tiny instances of the real classes, built offline: smoke tests only",
            family="wan", video_model="builtin:tiny-wan", anchor_model="builtin:tiny-qwen-image",
            height=32, width=32, num_frames=9, fps=8, guidance_scale=5.0, flow_shift=3.0,
            anchor_steps=4, anchor_guidance=1.0, output_is_noise=True,
        ),
        Preset(
            name="tiny-cogvideox", description="random tiny CogVideoX1.5-shaped models, built offline: smoke tests only",
            family="cogvideox", video_model="builtin:tiny-cogvideox", anchor_model="builtin:tiny-qwen-image",
            height=32, width=32, num_frames=9, fps=8, guidance_scale=6.0,
            anchor_steps=4, anchor_guidance=1.0, output_is_noise=True,
        ),
    ]
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise FvgError(f"unknown preset '{name}' (choose from: {', '.join(PRESETS)})")
    return PRESETS[name].replace(**overrides)


def preset_overrides(name: str, values: dict) -> dict:
    """`--set FIELD=VALUE` values (already parsed, `fvg.train.config.parse_set`) checked against preset
    `name`'s fields and their types: one FvgError line for an unknown field or a value of the wrong kind.
    Integers are accepted where a float is expected (`guidance_scale=1`)."""
    fields = {f.name: f.type for f in dataclasses.fields(Preset)}
    get_preset(name)
    checked = {}
    for key, value in values.items():
        kind = fields.get(key)
        if kind is None or key == "name":
            choices = ", ".join(sorted(set(fields) - {"name"}))
            raise FvgError(f"--set {key}: not a preset field (choose from: {choices})")
        try:
            checked[key] = conform(value, tuple(t for t in (bool, int, float, str) if t.__name__ in kind.split(" | ")))
        except ValueError:
            raise FvgError(f"--set {key}={value!r}: expected {kind}") from None
    return checked


def validate_mode(mode: str) -> None:
    if mode not in MODES:
        raise FvgError(f"unknown mode '{mode}' (choose from: {', '.join(MODES)})")
