"""Video model families: one module per family behind one interface (`ModelFamily`), one registry.

    from fvg.families import get_family, family_of
    family = get_family("cogvideox")          # by name (presets, training configs)
    family = family_of(pipe)                  # by pipeline or transformer instance
    family = family_of("THUDM/CogVideoX1.5-5B")  # by model id or local diffusers folder

Adding a family is one module (a `ModelFamily` subclass and its `FAMILY` instance), its anchored
pipeline in `fvg.animate`, and one line in `REGISTRY` (docs/adding-a-family.md). Modules load on
first use, so naming the families imports neither torch nor diffusers.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from fvg.families.base import LoraConverter, MemoryFacts, ModelFamily, TrainingObjective, check_video_shape
from fvg.io import FvgError

# name -> module holding `FAMILY`; registry order is the order `family_of` tries them.
REGISTRY: dict[str, str] = {
    "wan": "fvg.families.wan",
    "cogvideox": "fvg.families.cogvideox",
}
# What a model id, checkpoint or pipeline that names no family is: fvg's first family.
DEFAULT_FAMILY = "wan"


def family_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_family(name: str) -> ModelFamily:
    if name not in REGISTRY:
        raise FvgError(f"unknown video model family '{name}' (choose from: {', '.join(REGISTRY)})")
    return importlib.import_module(REGISTRY[name]).FAMILY


def family_of(thing) -> ModelFamily:
    """The family of a pipeline or transformer instance (by its classes' names), or of a model id or
    local diffusers folder (its model_index.json's class name, else the id itself). Anything that
    names no other family is the default family."""
    if isinstance(thing, (str, os.PathLike)):
        class_name = _class_name(Path(thing))
        names = [str(thing) if class_name is None else class_name]
    else:
        names = [cls.__name__ for cls in type(thing).__mro__]
    for name in REGISTRY:
        family = get_family(name)
        if name != DEFAULT_FAMILY and any(family.matches(n) for n in names):
            return family
    return get_family(DEFAULT_FAMILY)


def resolve_family(model: str, name: str = "auto") -> ModelFamily:
    """`name`'s family, or with "auto" the family of `model` (`family_of`)."""
    return family_of(model) if name == "auto" else get_family(name)


def _class_name(folder: Path) -> str | None:
    """The pipeline class a local diffusers folder names ("" if unreadable); None if it is not one."""
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    try:
        return str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


__all__ = ["DEFAULT_FAMILY", "REGISTRY", "LoraConverter", "MemoryFacts", "ModelFamily", "TrainingObjective",
           "check_video_shape", "family_names", "family_of", "get_family", "resolve_family"]
