"""The tiny models' prompt grammar: its words are the tiny tokenizer's, its draws are seeded."""

import numpy as np

from sencache.engine_builder.tiny.grammar import WORDS, PromptSpec, grammar_prompts, random_spec
from sencache.runtime.tiny_text import PAD, VOCABULARY, tokenize


def test_the_grammar_writes_exactly_the_tiny_vocabulary_in_token_order():
    assert (PAD, *WORDS) == VOCABULARY


def test_every_grammar_prompt_tokenizes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tokenize(random_spec(rng).prompt)


def test_prompt_spells_the_slots():
    assert (
        PromptSpec("one", "small", "red", "circle", None, None, "black").prompt
        == "one small red circle static on black"
    )
    assert (
        PromptSpec("two", "large", "blue", "square", "up", "fast", "texture").prompt
        == "two large blue squares moving up fast on texture"
    )


def test_grammar_prompts_are_the_seeded_draws():
    rng = np.random.default_rng(1000)
    assert grammar_prompts(8, 1000) == [random_spec(rng).prompt for _ in range(8)]
    assert grammar_prompts(8, 1000) == grammar_prompts(8, 1000) != grammar_prompts(8, 7)
