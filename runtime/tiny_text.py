"""The tiny text encoder of the bundled models: a small module over the fixed vocabulary and the
tokenizer of `sencache.runtime.tiny_grammar` (which imports no torch, so a front end refuses a
prompt outside the vocabulary or the grammar before any model code loads)."""

from __future__ import annotations

import torch
from torch import nn

from sencache.runtime.errors import BadInput
from sencache.runtime.tiny_grammar import MAX_TOKENS, VOCABULARY, tokenize


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
