"""The `mini` preset's models: real diffusers / transformers classes, small enough to train on 2 CPU cores.

* VAE: `AutoencoderKLWan`, 4x spatial and 4x temporal compression (64x64x17 -> 16x16x5), z_dim 16.
  Its `latents_mean` / `latents_std` are measured on the training latents and written into its
  config, so the pipelines normalise exactly as they do for Wan checkpoints.
* Text: `UMT5EncoderModel` (d_model 64), randomly initialised from a fixed seed and frozen, with a
  word-level tokenizer over MiniWorld's `VOCABULARY` (built offline with `tokenizers`, wrapped in
  `PreTrainedTokenizerFast`). Every MiniWorld prompt and caption is a distinct token sequence and a
  random transformer encoder keeps distinct sequences distinguishable (word identity and order),
  so the diffusion transformers learn to read it; training it would add cost and nothing they need.
* T2V base: `WanTransformer3DModel`, patch (1, 2, 2): 8x8 tokens per latent frame, 320 per clip.
* Anchor (text-to-image) model: a second `WanTransformer3DModel` trained on single frames
  (one latent frame, 64 tokens) with first-frame captions, used through a one-frame `WanPipeline`.
* Scheduler: `UniPCMultistepScheduler` with flow sigmas, as Wan's diffusers checkpoints ship.

Shipped layout (`src/fvg/weights/mini/`, diffusers `save_pretrained` layout):
    video/                     WanPipeline dir (loads as `AnchoredWanPipeline.from_pretrained`)
    anchor/                    WanPipeline dir with the one-frame anchor transformer
    anchor_lora.safetensors    the anchor LoRA on video/transformer (diffusers `transformer.` keys)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fvg.io import FvgError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "mini"
VIDEO_SUBDIR = "video"
ANCHOR_SUBDIR = "anchor"
PIPELINE_SUBDIRS = {"anchor": ANCHOR_SUBDIR, "t2v": VIDEO_SUBDIR}  # the stages that ship a WanPipeline
LORA_FILE = "anchor_lora.safetensors"
MAX_SHIPPED_BYTES = 40 * 1024 * 1024

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
TEXT_SEED = 1234  # the frozen text encoder is this seed's random initialisation
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default padding: training pads the same way


@dataclass
class VaeConfig:
    base_dim: int = 8
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    temperal_downsample: list[bool] = field(default_factory=lambda: [True, True])

    @property
    def scale_spatial(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def scale_temporal(self) -> int:
        return 2 ** sum(self.temperal_downsample)


@dataclass
class TextConfig:
    d_model: int = 64
    d_kv: int = 16
    d_ff: int = 128
    num_layers: int = 2
    num_heads: int = 4
    relative_attention_num_buckets: int = 16
    # v2: the random relative-position biases, scaled up. At UMT5's own init scale attention is nearly
    # uniform, so each output token is mostly its own word: "A left of B" and "B left of A" came out 7x
    # closer (as the sets of tokens that the DiT's position-free cross-attention sees) than prompts that
    # differ in one colour; scaled by 10 they differ as much as that (docs/miniworld.md, v2 diagnosis).
    relative_bias_scale: float = 10.0


@dataclass
class TransformerConfig:
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    ffn_dim: int = 512
    num_layers: int = 4
    freq_dim: int = 256
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    # "zero" (v3): `zero_init_residuals`, DiT's adaLN-Zero and Wan's zero output head; "torch": diffusers'
    # from-config initialisation (PyTorch's layer defaults), v1's and v2's.
    init: str = "zero"


@dataclass
class MiniConfig:
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # v7: an 8-layer T2V base (v1-v6: 4). The video stage was the weakest rung and neither the anchor
    # LoRA's recipe nor sampling moved it; the deeper base did (docs/miniworld.md, "v7").
    # v11: 6 heads (dim 192) and ffn 768 (v7-v10: 4 heads, dim 128, ffn 512). Depth past 8 layers (v9) and a
    # still-scene VAE (v10) did not move the video stage; width did, and more with more training
    # (docs/miniworld.md, "v11").
    t2v: TransformerConfig = field(
        default_factory=lambda: TransformerConfig(num_attention_heads=6, ffn_dim=768, num_layers=8))
    # v8: an 8-layer anchor model (v1-v7: 4); depth moved it as it moved the T2V base (docs/miniworld.md, "v8").
    # v3: patch 2 again (v2's patch 1 cost 2.4x per step and scored no better, docs/miniworld.md)
    anchor: TransformerConfig = field(default_factory=lambda: TransformerConfig(num_layers=8))
    flow_shift: float = 2.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MiniConfig":
        # Runs made before a setting existed recorded none: read them with what they ran.
        text = {"relative_bias_scale": 1.0, **d["text"]}  # before v2: UMT5's own scale
        t2v, anchor = ({"init": "torch", **d[k]} for k in ("t2v", "anchor"))  # before v3: diffusers' init
        return cls(vae=VaeConfig(**d["vae"]), text=TextConfig(**text), t2v=TransformerConfig(**t2v),
                   anchor=TransformerConfig(**anchor), flow_shift=d["flow_shift"])


def tiny_config() -> MiniConfig:
    """A few-thousand-parameter version of every model, for tests of the whole training recipe."""
    small = TransformerConfig(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=1, freq_dim=32)
    return MiniConfig(vae=VaeConfig(base_dim=4, z_dim=4), text=TextConfig(d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                                           num_heads=2),
                      t2v=small, anchor=dataclasses.replace(small, patch_size=[1, 1, 1]))


def v1_config() -> MiniConfig:
    """The models of the shipped v1 weights: UMT5's own bias scale, diffusers' initialisation."""
    return MiniConfig(text=TextConfig(relative_bias_scale=1.0), t2v=TransformerConfig(init="torch"),
                      anchor=TransformerConfig(init="torch"))


# -- tokenizer and text encoder -------------------------------------------------------------------

def build_tokenizer():
    """A word-level tokenizer over MiniWorld's vocabulary: lower-cases, splits words and punctuation,
    maps any unknown word to `<unk>` and appends `</s>` as UMT5's tokenizer does."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from .grammar import VOCABULARY

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in VOCABULARY:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                      special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=MAX_SEQUENCE_LENGTH, padding_side="right")


def build_text_encoder(cfg: TextConfig, vocab_size: int, seed: int = TEXT_SEED):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    with torch.no_grad():  # saved scaled: loading the encoder needs nothing of this
        for module in model.modules():
            bias = getattr(module, "relative_attention_bias", None)
            if isinstance(bias, torch.nn.Embedding):
                bias.weight.mul_(cfg.relative_bias_scale)
    return model.eval().requires_grad_(False)


# -- VAE, transformers, scheduler -----------------------------------------------------------------

def build_vae(cfg: VaeConfig, latents_mean: list[float] | None = None, latents_std: list[float] | None = None):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temperal_downsample), attn_scales=[],
        latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * cfg.z_dim,
        latents_std=list(latents_std) if latents_std is not None else [1.0] * cfg.z_dim,
        scale_factor_spatial=cfg.scale_spatial, scale_factor_temporal=cfg.scale_temporal,
    )


def build_transformer(cfg: TransformerConfig, in_channels: int, text_dim: int):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim, in_channels=in_channels, out_channels=in_channels,
        text_dim=text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )
    if cfg.init == "zero":
        zero_init_residuals(model)
    elif cfg.init != "torch":
        raise FvgError(f"unknown transformer init '{cfg.init}' (torch or zero)")
    return model


def zero_init_residuals(model) -> None:
    """DiT's adaLN-Zero on a `WanTransformer3DModel`, with Wan's own initialisation elsewhere.

    Why: diffusers builds the model from a config with PyTorch's layer defaults, so every block starts
    as a random function added to the residual stream and the output head is random. DiT (Peebles &
    Xie, 2023) found zero-initialised residual gates train markedly faster, and Wan's reference code
    zero-initialises its head. Here: Xavier-uniform Linear weights with zero biases (Wan's), the gates
    of self-attention and the feed-forward zero (their rows in the shared `time_proj` and each block's
    `scale_shift_table`), the cross-attention's output projection zero (Wan's cross-attention has no
    gate), and `proj_out` zero. Every block is then the identity and the model predicts 0 at step 0.
    """
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
        time_proj = model.condition_embedder.time_proj
        for gate in (2, 5):  # (shift, scale, gate) for self-attention, then for the feed-forward
            time_proj.weight[gate * dim:(gate + 1) * dim].zero_()
            time_proj.bias[gate * dim:(gate + 1) * dim].zero_()
        for block in model.blocks:
            block.scale_shift_table[:, 2].zero_()
            block.scale_shift_table[:, 5].zero_()
            block.attn2.to_out[0].weight.zero_()
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()


def build_scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)


def assemble_pipeline(tokenizer, text_encoder, vae, transformer, flow_shift: float):
    """A plain diffusers `WanPipeline` (so `save_pretrained` records `WanPipeline` and both
    `WanPipeline` and `AnchoredWanPipeline` load the directory)."""
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=build_scheduler(flow_shift))


# -- the shipped weights --------------------------------------------------------------------------

def weights_dir() -> Path:
    return WEIGHTS_DIR


def video_dir(root: str | Path | None = None) -> Path:
    return Path(root or WEIGHTS_DIR) / VIDEO_SUBDIR


def anchor_dir(root: str | Path | None = None) -> Path:
    return Path(root or WEIGHTS_DIR) / ANCHOR_SUBDIR


def lora_path(root: str | Path | None = None) -> Path:
    return Path(root or WEIGHTS_DIR) / LORA_FILE


def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def require_weights(root: str | Path | None = None) -> Path:
    """The weights root, or an FvgError that says how to make the weights."""
    root = Path(root or WEIGHTS_DIR)
    missing = [p for p in (video_dir(root), anchor_dir(root)) if not is_pipeline_dir(p)]
    if not lora_path(root).is_file():
        missing.append(lora_path(root))
    if missing:
        raise FvgError(f"the mini models are missing ({', '.join(str(m) for m in missing)}): train them with "
                       f"`fvg miniworld train --out runs/mini --stage all --resume` (docs/miniworld.md)")
    return root


def load_video_pipeline(root: str | Path | None = None, lora: bool = True, dtype: torch.dtype = torch.float32):
    """`AnchoredWanPipeline` from the shipped (or given) weights, with the anchor LoRA attached."""
    from fvg.animate.loading import load_anchor_lora
    from fvg.animate.wan import AnchoredWanPipeline

    root = require_weights(root) if lora else Path(root or WEIGHTS_DIR)
    pipe = AnchoredWanPipeline.from_pretrained(str(video_dir(root)), dtype=dtype)
    if lora:
        load_anchor_lora(pipe, str(lora_path(root)))
    return pipe


def load_anchor_pipeline(root: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The one-frame text-to-image `WanPipeline`."""
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(anchor_dir(root)), dtype=dtype)


def shipped_size(root: str | Path | None = None) -> int:
    root = Path(root or WEIGHTS_DIR)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def read_manifest(root: str | Path | None = None) -> dict:
    path = Path(root or WEIGHTS_DIR) / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
