"""The step engine's scheduler: the queue, admission at step boundaries, applying each pass's
outcomes to its requests, and retiring the ones that ended (done, cancelled or failed).

`schedule()` retires cancelled requests, admits queued ones by the admission policy and plans the
next pass; `update_from_output(plan, result)` takes each request's solver step from its outcome,
counts it, and ends the requests that failed or finished. The pass itself is the runner's
(`runtime/pass_runner.py`), which never touches the queue.

State is guarded by one lock, held only at the step boundary and while counting, never while
stages or solver steps run, so `enqueue`, `poll` and `cancel` answer from any thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from sencache.runtime.errors import BadInput, Cancelled, Failed
from sencache.runtime.pass_runner import PassResult
from sencache.runtime.placement import PassPlan
from sencache.runtime.progression import advance, finish
from sencache.runtime.request import ENDED, Progress, RequestState, Result, State


class Admission(Protocol):
    """Which queued requests join the running ones at a step boundary."""

    name: str

    def admit(self, queue: Sequence[RequestState], active: Sequence[RequestState], max_rows: int) -> int:
        """How many requests from the head of `queue` join now (rows of `active` are taken)."""
        ...


class StepLevel:
    """Step-level batching, first come first served: queued requests join at every step boundary
    while their rows fit; one that does not fit holds back the ones behind it, so none starves."""

    name = "step"

    def admit(self, queue: Sequence[RequestState], active: Sequence[RequestState], max_rows: int) -> int:
        used, count = sum(j.rows for j in active), 0
        for job in queue:
            if used + job.rows > max_rows:
                break
            used, count = used + job.rows, count + 1
        return count


class StaticBatching:
    """Static batching: only when nothing runs, the longest first-come run of queued requests whose
    rows fit starts together, and the next group waits until every request of this one ended."""

    name = "static"

    def admit(self, queue: Sequence[RequestState], active: Sequence[RequestState], max_rows: int) -> int:
        return 0 if active else StepLevel().admit(queue, active, max_rows)


ADMISSIONS: dict[str, type[StepLevel] | type[StaticBatching]] = {a.name: a for a in (StepLevel, StaticBatching)}
Batching = Literal["step", "static"]


def admission(name: str) -> Admission:
    """The admission policy called `name` ("step" or "static"); BadInput naming `batching` otherwise."""
    if name not in ADMISSIONS:
        raise BadInput(f"batching must be one of {', '.join(ADMISSIONS)}, got {name!r}", param="batching")
    return ADMISSIONS[name]()


@dataclass
class Counters:
    """Totals since the engine started (monotonic, for Prometheus counters)."""

    steps: int = 0
    step_seconds: float = 0.0
    nfe_run: int = 0
    nfe_saved: int = 0
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0


_ENDED_COUNTER = {"done": "finished", "cancelled": "cancelled", "failed": "failed"}


class Scheduler:
    """The requests of one step engine, from queued to ended."""

    def __init__(self, max_rows: int, admission: Admission) -> None:
        self.max_rows = max_rows
        self.admission = admission
        self._lock = threading.Lock()
        self._jobs: dict[int, RequestState] = {}
        self._queue: deque[RequestState] = deque()
        self._active: list[RequestState] = []
        self._ended: list[int] = []
        self._next_id = 1
        self._counters = Counters()

    def enqueue(self, job: RequestState) -> int:
        """Queue a prepared request (once); returns its id."""
        with self._lock:
            if job.id:
                raise RuntimeError(f"request {job.id} is already queued")
            job.id, job.submitted = self._next_id, time.perf_counter()
            self._next_id += 1
            self._jobs[job.id] = job
            self._queue.append(job)
            self._counters.submitted += 1
        return job.id

    @property
    def busy(self) -> bool:
        """Whether a request is queued or running, or an ended one is still to be reported."""
        with self._lock:
            return bool(self._queue or self._active or self._ended)

    def poll(self, job_id: int) -> Progress:
        """The progress of request `job_id` (KeyError when the engine does not know it)."""
        with self._lock:
            return self._jobs[job_id].progress()

    def cancel(self, job_id: int) -> bool:
        """Cancel request `job_id`: a queued one at once, a running one at the next step boundary.
        False when it has already ended."""
        with self._lock:
            job = self._jobs[job_id]
            if job.state in ENDED:
                return False
            if job.state == "queued":
                self._queue.remove(job)
                self._end(job, "cancelled")
            else:
                job.cancel_requested = True
            return True

    def result(self, job_id: int) -> Result:
        """The result of a finished request; Cancelled or Failed (from the request's error) when it
        ended otherwise, and RuntimeError while it is still queued or running."""
        with self._lock:
            job = self._jobs[job_id]
        if job.state == "done":
            assert job.result is not None, "a request is done once its result is set"
            return job.result
        if job.state == "cancelled":
            raise Cancelled(f"request {job_id} was cancelled")
        if job.state == "failed":
            raise Failed(f"request {job_id} failed: {job.error}") from job.error
        raise RuntimeError(f"request {job_id} is {job.state}")

    def release(self, job_id: int) -> None:
        """Forget an ended request (its result included)."""
        with self._lock:
            if self._jobs[job_id].state not in ENDED:
                raise RuntimeError(f"request {job_id} has not ended")
            del self._jobs[job_id]

    def stats(self) -> dict[str, float]:
        """Counters and gauges for monitoring (Prometheus names without the prefix)."""
        with self._lock:
            c = self._counters
            return {
                "queue_depth": len(self._queue),
                "active_requests": len(self._active),
                "active_rows": sum(j.rows for j in self._active),
                "max_rows": self.max_rows,
                "steps_total": c.steps,
                "step_seconds_total": c.step_seconds,
                "nfe_run_total": c.nfe_run,
                "nfe_saved_total": c.nfe_saved,
                "requests_submitted_total": c.submitted,
                "requests_finished_total": c.finished,
                "requests_cancelled_total": c.cancelled,
                "requests_failed_total": c.failed,
            }

    def end_all(self, state: Literal["cancelled", "failed"], error: BaseException | None = None) -> list[int]:
        """End every queued and running request as `state` (closing, or the driver's last resort
        on a fault outside any one request); returns the ids that ended since the last report."""
        with self._lock:
            for job in [*self._queue, *self._active]:
                self._end(job, state, error)
            self._queue.clear()
            self._active = []
            return self._report()

    def schedule(self) -> PassPlan:
        """The step boundary: retire cancelled requests, admit queued ones, and plan the pass of
        every running request (empty when none runs)."""
        with self._lock:
            for job in self._active:
                if job.cancel_requested:
                    self._end(job, "cancelled")
            self._active = [j for j in self._active if j.state == "running"]
            for _ in range(self.admission.admit(self._queue, self._active, self.max_rows)):
                job = self._queue.popleft()
                job.state, job.admitted = "running", time.perf_counter()
                self._active.append(job)
            return PassPlan.of(self._active)

    def update_from_output(self, plan: PassPlan, result: PassResult, started: float) -> list[int]:
        """Apply a pass begun at perf_counter() `started`: each request's solver step from its
        outcome (a failure, in the pass or in its own step, fails that request alone), then the
        counts, and the requests that took their last step end done. Returns the ids of the
        requests that ended since the last report."""
        runs: dict[int, int] = {}
        for job in plan.jobs:
            outcome = result.outcomes[job.id]
            try:
                if outcome.failure is not None:
                    raise outcome.failure
                assert outcome.noise is not None and outcome.decision is not None, "an outcome without failure ran"
                runs[job.id] = advance(job, outcome.noise, outcome.decision)
            except Exception as e:  # the pass failed for it, or its own solver step did
                with self._lock:
                    if job.state == "running":
                        self._end(job, "failed", e)
        with self._lock:
            c = self._counters
            if plan.jobs:
                c.steps += 1
                c.step_seconds += time.perf_counter() - started
            for job in plan.jobs:
                if job.id in runs:
                    job.step += 1
                    job.nfe += runs[job.id]
                    c.nfe_run += runs[job.id]
                    c.nfe_saved += job.batch - runs[job.id]
                if job.finished:
                    job.result = finish(job)
                    self._end(job, "done")
            self._active = [j for j in self._active if j.state == "running"]
            return self._report()

    def _end(self, job: RequestState, state: State, error: BaseException | None = None) -> None:
        """Move `job` to an ended state, count it and release what it holds (lock held)."""
        job.state, job.error = state, error
        counter = _ENDED_COUNTER[state]
        setattr(self._counters, counter, getattr(self._counters, counter) + 1)
        job.release()
        self._ended.append(job.id)

    def _report(self) -> list[int]:
        """The ids that ended since the last report (lock held)."""
        ended, self._ended = self._ended, []
        return ended
