"""The prompt grammar the tiny models were trained on, slot by slot::

    <count> <size> <colour> <shape> (static | moving <direction> <speed>) on <background>

for example ``"two small red circles moving left fast on texture"``. Training clips, the
evaluation of the trained models and the default prompts of tiny bundles are drawn from it; the
runtime only needs its words (`sencache.runtime.tiny_text.VOCABULARY`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COUNTS = ("one", "two", "three")
SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange")
SHAPES = ("circle", "square")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")
BACKGROUNDS = ("black", "gradient", "texture")
WORDS: tuple[str, ...] = (
    *COUNTS,
    *SIZES,
    *COLOURS,
    *SHAPES,
    *(s + "s" for s in SHAPES),
    "static",
    "moving",
    *DIRECTIONS,
    *SPEEDS,
    "on",
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
        return f"{self.count} {self.size} {self.colour} {noun} {motion} on {self.background}"


def random_spec(rng: np.random.Generator) -> PromptSpec:
    """Draw a sentence uniformly over the grammar (a third of them static)."""
    static = rng.random() < 1 / 3
    return PromptSpec(
        count=str(rng.choice(COUNTS)),
        size=str(rng.choice(SIZES)),
        colour=str(rng.choice(COLOURS)),
        shape=str(rng.choice(SHAPES)),
        direction=None if static else str(rng.choice(DIRECTIONS)),
        speed=None if static else str(rng.choice(SPEEDS)),
        background=str(rng.choice(BACKGROUNDS)),
    )


def grammar_prompts(count: int, seed: int) -> list[str]:
    """`count` prompts drawn from the grammar with a generator seeded by `seed`."""
    rng = np.random.default_rng(seed)
    return [random_spec(rng).prompt for _ in range(count)]
