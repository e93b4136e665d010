"""This process's place in the torch.distributed group that runs one engine over sp x cfg ranks.

Two kinds of traffic, as vLLM separates them: small host messages (the step boundary, the decision
vector) go over a gloo group on the host, so the decisions never wait on a device stream; tensors
(the attention all-to-all, the token gather, the branch exchange) go over the device's backend
(NCCL on GPUs, gloo on the host). The attention all-to-all is diffusers' own Ulysses attention,
given the "ulysses" dimension of the device mesh made here. Every collective has the group's
timeout: a rank that died or hangs fails the pass on the others within it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from sencache.runtime.errors import BadInput, RankFailure
from sencache.runtime.parallel.config import ParallelConfig, split

TIMEOUT_S = 120.0
"""The default limit on any one collective: longer than any pass, short enough to free a replica."""


class RankGroup:
    """The ranks of one engine and the collectives its passes use, counted by kind."""

    def __init__(self, config: ParallelConfig, rank: int, device: torch.device, timeout_s: float) -> None:
        """Joins the groups of an initialised default process group of `config.world` ranks."""
        self.config, self.rank, self.device, self.timeout_s = config, rank, device, timeout_s
        self.branch, self.shard = config.branch(rank), config.shard(rank)
        timeout = timedelta(seconds=timeout_s)
        self._host = dist.group.WORLD if device.type == "cpu" else dist.new_group(backend="gloo", timeout=timeout)
        self.mesh = init_device_mesh(device.type, (config.cfg, 1, config.sp), mesh_dim_names=("cfg", "ring", "ulysses"))
        self._sp = self.mesh["ulysses"].get_group()
        self._cfg = self.mesh["cfg"].get_group()
        self.calls: Counter[str] = Counter()
        """Collectives issued, by kind ("boundary", "decision", "tokens", "branches")."""
        self.bytes: Counter[str] = Counter()
        """Bytes this rank sent, by kind."""

    @classmethod
    def join(
        cls,
        config: ParallelConfig,
        rank: int | None = None,
        init_method: str | None = None,
        device: str = "cpu",
        timeout_s: float = TIMEOUT_S,
    ) -> RankGroup:
        """Join (creating it on first use) the process group of `config.world` ranks as `rank`,
        rendezvousing at `init_method` ("tcp://host:port"). Without `rank` the group is torchrun's:
        RANK, WORLD_SIZE and MASTER_ADDR/PORT from the environment. On CUDA each rank takes the
        GPU of its LOCAL_RANK (or its rank)."""
        if rank is None:
            if "RANK" not in os.environ:
                raise BadInput(
                    f"parallel {config} needs {config.world} processes: start them with torchrun "
                    "(or give rank and init_method)",
                    param="parallel",
                )
            rank, init_method = int(os.environ["RANK"]), "env://"
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world != config.world:
                raise BadInput(
                    f"parallel {config} needs {config.world} ranks; torchrun started {world}", param="parallel"
                )
        if not 0 <= rank < config.world:
            raise BadInput(f"rank must be in [0, {config.world}), got {rank}", param="rank")
        target = torch.device(device)
        if target.type == "cuda":
            target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(target)
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if target.type == "cuda" else "gloo",
                init_method=init_method,
                rank=rank,
                world_size=config.world,
                timeout=timedelta(seconds=timeout_s),
            )
        return cls(config, rank, target, timeout_s)

    @property
    def sp_group(self) -> Any:
        """The torch.distributed group of this rank's branch (the ranks that share its tokens)."""
        return self._sp

    @property
    def world(self) -> int:
        return self.config.world

    @property
    def is_driver(self) -> bool:
        """Rank 0 decides each step boundary (admission, cancellation) for the others."""
        return self.rank == 0

    def agree(self, message: Any) -> list[Any]:
        """Every rank's `message` (picklable), in rank order: the one host message of a step boundary."""
        out: list[Any] = [None] * self.world
        with self._collective("boundary"):
            dist.all_gather_object(out, message, group=self._host)
        return out

    def reduce(self, partial: np.ndarray) -> np.ndarray:
        """The elementwise sum over ranks of `partial` (float64), the same on every rank: the one
        decision collective of a pass."""
        tensor = torch.from_numpy(np.ascontiguousarray(partial, dtype=np.float64))
        with self._collective("decision"):
            dist.all_reduce(tensor, group=self._host)
        self.bytes["decision"] += tensor.numel() * 8
        return tensor.numpy()

    def elements(self, count: int) -> slice:
        """This rank's part of `count` per-sample elements in a reduction over every rank."""
        return split(count, self.world, self.rank)

    def branch_elements(self, count: int) -> slice | None:
        """This rank's part of `count` per-sample elements in a reduction over the ranks of the
        conditional branch alone (None on the unconditional branch's ranks)."""
        return split(count, self.config.sp, self.shard) if self.branch == 0 else None

    def tokens(self, count: int) -> slice:
        """The tokens this rank holds of a row's `count` (sequence parallelism; all when sp is 1)."""
        return split(count, self.config.sp, self.shard)

    def gather_tokens(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole rows of `tensor` (this rank's tokens along `dim`) from every shard."""
        if self.config.sp == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.config.sp)]
        with self._collective("tokens"):
            dist.all_gather(parts, tensor, group=self._sp)
        self.bytes["tokens"] += tensor.numel() * tensor.element_size()
        return torch.cat(parts, dim=dim)

    def exchange_branches(self, rows: torch.Tensor, counts: tuple[int, ...]) -> list[torch.Tensor]:
        """Every branch's rows, where branch b holds counts[b] of them (this rank's are `rows`):
        one all-gather over the branches, padded to the largest count."""
        width = max(counts)
        padded = rows.new_zeros((width, *rows.shape[1:]))
        padded[: len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in counts]
        with self._collective("branches"):
            dist.all_gather(parts, padded, group=self._cfg)
        self.bytes["branches"] += padded.numel() * padded.element_size()
        return [p[:n] for p, n in zip(parts, counts, strict=True)]

    @contextmanager
    def _collective(self, kind: str) -> Iterator[None]:
        """Count one collective of `kind`; its failure (a dead rank, the timeout) is a RankFailure."""
        self.calls[kind] += 1
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            raise RankFailure(
                f"rank {self.rank} of {self.config}: the {kind} collective failed (a rank died or did not answer "
                f"within {self.timeout_s:g} s): {e}"
            ) from e

    def close(self) -> None:
        """Leave the group (the default process group with it)."""
        if dist.is_initialized():
            dist.destroy_process_group()
