"""What a pass asks of the ranks that run it, and the single rank that needs no collective.

The pass runner is written once against `Ranks`: on one process every part is the whole and every
collective the identity (`SingleRank`); in a group (`RankGroup`) each rank runs its branch's rows
and its shard of the tokens, and the collectives make the pieces whole."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from sencache.runtime.parallel.config import ParallelConfig


class Ranks(Protocol):
    """The ranks of one engine, seen from one of them."""

    config: ParallelConfig
    rank: int
    branch: int
    shard: int

    def agree(self, message: Any) -> list[Any]:
        """Every rank's `message`, in rank order (the step boundary)."""
        ...

    def reduce(self, partial: np.ndarray) -> np.ndarray:
        """The sum over ranks of `partial` (the one decision collective of a pass)."""
        ...

    def elements(self, count: int) -> slice:
        """This rank's part of `count` per-sample elements in a reduction over every rank."""
        ...

    def branch_elements(self, count: int) -> slice | None:
        """This rank's part in a reduction over the conditional branch's ranks (None elsewhere)."""
        ...

    def tokens(self, count: int) -> slice:
        """The tokens of a row this rank holds."""
        ...

    def gather_tokens(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Whole rows from every shard's tokens."""
        ...

    def exchange_branches(self, rows: torch.Tensor, counts: tuple[int, ...]) -> list[torch.Tensor]:
        """Every branch's rows (branch b has counts[b])."""
        ...


class SingleRank:
    """One process holds everything: every part is whole, every collective the identity."""

    config = ParallelConfig()
    rank = branch = shard = 0

    def agree(self, message: Any) -> list[Any]:
        return [message]

    def reduce(self, partial: np.ndarray) -> np.ndarray:
        return partial

    def elements(self, count: int) -> slice:
        return slice(0, count)

    def branch_elements(self, count: int) -> slice | None:
        return slice(0, count)

    def tokens(self, count: int) -> slice:
        return slice(0, count)

    def gather_tokens(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor

    def exchange_branches(self, rows: torch.Tensor, counts: tuple[int, ...]) -> list[torch.Tensor]:
        return [rows]


def local_rows(config: ParallelConfig, branch: int, rows: int, batch: int) -> slice:
    """The rows of a request (`rows` = batch x its branches, laid out [cond x batch, uncond x
    batch]) that the ranks of `branch` run: all of them without CFG parallelism; with it, the
    branch's batch, and an unguided request's rows on the conditional branch's ranks."""
    if config.cfg == 1:
        return slice(0, rows)
    if rows == batch:
        return slice(0, rows) if branch == 0 else slice(0, 0)
    return slice(branch * batch, (branch + 1) * batch)
