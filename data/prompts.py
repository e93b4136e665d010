"""Calibration prompts: the ones given (a list, or a file with one per line) or the model's default.

Default: a tiny bundle gets prompts drawn from the grammar its model was trained on, seeded by the
calibration seed, so the same seed gives the same tables. A real model gets the ordinary video
prompts of `video_prompts.txt`, taken in turn from position seed mod their number.

A real model calibrated on prompts that are all within the tiny models' vocabulary (the grammar's
words, such as "two small red circles static on black") is refused unless the caller allows it:
its tables would be measured on inputs unlike the ones it serves, and nothing else would say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sencache.data.grammar import grammar_prompts
from sencache.runtime.errors import BadInput
from sencache.runtime.tiny_grammar import PAD, VOCABULARY, tokenize

VIDEO_PROMPTS = Path(__file__).with_name("video_prompts.txt")
"""The default calibration prompts of real models, one per line."""
_TINY_WORDS = frozenset(VOCABULARY) - {PAD}


def read_prompts(path: Path) -> list[str]:
    """The non-blank lines of a text file, stripped; BadInput if it cannot be read or holds none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"prompts file {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise BadInput(f"prompts file {path}: no prompts in the file (one per line)")
    return prompts


def default_prompts(tiny: bool, count: int, seed: int) -> list[str]:
    """`count` prompts for a tiny model (drawn from its grammar) or a real one (the video prompts)."""
    if tiny:
        return grammar_prompts(count, seed)
    video = read_prompts(VIDEO_PROMPTS)
    return [video[(seed + i) % len(video)] for i in range(count)]


def in_tiny_vocabulary(prompt: str) -> bool:
    """Whether every word of a non-empty prompt is one of the tiny models' words."""
    words = prompt.lower().split()
    return bool(words) and _TINY_WORDS.issuperset(words)


def check_prompts(prompts: Sequence[str], tiny: bool, model: str, allow_tiny_vocabulary: bool = False) -> None:
    """Refuse prompts `model` cannot be calibrated on: none, blank ones, words a tiny model has
    never seen, or (for a real model, unless allowed) only the tiny models' vocabulary."""
    if not prompts:
        raise BadInput("calibration needs at least one prompt")
    if any(not p.strip() for p in prompts):
        raise BadInput("a calibration prompt is blank (the empty prompt is the unconditional one)")
    if tiny:
        for prompt in prompts:
            tokenize(prompt)
    elif not allow_tiny_vocabulary and all(in_tiny_vocabulary(p) for p in prompts):
        raise BadInput(
            f"{model} is a real model, but every calibration prompt is in the tiny models' {len(_TINY_WORDS)}-word "
            f"vocabulary (e.g. {prompts[0]!r}): its tables would be measured on prompts unlike the ones it serves. "
            f"Give ordinary video prompts, or none for the built-in ones ({VIDEO_PROMPTS.name}); to calibrate on "
            f"these anyway, allow the tiny vocabulary (allow_tiny_vocabulary, --allow-tiny-vocabulary)"
        )


def calibration_prompts(
    tiny: bool,
    model: str,
    samples: int,
    seed: int,
    prompts: Sequence[str] | None = None,
    allow_tiny_vocabulary: bool = False,
) -> list[str]:
    """One prompt per sample: the given ones in turn (checked for the model), or the model's default."""
    if prompts is None:
        return default_prompts(tiny, samples, seed)
    check_prompts(prompts, tiny, model, allow_tiny_vocabulary)
    return [prompts[i % len(prompts)] for i in range(samples)]
