"""MiniWorld prompts and first-frame captions: typed structure, parser, formatter, sampler.

Prompts follow SPEC.md's grammar exactly (OBJ := a [small|large] COLOR SHAPE, with "an"
before a vowel as in the spec's example "an orange square grows ..."; "a" is accepted
everywhere). The parser enforces the spec's constraints too, so `parse_prompt` accepts a
text exactly when it is a MiniWorld v1 prompt.

First-frame captions describe only the initial scene (frame 0). They are what the anchor
text-to-image model is trained on and what the rules planner emits, so they are a pure
function of the prompt, and every scene the renderer samples for a prompt satisfies its
caption. Caption grammar (ours; it has no motion or change verbs):

    CAPTION := ITEM (" and " ITEM)* " on a " BG " background"      BG := black | white
    ITEM    := THING [" " POS] | OBJ " " REL " " OBJ
    THING   := OBJ | NUM " " COLOR " " SHAPE "s"
    POS     := on the left | on the right | at the top | at the bottom
    REL     := to the left of | to the right of | above | below      (spatial prompts)
             | just left of | just right of | just above | just below  (pusher, then pushed)

Rules from prompt to caption: objects appear in prompt order with their frame-0
attributes (the colour before `turns`, `small` for a grower, `large` for a shrinker, the
count of a numeracy group); an object that moves starts on the side it moves away from
(moves right -> "on the left", moves up -> "at the bottom"), so POS means its centre lies
in that half of the frame; a spatial prompt keeps its relation; a pusher is "just" behind
what it pushes (4-10 px gap, aligned). The background is always named. Examples:

    a red circle and a blue square move right
      -> a red circle on the left and a blue square on the left on a black background
    an orange square grows while a red triangle moves down
      -> a small orange square and a red triangle at the top on a black background
    a purple circle pushes a green square right
      -> a purple circle just left of a green square on a black background
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .spec import (
    BACKGROUNDS, CATEGORIES, COLORS, DIRECTIONS, MAX_OBJECTS, NUMBERS, RELATIONS, SHAPES, SIZES, WHITE_SUFFIX,
)

EVENT_KINDS = ("moves", "stays still", "grows", "shrinks", "turns", "pushes")
ACTIONS = ("moves", "stays still", "grows", "shrinks", "turns")  # ACT in action_binding
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
START_SIDE = {"right": "left", "left": "right", "up": "bottom", "down": "top"}  # a mover starts away from DIR
PUSH_RELATIONS = {"right": "just left of", "left": "just right of", "up": "just below", "down": "just above"}
# Unit vector from A to B when "A REL B" holds: used by the renderer and the evaluator.
REL_VECTORS: dict[str, tuple[int, int]] = {
    "to the left of": (1, 0), "to the right of": (-1, 0), "above": (0, 1), "below": (0, -1),
    **{rel: DIRECTIONS[d] for d, rel in PUSH_RELATIONS.items()},
}
_COUNT_WORDS = {n: w for w, n in NUMBERS.items()}


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str | None = None  # "small" | "large"; None: unnamed, the scene picks at random
    count: int = 1  # > 1 only for numeracy's counted group (which names no size)

    def phrase(self) -> str:
        if self.count > 1:
            return f"{_COUNT_WORDS[self.count]} {self.color} {self.shape}s"
        first = self.size or self.color
        article = "an" if first[0] in "aeiou" else "a"
        return " ".join(w for w in (article, self.size, self.color, self.shape) if w)

    def label(self) -> str:  # the phrase without its article, for check names
        return self.phrase().split(" ", 1)[1] if self.count == 1 else self.phrase()


@dataclass(frozen=True)
class Event:
    kind: str  # one of EVENT_KINDS
    direction: str | None = None  # moves, pushes
    color: str | None = None  # turns: the new colour

    def phrase(self, plural: bool = False) -> str:
        if self.kind == "moves":
            return f"{'move' if plural else 'moves'} {self.direction}"
        if self.kind == "turns":
            return f"turns {self.color}"
        if self.kind == "pushes":
            return f"pushes {self.direction}"
        return self.kind


@dataclass(frozen=True)
class MiniPrompt:
    category: str  # one of spec.CATEGORIES
    objects: tuple[Obj, ...]  # prompt order
    events: tuple[Event | None, ...]  # one per object; None: nothing named (it stays where it is)
    relation: str | None = None  # spatial: objects[0] REL objects[1]
    background: str = "black"

    def __str__(self) -> str:
        return format_prompt(self)

    @property
    def num_objects(self) -> int:
        return sum(o.count for o in self.objects)


@dataclass(frozen=True)
class CaptionItem:
    obj: Obj
    position: str | None = None  # key of POSITIONS: where the centre lies in frame 0
    relation: str | None = None  # `obj` REL `other`: RELATIONS or PUSH_RELATIONS values
    other: Obj | None = None


@dataclass(frozen=True)
class Caption:
    items: tuple[CaptionItem, ...]
    background: str = "black"

    def __str__(self) -> str:
        return format_caption(self)


# ---------------------------------------------------------------- formatting

def format_prompt(p: MiniPrompt) -> str:
    (a, *rest), (ea, *_) = p.objects, p.events
    if p.category == "consistent_attr":
        text = f"{a.phrase()} and {rest[0].phrase()} {ea.phrase(plural=True)}"
    elif p.category == "dynamic_attr":
        text = f"{a.phrase()} {ea.phrase()}"
    elif p.category == "spatial":
        text = f"{a.phrase()} is {p.relation} {rest[0].phrase()}"
    elif p.category in ("motion_binding", "action_binding"):
        text = f"{a.phrase()} {ea.phrase()} while {rest[0].phrase()} {p.events[1].phrase()}"
    elif p.category == "interaction":
        text = f"{a.phrase()} pushes {rest[0].phrase()} {ea.direction}"
    elif p.category == "numeracy":
        text = " and ".join(o.phrase() for o in p.objects) + (f" {ea.phrase(plural=True)}" if ea else "")
    else:
        raise ValueError(f"unknown MiniWorld category {p.category!r}")
    return text + (WHITE_SUFFIX if p.background == "white" else "")


def format_caption(c: Caption) -> str:
    def item(it: CaptionItem) -> str:
        if it.relation:
            return f"{it.obj.phrase()} {it.relation} {it.other.phrase()}"
        return it.obj.phrase() + (f" {POSITIONS[it.position]}" if it.position else "")

    return " and ".join(item(it) for it in c.items) + f" on a {c.background} background"


# ---------------------------------------------------------------- parsing

class _Words:
    """A cursor over the words of one text, raising one-line ValueErrors naming what failed."""

    def __init__(self, body: str, text: str, kind: str):
        self.words, self.i, self.text, self.kind = body.split(" "), 0, text, kind

    def fail(self, what: str):
        got = repr(self.words[self.i]) if self.i < len(self.words) else "the end"
        raise ValueError(f"not a MiniWorld {self.kind}: expected {what} at word {self.i + 1}, got {got}: {self.text!r}")

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self, options, what: str) -> str:
        word = self.peek()
        if word not in options:
            self.fail(what)
        self.i += 1
        return word

    def take_phrase(self, phrases, what: str) -> str:
        for phrase in sorted(phrases, key=len, reverse=True):
            n = phrase.split(" ")
            if self.words[self.i:self.i + len(n)] == n:
                self.i += len(n)
                return phrase
        self.fail(what)

    def at_phrase(self, phrases) -> bool:
        return any(self.words[self.i:self.i + len(p.split(" "))] == p.split(" ") for p in phrases)

    def obj(self) -> Obj:
        article = self.take(("a", "an"), "'a' or 'an'")
        if article == "an" and (self.peek() or "x")[0] not in "aeiou":
            self.fail("a word starting with a vowel after 'an'")
        size = self.take(SIZES, "a size") if self.peek() in SIZES else None
        color = self.take(COLORS, "a colour")
        return Obj(color, self.take(SHAPES, "a shape"), size)

    def group(self) -> Obj:
        count = NUMBERS[self.take(NUMBERS, "a number")]
        color = self.take(COLORS, "a colour")
        return Obj(color, self.take([s + "s" for s in SHAPES], "a plural shape")[:-1], None, count)

    def event(self) -> Event:
        verb = self.take(("moves", "stays", "grows", "shrinks", "turns"), "an action")
        if verb == "moves":
            return Event("moves", direction=self.take(DIRECTIONS, "a direction"))
        if verb == "stays":
            self.take(("still",), "'still'")
            return Event("stays still")
        if verb == "turns":
            return Event("turns", color=self.take(COLORS, "a colour"))
        return Event(verb)

    def end(self):
        if self.i != len(self.words):
            self.fail("the end")


def parse_prompt(text: str) -> MiniPrompt:
    """Parse a MiniWorld v1 prompt; ValueError (one line) for anything outside the grammar."""
    if not isinstance(text, str):
        raise ValueError(f"not a MiniWorld prompt: expected text, got {type(text).__name__}")
    white = text.endswith(WHITE_SUFFIX)
    w = _Words(text[: -len(WHITE_SUFFIX)] if white else text, text, "prompt")
    if w.peek() in NUMBERS:
        objects = [w.group()]
        if w.peek() == "and":
            w.i += 1
            objects.append(w.obj())
        event = None
        if w.peek() == "move":
            w.i += 1
            event = Event("moves", direction=w.take(DIRECTIONS, "a direction"))
        category, events, relation = "numeracy", (event,) * len(objects), None
    else:
        a = w.obj()
        relation = None
        verb = w.take(("and", "is", "pushes", "moves", "stays", "grows", "shrinks", "turns"), "a verb or 'and'")
        if verb == "and":
            objects = [a, w.obj()]
            w.take(("move",), "'move'")
            event = Event("moves", direction=w.take(DIRECTIONS, "a direction"))
            category, events = "consistent_attr", (event, event)
        elif verb == "is":
            relation = w.take_phrase(RELATIONS, "a relation")
            category, objects, events = "spatial", [a, w.obj()], (None, None)
        elif verb == "pushes":
            objects = [a, w.obj()]
            category, events = "interaction", (Event("pushes", direction=w.take(DIRECTIONS, "a direction")), None)
        else:
            w.i -= 1
            ea = w.event()
            if w.peek() is None:
                category, objects, events = "dynamic_attr", [a], (ea,)
            else:
                w.take(("while",), "'while' or the end")
                objects = [a, w.obj()]
                events = (ea, w.event())
                both_move = ea.kind == events[1].kind == "moves"
                category = "motion_binding" if both_move else "action_binding"
    w.end()
    prompt = MiniPrompt(category, tuple(objects), tuple(events), relation, "white" if white else "black")
    problem = _violation(prompt)
    if problem:
        raise ValueError(f"not a MiniWorld prompt: {problem}: {text!r}")
    return prompt


def _violation(p: MiniPrompt) -> str | None:
    """The first constraint of SPEC.md's grammar table that `p` breaks, if any."""
    kinds = [e.kind if e else None for e in p.events]
    keys = [(o.color, o.shape) for o in p.objects]
    if len(set(keys)) < len(keys):
        return "two objects share colour and shape"
    if p.num_objects > MAX_OBJECTS:
        return f"more than {MAX_OBJECTS} objects"
    for o, e in zip(p.objects, p.events):
        if e and e.kind == "turns" and e.color == o.color:
            return "an object turns its own colour"
    if p.category == "dynamic_attr":
        if kinds[0] not in ("turns", "grows", "shrinks"):
            return "dynamic_attr needs turns, grows or shrinks"
        if kinds[0] == "grows" and p.objects[0].size != "small":
            return "a growing object must be named small"
        if kinds[0] == "shrinks" and p.objects[0].size != "large":
            return "a shrinking object must be named large"
    if p.category == "motion_binding" and p.events[0].direction == p.events[1].direction:
        return "motion_binding needs two different directions"
    if p.category == "action_binding":
        if kinds[0] == kinds[1]:
            return "action_binding needs two different kinds of action"
        if any(k in ("grows", "shrinks") and o.size for o, k in zip(p.objects, kinds)):
            return "an object that grows or shrinks names no size in action_binding"
    if p.category == "interaction" and p.objects[0].color == p.objects[1].color:
        return "pusher and pushed need different colours"
    return None


def parse_caption(text: str) -> Caption:
    """Parse a first-frame caption (grammar in the module docstring); ValueError otherwise."""
    for background in BACKGROUNDS:
        suffix = f" on a {background} background"
        if text.endswith(suffix):
            break
    else:
        raise ValueError(f"not a MiniWorld caption: it must end with ' on a black/white background': {text!r}")
    w = _Words(text[: -len(suffix)], text, "caption")
    items = []
    while True:
        obj = w.group() if w.peek() in NUMBERS else w.obj()
        rels = [*RELATIONS, *PUSH_RELATIONS.values()]
        if obj.count == 1 and w.at_phrase(rels):
            relation = w.take_phrase(rels, "a relation")
            items.append(CaptionItem(obj, relation=relation, other=w.obj()))
        elif w.at_phrase(POSITIONS.values()):
            phrase = w.take_phrase(POSITIONS.values(), "a position")
            items.append(CaptionItem(obj, position=next(k for k, v in POSITIONS.items() if v == phrase)))
        else:
            items.append(CaptionItem(obj))
        if w.peek() != "and":
            break
        w.i += 1
    w.end()
    mentions = [o for it in items for o in (it.obj, it.other) if o]
    if sum(o.count for o in mentions) > MAX_OBJECTS:
        raise ValueError(f"not a MiniWorld caption: more than {MAX_OBJECTS} objects: {text!r}")
    if len({(o.color, o.shape) for o in mentions}) < len(mentions):
        raise ValueError(f"not a MiniWorld caption: two objects share colour and shape: {text!r}")
    return Caption(tuple(items), background)


def caption_objects(c: Caption) -> list[Obj]:
    """The caption's objects one by one (groups expanded), in the order the renderer places them."""
    out: list[Obj] = []
    for it in c.items:
        out += [replace(it.obj, count=1)] * it.obj.count + ([it.other] if it.other else [])
    return out


# ---------------------------------------------------------------- first-frame captions

def caption_for(prompt: str | MiniPrompt) -> Caption:
    """The structured first-frame caption of a prompt (see the module docstring)."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    a = p.objects[0]
    if p.category == "spatial":
        items = (CaptionItem(a, relation=p.relation, other=p.objects[1]),)
    elif p.category == "interaction":
        items = (CaptionItem(a, relation=PUSH_RELATIONS[p.events[0].direction], other=p.objects[1]),)
    else:
        items = tuple(_start(o, e) for o, e in zip(p.objects, p.events))
    return Caption(items, p.background)


def _start(obj: Obj, event: Event | None) -> CaptionItem:
    kind = event.kind if event else None
    size = {"grows": "small", "shrinks": "large"}.get(kind, obj.size)
    position = START_SIDE[event.direction] if kind == "moves" else None
    return CaptionItem(replace(obj, size=size), position)


def first_frame_caption(prompt: str | MiniPrompt) -> str:
    """The ground-truth caption of a prompt's initial scene (frame 0)."""
    return format_caption(caption_for(prompt))


# ---------------------------------------------------------------- sampling

def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _objects(rng: np.random.Generator, n: int, distinct_colors: bool = False) -> list[Obj]:
    """n objects with distinct (colour, shape), each with a random size or none."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    out: list[Obj] = []
    while len(out) < n:
        c, s = _pick(rng, pairs)
        if any((o.color, o.shape) == (c, s) or (distinct_colors and o.color == c) for o in out):
            continue
        out.append(Obj(c, s, _pick(rng, (None, "small", "large"))))
    return out


def _turn_color(rng: np.random.Generator, obj: Obj, others: list[Obj]) -> str:
    # Never turn into another object's colour and shape: the final scene would hold two
    # identical objects (legal in the grammar, but ambiguous to read back; we avoid it).
    taken = {obj.color} | {o.color for o in others if o.shape == obj.shape}
    return _pick(rng, [c for c in COLORS if c not in taken])


def sample_prompt(rng: np.random.Generator, category: str, white_prob: float = 0.2) -> MiniPrompt:
    """A random prompt of `category`, covering every form of SPEC.md's grammar table."""
    relation = None
    if category == "consistent_attr":
        objects = _objects(rng, 2)
        event = Event("moves", direction=_pick(rng, DIRECTIONS))
        events = [event, event]
    elif category == "dynamic_attr":
        (obj,) = _objects(rng, 1)
        kind = _pick(rng, ("turns", "grows", "shrinks"))
        if kind == "turns":
            events = [Event("turns", color=_turn_color(rng, obj, []))]
        else:
            obj, events = replace(obj, size="small" if kind == "grows" else "large"), [Event(kind)]
        objects = [obj]
    elif category == "spatial":
        objects, events, relation = _objects(rng, 2), [None, None], _pick(rng, RELATIONS)
    elif category == "motion_binding":
        objects = _objects(rng, 2)
        first = _pick(rng, DIRECTIONS)
        second = _pick(rng, [d for d in DIRECTIONS if d != first])
        events = [Event("moves", direction=first), Event("moves", direction=second)]
    elif category == "action_binding":
        objects = _objects(rng, 2)
        first = _pick(rng, ACTIONS)
        kinds = [first, _pick(rng, [k for k in ACTIONS if k != first])]
        objects = [replace(o, size=None) if k in ("grows", "shrinks") else o for o, k in zip(objects, kinds)]
        events = []
        for i, kind in enumerate(kinds):
            if kind == "moves":
                events.append(Event("moves", direction=_pick(rng, DIRECTIONS)))
            elif kind == "turns":
                events.append(Event("turns", color=_turn_color(rng, objects[i], [objects[1 - i]])))
            else:
                events.append(Event(kind))
    elif category == "interaction":
        objects = _objects(rng, 2, distinct_colors=True)
        events = [Event("pushes", direction=_pick(rng, DIRECTIONS)), None]
    elif category == "numeracy":
        count = _pick(rng, NUMBERS.values())
        group = Obj(_pick(rng, COLORS), _pick(rng, SHAPES), None, count)
        objects = [group]
        if count < MAX_OBJECTS and rng.random() < 0.5:
            extra = _objects(rng, 1)[0]
            while (extra.color, extra.shape) == (group.color, group.shape):
                extra = _objects(rng, 1)[0]
            objects.append(extra)
        event = Event("moves", direction=_pick(rng, DIRECTIONS)) if rng.random() < 0.5 else None
        events = [event] * len(objects)
    else:
        raise ValueError(f"unknown MiniWorld category {category!r}; expected one of {', '.join(CATEGORIES)}")
    background = "white" if rng.random() < white_prob else "black"
    return MiniPrompt(category, tuple(objects), tuple(events), relation, background)


# ---------------------------------------------------------------- vocabulary

def _vocabulary() -> list[str]:
    phrases = [
        "a an and is while move on background", *EVENT_KINDS, *SIZES, *COLORS, *BACKGROUNDS, *SHAPES,
        *(s + "s" for s in SHAPES), *NUMBERS, *DIRECTIONS, *RELATIONS, *PUSH_RELATIONS.values(), *POSITIONS.values(),
    ]
    return sorted({word for phrase in phrases for word in phrase.split()})


VOCABULARY: list[str] = _vocabulary()  # every word of every prompt and caption
