"""Where each request's rows sit in a pass: the plan the scheduler makes (every rank's rows in
request order), each request's rows on the ranks of one guidance branch, and, once its rule has
decided, which of them run the blocks. Pure bookkeeping over row indices, shared by the pass
runner and the rules' measurements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sencache.runtime.cache import ReuseObserver, StepDecision
from sencache.runtime.parallel.config import ParallelConfig
from sencache.runtime.parallel.ranks import local_rows
from sencache.runtime.request import RequestState


@dataclass(frozen=True)
class PassPlan:
    """The requests of one pass in row order, and where each one's rows start and end."""

    jobs: tuple[RequestState, ...]
    offsets: np.ndarray
    """[len(jobs) + 1]: request k holds the pass's rows offsets[k]:offsets[k + 1]."""

    @classmethod
    def of(cls, jobs: Sequence[RequestState]) -> PassPlan:
        return cls(tuple(jobs), np.cumsum([0] + [j.rows for j in jobs]))

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])


@dataclass(frozen=True)
class Placed:
    """A planned request's rows on this rank: `rows` among its own, from `begin` in the pass's."""

    job: RequestState
    rows: slice
    begin: int

    @property
    def count(self) -> int:
        return self.rows.stop - self.rows.start

    @property
    def end(self) -> int:
        return self.begin + self.count


@dataclass(frozen=True)
class Decided:
    """A planned request once its rule has decided the step: which of its rows on this rank run
    the blocks, as indices among those rows and among the pass's rows, computed once."""

    placed: Placed
    decision: StepDecision
    local: np.ndarray
    """Its rows on this rank that run, among its rows on this rank."""

    @property
    def job(self) -> RequestState:
        return self.placed.job

    @property
    def rows(self) -> np.ndarray:
        """Its rows that run, among the pass's rows on this rank."""
        return self.placed.begin + self.local

    @property
    def observes(self) -> bool:
        """Whether the pass measures what reusing would have cost its request: the rule observes,
        and samples run after an earlier run of the same expert (step 0 always runs, so a cache
        exists after it; an expert's first step has none)."""
        return (
            isinstance(self.job.policy, ReuseObserver)
            and not self.job.switched
            and self.job.step > 0
            and bool(self.decision.run.any())
        )


def place(plan: PassPlan, config: ParallelConfig, branch: int) -> list[Placed]:
    """Each request's rows on the ranks of guidance branch `branch`, in pass order."""
    placed, begin = [], 0
    for job in plan.jobs:
        rows = local_rows(config, branch, job.rows, job.batch)
        placed.append(Placed(job, rows, begin))
        begin += rows.stop - rows.start
    return placed
