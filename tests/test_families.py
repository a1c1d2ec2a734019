"""The family registry: names, lookup by id / folder / instance, the shape rule, per-family facts."""

import json

import pytest

from fvg.families import (DEFAULT_FAMILY, REGISTRY, ModelFamily, check_video_shape, family_names, family_of,
                          get_family, resolve_family)
from fvg.io import FvgError


def test_every_registered_module_holds_its_family():
    assert family_names() == ("wan", "cogvideox") and DEFAULT_FAMILY in REGISTRY
    for name in family_names():
        family = get_family(name)
        assert isinstance(family, ModelFamily) and family.name == name
        assert family_of(family.tiny_model_id) is family  # the tiny id names its own family
    with pytest.raises(FvgError, match="unknown video model family 'ltx'.*wan, cogvideox"):
        get_family("ltx")


def test_family_of_model_ids_and_folders(tmp_path):
    assert family_of("THUDM/CogVideoX1.5-5B").name == "cogvideox"
    assert family_of("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").name == "wan"
    assert family_of("someone/unknown-model").name == DEFAULT_FAMILY
    # a local folder is known by the pipeline class its model_index.json names, not by its path
    folder = tmp_path / "cogvideox-looking-name"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert family_of(folder).name == "wan" and family_of(str(folder)).name == "wan"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    assert family_of(folder).name == "cogvideox"
    assert resolve_family(str(folder), "wan").name == "wan" and resolve_family(str(folder)).name == "cogvideox"


def test_family_of_instances():
    from fvg.tiny import tiny_cogvideox_components, tiny_wan_components

    from fvg.animate.wan import AnchoredWanPipeline

    assert family_of(tiny_cogvideox_components()["transformer"]).name == "cogvideox"
    assert family_of(tiny_wan_components()["transformer"]).name == "wan"
    assert family_of(AnchoredWanPipeline(**tiny_wan_components())).name == "wan"


@pytest.mark.parametrize("shape, message", [
    ((32, 32, 10), "frames must be 4n\\+1 \\(e.g. 17, 49, 81\\), got 10"),
    ((32, 32, 0), "frames must be 4n\\+1"),
    ((40, 32, 9), "positive multiples of 16, got 40x32"),
    ((0, 32, 9), "positive multiples of 16"),
])
def test_shape_rule_names_the_problem(shape, message):
    for name in family_names():
        with pytest.raises(FvgError, match=message):
            get_family(name).check_shape(*shape)
    check_video_shape(32, 48, 9)  # a valid shape passes
    with pytest.raises(FvgError, match="8n\\+1"):
        check_video_shape(32, 32, 13, frame_step=8)


def test_family_facts_that_outputs_depend_on():
    wan, cog = get_family("wan"), get_family("cogvideox")
    assert wan.cache_key_parts() == {}  # Wan caches made before families existed stay valid
    assert cog.cache_key_parts() == {"family": "cogvideox"}
    assert set(wan.lora_converters) == {"wan"} and cog.lora_converters == {}
    assert cog.lora_info({"rank": 4})["family"] == "cogvideox" and "family" not in wan.lora_info({"rank": 4})
    assert wan.memory is None and cog.memory is None  # the memory-facts slot is not filled yet
