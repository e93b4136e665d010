"""The step-level denoising loop: every active request advances one step per pass (SPEC 2 and 3).

Requests join at step boundaries while rows are free (first come, first served: a request that
does not fit holds back the ones behind it, so none starves) and leave when done, cancelled or
failed. Each request keeps its own sampler (step count, schedule, solver state, noise
generators), guidance, cache rule and rule state, latents, anchors and cached residuals. A pass:

1. measure the drift from the anchor of every sample whose rule wants it, as ONE reduction;
2. run the head on the rows of every active request (a row is a (sample, CFG branch) pair; each
   row carries its own timestep, so requests at different steps share the call);
3. wait for the drift (the pass's only host wait) and let each request's rule decide;
4. run the blocks on the rows of running samples of all requests, gathered into one sub-batch,
   and add each other row's cached residual;
5. run the tail on every row, combine guidance per request and take each request's solver step.
   For requests whose rule learns from observed reuse errors (`ReuseObserver`), the rows that
   ran after an earlier run also go through the tail with their cached residual, and the rule
   receives the guided output's difference per sample (one more tail call, for them alone).

A request's decisions and latents do not depend on which others share its passes. A row that
runs uses the blocks' output as is, so a request that never reuses is bit-identical to the
uncached run of the same rows. Each request's solver step is its family sampler's: diffusers'
arithmetic with the schedule's scalars computed on the host and solver noise drawn from each
sample's own generator, so it adds no host wait on a GPU.

State is guarded by one lock; `step` holds it only to admit and retire requests at the step
boundary, never while stages run, so `submit`, `poll` and `cancel` answer from any thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from sencache.runtime.cache import CachePolicy, ReuseObserver, StepDecision
from sencache.runtime.chain import block_streams, blocks_feeds, tail_feeds
from sencache.runtime.errors import BadInput, Cancelled, Failed
from sencache.runtime.families.base import NOISE, Sampler
from sencache.runtime.memory import check_memory, request_bytes
from sencache.runtime.request import Request, Result

if TYPE_CHECKING:
    from sencache.runtime.model import Model

State = Literal["queued", "running", "done", "cancelled", "failed"]
ENDED: tuple[State, ...] = ("done", "cancelled", "failed")


@dataclass(frozen=True)
class Progress:
    """Where a request stands: its state, the steps it has taken of its steps, and the sample
    evaluations of the blocks (NFE, summed over its samples) so far."""

    state: State
    step: int
    steps: int
    nfe: int


@dataclass(eq=False)
class RequestState:
    """One request inside the step engine, with everything it carries from step to step."""

    id: int
    request: Request
    policy: CachePolicy
    sampler: Sampler | None
    """None once the request ended; then its generators are [] and its tensors empty (released)."""
    generators: list[torch.Generator]
    timesteps: list[float]
    scales: list[float]
    text: torch.Tensor
    """Text rows [cond x batch (, uncond x batch)] on the backend's device."""
    x: torch.Tensor
    anchor: torch.Tensor
    state: State = "queued"
    step: int = 0
    nfe: int = 0
    cancel_requested: bool = False
    cache: dict[str, torch.Tensor] | None = None
    decisions: list[list[str]] = field(default_factory=list)
    trace: list[list[dict[str, Any]]] = field(default_factory=list)
    trajectory: list[np.ndarray] | None = None
    decision_s: float = 0.0
    submitted: float = 0.0
    admitted: float = 0.0
    result: Result | None = None
    error: BaseException | None = None

    @property
    def batch(self) -> int:
        return len(self.request.prompts)

    @property
    def branches(self) -> int:
        return 2 if self.request.cfg else 1

    @property
    def rows(self) -> int:
        return self.batch * self.branches

    @property
    def row_sample(self) -> np.ndarray:
        """The sample of each of the request's rows."""
        return np.tile(np.arange(self.batch), self.branches)

    def progress(self) -> Progress:
        return Progress(self.state, self.step, self.request.steps, self.nfe)


@dataclass
class _Counters:
    """Totals since the engine started (monotonic, for Prometheus counters)."""

    steps: int = 0
    step_seconds: float = 0.0
    nfe_run: int = 0
    nfe_saved: int = 0
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0


class StepEngine:
    """Runs many requests through one model, each at its own step, in shared stage calls."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.max_rows = model.max_rows
        self._lock = threading.Lock()
        self._jobs: dict[int, RequestState] = {}
        self._queue: deque[RequestState] = deque()
        self._active: list[RequestState] = []
        self._ended: list[int] = []
        self._next_id = 1
        self._counters = _Counters()
        self._text_rows: tuple[tuple[int, ...], torch.Tensor] | None = None

    def submit(self, request: Request, policy: CachePolicy, record: bool = False) -> int:
        """Queue `request` under `policy` (a rule made for its steps and samples); returns its id.
        `record` keeps the denoiser input latent of every step in the result (calibration).
        Raises BadInput, before anything is queued, for what `prepare` refuses."""
        return self.enqueue(self.prepare(request, policy, record))

    def prepare(self, request: Request, policy: CachePolicy, record: bool = False) -> RequestState:
        """Everything a request needs before it can queue, computed on the caller's thread without
        the engine's lock (text encoding can be slow): its rows checked against the bundle, its
        embeddings, sampler and guidance schedule, its starting noise. BadInput when refused."""
        model = self.model
        job_rows = len(request.prompts) * (2 if request.cfg else 1)
        if job_rows > self.max_rows:
            raise BadInput(
                f"{len(request.prompts)} samples need {job_rows} rows; the bundle was built for at most "
                f"{model.bundle.shapes.max_batch} samples (build it with a larger max_batch)"
            )
        check_memory(
            request_bytes(model.bundle.manifest.shapes, len(request.prompts), 2 if request.cfg else 1),
            model.backend.device,
        )
        text = model.embeddings(request.prompt_embeds, request.prompts)
        if request.cfg:
            text = np.concatenate([text, model.embeddings(request.negative_prompt_embeds, [""] * len(request.prompts))])
        sampler = model.sampler(request.steps, request.sampling)
        timesteps = [float(t) for t in sampler.timesteps]
        scales = (
            [model.adapter.dynamic_guidance(request.guidance, t, request.steps) for t in timesteps]
            if request.dynamic_cfg
            else [request.guidance] * len(timesteps)
        )
        generators = model.generators(request.seeds)
        with model.stream():  # the loop's tensors belong to the engine's stream (on a GPU)
            x = model.initial_latents(generators).to(model.backend.device)
            text_rows, anchor = model.to_device(text), torch.zeros_like(x)
        return RequestState(
            id=0,
            request=request,
            policy=policy,
            sampler=sampler,
            generators=generators,
            timesteps=timesteps,
            scales=scales,
            text=text_rows,
            x=x,
            anchor=anchor,
            decisions=[[] for _ in request.prompts],
            trace=[[] for _ in request.prompts],
            trajectory=[] if record else None,
        )

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
        """Whether a request is queued or running, or an ended one is still to be reported by `step`."""
        with self._lock:
            return bool(self._queue or self._active or self._ended)

    def poll(self, job_id: int) -> Progress:
        """The progress of request `job_id` (KeyError when the engine does not know it)."""
        with self._lock:
            return self._jobs[job_id].progress()

    def cancel(self, job_id: int) -> bool:
        """Cancel request `job_id`: a queued one at once, a running one at the next step boundary
        (its rows are free for the next pass). False when it has already ended."""
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
        """The result of a finished request; Cancelled or Failed when it ended otherwise, and
        RuntimeError while it is still queued or running."""
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
        on a fault outside any one request, so none is left pending); returns the ids that ended
        since the last report."""
        with self._lock:
            for job in [*self._queue, *self._active]:
                self._end(job, state, error)
            self._queue.clear()
            self._active = []
            ended, self._ended = self._ended, []
            return ended

    def step(self) -> list[int]:
        """Admit and retire requests at this step boundary, advance every active request by one
        step in one pass through head, blocks and tail, and return the ids of the requests that
        ended (done, cancelled or failed) since the last call."""
        with self._lock:
            self._boundary()
            jobs = list(self._active)
        if jobs:
            started = time.perf_counter()
            with self.model.stream():
                self._pass(jobs)
            elapsed = time.perf_counter() - started
        with self._lock:
            if jobs:
                self._counters.steps += 1
                self._counters.step_seconds += elapsed
            for job in jobs:
                if job.state == "running" and job.step == job.request.steps:
                    job.result = self._finish(job)
                    self._end(job, "done")
            self._active = [j for j in self._active if j.state == "running"]
            ended, self._ended = self._ended, []
        return ended

    def _boundary(self) -> None:
        """Retire cancelled requests and admit queued ones while their rows fit (lock held)."""
        for job in self._active:
            if job.cancel_requested:
                self._end(job, "cancelled")
        self._active = [j for j in self._active if j.state == "running"]
        used = sum(j.rows for j in self._active)
        while self._queue and used + self._queue[0].rows <= self.max_rows:
            job = self._queue.popleft()
            job.state, job.admitted = "running", time.perf_counter()
            self._active.append(job)
            used += job.rows

    def _end(self, job: RequestState, state: State, error: BaseException | None = None) -> None:
        """Move `job` to an ended state and count it (lock held)."""
        job.state, job.error = state, error
        counter = {"done": "finished", "cancelled": "cancelled", "failed": "failed"}[state]
        setattr(self._counters, counter, getattr(self._counters, counter) + 1)
        job.x = job.anchor = job.text = torch.empty(0)
        job.cache, job.sampler, job.generators = None, None, []
        self._ended.append(job.id)

    def _fail(self, job: RequestState, error: BaseException) -> None:
        with self._lock:
            if job.state == "running":
                self._end(job, "failed", error)

    def _pass(self, jobs: list[RequestState]) -> None:
        """One denoising step of every job in `jobs`, sharing each stage call. An error in a
        request's own code (its rule, its solver step) fails that request alone; an error in a
        shared stage call fails every request of the pass."""
        try:
            live = self._decide_and_run(jobs)
        except Exception as e:  # a stage or the drift failed: the rows of every request were in it
            for job in jobs:
                self._fail(job, e)
            return
        for job, noise, decision, error in live:
            try:
                if error is not None:
                    assert isinstance(job.policy, ReuseObserver), "errors are measured for observing rules"
                    job.policy.observe(job.step, error)
                self._advance(job, noise, decision)
            except Exception as e:  # this request's own solver step
                self._fail(job, e)

    def _decide_and_run(
        self, jobs: list[RequestState]
    ) -> list[tuple[RequestState, torch.Tensor, StepDecision, np.ndarray | None]]:
        model, layout = self.model, self.model.layout
        for job in jobs:
            if job.trajectory is not None:
                job.trajectory.append(job.x.to("cpu", copy=True).numpy())
        tick = time.perf_counter()
        measured = [j for j in jobs if j.policy.needs_drift and j.step > 0]
        meter = model.drift_meter() if measured else None
        if meter is not None:
            meter.start(torch.cat([j.x for j in measured]), torch.cat([j.anchor for j in measured]))
        shared_s = time.perf_counter() - tick

        offsets = np.cumsum([0] + [j.rows for j in jobs])
        latent = torch.cat([j.x for j in jobs for _ in range(j.branches)])
        t_rows = np.concatenate([np.full(j.rows, j.timesteps[j.step], np.float32) for j in jobs])
        head = model.head(latent, self._upload(t_rows), self._text(jobs))

        tick = time.perf_counter()
        drift = meter.result() if meter is not None else np.zeros(0)
        modulation = self._modulation(jobs, head, offsets)
        shared_s += time.perf_counter() - tick
        drift_at = dict(zip((j.id for j in measured), np.cumsum([0] + [j.batch for j in measured]), strict=False))
        live: list[tuple[RequestState, int, StepDecision]] = []
        for k, job in enumerate(jobs):
            tick = time.perf_counter()
            try:
                start = drift_at.get(job.id)
                decision = job.policy.decide(
                    job.step,
                    job.timesteps[job.step],
                    None if start is None else drift[start : start + job.batch],
                    None if modulation is None else modulation.get(job.id),
                )
            except Exception as e:  # this request's rule: its rows leave the pass
                self._fail(job, e)
                continue
            job.decision_s += shared_s + time.perf_counter() - tick
            live.append((job, k, decision))

        run_rows = [offsets[k] + np.flatnonzero(d.run[job.row_sample]) for job, k, d in live]
        reused = self._reused_streams(head, live, offsets)
        streams = self._blocks(head, jobs, offsets, live, np.concatenate(run_rows) if run_rows else np.zeros(0, int))
        noise = model.backend.run("tail", tail_feeds(layout, streams, head))[NOISE].float()
        errors = self._reuse_errors(head, noise, offsets, reused)
        return [(job, noise[offsets[k] : offsets[k + 1]], d, errors.get(job.id)) for job, k, d in live]

    def _reused_streams(
        self, head: dict[str, torch.Tensor], live: list[tuple[RequestState, int, StepDecision]], offsets: np.ndarray
    ) -> list[tuple[RequestState, int, StepDecision, dict[str, torch.Tensor]]]:
        """For each request whose rule observes reuse errors and which holds a cached residual:
        the tail's streams of its running rows as reuse would have made them (head + cached
        residual), taken before this step's residuals replace the cache."""
        layout, out = self.model.layout, []
        for job, k, decision in live:
            if not isinstance(job.policy, ReuseObserver) or job.cache is None or not decision.run.any():
                continue
            local = np.flatnonzero(decision.run[job.row_sample])
            index, target = self._index(offsets[k] + local), self._index(local)
            rows = {
                s: head[s].index_select(0, index) + job.cache[s].index_select(0, target)
                for s in layout.tail_stream_names
            }
            out.append((job, k, decision, rows))
        return out

    def _reuse_errors(
        self,
        head: dict[str, torch.Tensor],
        noise: torch.Tensor,
        offsets: np.ndarray,
        reused: list[tuple[RequestState, int, StepDecision, dict[str, torch.Tensor]]],
    ) -> dict[int, np.ndarray]:
        """Per observing request, per sample: the squared L2 norm of the guided output from the
        cached residual minus the fresh guided output (NaN for samples that did not run), from
        one tail call over all their rows and one copy to the host."""
        if not reused:
            return {}
        layout = self.model.layout
        rows = np.concatenate([offsets[k] + np.flatnonzero(d.run[job.row_sample]) for job, k, d, _ in reused])
        index = self._index(rows)
        feeds = {
            **{s: torch.cat([r[s] for *_, r in reused]) for s in layout.tail_stream_names},
            **{c: head[c].index_select(0, index) for c in layout.tail_context},
        }
        from_cache = self.model.backend.run("tail", feeds)[NOISE].float()
        fresh = noise.index_select(0, index)
        sums, position = [], 0
        for job, _, decision, _ in reused:
            samples = int(decision.run.sum())
            count = samples * job.branches
            scale = job.scales[job.step]
            cached = guide(from_cache[position : position + count], samples, job.request.cfg, scale)
            now = guide(fresh[position : position + count], samples, job.request.cfg, scale)
            sums.append((cached.double() - now.double()).pow(2).flatten(1).sum(1))
            position += count
        host = torch.cat(sums).cpu().numpy()
        errors, position = {}, 0
        for job, _, decision, _ in reused:
            ran = np.flatnonzero(decision.run)
            error = np.full(job.batch, np.nan)
            error[ran] = host[position : position + len(ran)]
            errors[job.id] = error
            position += len(ran)
        return errors

    def _text(self, jobs: list[RequestState]) -> torch.Tensor:
        """The text rows of `jobs`, concatenated once per set of active requests."""
        key = tuple(j.id for j in jobs)
        if self._text_rows is None or self._text_rows[0] != key:
            self._text_rows = (key, torch.cat([j.text for j in jobs]))
        return self._text_rows[1]

    def _modulation(
        self, jobs: list[RequestState], head: dict[str, torch.Tensor], offsets: np.ndarray
    ) -> dict[int, np.ndarray] | None:
        """The head's modulated input of the conditional rows of the requests whose rule reads it,
        brought to the host in one copy."""
        wanting = [(k, j) for k, j in enumerate(jobs) if j.policy.needs_modulation]
        if not wanting:
            return None
        rows = np.concatenate([offsets[k] + np.arange(j.batch) for k, j in wanting])
        signal = head[self.model.adapter.modulation]
        values = signal.index_select(0, self._index(rows)).detach().cpu().numpy()
        starts = np.cumsum([0] + [j.batch for _, j in wanting])
        return {j.id: values[starts[i] : starts[i + 1]] for i, (_, j) in enumerate(wanting)}

    def _index(self, rows: np.ndarray) -> torch.Tensor:
        """Row indices on the backend's device."""
        return self._upload(rows.astype(np.int64))

    def _upload(self, values: np.ndarray) -> torch.Tensor:
        """A small host array on the backend's device; on a GPU through pinned memory, so the
        host does not wait for the copy."""
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        if self.model.backend.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.model.backend.device, non_blocking=True)

    def _blocks(
        self,
        head: dict[str, torch.Tensor],
        jobs: list[RequestState],
        offsets: np.ndarray,
        live: list[tuple[RequestState, int, StepDecision]],
        run_rows: np.ndarray,
    ) -> dict[str, torch.Tensor]:
        """Streams after the blocks for every row: computed for `run_rows` in one call, the
        request's cached residual added on the others; the residuals of the rows that ran are
        stored for the requests whose rule may reuse them."""
        layout, backend = self.model.layout, self.model.backend
        total = int(offsets[-1])
        if len(run_rows) == total:
            streams = block_streams(layout, backend.run("blocks", blocks_feeds(layout, head)))
            fresh = streams
        else:
            streams = {}
            for s in layout.streams:
                pieces = [
                    j.cache[s] if j.cache is not None else head[s].new_zeros((j.rows, *head[s].shape[1:])) for j in jobs
                ]
                streams[s] = head[s] + torch.cat(pieces)
            fresh = {}
            if len(run_rows):
                index = self._index(run_rows)
                inputs = {
                    k: v if k in layout.shared else v.index_select(0, index)
                    for k, v in blocks_feeds(layout, head).items()
                }
                fresh = block_streams(layout, backend.run("blocks", inputs))
                for s in layout.streams:
                    streams[s].index_copy_(0, index, fresh[s])
        self._store_residuals(head, fresh, live, offsets, run_rows, gathered=len(run_rows) != total)
        return streams

    def _store_residuals(
        self,
        head: dict[str, torch.Tensor],
        fresh: dict[str, torch.Tensor],
        live: list[tuple[RequestState, int, StepDecision]],
        offsets: np.ndarray,
        run_rows: np.ndarray,
        gathered: bool,
    ) -> None:
        position = 0
        for job, k, decision in live:
            local = np.flatnonzero(decision.run[job.row_sample])
            first, count = position, len(local)
            position += count
            if not job.policy.may_reuse or not count:
                continue
            if not gathered:  # every row ran: the request's rows are one slice
                begin, end = offsets[k], offsets[k + 1]
                job.cache = {s: fresh[s][begin:end] - head[s][begin:end] for s in fresh}
                continue
            index = self._index(offsets[k] + local)
            rows = {s: fresh[s][first : first + count] - head[s].index_select(0, index) for s in fresh}
            if count == job.rows:
                job.cache = rows
                continue
            if job.cache is None:
                job.cache = {s: r.new_zeros((job.rows, *r.shape[1:])) for s, r in rows.items()}
            target = self._index(local)
            for s in rows:
                job.cache[s].index_copy_(0, target, rows[s])

    def _advance(self, job: RequestState, noise: torch.Tensor, decision: StepDecision) -> None:
        """Guidance, anchors, the trace and the solver step of one request after its pass."""
        i = job.step
        guided = guide(noise, job.batch, job.request.cfg, job.scales[i])
        if decision.run.all():
            job.anchor.copy_(job.x)
        elif decision.run.any():
            ran = self._index(np.flatnonzero(decision.run))
            job.anchor.index_copy_(0, ran, job.x.index_select(0, ran))
        t = job.timesteps[i]
        for b in range(job.batch):
            verdict = "run" if decision.run[b] else "reuse"
            job.decisions[b].append(verdict)
            score = decision.score[b]
            job.trace[b].append(
                {
                    "step": i,
                    "t": t,
                    "score": None if math.isnan(score) else float(score),
                    "eps": None if math.isnan(decision.threshold) else decision.threshold,
                    "forced": decision.forced,
                    "decision": verdict,
                }
            )
        assert job.sampler is not None, "a running request holds its sampler"
        job.x = job.sampler.step(i, guided, job.x, job.generators)
        runs = int(decision.run.sum())
        with self._lock:
            job.step += 1
            job.nfe += runs
            self._counters.nfe_run += runs
            self._counters.nfe_saved += job.batch - runs

    def _finish(self, job: RequestState) -> Result:
        """The result of a request that took its last step (lock held)."""
        warnings = []
        outside = getattr(job.policy, "outside_table", [])
        if outside:
            warnings.append(
                f"{len(outside)} sensitivity look-ups fell outside the table's timesteps "
                f"(t={min(outside):.1f}..{max(outside):.1f}) and were clamped to its edge"
            )
        return Result(
            latents=job.x.detach().cpu().numpy(),
            timesteps=job.timesteps,
            decisions=job.decisions,
            trace=job.trace,
            timing={
                "denoise_s": time.perf_counter() - job.admitted,
                "decision_s": job.decision_s,
                "queue_s": job.admitted - job.submitted,
            },
            warnings=warnings,
            trajectory=job.trajectory,
        )


def guide(noise: torch.Tensor, batch: int, cfg: bool, guidance: float) -> torch.Tensor:
    """Classifier-free guidance over rows [cond x batch, uncond x batch] (or the rows as they are)."""
    if not cfg:
        return noise
    cond, uncond = noise[:batch], noise[batch:]
    return uncond + guidance * (cond - uncond)
