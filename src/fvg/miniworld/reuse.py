"""Reuse finished stages of an earlier export, so that a recipe change in one model retrains only that model.

    fvg miniworld reuse --out runs/mini-v8 --weights src/fvg/weights/mini --stages t2v,lora

An export (`fvg miniworld train --stage export`, the package's weights/mini) holds every model and, in
manifest.json, the settings that trained them and each stage's summary. Reusing its anchor, t2v or lora stage
writes that stage's outputs into a run folder as if the run had trained them (`anchor/final`, `t2v/final`,
`pipelines/...`, the LoRA file, `DONE.json`), so `train --stage all --resume` skips it and a later export ships
it unchanged, byte for byte.

Decisions:
* A stage is reused only into a run whose settings equal the export's everywhere except in the settings owned by
  the stages it does not reuse (`settings.STAGE_SETTINGS`) and in bookkeeping. Otherwise the run's
  settings.json, and the manifest its export writes, would describe a model that was never trained.
* `t2v_ship_dtype` is not compared either: it rounds only what an export stores, not what a run trains.
* The transformers learnt on latents and embeddings of one VAE and one frozen text encoder, so the run's text
  encoder must be the export's, tensor for tensor. So must the run's VAE for the T2V base (the LoRA stage and
  every later stage read the run's video pipeline, and the manifest's vae stage describes that VAE); the VAE's
  settings are not compared: a `vae_source` VAE has the recipe of whichever run trained it. The latent
  statistics, measured again by the run's latents stage, may differ by float rounding only.
* The anchor model may keep a VAE of its own (v10: a video VAE fine-tuned for still scenes beside v8's anchor
  model). Its pipeline ships the VAE it learnt on, and its output reaches the video model as an image, which the
  video pipeline encodes with its own VAE. Its DONE.json then says so (`vae`: "the export's anchor VAE").
* The LoRA was trained on the export's T2V base, so it is reused only with that base.
* The reused stage's DONE.json is the export's summary of it plus `reused_from`: the manifest keeps saying how
  the model was trained (steps, losses, devices), and where this run took it from.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from fvg.io import FvgError, read_json_object

from . import models
from .loop import done, done_info, mark_done
from .settings import BOOKKEEPING_SETTINGS, STAGE_SETTINGS, RunSettings, flat_settings, load_settings
from .stages import lora_file

log = logging.getLogger("fvg.miniworld")

REUSABLE = ("anchor", "t2v", "lora")
STATS_TOLERANCE = 1e-4  # latents_mean / latents_std: the same VAE over the same clips, at another thread count


def reuse_stages(out: str | Path, weights: str | Path | None, names: list[str]) -> list[str]:
    """Make `names` (anchor, t2v, lora) of run `out` the export `weights`'s (default: the package's weights/mini);
    returns them in the order written. Refuses, naming the difference, when the run cannot have trained them."""
    out, weights = Path(out), Path(weights or models.WEIGHTS_DIR)
    unknown = [n for n in names if n not in REUSABLE]
    if not names or unknown:
        raise FvgError(f"cannot reuse stage(s) {', '.join(unknown) or '(none given)'}: "
                       f"choose from {', '.join(REUSABLE)}")
    names = [n for n in REUSABLE if n in names]
    if not (out / "settings.json").is_file() or not done(out / "latents"):
        raise FvgError(f"{out}: run the data, vae and latents stages first (the reused models are checked "
                       "against the run's VAE and text encoder)")
    manifest = _read_export(weights, names)
    _check_settings(load_settings(out), RunSettings.from_dict(manifest["settings"]), names)
    source = _where(weights)
    if "lora" in names and "t2v" not in names and _reused_from(out / "t2v") != source:
        raise FvgError(f"the LoRA in {weights} was trained on its T2V base: reuse t2v from there too")
    for name in names:
        stage = out / name
        if stage.exists() and any(stage.iterdir()):
            raise FvgError(f"{stage} is not empty: remove it to reuse the export's {name}")
    same_vae = {name: _same_tensors(out / "latents" / "vae", weights / models.PIPELINE_SUBDIRS[name] / "vae")
                for name in names if name in models.PIPELINE_SUBDIRS}
    for name, same in same_vae.items():
        _check_frozen_parts(out, weights / models.PIPELINE_SUBDIRS[name], same_vae=same,
                            own_vae_allowed=name == "anchor")
    for name in names:
        if name == "lora":
            target = lora_file(out, load_settings(out))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(models.lora_path(weights), target)
        else:
            pipeline = weights / models.PIPELINE_SUBDIRS[name]
            _copy_tree(pipeline / "transformer", out / name / "final")
            _copy_tree(pipeline, out / "pipelines" / models.PIPELINE_SUBDIRS[name])
        own = {"vae": "the export's anchor VAE"} if not same_vae.get(name, True) else {}
        mark_done(out / name, {**manifest["stages"][name], "reused_from": source, **own})
        log.info("%s: reused from %s", name, weights)
    return names


def _read_export(weights: Path, names: list[str]) -> dict:
    """The export's manifest, once every part that `names` take from it is there."""
    path = weights / "manifest.json"
    if not path.is_file():
        raise FvgError(f"{weights} is not a mini export (no manifest.json)")
    manifest = read_json_object(path, "mini export manifest")
    missing = ([] if "settings" in manifest else ["settings"]) + \
        [n for n in names if n not in manifest.get("stages", {})] + \
        [sub for n, sub in models.PIPELINE_SUBDIRS.items()
         if n in names and not models.is_pipeline_dir(weights / sub)] + \
        ([models.LORA_FILE] if "lora" in names and not models.lora_path(weights).is_file() else [])
    if missing:
        raise FvgError(f"{weights} is not a complete mini export (missing: {', '.join(missing)})")
    return manifest


def _check_settings(mine: RunSettings, theirs: RunSettings, names: list[str]) -> None:
    # t2v_ship_dtype rounds nothing this run trains: a float16 export's T2V base reused here is rounded already,
    # and a float32 one is rounded when this run exports it, as its settings say
    free = set(BOOKKEEPING_SETTINGS) | set(STAGE_SETTINGS["vae"]) | {"t2v_ship_dtype"}
    free |= {key for stage, keys in STAGE_SETTINGS.items() if stage in REUSABLE and stage not in names for key in keys}
    a, b = flat_settings(mine.to_dict()), flat_settings(theirs.to_dict())
    differ = sorted(k for k in a.keys() | b.keys()
                    if a.get(k) != b.get(k) and not any(k == f or k.startswith(f + ".") for f in free))
    if differ:
        shown = ", ".join(f"{k} ({a.get(k)!r} here, {b.get(k)!r} in the export)" for k in differ[:4])
        raise FvgError(f"the run's settings differ from the export's in {shown}: "
                       f"the reused {', '.join(names)} would not be what this run trains")


def _same_tensors(a: Path, b: Path) -> bool:
    ours, theirs = _tensors(a), _tensors(b)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _check_frozen_parts(out: Path, pipeline: Path, same_vae: bool, own_vae_allowed: bool) -> None:
    """Refuse a reused pipeline whose text encoder or tokenizer are not the run's, or whose VAE (`same_vae`:
    compared by the caller) is not, unless `own_vae_allowed`: the anchor's output reaches the video model as an
    image, so it keeps the VAE it learnt on. A shared VAE must also share the latent statistics."""
    for part, same in (("vae", same_vae or own_vae_allowed),
                       ("text_encoder", _same_tensors(out / "latents" / "text_encoder", pipeline / "text_encoder"))):
        if not same:
            raise FvgError(f"{pipeline / part} is not this run's {part} ({out / 'latents' / part}): the reused "
                           "model learnt on another one")
    vocab = [read_json_object(p / "tokenizer.json", "tokenizer file")["model"]["vocab"]
             for p in (out / "latents" / "tokenizer", pipeline / "tokenizer")]
    if vocab[0] != vocab[1]:
        raise FvgError(f"{pipeline / 'tokenizer'} is not this run's tokenizer")
    if same_vae:
        _check_statistics(out, pipeline)


def _check_statistics(out: Path, pipeline: Path) -> None:
    ours = read_json_object(out / "latents" / "vae" / "config.json", "VAE config")
    theirs = read_json_object(pipeline / "vae" / "config.json", "VAE config")
    for key in ("latents_mean", "latents_std"):
        if len(ours[key]) != len(theirs[key]):
            raise FvgError(f"the run's {key} has {len(ours[key])} channels, {pipeline / 'vae'}'s {len(theirs[key])}")
        gap = max(abs(x - y) for x, y in zip(ours[key], theirs[key]))
        if gap > STATS_TOLERANCE:
            raise FvgError(f"the run's {key} differ from {pipeline / 'vae'}'s (by {gap:.2g}): not the same latents")


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FvgError(f"{folder}: no safetensors weights")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _where(weights: Path) -> str:
    """How DONE.json (and so a manifest) names the export: relative to the working directory when inside it,
    so that no machine's absolute path ships."""
    resolved = weights.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def _reused_from(stage: Path) -> str | None:
    return (done_info(stage) or {}).get("reused_from")


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder whole or not at all: into a sibling temp folder, then rename."""
    tmp = dst.with_name(dst.name + ".reuse-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
