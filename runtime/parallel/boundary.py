"""The step boundary of an engine over several ranks: rank 0 decides admission, cancellation and
the pass's requests in their order, and tells the others in one small host message; every other
rank (a `Follower`) runs the same pass on its rows and tokens.

Rule errors and finished requests need no message: every rank decides on the same numbers and
steps the same latents, so they happen at the same step everywhere. A fault on one rank alone (a
dead process, an out-of-memory) breaks the group: the collectives fail within its timeout on
every rank (RankFailure), the pass's requests fail with that reason, and the group is rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sencache.runtime.denoiser import Denoiser
from sencache.runtime.errors import RankFailure
from sencache.runtime.parallel.group import RankGroup
from sencache.runtime.pass_runner import PassRunner
from sencache.runtime.placement import PassPlan
from sencache.runtime.preparation import prepare
from sencache.runtime.progression import advance
from sencache.runtime.request import GenerationParams, RequestState


@dataclass(frozen=True)
class Boundary:
    """Rank 0's message at one step boundary."""

    admitted: tuple[tuple[int, GenerationParams, bool], ...] = ()
    """(id, request, record) of each request admitted since the last boundary."""
    plan: tuple[int, ...] = ()
    """The ids of the pass's requests in row order (empty: no pass, the group is idle)."""
    stop: bool = False
    """The engine closes: the other ranks leave."""


class Announcer:
    """Rank 0's side: says each boundary's plan, with the requests the others have not seen yet."""

    def __init__(self, ranks: RankGroup) -> None:
        self.ranks = ranks
        self._known: set[int] = set()

    def announce(self, plan: PassPlan) -> None:
        ids = tuple(j.id for j in plan.jobs)
        admitted = tuple((j.id, j.request, j.trajectory is not None) for j in plan.jobs if j.id not in self._known)
        self._known = set(ids)
        self.ranks.agree(Boundary(admitted, ids))

    def idle(self) -> None:
        """A boundary without a pass: keeps the others' wait within the group's timeout."""
        self._known.clear()
        self.ranks.agree(Boundary())

    def stop(self) -> None:
        self.ranks.agree(Boundary(stop=True))


class Follower:
    """A rank other than 0: runs each pass rank 0 plans, on this rank's rows and tokens, until
    rank 0 stops the group; RankFailure when the group breaks."""

    def __init__(
        self, model: Denoiser, ranks: RankGroup, on_done: Callable[[RequestState], None] | None = None
    ) -> None:
        """`on_done` sees each request that took its last step here, before it is released."""
        self.model, self.ranks, self.on_done = model, ranks, on_done
        self.runner = PassRunner(model, ranks)
        self.jobs: dict[int, RequestState] = {}

    def run(self) -> None:
        while True:
            boundary = self.ranks.agree(None)[0]
            if not isinstance(boundary, Boundary):
                raise RankFailure(f"rank {self.ranks.rank}: rank 0 sent {type(boundary).__name__}, not a step boundary")
            if boundary.stop:
                return
            self.follow(boundary)

    def follow(self, boundary: Boundary) -> None:
        """Admit, retire and run one pass as rank 0 planned it."""
        for job_id, request, record in boundary.admitted:
            job = prepare(self.model, request, record=record)
            job.id, job.state = job_id, "running"
            self.jobs[job_id] = job
        for job_id in set(self.jobs) - set(boundary.plan):
            self.jobs.pop(job_id).release()
        if not boundary.plan:
            return
        plan = PassPlan.of([self.jobs[i] for i in boundary.plan])
        result = self.runner.execute(plan)
        for job in plan.jobs:
            outcome = result.outcomes[job.id]
            if isinstance(outcome.failure, RankFailure):
                raise outcome.failure
            if outcome.failure is not None:  # rank 0 fails it at the same step
                self.jobs.pop(job.id).release()
                continue
            assert outcome.noise is not None and outcome.decision is not None, "an outcome without failure ran"
            try:
                advance(job, outcome.noise, outcome.decision)
            except Exception:  # its solver step fails on rank 0 too, which fails the request
                self.jobs.pop(job.id).release()
                continue
            job.step += 1
            if job.finished:
                if self.on_done is not None:
                    self.on_done(job)
                self.jobs.pop(job.id).release()
