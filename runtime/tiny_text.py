"""The tiny text encoder of the bundled models: a fixed vocabulary, a tokenizer and a small module.

Prompts follow one grammar (documented in the README)::

    <count> <size> <colour> <shape> (static | moving <direction> <speed>) on <background>

for example ``"two small red circles moving left fast on texture"``. Every word must be in
``VOCABULARY``; anything else is rejected, because the model has never seen it. The empty
prompt (all padding) is the unconditional prompt used for classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sencache.runtime.errors import BadInput

COUNTS = ("one", "two", "three")
SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange")
SHAPES = ("circle", "square")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")
BACKGROUNDS = ("black", "gradient", "texture")

PAD = "<pad>"
VOCABULARY: tuple[str, ...] = (
    PAD,
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
MAX_TOKENS = 12


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
_INDEX = {word: i for i, word in enumerate(VOCABULARY)}


def _quoted(prompt: str) -> str:
    return repr(prompt if len(prompt) <= 60 else prompt[:57] + "...")


def tokenize(prompt: str) -> list[int]:
    """Map a prompt to MAX_TOKENS token ids (padded); raise BadInput for unknown words."""
    words = prompt.lower().split()
    if len(words) > MAX_TOKENS:
        raise BadInput(f"prompt {_quoted(prompt)} has {len(words)} words; the tiny text encoder takes at most "
                       f"{MAX_TOKENS}")
    unknown = list(dict.fromkeys(w for w in words if w not in _INDEX or w == PAD))
    if unknown:
        raise BadInput(
            f"prompt {_quoted(prompt)} has words outside the tiny model's vocabulary: {', '.join(unknown)} "
            f"(known: {' '.join(VOCABULARY[1:])})"
        )
    return [_INDEX[w] for w in words] + [_INDEX[PAD]] * (MAX_TOKENS - len(words))


class TinyTextEncoder(nn.Module):
    """Token and position embeddings followed by one pre-norm self-attention layer."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.token = nn.Embedding(len(VOCABULARY), dim)
        self.position = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out_norm = nn.LayerNorm(dim)

    @property
    def dim(self) -> int:
        return self.token.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token(ids) + self.position
        n = self.norm(x)
        x = x + self.attn(n, n, n, need_weights=False)[0]
        return self.out_norm(x)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Embed prompts as [B, MAX_TOKENS, dim] float32 (the empty string is unconditional)."""
        ids = torch.tensor([tokenize(p) for p in prompts], dtype=torch.long)
        return self(ids).float()


def load_tiny_text_encoder(data: bytes, dim: int, name: str) -> TinyTextEncoder:
    """The tiny text encoder from the bytes of its safetensors file; BadInput if they do not hold it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    encoder = TinyTextEncoder(dim=dim)
    try:
        encoder.load_state_dict(load(data))
    except (SafetensorError, RuntimeError, ValueError) as e:
        raise BadInput(f"{name} is not a tiny text encoder of width {dim}: {str(e).splitlines()[0][:200]}") from None
    return encoder.eval()
