import numpy as np
import pytest

from fvg.miniworld import (
    CATEGORIES, VOCABULARY, Event, Obj, caption_for, first_frame_caption, format_caption, format_prompt,
    parse_caption, parse_prompt, sample_prompt,
)

MOTION_WORDS = {"move", "moves", "stays", "still", "grows", "shrinks", "turns", "pushes", "while", "is"}


def sampled(n_per_category=60, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_prompt(rng, c) for c in CATEGORIES for _ in range(n_per_category)]


def test_round_trip_and_categories():
    for p in sampled():
        text = format_prompt(p)
        assert parse_prompt(text) == p, text
        assert format_prompt(parse_prompt(text)) == text


def test_sampler_covers_every_form():
    prompts = sampled(200)
    forms = {(p.category, tuple(e.kind if e else None for e in p.events)) for p in prompts}
    assert {("dynamic_attr", (k,)) for k in ("turns", "grows", "shrinks")} <= forms
    kinds = {k for c, ks in forms if c == "action_binding" for k in ks}
    assert kinds == {"moves", "stays still", "grows", "shrinks", "turns"}
    numeracy = [p for p in prompts if p.category == "numeracy"]
    assert {p.objects[0].count for p in numeracy} == {2, 3, 4}
    assert any(len(p.objects) == 2 for p in numeracy) and any(len(p.objects) == 1 for p in numeracy)
    assert any(p.events[0] for p in numeracy) and any(p.events[0] is None for p in numeracy)
    assert {p.relation for p in prompts if p.category == "spatial"} == {
        "to the left of", "to the right of", "above", "below"}
    assert {p.background for p in prompts} == {"black", "white"}


def test_sampler_respects_constraints():
    for p in sampled(100, seed=1):
        keys = [(o.color, o.shape) for o in p.objects]
        assert len(set(keys)) == len(keys) and p.num_objects <= 4
        kinds = [e.kind if e else None for e in p.events]
        if p.category == "motion_binding":
            assert p.events[0].direction != p.events[1].direction
        if p.category == "action_binding":
            assert kinds[0] != kinds[1]
            assert all(o.size is None for o, k in zip(p.objects, kinds) if k in ("grows", "shrinks"))
        if p.category == "interaction":
            assert p.objects[0].color != p.objects[1].color
        for o, e in zip(p.objects, p.events):
            if e and e.kind == "turns":
                assert e.color != o.color


def test_spec_examples_parse():
    p = parse_prompt("a red circle and a blue square move right")
    assert p.category == "consistent_attr"
    assert p.objects == (Obj("red", "circle"), Obj("blue", "square"))
    assert p.events == (Event("moves", "right"),) * 2 and p.background == "black"

    p = parse_prompt("a green triangle turns orange")
    assert (p.category, p.objects, p.events) == ("dynamic_attr", (Obj("green", "triangle"),), (Event("turns", color="orange"),))

    p = parse_prompt("a cyan square is above a purple circle")
    assert (p.category, p.relation, p.events) == ("spatial", "above", (None, None))
    assert p.objects == (Obj("cyan", "square"), Obj("purple", "circle"))

    p = parse_prompt("a red circle moves left while a blue square moves up")
    assert p.category == "motion_binding" and p.events == (Event("moves", "left"), Event("moves", "up"))

    p = parse_prompt("an orange square grows while a red triangle moves down")
    assert p.category == "action_binding"
    assert p.objects == (Obj("orange", "square"), Obj("red", "triangle"))
    assert p.events == (Event("grows"), Event("moves", "down"))

    p = parse_prompt("a purple circle pushes a green square right")
    assert p.category == "interaction" and p.events == (Event("pushes", "right"), None)

    p = parse_prompt("three orange circles and a blue square on a white background")
    assert p.category == "numeracy" and p.background == "white" and p.num_objects == 4
    assert p.objects == (Obj("orange", "circle", None, 3), Obj("blue", "square")) and p.events == (None, None)

    p = parse_prompt("a small red circle grows")
    assert p.objects == (Obj("red", "circle", "small"),) and p.events == (Event("grows"),)
    assert parse_prompt("a large cyan square stays still while a blue triangle shrinks").events[0] == Event("stays still")


@pytest.mark.parametrize("text", [
    "",
    "a red circle",
    "a red circle moves left",  # a lone mover is no form
    "A red circle turns blue",
    "a red circle turns blue.",
    "a red circle turns blue ",
    "a red  circle turns blue",
    "a pink circle turns blue",
    "a red cat turns blue",
    "an red circle turns blue",
    "a red circle turns red",
    "a red circle grows",  # dynamic_attr growers are named small
    "a large red circle grows",
    "a small red circle shrinks",
    "a red circle moves left while a blue square moves left",
    "a red circle grows while a blue square grows",
    "a small red circle grows while a blue square moves up",
    "a red circle pushes a red square left",
    "a red circle pushes a blue square",
    "a red circle is near a blue square",
    "a red circle and a red circle move up",
    "a red circle and a blue square move",
    "four red circles and a blue square",
    "five red circles",
    "two red circle",
    "two red circles and a red circle",
    "two red circles move",
    "a red circle turns blue on a black background",
    "a red circle turns blue on a white background on a white background",
])
def test_rejects_out_of_grammar(text):
    with pytest.raises(ValueError) as info:
        parse_prompt(text)
    assert "\n" not in str(info.value) and "not a MiniWorld prompt" in str(info.value)


CAPTIONS = {
    "a red circle and a blue square move right":
        "a red circle on the left and a blue square on the left on a black background",
    "a large green triangle turns orange": "a large green triangle on a black background",
    "a large blue square shrinks on a white background": "a large blue square on a white background",
    "a cyan square is above a purple circle": "a cyan square above a purple circle on a black background",
    "a red circle moves left while a blue square moves up":
        "a red circle on the right and a blue square at the bottom on a black background",
    "an orange square grows while a red triangle moves down":
        "a small orange square and a red triangle at the top on a black background",
    "a red circle turns blue while a small green square stays still":
        "a red circle and a small green square on a black background",
    "a purple circle pushes a green square right":
        "a purple circle just left of a green square on a black background",
    "a small cyan triangle pushes a red square down on a white background":
        "a small cyan triangle just above a red square on a white background",
    "three orange circles and a blue square": "three orange circles and a blue square on a black background",
    "two red circles and a large purple square move up":
        "two red circles at the bottom and a large purple square at the bottom on a black background",
}


@pytest.mark.parametrize("prompt,caption", CAPTIONS.items())
def test_first_frame_caption_examples(prompt, caption):
    assert first_frame_caption(prompt) == caption
    assert first_frame_caption(parse_prompt(prompt)) == caption


def test_captions_are_static_and_parse():
    for p in sampled(40, seed=2):
        caption = first_frame_caption(p)
        assert not set(caption.split()) & MOTION_WORDS, caption
        assert parse_caption(caption) == caption_for(p)
        assert format_caption(parse_caption(caption)) == caption
        assert caption.endswith(f" on a {p.background} background")


def test_parse_caption_rejects():
    for text in ["a red circle", "a red circle moves left on a black background",
                 "a red circle on the left and a red circle on the right on a black background",
                 "three red circles and two blue squares on a black background"]:
        with pytest.raises(ValueError):
            parse_caption(text)


def test_vocabulary_covers_everything():
    assert VOCABULARY == sorted(set(VOCABULARY))
    words = set()
    for p in sampled(40, seed=3):
        words |= set(format_prompt(p).split()) | set(first_frame_caption(p).split())
    assert words <= set(VOCABULARY)
    assert set(VOCABULARY) - words <= {"an"}  # everything else shows up in 280 samples
