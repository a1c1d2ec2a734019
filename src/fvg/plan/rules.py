"""Offline, deterministic planner.

MiniWorld v1 prompts get the grammar's own first-frame caption (exact). Any other text
goes through a small table of patterns that rewrites each clause to its start state:
"turns from X to Y" keeps X, "turns into / becomes Y" drops Y, change verbs become their
start state (grows -> small, opens -> closed, ...), and motion verbs become a start
position that leaves room for the motion (moves left -> on the right side of the frame)
plus, for walkers and runners, a still pose. Subjects, counts and attributes are kept
verbatim. It is a fallback, not a parser: the LLM backends handle open-ended prompts.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable

from fvg.miniworld.grammar import first_frame_caption, parse_prompt
from fvg.plan.base import Plan, normalize_space, validate_prompt

RULES_VERSION = "fvg-rules-v1"

UPSAMPLE_DETAIL = (
    "High-quality, detailed footage with natural, consistent lighting and a steady camera; "
    "every subject keeps its appearance, colours and count, and all motion is smooth and "
    "continuous from the first frame to the last."
)



def _alternation(words: list[str]) -> str:
    """A regex for any of `words`, written as a trie ("run(?:ning|s)?"), longer forms first.

    It matches what `"|".join(sorted(words, key=len, reverse=True))` matches, but Python's `re`
    tries a flat alternation one word at a time at every position: with some 500 verb forms that
    made the planner ten times slower.
    """
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


# --- word tables -------------------------------------------------------------------------

_NUMBERS = "two three four five six seven eight nine ten eleven twelve dozens several many these those both few".split()
_SINGULAR = {"a", "an", "one", "this", "that", "each", "every"}
_DETERMINERS = _SINGULAR | set(_NUMBERS) | {"the", "some", "his", "her", "its", "their", "my", "your", "our"}
_POSSESSIVES = {"its", "his", "her", "their", "my", "your", "our"}
_PREPOSITIONS = set(
    "in on at under near beside behind inside outside above below among against during over across along "
    "around through past from into onto toward towards to with of by after before about without".split()
)
_OBJECT_PRONOUNS = {"it", "them", "him", "her", "us", "me"}
_SIZES = {"small", "large", "big", "tiny", "huge", "little", "giant", "tall", "short"}
_ADVERB_WORDS = (
    r"slowly and steadily|slowly|quickly|rapidly|fast|gradually|steadily|smoothly|gently|swiftly|"
    r"suddenly|continuously|constantly|briskly|gracefully|happily|calmly|softly|quietly|silently|"
    r"carefully|playfully|lazily|patiently|elegantly|effortlessly|spontaneously|completely|instantly|"
    r"magically|eventually|finally|abruptly|dramatically|visibly|partially|fully|briefly|proudly|"
    r"excitedly|energetically|freely|peacefully|majestically|hard|initially|at first|over time|"
    r"all the way|in size|little by little|guadually"
)
_ADVERBS = _alternation(_ADVERB_WORDS.split("|"))
_SETTING = (  # prepositions that start a setting phrase after a change ("melts in the sun")
    r"in front of|next to|on top of|in|on|at|under|near|beside|behind|inside|outside|above|below|"
    r"among|against|during|over|while|as|when|until"
)
_LOC = _SETTING + r"|across|along|around|through|past|from|into|onto|toward|towards|(?<!next )(?<!close )(?<!due )to"
_TO = r"(?<!next )(?<!close )(?<!due )(?:to|towards?|toward)"
_NP = rf"(?!(?:{_LOC})\b)(?P<np>[^\s\0][^\0]*?)(?=\s*[,;\0]|\s+(?:{_LOC})\b|$)"  # a noun phrase up to a boundary

# Motion verbs: base -> (pose in the first frame, implied direction, template for a direct object).
_MOTION: dict[str, tuple[str, str | None, str | None]] = {
    **{v: ("", None, None) for v in (
        "move go travel drive roll slide drift float sail ride glide race bounce zoom speed cruise "
        "skate ski surf paddle row pedal tumble slither swing creep sneak slink scurry dart flutter "
        "swoop crawl pass spin").split()},
    **{v: ("standing", None, None) for v in (
        "walk run jog march stroll sprint gallop trot wander dash hurry rush charge scamper "
        "waddle step").split()},
    **{v: ("crouching", None, None) for v in "jump leap hop".split()},
    **{v: ("flying", None, None) for v in "fly soar".split()},
    "swim": ("swimming", None, None),
    **{v: ("", "up", None) for v in "rise ascend".split()},
    **{v: ("", "down", None) for v in "fall drop sink plunge dive".split()},
    "climb": ("", "up", "at the bottom of {}"),
    "descend": ("", "down", "at the top of {}"),
    "enter": ("", None, "outside {}"),
    "exit": ("", None, "inside {}"),
    "cross": ("", None, "on one side of {}"),
    "approach": ("", None, "far from {}"),
}
# Change verbs: base -> start state (None: the start state is unknown, only the target is dropped).
_CHANGE: dict[str, str | None] = {
    "grow": "small", "expand": "small", "shrink": "large", "diminish": "large", "melt": "solid",
    "thaw": "frozen", "freeze": "unfrozen", "open": "closed", "close": "open", "shut": "open",
    "light up": "unlit", "go out": "lit", "burn out": "lit", "fill": "empty", "fill up": "empty",
    "empty": "full", "inflate": "deflated", "deflate": "inflated", "bloom": "unopened",
    "blossom": "unopened", "wilt": "fresh", "wither": "fresh", "rot": "fresh", "decay": "fresh",
    "ripen": "unripe", "dry": "wet", "dry up": "wet", "break": "intact", "shatter": "intact",
    "crack": "intact", "rust": "shiny", "tarnish": "shiny", "brighten": "dim", "darken": "bright",
    "freeze over": "unfrozen", "cloud over": "clear", "fog up": "clear", "cool": "hot", "cool down": "hot",
    "heat up": "cold", "warm up": "cold", "burn down": "intact", "fade": None,
    **{v: None for v in "turn become change transform morph evolve get shift transition switch".split()},
}
_COMPARATIVES = {
    "bigger": "small", "larger": "small", "taller": "short", "longer": "short", "wider": "narrow",
    "smaller": "large", "shorter": "tall", "brighter": "dim", "darker": "bright", "hotter": "cold",
    "warmer": "cold", "colder": "hot", "cooler": "warm", "fuller": "empty", "emptier": "full",
    "older": "young", "younger": "old", "wetter": "dry", "drier": "wet", "thicker": "thin",
    "thinner": "thick", "heavier": "light", "lighter": "dark",
}
_START = {"left": "on the right side of the frame", "right": "on the left side of the frame",
          "up": "near the bottom of the frame", "down": "near the top of the frame"}
_SIDE = {"left": "on the left side of the frame", "right": "on the right side of the frame",
         "top": "near the top of the frame", "bottom": "near the bottom of the frame"}
_TOWARD = {"left": "left", "right": "right", "top": "up", "bottom": "down", "up": "up", "down": "down"}
_SLOPES = {"hill", "hills", "stairs", "staircase", "steps", "slope", "mountain", "ladder", "tree", "wall",
           "ramp", "pole", "rope", "cliff", "dune", "trunk", "slide"}
_OPPOSITE = {"left": "right", "right": "left"}
_DOUBLING = {"run", "swim", "jog", "hop", "skip", "slip", "drop", "trot", "step", "get", "shut", "spin", "fog", "dim"}


def _forms(base: str) -> dict[str, str]:
    """Inflections of a (possibly two-word) verb: {form: "base" | "s" | "ing" | "ed"}."""
    word, _, particle = base.partition(" ")
    if word.endswith(("s", "sh", "ch", "x", "z", "o")):
        third = word + "es"
    elif re.search(r"[^aeiou]y$", word):
        third = word[:-1] + "ies"
    else:
        third = word + "s"
    stem = word + word[-1] if word in _DOUBLING else word
    if word.endswith("ie"):
        ing = word[:-2] + "ying"
    elif word.endswith("e") and not word.endswith(("ee", "ye", "oe")):
        ing = word[:-1] + "ing"
    else:
        ing = stem + "ing"
    if word.endswith("e"):
        past = word + "d"
    elif re.search(r"[^aeiou]y$", word):
        past = word[:-1] + "ied"
    else:
        past = stem + "ed"
    tail = f" {particle}" if particle else ""
    return {word + tail: "base", third + tail: "s", ing + tail: "ing", past + tail: "ed"}


_VERBS: dict[str, tuple[str, str]] = {}  # form -> (base, kind)
for _base in (*_MOTION, *_CHANGE):
    for _form, _kind in _forms(_base).items():
        _VERBS.setdefault(_form, (_base, _kind))
_VERB_RE = re.compile(
    r"\b(?P<aux>(?:is|are|gets?|starts?|begins?|keeps?|continues?)\s+(?:to\s+)?|being\s+)?"
    rf"(?:(?:{_ADVERBS})\s+)?(?P<verb>{_alternation(list(_VERBS))})\b",
    re.IGNORECASE,
)

# --- text helpers ------------------------------------------------------------------------


_ADVERB_RE = re.compile(rf"\b(?:{_ADVERBS})\b", re.IGNORECASE)
_SPACE_BEFORE_COMMA = re.compile(r"\s+([,;])")
_SPACES = re.compile(r"\s+")
_LEADING_JOINERS = re.compile(r"(?:[,;]\s*|and\s+)*", re.IGNORECASE)
# Trailing ", and" runs are matched at the start of the reversed text: a `(...)+$` pattern restarts
# at every position and so takes quadratic time on a long run of commas.
_TRAILING_JOINERS_REVERSED = re.compile(r"(?:[,;]\s*|dna\s+)*", re.IGNORECASE)


def _clean(text: str) -> str:
    text = _SPACES.sub(" ", _ADVERB_RE.sub(" ", text)).strip()
    text = _SPACE_BEFORE_COMMA.sub(r"\1", text)
    text = text[_LEADING_JOINERS.match(text).end() :]
    tail = _TRAILING_JOINERS_REVERSED.match(text[::-1]).end()
    return text[: len(text) - tail].strip()


def _words(text: str) -> list[str]:
    return text.lower().split()


def _last_word(text: str, end: int) -> str:
    """The last word of `text[:end]`, lower case, found without copying the prefix (linear time
    for the caller's loop). Only its last 64 characters are read: longer words match no table."""
    while end and text[end - 1].isspace():
        end -= 1
    start = end
    while start and end - start < 64 and not text[start - 1].isspace():
        start -= 1
    return text[start:end].lower()


def _strip_det(text: str) -> str:
    return re.sub(r"^(?:a|an|the)\s+", "", text.strip(), flags=re.IGNORECASE)


def _phrase_end(text: str, preps: str) -> int:
    """Where a noun phrase or target at the start of `text` ends: a comma or one of `preps`."""
    m = re.search(rf"\s*[,;\0]|(?:^|\s+)(?:{preps})\b", text, re.IGNORECASE)
    return m.start() if m else len(text)


def _insert_adjective(subject: str, adjective: str, first_only: bool) -> str:
    """Put `adjective` into the subject's noun phrase(s): "a leaf" + green -> "a green leaf".

    With a plural verb, later noun phrases that start with a determiner get it too
    ("a circle and a square grow" -> "a small circle and a small square").
    """
    parts = [subject] if first_only else re.split(r"(\s+and\s+|,\s+)", subject)
    for i in range(0, len(parts), 2):
        words, lower = parts[i].split(), _words(parts[i])
        if not words or (i and lower[0] not in _DETERMINERS):
            continue
        if adjective.lower() in lower or (adjective in _SIZES and _SIZES & set(lower)):
            continue
        at = 0
        while at < len(words) - 1 and lower[at] in _DETERMINERS:
            at += 1
        while adjective not in _SIZES and at < len(words) - 1 and lower[at] in _SIZES:
            at += 1  # size before colour: "a small green leaf"
        if at == 0 and len(words) > 1 and words[0][:1].isupper() and words[0][1:].islower():
            words[0] = words[0].lower()  # sentence case: "Green apple" -> "unripe green apple"
        words.insert(at, adjective)
        if at == 1 and lower[0] in {"a", "an"}:
            article = "an" if adjective[0].lower() in "aeiou" else "a"
            words[0] = article.capitalize() if words[0][0].isupper() else article
        parts[i] = " ".join(words)
    return "".join(parts)


def _count(word: str) -> int | None:
    """The value of a numeral in any script ("3", "٣", "３"), capped at 10; None for other words.

    `str.isdigit` is also true of "²" and "①", which `int` rejects, and `int` refuses numerals
    over 4300 digits: the value is built digit by digit instead, and only "0", "1" or more matter.
    """
    if not word.isdecimal():
        return None
    value = 0
    for char in word:
        value = min(value * 10 + unicodedata.decimal(char), 10)
    return value


def _number(subject: str) -> str | None:
    """"s" (singular), "p" (plural) or None (unknown) from the subject's first word."""
    words = _words(subject)
    if not words or " and " in f" {subject.lower()} ":
        return None
    if words[0] in _SINGULAR and not any(w.endswith("'s") for w in words):  # "a cat's eyes turn"
        return "s"
    if words[0] in _NUMBERS or (_count(words[0]) or 0) > 1:
        return "p"
    return None


def _verb(form: str) -> tuple[str, str] | None:
    """(base, kind) of a matched verb form. IGNORECASE matches "ſ" to "s" and "K" (Kelvin) to "k";
    casefold maps them back to the table's spelling. None if the form still is not in the table."""
    return _VERBS.get(form.lower()) or _VERBS.get(form.casefold())


def _find_verb(text: str) -> re.Match | None:
    """The first table verb that can be the clause's main verb."""
    for m in _VERB_RE.finditer(text):
        entry = _verb(m.group("verb"))
        if entry is None:
            continue
        before = _last_word(text, m.start())
        if before in _DETERMINERS or before in _PREPOSITIONS:
            continue  # "a running dog", "an open door", "around blooming flowers": a modifier
        kind, number = entry[1], _number(text[: m.start()])
        if kind == "base" and (number == "s" or before.endswith("ing") or before in _OBJECT_PRONOUNS):
            continue  # "a bread roll moves", "acquiring rust", "causing it to crack", "watch them grow"
        if kind == "s" and number == "p":
            continue
        if kind == "ed" and not m.group("aux"):
            continue  # past participles only in the passive: "a stone is dropped"
        return m
    return None


# --- start positions for motion ----------------------------------------------------------

_FRAME = r"(?:\s+of\s+(?:the\s+)?(?:frame|screen|image|picture|scene|view))?"
_SIDE_RE = r"(?:the\s+)?(?P<{}>left|right|top|bottom)(?:[\s-]+(?:hand\s+)?(?:side|edge|corner))?" + _FRAME
_SIDE_TO_SIDE = rf"\b(?:from\s+)?{_SIDE_RE.format('a')}\s+(?:to|towards?)\s+{_SIDE_RE.format('b')}"
_TO_SIDE = rf"\b{_TO}\s+{_SIDE_RE.format('s')}"


def _np(template: str) -> Callable[[re.Match], str]:
    return lambda m: template.format(m.group("np"))


def _up_down(m: re.Match, top: bool) -> str:
    if _words(m.group("np"))[-1] in _SLOPES:
        return f"at the {'top' if top else 'bottom'} of {m.group('np')}"
    return f"on {m.group('np')}"


def _from(m: re.Match) -> str:
    place, target = m.group("x"), m.groupdict().get("np")
    side = re.fullmatch(_SIDE_RE.format("s"), place, re.IGNORECASE)
    if side:
        return _SIDE[side.group("s").lower()]
    if _words(place)[0] in _DETERMINERS:
        return f"at {place}"
    if target and _words(target) != _words(place):
        return f"@{place}"  # "goes from green to red": a start state, not a place (see _motion)
    return ""  # "from branch to branch", "from above"


def _side_of(m: re.Match) -> str:
    d = _OPPOSITE[m.group("d").lower()]
    return f"on the {d} side of {m.group('np')}" if m.group("side") else f"to the {d} of {m.group('np')}"


_MOTION_PATTERNS: list[tuple[str, Callable[[re.Match], str]]] = [
    (rf"\b(?:on|at|in)\s+the\s+(?:left|right|top|bottom)(?:[\s-]+(?:hand\s+)?side|\s+edge)?(?:\s+of\s+{_NP})?",
     lambda m: m.group(0)),  # a place, not a direction: "a dog running on the left of a bicycle"
    (_SIDE_TO_SIDE, lambda m: _SIDE[m.group("a").lower()]),
    (rf"\bfrom\s+(?P<x>[^\s\0][^\0]*?)\s+(?:to|towards?|into)\s+{_NP}", _from),
    (rf"\bfrom\s+(?P<x>[^\s\0][^\0]*?)(?=\s*[,;\0]|\s+(?:{_LOC})\b|$)", _from),
    (rf"\b{_TO}\s+the\s+(?P<d>left|right)(?P<side>[\s-]+(?:hand\s+)?side)?\s+of\s+"
     rf"(?!(?:the\s+)?(?:frame|screen|image|picture|scene|view)\b){_NP}", _side_of),
    (_TO_SIDE, lambda m: _START[_TOWARD[m.group("s").lower()]]),
    (r"\bacross\s+(?:the\s+)?(?:frame|screen|image|picture|scene|view)\b", lambda m: _SIDE["left"]),
    (rf"\b{_TO}\s+(?:the\s+)?(?:camera|viewer)\b", lambda m: "far from the camera"),
    (r"\baway\s+from\s+(?:the\s+)?(?:camera|viewer)\b", lambda m: "close to the camera"),
    (rf"\baway\s+from\s+{_NP}", _np("next to {}")),
    (r"(?<!the )\b(?P<d>up|down|left|right)(?:wards?)?\b(?!\s+(?:the|a|an|his|her|its|their)\b)",
     lambda m: _START[m.group("d").lower()]),
    (rf"\bup\s+{_NP}", lambda m: _up_down(m, top=False)),
    (rf"\bdown\s+{_NP}", lambda m: _up_down(m, top=True)),
    (rf"\binto\s+{_NP}", _np("outside {}")),
    (rf"\bout\s+of\s+{_NP}", _np("inside {}")),
    (rf"\bonto\s+{_NP}", _np("next to {}")),
    (rf"\boff\s+{_NP}", _np("on {}")),
    (rf"\b(?:over|by)\s+{_NP}", _np("near {}")),
    (rf"\bthrough\s+{_NP}", _np("in {}")),
    (rf"\bacross\s+{_NP}", _np("on one side of {}")),
    (rf"\baround\s+{_NP}", _np("next to {}")),
    (rf"\balong\s+{_NP}", _np("at one end of {}")),
    (rf"\bpast\s+{_NP}", _np("near {}")),
    (rf"\b{_TO}\s+{_NP}", _np("far from {}")),
    (r"\b(?:away|forwards?|backwards?|across|around|by|past)\b", lambda m: ""),
]
_MOTION_RES = [(re.compile(p, re.IGNORECASE), f) for p, f in _MOTION_PATTERNS]


def _positions(rest: str) -> tuple[list[str], str]:
    """Start positions for the motion phrases in `rest`, and what is left of `rest`."""
    found: list[tuple[int, str]] = []
    for regex, to_position in _MOTION_RES:
        m = regex.search(rest)
        if m:
            found.append((m.start(), to_position(m)))
            rest = rest[: m.start()] + " \0 " + rest[m.end() :]  # \0 keeps later patterns off the span
    positions = list(dict.fromkeys(p for _, p in sorted(found) if p))
    return positions, re.sub(r"\s*\0\s*", " ", rest)


# --- clauses -------------------------------------------------------------------------------


def _join(subject: str, positions: list[str], leftover: str) -> str:
    """Subject (and pose), then start positions, then the rest of the clause (its setting)."""
    text = " ".join([_clean(subject), *positions[:1]]) + "".join(f", {p}" for p in positions[1:])
    leftover = _clean(leftover)
    return text if not leftover else f"{text}, {leftover}" if positions else f"{text} {leftover}"


def _change(subject: str, base: str, kind: str, rest: str) -> str:
    first_only = kind == "s"
    if base in {"turn", "switch"} and re.match(r"(on|off)\b(?!\s+(?:the|a|an)\b)", rest, re.IGNORECASE):
        state = "switched-off" if rest[:2].lower() == "on" else "switched-on"
        return _join(_insert_adjective(subject, state, first_only), [], rest[3:])
    start, obj, words = _CHANGE[base], None, _words(rest)
    transitive = start is not None or re.search(r"\s(?:into|to)\s", rest)  # not "turns a deep purple"
    if transitive and words and words[0] in _DETERMINERS:  # an object: "opens the door", "changes its colour"
        end = len(words[0]) + _phrase_end(rest[len(words[0]) :], _LOC)
        obj, rest = (None if words[0] in _POSSESSIVES else rest[:end]), rest[end:].strip()
    m = re.match(r"from\s+(?P<x>.+?)\s+(?:to|into)\s+", rest, re.IGNORECASE)
    if m:
        start, rest = _strip_det(m.group("x")), rest[m.end() :]
    elif _words(rest) and _words(rest)[0] in _COMPARATIVES:
        start = _COMPARATIVES[_words(rest)[0]]
    leftover = rest[_phrase_end(rest, _SETTING) :]  # the target ("red", "into a butterfly") is dropped
    if obj:
        return _join(f"{subject} and {_insert_adjective(obj, start, True) if start else obj}", [], leftover)
    return _join(_insert_adjective(subject, start, first_only) if start else subject, [], leftover)


def _motion(subject: str, base: str, kind: str, rest: str) -> str:
    pose, direction, template = _MOTION[base]
    if template and _words(rest) and _words(rest)[0] in _DETERMINERS:  # "climbs a tree", "enters the room"
        end = _phrase_end(rest, _LOC)
        return _join(f"{subject} {pose}", [template.format(rest[:end])], rest[end:])
    positions, leftover = _positions(rest)
    states = [p[1:] for p in positions if p.startswith("@")]
    positions = [p for p in positions if not p.startswith("@")] or ([_START[direction]] if direction else [])
    if states:  # "goes from green to red"
        subject = _insert_adjective(subject, _strip_det(states[0]), kind == "s")
    leftover = _clean(leftover)
    if _words(leftover) and _words(leftover)[0] in _DETERMINERS:
        pose, leftover = "", f"with {leftover}"  # "rides a bike to the left" -> "a man with a bike, ..."
    return _join(f"{subject} {pose}", positions, leftover)


# An unknown verb followed by a direction: "a bird swoops rightwards", "a moon waxing from new to full".
# The subject before it must hold a word character; "from X" must be followed by " to " or " into "
# somewhere later. Both are checked outside the regex (see _unknown_motion): written as lazy
# `.*?` groups inside it they made matching quadratic in the clause's length.
_UNKNOWN_MOTION_AT = re.compile(
    rf"\s+(?:(?:is|are|being)\s+)?(?P<verb>\w{{2,}}(?:s|ing|ed))(?:\s+(?:{_ADVERBS}))*\s+"
    r"(?P<rest>from\s+\S|(?:to|towards?)\s+the\s+(?:left|right|top|bottom)\b|(?:left|right)(?:wards?)?\b|"
    r"(?:up|down)wards?\b)",
    re.IGNORECASE,
)
_TO_OR_INTO = re.compile(r"(?=\s(?:to|into)\s)", re.IGNORECASE)


def _unknown_motion(clause: str) -> tuple[str, str, str] | None:
    """(subject, verb, rest) of the first unknown verb followed by a direction, or None. Linear time."""
    first_word = re.search(r"\w", clause)
    if first_word is None:
        return None
    last_to = max((m.start() for m in _TO_OR_INTO.finditer(clause)), default=-1)
    pos = first_word.end()
    while m := _UNKNOWN_MOTION_AT.search(clause, pos):
        if not m.group("rest").lower().startswith("from") or last_to >= m.end("rest"):
            return clause[: m.start()], m.group("verb"), clause[m.start("rest") :]
        pos = m.start() + 1
    return None


# Clauses longer than this are kept as they are. Real clauses are far shorter (whole T2V-CompBench
# prompts stay under 300 characters), and some patterns (a lazy "from X to Y" span, say) cost time
# quadratic in the clause's length: the cap keeps the planner linear in the prompt's length.
MAX_CLAUSE_CHARS = 600


def _clause_state(clause: str) -> str | None:
    """A clause rewritten to its start state; None when it has no subject of its own."""
    analysable = len(clause) <= MAX_CLAUSE_CHARS
    m = _find_verb(clause) if analysable else None
    if m is not None:
        subject, rest = clause[: m.start()], clause[m.end() :]
        base, kind = _verb(m.group("verb"))
    elif analysable and (unknown := _unknown_motion(clause)):
        subject, verb, rest = unknown
        base, kind = "move", "s" if verb.lower().endswith("s") else "ing"
    else:  # no verb we know: keep the clause, with any left-to-right motion as a start position
        clause = re.sub(_SIDE_TO_SIDE, lambda m: _SIDE[m.group("a").lower()], clause, flags=re.IGNORECASE)
        return _clean(re.sub(_TO_SIDE, lambda m: _START[_TOWARD[m.group("s").lower()]], clause, flags=re.I))
    subject = re.sub(rf"(?:\s+(?:{_ADVERBS}))+$", "", subject.strip(), flags=re.IGNORECASE)
    if not subject or _words(subject) in (["it"], ["he"], ["she"], ["they"], ["we"], ["i"], ["you"]):
        return None  # "then walks away", "as it ripens": no entity of its own
    handler = _motion if base in _MOTION and base not in _CHANGE else _change
    return handler(subject, base, kind, _clean(rest))


_MAIN_SPLIT = re.compile(r"\s*(?:[,;]\s*)?\b(?:while|whilst|meanwhile|and then|then)\b\s*|\s*;\s*", re.IGNORECASE)
_SUB_SPLIT = re.compile(
    r"\s*,?\s*\b(?<!such )(?<!as well )(?:as(?! well| if| though| many)|when|until|because|once)\b\s+",
    re.IGNORECASE,
)
_FRAMING = re.compile(
    r"^(?:an?\s+|the\s+)?(?:(?:time-?lapse|slow[- ]motion|close-?up|video|clip|footage|shot|scene|animation)\s+)+"
    r"(?:of|showing|in which)\s+",
    re.IGNORECASE,
)


def _is_clause(piece: str) -> bool:
    return len(piece) <= MAX_CLAUSE_CHARS and bool(
        _find_verb(piece)
        or _unknown_motion(piece)
        or (_words(piece)[:1] and _words(piece)[0] in _DETERMINERS and re.search(r"\b(?:is|are)\b", piece))
    )


def _clauses(text: str) -> list[str]:
    """Split into clauses; a piece without a verb joins its neighbour ("a cat and a dog run")."""
    clauses: list[str] = []
    for chunk in _MAIN_SPLIT.split(text):
        pieces = re.split(r"(,\s*and\s+|\s+and\s+|,\s*)", chunk)
        current, has_verb = [pieces[0]], _is_clause(pieces[0])
        for sep, piece in zip(pieces[1::2], pieces[2::2]):
            if has_verb and _is_clause(piece):
                clauses.append("".join(current))
                current = [piece]
            else:
                current += [sep, piece]
                has_verb = has_verb or _is_clause(piece)
        clauses.append("".join(current))
    return [c.strip() for c in clauses if c.strip()]


def free_text_caption(prompt: str) -> str:
    """First-frame caption of arbitrary text by the pattern table."""
    text = normalize_space(prompt)
    final = "." if text.endswith(".") else ""
    text = _FRAMING.sub("", text.rstrip(".!"))
    main, *subordinates = _SUB_SPLIT.split(text)
    clauses = _clauses(main)
    for sub in subordinates:  # "as a horse gallops outside" is kept; "as autumn progresses" is not
        if len(sub) <= MAX_CLAUSE_CHARS and _words(sub)[:1] and _words(sub)[0] in {"a", "an", *_NUMBERS} \
                and _find_verb(sub):
            clauses += _clauses(sub)
    states = [s for s in map(_clause_state, clauses) if s]
    if not states:
        return prompt.strip()
    if len(states) == 1:
        caption = states[0]
    else:
        comma = "," if len(states) > 2 or "," in states[0] else ""
        caption = ", ".join(states[:-1]) + f"{comma} and " + states[-1]
    if prompt.strip()[:1].isupper():
        caption = caption[:1].upper() + caption[1:]
    return caption + final


def miniworld_caption(prompt: str) -> str | None:
    """The MiniWorld v1 grammar's first-frame caption, or None if `prompt` is not MiniWorld."""
    try:
        parsed = parse_prompt(prompt)
    except ValueError:
        return None
    return first_frame_caption(parsed)


class RulesPlanner:
    name = "rules"
    model = None

    def plan(self, prompt: str) -> Plan:
        prompt = validate_prompt(prompt)
        caption = miniworld_caption(normalize_space(prompt))
        if caption is not None:
            upsampled = f"{prompt}, starting from {caption}"
        else:
            caption = free_text_caption(prompt)
            upsampled = f"{prompt.rstrip('.!')}. {UPSAMPLE_DETAIL}"
        return Plan(prompt, caption, upsampled, self.name, None, RULES_VERSION)
