"""The tiny text encoder of the bundled models: a fixed vocabulary, a tokenizer and a small module.

The tiny models were trained on prompts of one small grammar (`sencache.runtime.tiny_grammar`).
Every word of a prompt must be in ``VOCABULARY`` and the prompt must be a sentence of that grammar;
anything else is rejected, because the model has never seen it. The empty prompt (all padding) is
the unconditional prompt used for classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import nn

from sencache.runtime.errors import BadInput
from sencache.runtime.tiny_grammar import check_prompt

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


def _quoted(prompt: str) -> str:
    return repr(prompt if len(prompt) <= 60 else prompt[:57] + "...")


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
