"""Sequence parallelism for the PyTorch backend: each rank of a branch holds 1/sp of every row's
video tokens through the blocks, and attention exchanges heads for tokens (Ulysses).

Wan's and LTX's attention processors take diffusers' own context parallelism (its
`ContextParallelConfig` and Ulysses attention over a device mesh, which runs on NCCL and on gloo);
the family adapter turns it on for the self-attention of each block only, since cross-attention
reads the whole text on every rank. diffusers has no context parallelism for CogVideoX's joint
text-video attention, so its adapter installs `JointUlyssesProcessor`: the same exchange written
on torch.distributed's all-to-all, with the text tokens (whole on every rank) sliced by head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn import functional as F

from sencache.runtime.errors import BadInput

if TYPE_CHECKING:
    from sencache.runtime.model import Model
    from sencache.runtime.parallel.group import RankGroup


@dataclass(frozen=True)
class SequenceShard:
    """What a family adapter needs to run its blocks on one rank's tokens."""

    size: int
    """sp: the ranks that share each row's tokens."""
    index: int
    """This rank's place among them."""
    diffusers_config: Any
    """diffusers' ParallelConfig with this group's Ulysses mesh, for processors that take one."""
    group: Any
    """The torch.distributed group of the sp ranks (for attention diffusers does not split)."""

    def tokens(self, count: int) -> slice:
        """This rank's tokens of `count` (equal parts; the adapter checks divisibility)."""
        if count % self.size:
            raise BadInput(
                f"sequence parallelism sp={self.size} needs the {count} video tokens to divide by {self.size}",
                param="parallel",
            )
        part = count // self.size
        return slice(self.index * part, (self.index + 1) * part)

    def check_heads(self, heads: int) -> None:
        if heads % self.size:
            raise BadInput(
                f"sequence parallelism sp={self.size} splits the {heads} attention heads: sp must divide {heads}",
                param="parallel",
            )


def shard_sequence(model: Model, group: RankGroup) -> None:
    """Make `model`'s blocks run on this rank's tokens (nothing when sp is 1). BadInput when the
    backend is not PyTorch or the model's heads or tokens do not divide by sp."""
    if group.config.sp == 1:
        return
    if model.backend.name != "torch":
        raise BadInput(
            f"sequence parallelism (sp={group.config.sp}) runs on the torch backend; this bundle is "
            f"{model.backend.name}, whose graphs are built for whole rows (use cfg parallelism, or a torch bundle)",
            param="parallel",
        )
    from diffusers import ContextParallelConfig, ParallelConfig

    attention: Any = ContextParallelConfig(ulysses_degree=group.config.sp, mesh=group.mesh)
    attention.setup(group.rank, group.world, group.device, group.mesh)
    shard = SequenceShard(
        group.config.sp, group.shard, ParallelConfig(context_parallel_config=attention), group.sp_group
    )
    backend: Any = model.backend
    model.adapter.shard_blocks(backend.modules["blocks"], model.preset, model.bundle.shapes, shard)


def _exchange(x: torch.Tensor, group: Any, size: int, to_heads: bool) -> torch.Tensor:
    """Ulysses' all-to-all: [B, S/n, H, D] -> [B, S, H/n, D] (`to_heads`), or back."""
    b, s, h, d = x.shape
    if to_heads:
        send = x.reshape(b, s, size, h // size, d).permute(2, 0, 1, 3, 4).contiguous()
    else:
        send = x.reshape(b, size, s // size, h, d).permute(1, 0, 2, 3, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    if to_heads:
        return received.permute(1, 0, 2, 3, 4).reshape(b, size * s, h // size, d)
    return received.permute(1, 2, 0, 3, 4).reshape(b, s // size, size * h, d)


class JointUlyssesProcessor:
    """CogVideoX's joint attention over [text, video] tokens when each rank holds 1/n of the video
    tokens and the whole text: the video tokens' queries, keys and values go to the rank of their
    heads (all-to-all), the text's are sliced by head, attention runs over every token once, and
    the outputs come back (all-to-all for video, an all-gather over heads for the text)."""

    def __init__(self, shard: SequenceShard) -> None:
        self.size, self.index, self.group = shard.size, shard.index, shard.group

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("joint sequence-parallel attention takes no attention mask")
        words, batch = encoder_hidden_states.shape[1], hidden_states.shape[0]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        heads = attn.heads
        q, k, v = (proj(tokens).unflatten(2, (heads, -1)).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:  # on the video tokens, as CogVideoX's own processor applies it
            rotated: Any = (apply_rotary_emb(x[:, :, words:], image_rotary_emb) for x in (q, k))
            q, k = (torch.cat([x[:, :, :words], r], dim=2) for x, r in zip((q, k), rotated, strict=True))
        part = heads // self.size
        mine = slice(self.index * part, (self.index + 1) * part)

        def gathered(x: torch.Tensor) -> torch.Tensor:
            """[B, H, T + S/n, D] -> [B, H/n, T + S, D]: my heads of every token."""
            video = _exchange(x[:, :, words:].transpose(1, 2), self.group, self.size, to_heads=True).transpose(1, 2)
            return torch.cat([x[:, mine, :words], video], dim=2)

        out = F.scaled_dot_product_attention(gathered(q), gathered(k), gathered(v), dropout_p=0.0, is_causal=False)
        video = _exchange(out[:, :, words:].transpose(1, 2).contiguous(), self.group, self.size, to_heads=False)
        text_parts = [torch.empty_like(out[:, :, :words].contiguous()) for _ in range(self.size)]
        dist.all_gather(text_parts, out[:, :, :words].contiguous(), group=self.group)
        text = torch.cat(text_parts, dim=1).transpose(1, 2)
        joined = torch.cat([text, video], dim=1).reshape(batch, words + video.shape[1], -1)
        joined = attn.to_out[1](attn.to_out[0](joined))
        return joined[:, words:], joined[:, :words]
