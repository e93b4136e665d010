"""Draws from the prompt grammar the tiny models were trained on (`sencache.runtime.tiny_grammar`,
the one definition of its slots and form)::

    <count> <size> <colour> <shape> (static | moving <direction> <speed>) on <background>

for example ``"two small red circles moving left fast on texture"``. Training clips, the
evaluation of the trained models and the default prompts of tiny bundles are drawn here; the
runtime checks every prompt of a tiny bundle against the same definition.
"""

from __future__ import annotations

import numpy as np

from sencache.runtime.tiny_grammar import (
    BACKGROUNDS,
    COLOURS,
    COUNTS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    SPEEDS,
    WORDS,
    PromptSpec,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COUNTS",
    "DIRECTIONS",
    "SHAPES",
    "SIZES",
    "SPEEDS",
    "WORDS",
    "PromptSpec",
    "grammar_prompts",
    "random_spec",
]


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
