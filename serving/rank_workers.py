"""The ranks of a replica whose engine spans several devices (`sencache serve --gpus-per-replica N
--parallel ...`): the replica itself is rank 0 (the ingress talks to it) and starts N-1 Ray actors
that join its torch.distributed group and follow its passes.

Placement is Ray's: Serve gives each replica a placement group of N bundles (one per rank, packed
onto one node, so the ranks' tensors cross that node's links), the replica takes bundle 0 and
worker r bundle r; each bundle is one GPU, or on the CPU `threads` CPUs. The group meets at
tcp://<the replica's node address>:<a free port> (NCCL on GPUs, gloo on the CPU).

A worker that dies makes the group's next collective fail on rank 0 within the group's timeout:
the requests of that pass (or the next one) fail with the RankFailure's reason and the engine is
broken. `RankWorkers.reopen` then kills the other workers and starts a new group on a new port
with a new engine; the replica stays up throughout.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sencache.runtime.api import Engine
from sencache.runtime.errors import RankFailure
from sencache.runtime.parallel.config import ParallelConfig
from sencache.runtime.parallel.group import TIMEOUT_S, RankGroup
from sencache.runtime.scheduler import Batching
from sencache.serving.options import free_port


@dataclass(frozen=True)
class RankSetup:
    """What every rank of a replica's engine opens: the bundle on its device, split by `parallel`."""

    engine_dir: str
    parallel: str
    backend: str
    device: str
    threads: int
    timeout_s: float = TIMEOUT_S

    @property
    def config(self) -> ParallelConfig:
        return ParallelConfig.parse(self.parallel)

    def resources(self) -> dict[str, float]:
        """One rank's Ray resources: a GPU (and a CPU to drive it), or `threads` CPUs."""
        if self.device.startswith("cuda"):
            return {"num_cpus": 1, "num_gpus": 1}
        return {"num_cpus": max(1, self.threads)}

    def bundles(self) -> list[dict[str, float]]:
        """The placement group's bundles: one per rank, with its resources."""
        names = {"num_cpus": "CPU", "num_gpus": "GPU"}
        return [{names[k]: v for k, v in self.resources().items()}] * self.config.world

    def open(self, rank: int, init_method: str, batching: Batching = "step") -> Engine:
        """Join the group as `rank` and open the engine (rank 0 takes jobs; the others follow)."""
        group = RankGroup.join(self.config, rank, init_method, self.device, self.timeout_s)
        return Engine.from_bundle(self.engine_dir, self.backend, self.device, self.threads, batching, group=group)


@ray.remote
class RankWorker:
    """Rank `rank` (>= 1) of a replica's engine: runs rank 0's passes until rank 0 closes the engine
    or the group breaks (then the replica kills it). Named `sencache-rank<rank>-<group>`."""

    def __init__(self, setup: RankSetup, rank: int, init_method: str) -> None:
        self.engine = setup.open(rank, init_method)

    def ready(self) -> bool:
        """Answers once the engine is open (raises the error that stopped it from opening)."""
        return True


class RankWorkers:
    """Rank 0's side: the other ranks' actors in this replica's placement group, and the group."""

    def __init__(self, setup: RankSetup, batching: Batching) -> None:
        self.setup, self.batching = setup, batching
        self.workers: list[ActorHandle] = []

    def open(self) -> Engine:
        """Start the workers, join their group as rank 0 and open the engine; the workers' own
        error when one of them fails to start."""
        placement = ray.util.get_current_placement_group()
        if placement is None:
            raise RuntimeError("a replica over several ranks runs in its placement group (Serve's bundles)")
        address = ray.util.get_node_ip_address()
        init_method = f"tcp://{address}:{free_port(address)}"
        group = uuid.uuid4().hex[:8]
        self.workers = [
            RankWorker.options(
                name=f"sencache-rank{rank}-{group}",
                **self.setup.resources(),
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=rank),
            ).remote(self.setup, rank, init_method)
            for rank in range(1, self.setup.config.world)
        ]
        try:
            engine = self.setup.open(0, init_method, self.batching)
        except Exception:
            try:
                self._raise_worker_error()
            finally:
                self.kill()
            raise
        try:  # a worker that joined but could not open the engine fails here, not in the first pass
            ray.get([w.ready.remote() for w in self.workers], timeout=self.setup.timeout_s)
        except Exception:
            try:
                with contextlib.suppress(RankFailure):
                    engine.close()
            finally:
                self.kill()
            raise
        return engine

    def reopen(self, broken: Engine) -> Engine:
        """A new group and engine in place of `broken` (its group failed): the old workers killed,
        new ones on a new port."""
        try:
            with contextlib.suppress(RankFailure):  # the group is gone: nothing to tell the workers
                broken.close()
        finally:
            self.kill()
        return self.open()

    def kill(self) -> None:
        """End the workers (after rank 0 closed its engine, or the group broke)."""
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []

    def _raise_worker_error(self) -> None:
        """Raise the error of a worker that failed to start, if one did (theirs explains rank 0's)."""
        done, _ = ray.wait([w.ready.remote() for w in self.workers], num_returns=len(self.workers), timeout=0)
        for ref in done:
            ray.get(ref)
