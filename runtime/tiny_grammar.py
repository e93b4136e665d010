"""The prompt grammar the tiny models were trained on: its slots, its form, the check of a prompt,
and the tiny text encoder's vocabulary and tokenizer (`tokenize`: every word in ``VOCABULARY``, the
prompt a sentence of the grammar; the empty prompt, all padding, is the unconditional one).

One sentence of the grammar, slot by slot::

    <count> <size> <colour> <shape> (static | moving <direction> <speed>) on <background>

with a singular shape after ``one`` and a plural one after ``two`` and ``three``, for example
``"two small red circles moving left fast on texture"``. The tiny models have seen nothing else:
a prompt of their words in another order is as foreign to them as an unknown word, so the runtime
refuses it (`check_prompt`, called by `tokenize`). Training clips and default prompts are
drawn from the same definition (`sencache.data.grammar`). No heavy imports: the
command line shows the grammar in its help and checks prompts before it loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from sencache.runtime.errors import BadInput

COUNTS = ("one", "two", "three")
SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange")
SHAPES = ("circle", "square")
PLURAL_SHAPES = tuple(s + "s" for s in SHAPES)
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")
BACKGROUNDS = ("black", "gradient", "texture")
MOTIONS = ("static", "moving")
ON = "on"

FORM = "<count> <size> <colour> <shape> (static | moving <direction> <speed>) on <background>"
"""The sentence form; `check_prompt` reads prompts in this order and `PromptSpec.prompt` writes it."""
SLOTS: dict[str, tuple[str, ...]] = {
    "count": COUNTS,
    "size": SIZES,
    "colour": COLOURS,
    "shape": SHAPES,
    "direction": DIRECTIONS,
    "speed": SPEEDS,
    "background": BACKGROUNDS,
}
"""The words of each slot of FORM (`shape` is plural after two and three)."""
WORDS: tuple[str, ...] = (
    *COUNTS,
    *SIZES,
    *COLOURS,
    *SHAPES,
    *PLURAL_SHAPES,
    *MOTIONS,
    *DIRECTIONS,
    *SPEEDS,
    ON,
    *BACKGROUNDS,
)
"""Every word the grammar writes, in the order of the tiny tokenizer's ids (after the pad)."""


@dataclass(frozen=True)
class PromptSpec:
    """One sentence of the grammar, slot by slot (direction and speed are None when static)."""

    count: str
    size: str
    colour: str
    shape: str
    direction: str | None
    speed: str | None
    background: str

    @property
    def prompt(self) -> str:
        noun = self.shape if self.count == "one" else self.shape + "s"
        motion = "static" if self.direction is None else f"moving {self.direction} {self.speed}"
        return f"{self.count} {self.size} {self.colour} {noun} {motion} {ON} {self.background}"


def _choices(words: tuple[str, ...]) -> str:
    return "|".join(words)


def _legend() -> list[str]:
    """Each slot with its words, as `slot: a|b|c`."""
    lines = []
    for slot, words in SLOTS.items():
        if slot == "shape":
            lines.append(f"shape: {_choices(SHAPES)} after one, {_choices(PLURAL_SHAPES)} after two and three")
        else:
            lines.append(f"{slot}: {_choices(words)}")
    return lines


def grammar_line() -> str:
    """The grammar on one line, for error messages."""
    return f"{FORM}, where {'; '.join(_legend())}"


def grammar_help() -> str:
    """The grammar over several lines, for help texts."""
    return "\n".join([FORM, *("  " + line for line in _legend())])


def _quoted(prompt: str) -> str:
    return repr(prompt if len(prompt) <= 60 else prompt[:57] + "...")


def parse_prompt(prompt: str) -> PromptSpec | None:
    """The sentence a prompt spells (None for the empty, unconditional prompt); BadInput naming the
    first word out of place, with the grammar, when it is not a sentence of the grammar."""
    words = prompt.lower().split()
    if not words:
        return None
    expected: list[tuple[str, tuple[str, ...]]] = [
        ("count", COUNTS),
        ("size", SIZES),
        ("colour", COLOURS),
        ("shape", SHAPES if words[0] == "one" else PLURAL_SHAPES),
        ("'static' or 'moving'", MOTIONS),
    ]
    if len(words) > 4 and words[4] == "moving":
        expected += [("direction", DIRECTIONS), ("speed", SPEEDS)]
    expected += [("'on'", (ON,)), ("background", BACKGROUNDS)]
    for i, (slot, choices) in enumerate(expected):
        if i >= len(words):
            problem = f"it ends where {_wanted(slot, choices)} should follow"
            break
        if words[i] not in choices:
            after = f" after {words[0]!r}" if slot == "shape" else ""
            problem = f"word {i + 1} {words[i]!r} should be {_wanted(slot, choices)}{after}"
            break
    else:
        if len(words) == len(expected):
            moving = words[4] == "moving"
            return PromptSpec(
                count=words[0],
                size=words[1],
                colour=words[2],
                shape=words[3] if words[0] == "one" else words[3][:-1],
                direction=words[5] if moving else None,
                speed=words[6] if moving else None,
                background=words[-1],
            )
        problem = f"words after the background: {' '.join(words[len(expected) :])}"
    raise BadInput(
        f"prompt {_quoted(prompt)} is not in the tiny models' grammar: {problem}; the grammar: {grammar_line()}",
        param="prompt",
    )


def _wanted(slot: str, choices: tuple[str, ...]) -> str:
    """What a position takes: a quoted word as it is, a slot as `a colour (red|green|...)`."""
    return slot if slot.startswith("'") else f"a {slot} ({_choices(choices)})"


def check_prompt(prompt: str) -> None:
    """Refuse (BadInput) a prompt that is not a sentence of the grammar; the empty prompt passes."""
    parse_prompt(prompt)


PAD = "<pad>"
VOCABULARY: tuple[str, ...] = (
    PAD,
    "one",
    "two",
    "three",
    "small",
    "large",
    "red",
    "green",
    "blue",
    "yellow",
    "cyan",
    "magenta",
    "white",
    "orange",
    "circle",
    "square",
    "circles",
    "squares",
    "static",
    "moving",
    "left",
    "right",
    "up",
    "down",
    "slow",
    "fast",
    "on",
    "black",
    "gradient",
    "texture",
)
"""The token ids of the tiny text encoder, in order (the trained embeddings index this table)."""
MAX_TOKENS = 12
_INDEX = {word: i for i, word in enumerate(VOCABULARY)}


def tokenize(prompt: str) -> list[int]:
    """Map a prompt to MAX_TOKENS token ids (padded); raise BadInput for unknown words or a prompt
    outside the grammar."""
    words = prompt.lower().split()
    if len(words) > MAX_TOKENS:
        raise BadInput(
            f"prompt {_quoted(prompt)} has {len(words)} words; the tiny text encoder takes at most {MAX_TOKENS}",
            param="prompt",
        )
    unknown = list(dict.fromkeys(w for w in words if w not in _INDEX or w == PAD))
    if unknown:
        raise BadInput(
            f"prompt {_quoted(prompt)} has words outside the tiny model's vocabulary: {', '.join(unknown)} "
            f"(known: {' '.join(VOCABULARY[1:])})",
            param="prompt",
        )
    check_prompt(prompt)
    return [_INDEX[w] for w in words] + [_INDEX[PAD]] * (MAX_TOKENS - len(words))
