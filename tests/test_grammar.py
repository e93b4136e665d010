"""The tiny models' prompt grammar: one definition (runtime), its words are the tiny tokenizer's,
its draws are seeded, and the runtime refuses a prompt of the right words in the wrong form."""

import numpy as np
import pytest

from sencache.data.grammar import grammar_prompts, random_spec
from sencache.runtime.errors import BadInput
from sencache.runtime.tiny_grammar import (
    FORM,
    PAD,
    SLOTS,
    VOCABULARY,
    WORDS,
    PromptSpec,
    check_prompt,
    grammar_help,
    grammar_line,
    parse_prompt,
    tokenize,
)


def test_the_grammar_writes_exactly_the_tiny_vocabulary_in_token_order():
    assert (PAD, *WORDS) == VOCABULARY


def test_every_grammar_prompt_tokenizes_and_reads_back_as_its_sentence():
    rng = np.random.default_rng(0)
    for _ in range(200):
        spec = random_spec(rng)
        tokenize(spec.prompt)
        assert parse_prompt(spec.prompt) == spec
        assert parse_prompt(spec.prompt.upper().replace(" ", "  ")) == spec


def test_the_empty_prompt_is_the_unconditional_one():
    assert parse_prompt("") is None and parse_prompt("   ") is None
    assert len(tokenize("")) == len(tokenize("one small red circle static on black"))


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


@pytest.mark.parametrize(
    "prompt,problem",
    [
        ("circle one small red static on black", "word 1 'circle' should be a count (one|two|three)"),
        ("one small red circles static on black", "word 4 'circles' should be a shape (circle|square) after 'one'"),
        ("two small red circle static on black", "word 4 'circle' should be a shape (circles|squares) after 'two'"),
        ("one small red circle moving left on black", "word 7 'on' should be a speed (slow|fast)"),
        ("one small red circle static black", "word 6 'black' should be 'on';"),
        ("one small red circle static on", "it ends where a background (black|gradient|texture) should follow"),
        ("one small red circle", "it ends where 'static' or 'moving' should follow"),
        ("one small red circle static on black texture", "words after the background: texture"),
        ("red", "word 1 'red' should be a count"),
    ],
)
def test_words_of_the_vocabulary_in_another_form_are_refused_with_the_grammar(prompt, problem):
    """Every word is known to the tokenizer, so only the grammar check can refuse these."""
    assert set(prompt.split()) <= set(WORDS)
    for check in (check_prompt, tokenize):
        with pytest.raises(BadInput) as raised:
            check(prompt)
        message = str(raised.value)
        assert problem in message and message.endswith(f"the grammar: {grammar_line()}")
        assert "\n" not in message


def test_the_grammar_text_is_made_from_its_slots():
    """Help and errors show the form and every slot's words from the one definition."""
    for text in (grammar_help(), grammar_line()):
        assert text.startswith(FORM)
        for slot, words in SLOTS.items():
            assert f"{slot}: {'|'.join(words)}" in text
            assert f"<{slot}>" in FORM
    assert "circles|squares after two and three" in grammar_line()
