"""One engine replica's video jobs: admission (bounded queue, step-level or static batching),
progress, results as MP4 or raw frames, cancellation, retention and counters.

Plain Python (no Ray): the Ray Serve replica and the Triton model both wrap it. Each submitted
job has one waiter thread that blocks on its result, so completion times are exact and nothing
polls the engine."""

from __future__ import annotations

import io
import math
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sencache.runtime.errors import BadInput, Cancelled
from sencache.runtime.manifest import Defaults
from sencache.runtime.request import Request
from sencache.runtime.video import write_mp4
from sencache.serving.schema import VideoJob, VideoRequest

if TYPE_CHECKING:
    from sencache.runtime.api import Engine, Job, Video

Batching = Literal["step", "static"]

LATENCY_BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
"""Upper bounds (seconds) of the request latency and queue wait histograms."""


class QueueFull(Exception):
    """The replica's queue holds `max_queue` jobs; try again after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({depth} jobs waiting); retry after {retry_after} s")
        self.retry_after = retry_after


class UnknownJob(KeyError):
    """No job of that id on this replica; `expired` when it ended and its result was released."""

    def __init__(self, job_id: str, expired: bool) -> None:
        super().__init__(job_id)
        self.expired = expired

    def __str__(self) -> str:
        kind = "expired (its result was released)" if self.expired else "unknown"
        return f"video {self.args[0]} is {kind}"


class NotReady(Exception):
    """The content of a job that has not completed."""


@dataclass
class Histogram:
    """Cumulative Prometheus histogram counts over fixed buckets."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1
        self.counts[-1] += 1
        self.total += seconds

    def snapshot(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total}


@dataclass(eq=False)
class _Record:
    """One job as the service tracks it."""

    id: str
    kwargs: dict[str, Any]
    """The engine's `submit` arguments."""
    rows: int
    created: float
    """Wall-clock seconds (Unix) of the submission, for the API."""
    submitted: float
    """perf_counter() of the submission, for latencies."""
    seed: int
    cache: str
    steps: int
    job: Job | None = None
    """The engine's Job; None while it waits for a static batch."""
    state: str = "queued"
    """The service's own end state once the job ended; queued/running come from the engine."""
    completed_at: float | None = None
    video: Video | None = None
    error: str | None = None
    mp4: bytes | None = None
    latency_s: float | None = None
    queue_wait_s: float | None = None


class VideoService:
    """The jobs of one engine: submit, status, content, cancel, metrics."""

    def __init__(
        self,
        engine: Engine,
        *,
        model: str,
        defaults: Defaults,
        slot: int = 0,
        max_queue: int = 64,
        batching: Batching = "step",
        retain: int = 64,
    ) -> None:
        """`engine` is a started `sencache.Engine`; `defaults` the bundle's (steps, guidance, and the
        knobs of each cache method); `slot` tags the ids so a router can send a job's calls back
        here; at most `max_queue` jobs wait for rows (more get QueueFull); the results of the last
        `retain` ended jobs are kept."""
        if batching not in ("step", "static"):
            raise BadInput(f"batching must be 'step' or 'static', got {batching!r}")
        if max_queue < 1 or retain < 1:
            raise BadInput(f"max_queue and retain must be >= 1, got {max_queue} and {retain}")
        self.engine = engine
        self.model = model
        self.defaults = defaults
        self.slot = slot
        self.max_queue = max_queue
        self.batching = batching
        self.retain = retain
        self.max_rows = int(engine.stats()["max_rows"])
        self._lock = threading.Condition()
        self._jobs: OrderedDict[str, _Record] = OrderedDict()
        self._pending: deque[_Record] = deque()
        """Static batching: jobs not yet given to the engine."""
        self._in_engine = 0
        self._ended: deque[str] = deque()
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._latency = Histogram()
        self._queue_wait = Histogram()
        self._rejected = 0
        self._row_steps = 0
        self._closed = False
        self._dispatcher: threading.Thread | None = None
        if batching == "static":
            self._dispatcher = threading.Thread(target=self._dispatch, name="static-batcher", daemon=True)
            self._dispatcher.start()

    # -- the API -------------------------------------------------------------------------------

    def submit(self, request: VideoRequest) -> VideoJob:
        """Check and queue one video job; BadInput (never queued) or QueueFull."""
        steps = self.defaults.steps if request.steps is None else request.steps
        guidance = self.defaults.guidance if request.guidance is None else request.guidance
        method, knobs = request.cache.resolve(self.defaults)
        kwargs: dict[str, Any] = {
            "prompt": request.prompt or "",
            "seed": request.seed,
            "steps": steps,
            "guidance": guidance,
            "cache": method,
            "knobs": knobs,
            "dynamic_cfg": request.dynamic_cfg,
            "sampling": request.sampling,
        }
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            value = getattr(request, name)
            if value is not None:
                kwargs[name] = np.asarray(value, dtype=np.float32)
        rows = 2 if guidance > 1.0 else 1
        now = time.perf_counter()
        record = _Record(
            id=f"video_{self.slot}_{uuid.uuid4().hex}",
            kwargs=kwargs,
            rows=rows,
            created=time.time(),
            submitted=now,
            seed=request.seed,
            cache=method,
            steps=steps,
        )
        with self._lock:
            if self._closed:
                raise QueueFull(0, 1)
            depth = self._waiting()
            if depth >= self.max_queue:
                self._rejected += 1
                raise QueueFull(depth, self._retry_after())
            if self.batching == "step":
                record.job = self.engine.submit(**kwargs)
                self._start_waiter(record)
            else:
                self._check(kwargs, rows)
                self._pending.append(record)
                self._lock.notify_all()
            self._jobs[record.id] = record
        return self._describe(record)

    def status(self, job_id: str) -> VideoJob:
        with self._lock:
            return self._describe(self._record(job_id))

    def cancel(self, job_id: str) -> VideoJob:
        """Cancel a queued or running job (its rows are free at the next step); an ended job stays as it is."""
        with self._lock:
            record = self._record(job_id)
            if record.job is None and record.state == "queued":
                self._pending.remove(record)
                self._end(record, "cancelled")
            elif record.job is not None:
                record.job.cancel()
            while record.completed_at is None:  # a running job ends at the next step; its waiter records it
                self._lock.wait()
            return self._describe(record)

    def content(self, job_id: str, variant: Literal["video", "frames"]) -> bytes:
        """The MP4 (H.264) of a completed job, or its frames as a float32 [T, H, W, 3] .npy."""
        with self._lock:
            record = self._record(job_id)
            if record.state != "completed":
                raise NotReady(f"video {job_id} is {self._describe(record).status}; its content exists once completed")
            video = record.video
        if variant == "frames":
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(video.frames, dtype=np.float32))
            return buffer.getvalue()
        if record.mp4 is None:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "video.mp4"
                write_mp4(video.frames, path)
                record.mp4 = path.read_bytes()
        return record.mp4

    def metrics(self) -> dict[str, Any]:
        """The engine's counters and this service's (rejections, row-steps, latency histograms)."""
        stats = dict(self.engine.stats())
        with self._lock:
            stats.update(
                {
                    "queue_depth": self._waiting(),
                    "requests_rejected_total": self._rejected,
                    "row_steps_total": self._row_steps,
                    "latency_seconds": self._latency.snapshot(),
                    "queue_wait_seconds": self._queue_wait.snapshot(),
                }
            )
        return stats

    def close(self) -> None:
        """Stop admitting, cancel what is pending and close the engine."""
        with self._lock:
            self._closed = True
            for record in list(self._pending):
                self._end(record, "cancelled")
            self._pending.clear()
            self._lock.notify_all()
        self.engine.close()

    # -- internals -----------------------------------------------------------------------------

    def _record(self, job_id: str) -> _Record:
        record = self._jobs.get(job_id)
        if record is None:
            raise UnknownJob(job_id, expired=job_id in self._expired)
        return record

    def _waiting(self) -> int:
        """Jobs that hold no rows yet: the static batcher's and the engine's queue."""
        return len(self._pending) + int(self.engine.stats()["queue_depth"])

    def _retry_after(self) -> int:
        """Seconds until rows are likely free: the fewest steps left of a running job at the mean step time."""
        stats = self.engine.stats()
        step_s = stats["step_seconds_total"] / stats["steps_total"] if stats["steps_total"] else 1.0
        left = [
            r.steps - r.job.progress.step
            for r in self._jobs.values()
            if r.job is not None and r.completed_at is None and r.job.progress.state == "running"
        ]
        return max(1, math.ceil(step_s * (min(left) if left else 1)))

    def _describe(self, record: _Record) -> VideoJob:
        if record.job is not None:
            progress = record.job.progress
            step, nfe, state = progress.step, progress.nfe, progress.state
        else:
            step, nfe, state = 0, 0, record.state
        status = (
            record.state
            if record.completed_at is not None
            else {"queued": "queued", "running": "in_progress"}.get(state, "in_progress")
        )
        return VideoJob(
            id=record.id,
            status=status,
            progress=int(100 * step / record.steps),
            step=step,
            steps=record.steps,
            nfe=nfe,
            created_at=int(record.created),
            completed_at=None if record.completed_at is None else int(record.completed_at),
            model=self.model,
            seed=record.seed,
            cache=record.cache,
            latency_s=record.latency_s,
            queue_wait_s=record.queue_wait_s,
            error=None if record.error is None else {"message": record.error},
        )

    def _check(self, kwargs: dict[str, Any], rows: int) -> None:
        """Static batching holds a job before the engine sees it: refuse now what the engine's
        `submit` would refuse (its values, its cache rule, its rows, its text)."""
        model = self.engine.model
        embeds = kwargs.get("prompt_embeds")
        negative = kwargs.get("negative_prompt_embeds")
        request = Request(
            [kwargs["prompt"]],
            [kwargs["seed"]],
            kwargs["steps"],
            kwargs["guidance"],
            None if embeds is None else embeds[None],
            None if negative is None else negative[None],
            dynamic_cfg=kwargs["dynamic_cfg"],
            sampling=kwargs["sampling"],
        )
        model.policy(kwargs["cache"], request.steps, 1, kwargs["knobs"])
        if request.sampling != "engine":
            model.scheduler(request.sampling)
        if rows > self.max_rows:
            raise BadInput(f"one sample needs {rows} rows; the bundle runs at most {self.max_rows}")
        model.embeddings(request.prompt_embeds, request.prompts)
        if request.cfg:
            model.embeddings(request.negative_prompt_embeds, [""])

    def _start_waiter(self, record: _Record) -> None:
        self._in_engine += 1
        threading.Thread(target=self._await, args=(record,), name=f"wait-{record.id}", daemon=True).start()

    def _await(self, record: _Record) -> None:
        """Block on the job's result and record how it ended."""
        try:
            record.video = record.job.result(timeout=None)
            state, error = "completed", None
        except Cancelled:
            state, error = "cancelled", None
        except Exception as e:  # Failed, or the engine closed under it: reported, never left pending
            state, error = "failed", str(e) or type(e).__name__
        with self._lock:
            self._in_engine -= 1
            self._row_steps += record.rows * record.job.progress.step
            if state == "completed":
                record.latency_s = time.perf_counter() - record.submitted
                record.queue_wait_s = max(0.0, record.latency_s - record.video.stats["timing"]["denoise_s"])
                self._latency.observe(record.latency_s)
                self._queue_wait.observe(record.queue_wait_s)
            record.error = error
            self._end(record, state)

    def _end(self, record: _Record, state: str) -> None:
        """Record the end of a job and release the oldest ended results past `retain` (lock held)."""
        record.state, record.completed_at = state, time.time()
        self._ended.append(record.id)
        while len(self._ended) > self.retain:
            old = self._ended.popleft()
            del self._jobs[old]
            self._expired[old] = None
            while len(self._expired) > 100_000:
                self._expired.popitem(last=False)
        self._lock.notify_all()

    def _dispatch(self) -> None:
        """Static batching: when the engine has nothing in flight, give it the longest FIFO run
        of pending jobs whose rows fit, together, and wait for all of them to end."""
        with self._lock:
            while not self._closed:
                if self._in_engine or not self._pending:
                    self._lock.wait()
                    continue
                rows = 0
                group: list[_Record] = []
                while self._pending and rows + self._pending[0].rows <= self.max_rows:
                    record = self._pending.popleft()
                    rows += record.rows
                    group.append(record)
                if not group:  # a job larger than the engine: the engine refuses it with the reason
                    group.append(self._pending.popleft())
                with self.engine.together():  # the whole group joins the same first step
                    for record in group:
                        try:
                            record.job = self.engine.submit(**record.kwargs)
                        except Exception as e:  # checked at submission; reported, never left pending
                            record.error = str(e)
                            self._end(record, "failed")
                            continue
                        self._start_waiter(record)
