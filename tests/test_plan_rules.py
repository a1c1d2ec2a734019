"""fvg.plan: the plan record, make_planner, and the offline rules backend."""

import json

import numpy as np
import pytest

from fvg.io import FvgError
from fvg.miniworld import grammar
from fvg.plan import (
    BACKENDS, RULES_VERSION, Plan, Planner, RulesPlanner, free_text_caption, make_planner, parse_reply,
)
from fvg.plan.rules import UPSAMPLE_DETAIL


def caption(prompt: str) -> str:
    return make_planner("rules").plan(prompt).first_frame_caption


# ---------------------------------------------------------------- make_planner, Plan


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(FvgError) as err:
        make_planner("gpt")
    for name in BACKENDS:
        assert name in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt_is_an_error_for_every_backend(backend, prompt, tmp_path):
    planner = make_planner(backend, model=str(tmp_path / "never-loaded"), cache_dir=tmp_path,
                           base_url="http://127.0.0.1:9")
    assert isinstance(planner, Planner)
    with pytest.raises(FvgError, match="prompt is empty"):
        planner.plan(prompt)


def test_plan_round_trips_through_a_dict():
    plan = Plan("p", "c", "u", "openai", "m", "v", warnings=["w"], cached=True)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict({**plan.to_dict(), "unknown": 1}) == plan
    with pytest.raises(FvgError, match="first_frame_caption"):
        Plan.from_dict({"prompt": "p", "upsampled_prompt": "u", "backend": "rules", "template_version": "v"})


def test_rules_plan_fields_and_determinism():
    planner = make_planner()
    assert isinstance(planner, RulesPlanner) and planner.name == "rules" and planner.model is None
    first = planner.plan("  a leaf turns from green to red ")
    assert first == planner.plan("a leaf turns from green to red")
    assert first.prompt == "a leaf turns from green to red"
    assert (first.backend, first.model, first.template_version, first.warnings, first.cached) == (
        "rules", None, RULES_VERSION, [], False)
    assert first.upsampled_prompt == f"a leaf turns from green to red. {UPSAMPLE_DETAIL}"


# ---------------------------------------------------------------- MiniWorld: exact


MINIWORLD_PROMPTS = [
    "a red circle and a blue square move right",
    "a green triangle turns orange",
    "a small purple circle grows on a white background",
    "a large cyan square shrinks",
    "a cyan square is above a purple circle",
    "a red circle moves left while a blue square moves up",
    "an orange square grows while a red triangle moves down",
    "a purple circle pushes a green square right",
    "three orange circles and a blue square",
    "two red squares move left on a white background",
]


@pytest.mark.parametrize("prompt", MINIWORLD_PROMPTS)
def test_miniworld_prompts_get_the_grammar_caption(prompt):
    grammar.parse_prompt(prompt)  # really a MiniWorld prompt
    expected = grammar.first_frame_caption(prompt)
    plan = make_planner("rules").plan(prompt)
    assert plan.first_frame_caption == expected
    assert plan.upsampled_prompt == f"{prompt}, starting from {expected}"


def test_miniworld_sampled_prompts_are_exact():
    from fvg.miniworld import CATEGORIES

    rng = np.random.default_rng(0)
    planner = RulesPlanner()
    for category in CATEGORIES:
        for _ in range(5):
            prompt = str(grammar.sample_prompt(rng, category))
            assert planner.plan(prompt).first_frame_caption == grammar.first_frame_caption(prompt), prompt


def test_text_outside_the_grammar_uses_the_heuristics():
    assert caption("A red circle moves left") == "A red circle on the right side of the frame"


# ---------------------------------------------------------------- free text


@pytest.mark.parametrize(
    "prompt, expected",
    [
        # "from X to Y" keeps X; "turns into" / "becomes" / "changes to" drop the target
        ("a leaf turns from green to red", "a green leaf"),
        ("The leaf is turning from green to yellow.", "The green leaf."),
        ("A timelapse of a leaf transitioning from green to bright red as autumn progresses.", "A green leaf."),
        ("a caterpillar turns into a butterfly inside a cocoon", "a caterpillar inside a cocoon"),
        ("the sky becomes dark", "the sky"),
        ("a balloon becomes bigger", "a small balloon"),
        ("a traffic light changes to green", "a traffic light"),
        ("A green chameleon changes its skin color to pink", "A green chameleon"),
        ("A moon waxing from new to full", "A new moon"),
        # motion: a start position that leaves room for the motion, walkers get a still pose
        ("a car moves to the left", "a car on the right side of the frame"),
        ("a car drives left on a highway", "a car on the right side of the frame, on a highway"),
        ("a dog walks to the right", "a dog standing on the left side of the frame"),
        ("a balloon rises", "a balloon near the bottom of the frame"),
        ("A rabbit hops from left to right in a garden",
         "A rabbit crouching on the left side of the frame, in a garden"),
        ("a dog runs towards a red ball", "a dog standing far from a red ball"),
        ("a cat runs into the house", "a cat standing outside the house"),
        ("Sled slides down a snowy hill", "Sled at the top of a snowy hill"),
        ("A dog runs through a field while a cat climbs a tree",
         "A dog standing in a field and a cat at the bottom of a tree"),
        ("A dog running on the left of a bicycle", "A dog standing on the left of a bicycle"),
        # change verbs become their start state
        ("a plant grows", "a small plant"),
        ("a large balloon shrinks", "a large balloon"),
        ("an ice cube melts in the sun", "a solid ice cube in the sun"),
        ("a door opens", "a closed door"),
        ("a lamp lights up", "an unlit lamp"),
        ("the lamp turns on", "the switched-off lamp"),
        ("a glass fills with water on a table", "an empty glass on a table"),
        ("a man opens the door", "a man and the closed door"),
        # counts and attribute bindings are kept verbatim
        ("three red apples and two green pears roll to the right",
         "three red apples and two green pears on the left side of the frame"),
        ("a red circle and a blue square grow", "a small red circle and a small blue square"),
        ("a red circle moves left while a blue square moves up",
         "a red circle on the right side of the frame and a blue square near the bottom of the frame"),
        # a verb-looking word that is a noun or a modifier is left alone
        ("a bread roll moves left", "a bread roll on the right side of the frame"),
        ("an open door closes", "an open door"),
        ("Four butterflies dance around blooming flowers.", "Four butterflies dance around blooming flowers."),
        # nothing temporal: unchanged
        ("a red apple on a wooden table", "a red apple on a wooden table"),
    ],
)
def test_free_text_heuristics(prompt, expected):
    assert free_text_caption(prompt) == expected


def test_free_text_captions_are_single_still_sentences():
    prompts = [
        "A ball rolls left while a puppy dashes right",
        "A butterfly gracefully ascends and a stone is dropped into a tranquil pond",
        "A timelapse of a flower bud blooming into a full flower.",
        "two horses race across a grassy field at sunset",
    ]
    for prompt in prompts:
        text = free_text_caption(prompt)
        assert "\n" not in text and text.count(".") <= 1
        for word in ("rolls", "dashes", "ascends", "dropped", "blooming", "race "):
            assert word not in text, (prompt, text)


def test_rules_plans_round_trip_through_the_llm_reply_format():
    # a rules plan written as an LLM reply reads back exactly (no whitespace or length normalisation
    # changes it), while its plain-text caption alone is not mistaken for a reply
    for prompt in ["a leaf turns from green to red", "A red circle moves left", MINIWORLD_PROMPTS[0]]:
        plan = make_planner("rules").plan(prompt)
        reply = json.dumps({"first_frame_caption": plan.first_frame_caption, "upsampled_prompt": plan.upsampled_prompt})
        assert parse_reply(f"Here is the plan: {reply}") == (plan.first_frame_caption, plan.upsampled_prompt)
        with pytest.raises(ValueError):
            parse_reply(plan.first_frame_caption)
