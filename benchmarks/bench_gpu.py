"""Real-scale check: every stage of every preset, at full size and full resolution, in each memory mode.

Builds each preset's models from their published configs (`src/fvg/model_configs/`, no download)
with random weights (bf16; the video VAEs in fp32 as fvg loads them), and runs each stage once per memory mode
with few steps, through the same pipelines `fvg generate` uses (`AnchoredWanPipeline`,
`AnchoredCogVideoXPipeline`, diffusers' `QwenImagePipeline`) and the same placement code
(`fvg.residency.apply_mode`). Text goes in as embeddings of the encoders' real widths (no tokenizer
files offline); each text encoder still runs one forward on random token ids inside its stage, so
its memory counts. Every (stage, mode) runs in its own process: peaks cannot hide each other and
offload hooks never leak between modes.

A job is `stage:preset:mode[:weights]`. `fp8` stores the denoisers' weights in fp8 (`--weights fp8`,
`fvg.weight_storage.store_denoisers_in_fp8`, cast before the memory mode's hooks go on, as fvg
orders it). `torchao-int8wo`, `bnb-8bit`, `bnb-4bit` (`--quantize`; bitsandbytes on CUDA only) and
`gguf-q8_0` (`--video-transformer FILE.gguf`, Wan only) apply to the animate stage: quantization
happens while a checkpoint loads, so the built pipeline is saved to a temporary folder (the
transformer also as a Q8_0 GGUF file in the original Wan layout, `fvg.families.wan.save_wan_gguf`)
and loaded back through the family's own loader with that option, as `fvg generate` loads it.
The `speed` stage builds one video pipeline, places it whole and samples the same anchored video
with each attention backend and then with regional compilation (`fvg.speed`),
recording seconds per step and each variant's largest difference from the default backend.

Recorded per job: peak device memory of the stage (`torch.cuda.max_memory_allocated`), seconds
per denoising step (from the 2nd step on), the text encoder's and the VAE decode's seconds, and
the card. Results go to `--out` as JSON lines (appended as each job ends, so a cut-off run keeps
what it measured) and a markdown table.

    python benchmarks/bench_gpu.py --out runs/bench-gpu                 # on a CUDA machine
    python benchmarks/bench_gpu.py --toy --out runs/bench-gpu-toy       # CPU: same code, tiny models

`--toy` swaps the full-size builders for fvg's tiny random models at toy resolution on the CPU,
where only the `gpu` mode exists (it is what tests/test_bench_gpu.py runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

GIB = 2**30
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "fvg" / "model_configs"
QWEN_IMAGE, PLANNER = "Qwen--Qwen-Image", "Qwen--Qwen2.5-7B-Instruct"
VIDEO = {"wan2.1-1.3b": "Wan-AI--Wan2.1-T2V-1.3B-Diffusers", "wan2.2-5b": "Wan-AI--Wan2.2-TI2V-5B-Diffusers",
         "wan2.2-a14b": "Wan-AI--Wan2.2-T2V-A14B-Diffusers", "cogvideox1.5-5b": "THUDM--CogVideoX1.5-5B"}
MODES = ("gpu", "model-offload", "group-offload", "sequential")
WEIGHTS = ("native", "fp8", "torchao-int8wo", "bnb-8bit", "bnb-4bit", "gguf-q8_0")
LOADED_WEIGHTS = ("torchao-int8wo", "bnb-8bit", "bnb-4bit", "gguf-q8_0")  # options that act while a checkpoint loads
CUDA_ONLY_WEIGHTS = ("bnb-8bit", "bnb-4bit")  # bitsandbytes quantizes on the GPU
# (stage, preset, modes) in the order they run: the cheap and the essential first, under a time budget.
DEFAULT_JOBS = [
    ("animate", "wan2.1-1.3b", ("gpu",)),
    ("animate", "wan2.2-5b", ("gpu",)),
    ("anchor", "wan2.2-5b", ("gpu",)),
    ("animate", "wan2.2-a14b", ("gpu",)),
    ("animate", "wan2.2-5b", ("group-offload",)),
    ("animate", "wan2.2-a14b", ("group-offload",)),
    ("animate", "wan2.1-1.3b", ("model-offload", "group-offload", "sequential")),
    ("anchor", "wan2.2-5b", ("model-offload", "group-offload")),
    ("plan", "wan2.2-5b", ("gpu",)),
    ("animate", "cogvideox1.5-5b", ("gpu", "group-offload")),
    ("animate", "wan2.2-5b", ("model-offload",)),
    ("animate", "wan2.2-a14b", ("model-offload",)),
    ("speed", "wan2.1-1.3b", ("gpu",)),
    ("animate", "wan2.2-a14b", ("gpu:fp8",)),
    ("animate", "wan2.2-5b", ("gpu:fp8",)),
]


# -- building models ------------------------------------------------------------------------------

def _config(*parts: str) -> dict:
    return json.loads((CONFIGS.joinpath(*parts, "config.json")).read_text())


def build_full(parts: tuple[str, ...], dtype, device: str):
    """A model from its shipped config, initialised directly on `device` in `dtype` (random weights),
    with the modules its class keeps in fp32 cast back, as `from_pretrained(dtype=...)` does."""
    import diffusers
    import torch
    import transformers

    config = _config(*parts)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if "_class_name" in config:
                model = getattr(diffusers, config["_class_name"]).from_config(config)
            else:
                model = getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype)  # transformers 5 builds in its own default (fp32), whatever torch's default is
    # Modules kept in fp32 as from_pretrained keeps them: diffusers always, transformers only under fp16
    # (UMT5's `wo`); keeping them otherwise overstated the Wan runs' weights by 1.9 GiB (BENCHMARKS.md).
    is_diffusers = type(model).__module__.startswith("diffusers")
    keep = (getattr(model, "_keep_in_fp32_modules", None) or []) if is_diffusers or dtype == torch.float16 else []
    for name, param in model.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def video_components(preset: str, device: str) -> dict:
    import torch
    from diffusers import CogVideoXDPMScheduler, UniPCMultistepScheduler

    repo = VIDEO[preset]
    parts = {name: (repo, name) for name in ("transformer", "text_encoder")}
    components = {name: build_full(p, torch.bfloat16, device) for name, p in parts.items()}
    components["vae"] = build_full((repo, "vae"), torch.float32, device)
    components["tokenizer"] = None
    if preset.startswith("cogvideox"):
        components["scheduler"] = CogVideoXDPMScheduler.from_config(
            json.loads((CONFIGS / repo / "scheduler" / "scheduler_config.json").read_text()))
    else:
        components["scheduler"] = UniPCMultistepScheduler.from_config(
            json.loads((CONFIGS / repo / "scheduler" / "scheduler_config.json").read_text()))
    if preset == "wan2.2-a14b":
        components["transformer_2"] = build_full((repo, "transformer_2"), torch.bfloat16, device)
        components["boundary_ratio"] = 0.875
    return components


def anchor_components(device: str) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {"transformer": build_full((QWEN_IMAGE, "transformer"), torch.bfloat16, device),
            "text_encoder": build_full((QWEN_IMAGE, "text_encoder"), torch.bfloat16, device),
            # bf16 as fvg loads the whole anchor pipeline (the H200 run of 2026-11-26 built it in fp32: its
            # anchor `gpu` peak counts the decode's activations twice over, BENCHMARKS.md)
            "vae": build_full((QWEN_IMAGE, "vae"), torch.bfloat16, device), "tokenizer": None,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                         max_shift=0.9, base_image_seq_len=256,
                                                         max_image_seq_len=8192, shift_terminal=0.02)}


# -- one job: one stage in one mode, in its own process ------------------------------------------------

class StepClock:
    """Seconds per denoising step from the 2nd step on (the 1st pays lazy initialisation)."""

    def __init__(self, sync):
        self.sync, self.stamps = sync, []

    def __call__(self, _pipe, _i, _t, _kwargs):
        self.sync()
        self.stamps.append(time.perf_counter())
        return {}

    def per_step(self) -> float | None:
        if len(self.stamps) < 2:
            return None
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


def run_job(stage: str, preset_name: str, mode: str, steps: int, toy: bool, weights: str = "native") -> dict:
    import torch

    from fvg.presets import get_preset
    from fvg.residency import apply_mode
    from fvg.residency import module_bytes
    from fvg.weight_storage import store_denoisers_in_fp8

    device = "cpu" if toy else "cuda"
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    preset = get_preset("tiny-cogvideox" if toy and preset_name.startswith("cogvideox") else
                        "tiny" if toy else preset_name)
    build_device = device  # random init is fast on the device; offload modes then move weights to the host
    start = time.perf_counter()
    record: dict = {"stage": stage, "preset": preset_name, "mode": mode, "steps": steps, "weights": weights}

    if stage == "plan":
        model = _toy_llm() if toy else build_full((PLANNER,), torch.bfloat16, build_device)
        record["build_s"] = round(time.perf_counter() - start, 1)
        if mode == "gpu":
            model.to(device)
        else:
            from accelerate import cpu_offload

            model.to("cpu")

            cpu_offload(model, execution_device=torch.device(device))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, model.config.vocab_size, (1, 512), device=device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=0)
        sync()
        record["generate_32_tokens_s"] = round(time.perf_counter() - t0, 3)
    elif stage == "speed":
        pipe, call = _video_pipeline(preset, preset_name, toy, build_device)
        record["build_s"] = round(time.perf_counter() - start, 1)
        pipe.to(device)
        record["variants"] = speed_variants(pipe, call, steps, sync, toy)
    else:
        pipe, call = (_anchor_pipeline(preset, toy, build_device) if stage == "anchor"
                      else _video_pipeline(preset, preset_name, toy, build_device))
        record["build_s"] = round(time.perf_counter() - start, 1)
        if weights == "fp8":  # before the hooks, as fvg orders it (weight_storage's docstring)
            record["fp8_components"] = store_denoisers_in_fp8(pipe, torch.bfloat16 if not toy else torch.float32)
        elif weights in LOADED_WEIGHTS:
            t0 = time.perf_counter()
            pipe = reload_with_weights(pipe, weights, device, record)
            record["save_and_load_s"] = round(time.perf_counter() - t0, 1)
        record["weights_gib"] = round(sum(module_bytes(m) for m in pipe.components.values()
                                          if isinstance(m, torch.nn.Module)) / GIB, 2)
        if mode == "gpu":
            pipe.to(device)
        else:
            pipe.to("cpu")  # as fvg loads weights: on the host, placed by the memory mode
            if cuda:
                torch.cuda.empty_cache()
            if mode == "group-offload" and cuda:
                from fvg.residency import group_offload_pins_per_transfer, host_bytes_available

                record["host_available_gib"] = round(host_bytes_available() / GIB, 1)
                record["pinned_per_transfer"] = group_offload_pins_per_transfer(pipe, device)
            apply_mode(pipe, mode, device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            _run_text_encoder(pipe, stage, device, toy)
            sync()
            record["text_encoder_s"] = round(time.perf_counter() - t0, 3)
        except RuntimeError as exc:  # the denoiser and VAE are still worth measuring; say what failed
            traceback.print_exc()
            record["text_encoder_error"] = str(exc).splitlines()[0][:200]
        clock = StepClock(sync)
        t0 = time.perf_counter()
        out = call(pipe, steps, clock, decode=mode == "gpu")
        sync()
        record["denoise_and_decode_s"] = round(time.perf_counter() - t0, 3)
        record["s_per_step"] = None if clock.per_step() is None else round(clock.per_step(), 3)
        record["output_shape"] = list(out.shape)
        record["decoded"] = mode == "gpu"
    record["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None
    record["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    record["torch"] = torch.__version__
    record["wall_s"] = round(time.perf_counter() - start, 1)
    return record


def reload_with_weights(pipe, weights: str, device: str, record: dict):
    """`pipe` saved to a temporary folder and loaded back by its family's loader with `weights`
    (`--quantize torchao-int8wo|bnb-8bit|bnb-4bit` or a Q8_0 GGUF video transformer): the path a
    checkpoint on disk takes. The VAE's tiling is carried over; the folder is removed once loaded. A full-size build has no tokenizer
    (no files offline): a tiny T5 tokenizer stands in, never called, since text goes in as embeddings."""
    import gc
    import shutil
    import tempfile

    import torch

    from fvg.families import family_of
    from fvg.families.wan import save_wan_gguf
    from fvg.weight_storage import WeightStorage

    family, dtype, tiled = family_of(pipe), pipe.transformer.dtype, pipe.vae.use_tiling
    if pipe.tokenizer is None:  # the bench feeds embeddings; a loadable checkpoint needs some tokenizer files
        from fvg.tiny import tiny_t5_tokenizer

        pipe.register_modules(tokenizer=tiny_t5_tokenizer())
    folder = Path(tempfile.mkdtemp(prefix="fvg-bench-"))
    try:
        pipe.save_pretrained(folder)
        if weights == "gguf-q8_0":
            gguf = folder / "transformer-Q8_0.gguf"
            record["gguf_q8_0_tensors"] = len(save_wan_gguf(pipe.transformer, gguf))
            storage = WeightStorage(video_transformer=str(gguf))
        else:
            storage = WeightStorage(quantize=weights)
        del pipe
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        loaded = family.load_pipeline(str(folder), dtype, storage=storage.validate(device))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if tiled:
        loaded.vae.enable_tiling()
    return loaded


TOY_BACKENDS = ("native", "_native_math")  # what a CPU can run
GPU_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient")


def speed_variants(pipe, call, steps: int, sync, toy: bool) -> list[dict]:
    """The same anchored video (latents) with each attention backend, then compiled (default backend).

    Each variant runs once untimed (kernel selection, compilation), then once timed. Differences are
    against the default backend's latents: the backends are different kernels, equal up to rounding."""
    from fvg import speed

    variants, reference = [], None

    def sample(name: str) -> None:
        nonlocal reference
        record: dict = {"variant": name}
        try:
            call(pipe, 2, lambda *a: {}, decode=False)
            clock = StepClock(sync)
            latents = call(pipe, max(steps, 3), clock, decode=False).float()  # 2 timed intervals at least
            record["s_per_step"] = round(clock.per_step(), 3)
            reference = latents if reference is None else reference
            record["max_abs_diff"] = float((latents - reference).abs().max())
        except Exception as exc:  # a backend this build cannot run: say so and go on
            record["error"] = " ".join(str(exc).split())[:200]
        variants.append(record)
        print(f"speed: {json.dumps(record)}", flush=True)

    for backend in TOY_BACKENDS if toy else GPU_BACKENDS:
        speed.set_attention_backend(pipe.transformer, backend)
        sample(backend)
    speed.set_attention_backend(pipe.transformer, "native")
    if toy:
        speed.COMPILE_BACKEND = "eager"  # inductor takes minutes on a CPU; the tests trace with eager too
    speed.apply_speed(pipe, speed.SpeedOptions(compile=True))
    sample(f"compile ({speed.COMPILE_BACKEND})")
    return variants


def _toy_llm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _run_text_encoder(pipe, stage: str, device: str, toy: bool) -> None:
    """One forward of the stage's text encoder on random ids (its weights and activations count)."""
    import torch

    encoder = pipe.text_encoder
    tokens = 128 if stage == "anchor" else (226 if "CogVideoX" in type(pipe).__name__ else 512)
    ids = torch.randint(0, min(encoder.config.vocab_size, 1000), (1, tokens), device=device)
    with torch.inference_mode():
        if stage == "anchor" and not toy:
            encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        else:
            encoder(input_ids=ids)


def _anchor_pipeline(preset, toy: bool, device: str):
    import torch
    from diffusers import QwenImagePipeline

    from fvg.anchor import generation_size

    if toy:
        from fvg.tiny import tiny_qwen_image_pipeline

        pipe = tiny_qwen_image_pipeline()
    else:
        pipe = QwenImagePipeline(**anchor_components(device))
    width = pipe.text_encoder.config.get_text_config().hidden_size if not toy else \
        pipe.transformer.config.joint_attention_dim
    height, gen_w = generation_size(preset.height, preset.width, preset.anchor_area)

    def call(pipe, steps, clock, decode):
        embeds = torch.randn(1, 128, width, generator=torch.Generator().manual_seed(0)).to(
            pipe._execution_device, pipe.transformer.dtype)
        mask = torch.ones(1, 128, dtype=torch.long, device=pipe._execution_device)
        return pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=embeds,
                    negative_prompt_embeds_mask=mask, true_cfg_scale=4.0, height=height, width=gen_w,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                    output_type="pt" if decode else "latent", callback_on_step_end=clock).images
    return pipe, call


def _video_pipeline(preset, preset_name: str, toy: bool, device: str):
    import torch
    from PIL import Image

    cogvideox = preset_name.startswith("cogvideox")
    if cogvideox:
        from fvg.animate.cogvideox import AnchoredCogVideoXPipeline as Pipeline
    else:
        from fvg.animate.wan import AnchoredWanPipeline as Pipeline
    if toy:
        from fvg.tiny import tiny_cogvideox_components, tiny_wan_components

        components = tiny_cogvideox_components() if cogvideox else tiny_wan_components()
    else:
        components = video_components(preset_name, device)
        if cogvideox:
            components.pop("transformer_2", None)
    if cogvideox:
        pipe = Pipeline(**components)
        text_tokens, width = 226, pipe.text_encoder.config.d_model
    else:
        pipe = Pipeline(**components)
        text_tokens, width = 512, pipe.text_encoder.config.d_model
    # fvg's rule (FactorizedPipeline): tile the VAE decode at 704p and above
    if preset.height * preset.width >= 704 * 1280:
        pipe.vae.enable_tiling()
    anchor = Image.new("RGB", (preset.width, preset.height), (90, 140, 60))

    def call(pipe, steps, clock, decode):
        embeds = torch.randn(1, text_tokens, width, generator=torch.Generator().manual_seed(0)).to(
            pipe._execution_device, pipe.transformer.dtype)
        kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=embeds, anchor=anchor, height=preset.height,
                      width=preset.width, num_frames=preset.num_frames, num_inference_steps=steps,
                      guidance_scale=preset.guidance_scale, generator=torch.Generator().manual_seed(0),
                      output_type="pt" if decode else "latent", callback_on_step_end=clock)
        if cogvideox:
            kwargs["max_sequence_length"] = text_tokens
        return pipe(**kwargs).frames
    return pipe, call


# -- the driver ---------------------------------------------------------------------------------------

def table(records: list[dict]) -> str:
    lines = ["| stage | preset | memory mode | weights | peak GiB | s/step | text enc. s | stage s | weights GiB | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        head = f"| {r['stage']} | {r['preset']} | {r['mode']} | {r.get('weights', 'native')} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | |")
            continue
        if r["stage"] == "speed":
            for v in r["variants"]:
                result = v.get("error", f"{v.get('s_per_step')} s/step, max diff {v.get('max_abs_diff', 0):.3g}")
                lines.append(f"{head} {r['peak_gib']} | {v['variant']}: {result} | | | | {r['device']} |")
            continue
        stage_s = r.get("denoise_and_decode_s", r.get("generate_32_tokens_s"))
        lines.append(f"{head} {r['peak_gib']} | {r.get('s_per_step')} | {r.get('text_encoder_s', '')} | {stage_s} | "
                     f"{r.get('weights_gib', '')} | {r['device']} |")
    return "\n".join(lines)


def main() -> None:
    from fvg.weight_storage import QUANTIZERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--toy", action="store_true", help="tiny models on the CPU (the test's scale)")
    parser.add_argument("--budget-s", type=float, default=540, help="start no job after this many seconds")
    parser.add_argument("--only", help="comma-separated stage:preset:mode jobs instead of the default list")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # child process: stage:preset:mode
    args = parser.parse_args()

    if args.job:
        stage, preset, mode, *weights = args.job.split(":")
        record = run_job(stage, preset, mode, args.steps, args.toy, *weights)
        print("RESULT " + json.dumps(record), flush=True)
        return

    if args.only:
        jobs = [tuple(j.split(":")) for j in args.only.split(",")]
    else:
        jobs = [(s, p, *m.split(":")) for s, p, modes in DEFAULT_JOBS for m in modes]
    for job in jobs:
        weights = (job[3:] or ("native",))[0]
        if len(job) not in (3, 4) or job[0] not in ("plan", "anchor", "animate", "speed") or job[1] not in VIDEO or \
                job[2] not in MODES or weights not in WEIGHTS:
            parser.error(f"bad job '{':'.join(job)}': stage:preset:mode[:{'|'.join(WEIGHTS[1:])}]")
        if weights in LOADED_WEIGHTS and (job[0] != "animate" or
                                          (weights == "gguf-q8_0" and job[1].startswith("cogvideox"))):
            parser.error(f"bad job '{':'.join(job)}': {weights} applies to the animate stage"
                         + (" of a Wan preset" if weights == "gguf-q8_0" else ""))
        if weights in QUANTIZERS and job[2] in QUANTIZERS[weights].failing_memory_modes:
            parser.error(f"bad job '{':'.join(job)}': fvg refuses --memory {job[2]} with --quantize {weights}")
    if args.toy:
        jobs = [j for j in jobs if j[2] == "gpu" and (j[3:] or ("native",))[0] not in CUDA_ONLY_WEIGHTS]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "bench_gpu.jsonl"
    records, start = [], time.perf_counter()
    for n, job in enumerate(jobs, 1):
        stage, preset, mode = job[:3]
        if time.perf_counter() - start > args.budget_s:
            print(f"[{n}/{len(jobs)}] budget spent: skipping {':'.join(job)} and the rest", flush=True)
            break
        cmd = [sys.executable, __file__, "--job", ":".join(job), "--steps", str(args.steps),
               "--out", str(args.out)] + (["--toy"] if args.toy else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        with (args.out / "children.log").open("a") as log:
            log.write(f"===== {':'.join(job)} (exit {proc.returncode})\n{proc.stderr[-20000:]}\n")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            record = json.loads(lines[-1][len("RESULT "):])
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            record = {"stage": stage, "preset": preset, "mode": mode, "weights": (job[3:] or ("native",))[0],
                      "error": f"exit {proc.returncode}: {tail}"}
        records.append(record)
        with results_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[{n}/{len(jobs)}] {json.dumps(record)}", flush=True)
    (args.out / "bench_gpu.md").write_text(table(records) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
