"""One engine replica's video jobs: a bounded queue, progress, results as MP4, thumbnail or raw
frames, cancellation, deletion, listing, retention and counters. Admission (step-level or static
batching) is the engine's.

Plain Python (no Ray): the Ray Serve replica wraps it. Each submitted job has one waiter thread
that blocks on its result, so completion times are exact and nothing polls the engine."""

from __future__ import annotations

import base64
import binascii
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

from sencache.runtime.cache.budget import budget_rule
from sencache.runtime.errors import BadInput, Cancelled
from sencache.runtime.images import check_image_fits, read_image
from sencache.runtime.manifest import Defaults
from sencache.runtime.request import GenerationParams, State
from sencache.runtime.scheduler import Batching
from sencache.runtime.video import MP4_FPS, thumbnail_png, write_mp4
from sencache.serving.schema import VideoDeleted, VideoError, VideoJob, VideoRequest

if TYPE_CHECKING:
    from sencache.runtime.api import Engine, Job, Video
    from sencache.runtime.bundle import Bundle

STATUS: dict[State, str] = {
    "queued": "queued",
    "running": "in_progress",
    "done": "completed",
    "cancelled": "failed",
    "failed": "failed",
}
"""The API's status of each request state: OpenAI's four (a cancelled job has failed, with the
error code `cancelled`)."""

Variant = Literal["video", "thumbnail", "frames"]
"""The downloadable content of a completed job: the MP4, its first frame as a PNG, the raw frames as .npy."""

LATENCY_BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
"""Upper bounds (seconds) of the request latency and queue wait histograms."""


class QueueFull(Exception):
    """The replica's queue holds `max_queue` jobs; try again after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({depth} jobs waiting); retry after {retry_after} s")
        self.retry_after = retry_after


class UnknownJob(KeyError):
    """No job of that id on this replica; `gone` says why when it had one: `expired` (it ended
    and its result was released) or `deleted`."""

    def __init__(self, job_id: str, gone: str | None) -> None:
        super().__init__(job_id)
        self.gone = gone

    def __str__(self) -> str:
        kind = {None: "unknown", "expired": "expired (its result was released)"}.get(self.gone, self.gone)
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
    job: Job
    """The engine's job."""
    created: float
    """Wall-clock seconds (Unix) of the submission, for the API."""
    submitted: float
    """perf_counter() of the submission, for latencies."""
    seed: int
    cache: str
    steps: int
    rows: int
    prompt: str | None
    ended: State | None = None
    """How the job ended, once its video is decoded (or it failed or was cancelled); until then
    its state is the engine's."""
    completed_at: float | None = None
    video: Video | None = None
    error: VideoError | None = None
    mp4: bytes | None = None
    latency_s: float | None = None
    queue_wait_s: float | None = None


class VideoService:
    """The jobs of one engine: submit, status, content, cancel, metrics."""

    def __init__(
        self, engine: Engine, *, model: str, defaults: Defaults, slot: int = 0, max_queue: int = 64, retain: int = 64
    ) -> None:
        """`engine` is a started `sencache.Engine` (its batching admits the jobs); `defaults` the
        bundle's (steps, guidance, and the knobs of each cache method); `slot` tags the ids so a
        router can send a job's calls back here; at most `max_queue` jobs wait for rows (more get
        QueueFull); the results of the last `retain` ended jobs are kept."""
        if max_queue < 1 or retain < 1:
            raise BadInput(f"max_queue and retain must be >= 1, got {max_queue} and {retain}")
        self.engine = engine
        self.model = model
        shapes = engine.model.bundle.manifest.shapes
        self.size = f"{shapes.width}x{shapes.height}"
        self.seconds = f"{shapes.frames / MP4_FPS:g}"
        self.defaults = defaults
        self.budget_rule = _budget_rule(engine.model.bundle)
        """The rule the presets' speeds run on this bundle (`budget_rule`)."""
        self.slot = slot
        self.max_queue = max_queue
        self.batching: Batching = engine.batching
        self.retain = retain
        self._lock = threading.Condition()
        self._jobs: OrderedDict[str, _Record] = OrderedDict()
        self._ended: deque[str] = deque()
        self._gone: OrderedDict[str, str] = OrderedDict()
        """Ids no longer held, and why (expired or deleted)."""
        self._latency = Histogram()
        self._queue_wait = Histogram()
        self._rejected = 0
        self._row_steps = 0
        self._closed = False

    # -- the API -------------------------------------------------------------------------------

    def submit(self, video: VideoRequest) -> VideoJob:
        """Check and queue one video job; BadInput (never queued) or QueueFull."""
        self._check_output(video)
        manifest = self.engine.model.bundle.manifest
        image = None if video.image is None else read_image(image_bytes(video.image))
        check_image_fits(manifest.family, manifest.model, image is not None)
        method, knobs = video.cache.resolve(self.budget_rule)
        request = GenerationParams.resolve(
            self.defaults,
            [video.prompt or ""],
            [video.seed],
            steps=video.steps,
            guidance=video.guidance,
            guidance_2=video.guidance_2,
            cache=method,
            knobs=knobs,
            prompt_embeds=_embeds(video.prompt_embeds),
            negative_prompt_embeds=_embeds(video.negative_prompt_embeds),
            dynamic_cfg=video.dynamic_cfg,
            sampling=video.sampling,
            image=image,
        )
        with self._lock:
            if self._closed:
                raise QueueFull(0, 1)
            depth = self._waiting()
            if depth >= self.max_queue:
                self._rejected += 1
                raise QueueFull(depth, self._retry_after())
            record = _Record(
                id=f"video_{self.slot}_{uuid.uuid4().hex}",
                job=self.engine.enqueue(request),
                created=time.time(),
                submitted=time.perf_counter(),
                seed=video.seed,
                cache=method,
                steps=request.steps,
                rows=2 if request.cfg else 1,
                prompt=video.prompt,
            )
            self._jobs[record.id] = record
            threading.Thread(target=self._await, args=(record,), name=f"wait-{record.id}", daemon=True).start()
        return self._describe(record)

    def status(self, job_id: str) -> VideoJob:
        with self._lock:
            return self._describe(self._record(job_id))

    def cancel(self, job_id: str) -> VideoJob:
        """Cancel a queued or running job (its rows are free at the next step); an ended job stays as it is."""
        with self._lock:
            record = self._record(job_id)
            record.job.cancel()
            while record.completed_at is None:  # a running job ends at the next step; its waiter records it
                self._lock.wait()
            return self._describe(record)

    def delete(self, job_id: str) -> VideoDeleted:
        """Cancel a queued or running job (as `cancel`), then forget it and its video."""
        with self._lock:
            self.cancel(job_id)
            del self._jobs[job_id]
            self._ended.remove(job_id)
            self._forget(job_id, "deleted")
        return VideoDeleted(id=job_id)

    def jobs(self) -> list[tuple[float, VideoJob]]:
        """Every job held (running, queued, and the last `retain` ended), each with its submission
        time (Unix seconds, unrounded) to order a listing by."""
        with self._lock:
            return [(r.created, self._describe(r)) for r in self._jobs.values()]

    def content(self, job_id: str, variant: Variant) -> bytes:
        """The MP4 (H.264) of a completed job, its first frame as a PNG, or its frames as a float32
        [T, H, W, 3] .npy."""
        with self._lock:
            record = self._record(job_id)
            if record.ended != "done":
                raise NotReady(f"video {job_id} is {self._describe(record).status}; its content exists once completed")
            video = record.video
        if variant == "frames":
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(video.frames, dtype=np.float32))
            return buffer.getvalue()
        if variant == "thumbnail":
            return thumbnail_png(video.frames)
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

    def reopen(self, engine: Engine) -> None:
        """Serve on `engine` from now on: the same bundle opened again after the rank group of the
        old one failed (its jobs have ended, failed with the reason; the counters start again)."""
        with self._lock:
            self.engine = engine

    def close(self) -> None:
        """Stop admitting and close the engine (what is queued or running ends cancelled)."""
        with self._lock:
            self._closed = True
        self.engine.close()

    # -- internals -----------------------------------------------------------------------------

    def _record(self, job_id: str) -> _Record:
        record = self._jobs.get(job_id)
        if record is None:
            raise UnknownJob(job_id, self._gone.get(job_id))
        return record

    def _check_output(self, video: VideoRequest) -> None:
        """The model, size and seconds asked for, where given, are the bundle's (the only ones it serves)."""
        if video.model is not None and video.model != self.model:
            raise BadInput(f"model {video.model!r} is not served here; this server serves {self.model!r}", "model")
        if video.size is not None and video.size != self.size:
            raise BadInput(f"size {video.size!r} is not served; this model makes {self.size!r}", "size")
        if video.seconds is not None:
            try:
                seconds = float(video.seconds)
            except ValueError:
                seconds = math.nan
            if not math.isclose(seconds, float(self.seconds), abs_tol=1e-3):
                raise BadInput(
                    f"seconds {str(video.seconds)[:20]!r} is not served; this model makes {self.seconds!r} "
                    f"({self.engine.model.bundle.manifest.shapes.frames} frames at {MP4_FPS} per second)",
                    "seconds",
                )

    def _forget(self, job_id: str, why: str) -> None:
        """Remember that `job_id` is gone and why, the newest 100 000 (lock held)."""
        self._gone[job_id] = why
        while len(self._gone) > 100_000:
            self._gone.popitem(last=False)

    def _waiting(self) -> int:
        """Jobs that hold no rows yet: the engine's queue."""
        return int(self.engine.stats()["queue_depth"])

    def _retry_after(self) -> int:
        """Seconds until rows are likely free: the fewest steps left of a running job at the mean step time."""
        stats = self.engine.stats()
        step_s = stats["step_seconds_total"] / stats["steps_total"] if stats["steps_total"] else 1.0
        left = [
            r.steps - r.job.progress.step
            for r in self._jobs.values()
            if r.completed_at is None and r.job.progress.state == "running"
        ]
        return max(1, math.ceil(step_s * (min(left) if left else 1)))

    def _describe(self, record: _Record) -> VideoJob:
        progress = record.job.progress
        step, nfe, state = progress.step, progress.nfe, progress.state
        # a job the engine has ended is in progress here until its waiter has recorded it (and decoded its video)
        status = (
            STATUS[record.ended] if record.ended is not None else STATUS["queued" if state == "queued" else "running"]
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
            prompt=record.prompt,
            size=self.size,
            seconds=self.seconds,
            error=record.error,
            seed=record.seed,
            cache=record.cache,
            latency_s=record.latency_s,
            queue_wait_s=record.queue_wait_s,
        )

    def _await(self, record: _Record) -> None:
        """Block on the job's result and record how it ended."""
        state: State
        error: VideoError | None = None
        try:
            record.video = record.job.result(timeout=None)
            state = "done"
        except Cancelled:
            state, error = "cancelled", VideoError(code="cancelled", message="cancelled before it completed")
        except Exception as e:  # Failed, or the engine closed under it: reported, never left pending
            state, error = "failed", VideoError(code="generation_failed", message=str(e) or type(e).__name__)
        with self._lock:
            self._row_steps += record.rows * record.job.progress.step
            if state == "done":
                record.latency_s = time.perf_counter() - record.submitted
                record.queue_wait_s = max(0.0, record.latency_s - record.video.stats["timing"]["denoise_s"])
                self._latency.observe(record.latency_s)
                self._queue_wait.observe(record.queue_wait_s)
            record.error = error
            self._end(record, state)

    def _end(self, record: _Record, state: State) -> None:
        """Record the end of a job and release the oldest ended results past `retain` (lock held)."""
        record.ended, record.completed_at = state, time.time()
        self._ended.append(record.id)
        while len(self._ended) > self.retain:
            old = self._ended.popleft()
            del self._jobs[old]
            self._forget(old, "expired")
        self._lock.notify_all()


def image_bytes(text: str) -> bytes:
    """The image file a body's `image` field carries: base64, or a data: URL of it; BadInput naming
    `image` when it is neither."""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise BadInput("image: a data: URL must be base64 (data:image/png;base64,...)", param="image")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("image is not base64 (nor a data: URL of it)", param="image") from None


def _embeds(value: list[list[float]] | None) -> np.ndarray | None:
    """One prompt's embeddings from the JSON body as a batch of one."""
    return None if value is None else np.asarray(value, dtype=np.float32)[None]


def _budget_rule(bundle: Bundle) -> str:
    """`budget_rule` of the bundle's tables; SenCache's where it is not calibrated (a preset then
    says to calibrate it, as SenCache's budget does)."""
    try:
        tables = [bundle.sensitivity(e) for e in range(bundle.manifest.experts)]
    except BadInput:
        return "sencache"
    return budget_rule(tables)
