"""The step-level denoising loop: every running request advances one step per pass (SPEC 2 and 3).

`StepEngine` puts the pieces together: `prepare` (runtime/preparation.py) readies a request on
the caller's thread, the `Scheduler` (runtime/scheduler.py) queues, admits by its admission policy
(step-level first come first served, or static batches) and retires, and the `PassRunner`
(runtime/pass_runner.py) runs each planned pass through head, blocks and tail. Each request keeps
its own sampler (step count, schedule, solver state, noise generators), guidance, cache rule and
rule state, latents, anchors and cached residuals, so its decisions and latents do not depend on
which others share its passes.
"""

from __future__ import annotations

import time
from typing import Literal

from sencache.runtime.cache import CachePolicy
from sencache.runtime.denoiser import Denoiser
from sencache.runtime.errors import RankFailure
from sencache.runtime.parallel.boundary import Announcer
from sencache.runtime.parallel.group import RankGroup
from sencache.runtime.pass_runner import Outcome, PassResult, PassRunner
from sencache.runtime.preparation import prepare
from sencache.runtime.request import GenerationParams, Progress, RequestState, Result
from sencache.runtime.scheduler import Admission, Scheduler, StepLevel


class StepEngine:
    """Runs many requests through one model, each at its own step, in shared stage calls.

    With a rank group this is rank 0's engine: each step boundary is announced to the other
    ranks (runtime/parallel/boundary.py), which run the same pass on their rows and tokens."""

    def __init__(self, model: Denoiser, admission: Admission | None = None, ranks: RankGroup | None = None) -> None:
        self.model = model
        self.max_rows = model.max_rows
        self.scheduler = Scheduler(model.max_rows, admission or StepLevel())
        self.runner = PassRunner(model, ranks)
        self.announcer = Announcer(ranks) if ranks is not None else None
        self.broken: RankFailure | None = None
        """Set when the rank group failed: no pass can run again on it."""

    def submit(self, request: GenerationParams, policy: CachePolicy | None = None, record: bool = False) -> int:
        """Queue `request` under `policy` (a rule made for its steps and samples; None: the rule of
        the request's cache method and knobs); returns its id.
        `record` keeps the denoiser input latent of every step in the result (calibration).
        Raises BadInput, before anything is queued, for what `prepare` refuses."""
        return self.enqueue(self.prepare(request, policy, record))

    def prepare(
        self, request: GenerationParams, policy: CachePolicy | None = None, record: bool = False
    ) -> RequestState:
        """Everything a request needs before it can queue, computed on the caller's thread without
        the engine's lock (text encoding can be slow). BadInput when refused."""
        return prepare(self.model, request, policy, record)

    def enqueue(self, job: RequestState) -> int:
        """Queue a prepared request (once); returns its id."""
        return self.scheduler.enqueue(job)

    @property
    def busy(self) -> bool:
        """Whether a request is queued or running, or an ended one is still to be reported by `step`."""
        return self.scheduler.busy

    def poll(self, job_id: int) -> Progress:
        """The progress of request `job_id` (KeyError when the engine does not know it)."""
        return self.scheduler.poll(job_id)

    def cancel(self, job_id: int) -> bool:
        """Cancel request `job_id`: a queued one at once, a running one at the next step boundary
        (its rows are free for the next pass). False when it has already ended."""
        return self.scheduler.cancel(job_id)

    def result(self, job_id: int) -> Result:
        """The result of a finished request; Cancelled or Failed when it ended otherwise, and
        RuntimeError while it is still queued or running."""
        return self.scheduler.result(job_id)

    def release(self, job_id: int) -> None:
        """Forget an ended request (its result included)."""
        self.scheduler.release(job_id)

    def stats(self) -> dict[str, float]:
        """Counters and gauges for monitoring (Prometheus names without the prefix)."""
        return self.scheduler.stats()

    def end_all(self, state: Literal["cancelled", "failed"], error: BaseException | None = None) -> list[int]:
        """End every queued and running request as `state`; returns the ids that ended since the last report."""
        return self.scheduler.end_all(state, error)

    def step(self) -> list[int]:
        """Admit and retire requests at this step boundary, advance every running request by one
        step in one pass through head, blocks and tail, and return the ids of the requests that
        ended (done, cancelled or failed) since the last call."""
        if self.broken is not None:
            return self.scheduler.end_all("failed", self.broken)
        plan = self.scheduler.schedule()
        started = time.perf_counter()
        try:
            if self.announcer is not None:
                self.announcer.announce(plan)
            result = self.runner.execute(plan)
        except RankFailure as e:
            result = PassResult({j.id: Outcome(failure=e) for j in plan.jobs})
        self.broken = next((o.failure for o in result.outcomes.values() if isinstance(o.failure, RankFailure)), None)
        with self.model.stream():
            ended = self.scheduler.update_from_output(plan, result, started)
        return ended + (self.scheduler.end_all("failed", self.broken) if self.broken is not None else [])

    def idle(self) -> None:
        """With a rank group and nothing to run: a boundary without a pass, so the other ranks'
        wait stays within the group's timeout. RankFailure when the group broke."""
        if self.announcer is not None and self.broken is None:
            try:
                self.announcer.idle()
            except RankFailure as e:
                self.broken = e
                raise

    def stop(self) -> None:
        """With a rank group: tell the other ranks to leave (the engine closes)."""
        if self.announcer is not None and self.broken is None:
            self.announcer.stop()
