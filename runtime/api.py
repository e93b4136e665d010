"""The Python API: load a bundle, then generate videos or submit jobs from any number of threads.

One background thread (started with the first job) drives the step engine while jobs are
pending, so jobs submitted at different moments share every engine pass, each with its own
steps, guidance and cache. A bad request raises BadInput from `submit`, before it is queued.

    import sencache
    with sencache.Engine.from_bundle("bundles/tiny-wan") as engine:
        video = engine.generate(prompt="one small red circle static on black", seed=1, steps=30)
        video.frames  # [T, H, W, 3] float32 in [0, 1]

An image-to-video bundle takes its first frame as `image` (a path, bytes, a PIL image or pixels):

    video = engine.generate(prompt="a cat turns its head", image="cat.png", seed=1)

Over several ranks (`parallel="sp=2,cfg=2"`, each rank a process launched by torchrun, or given a
`RankGroup`), every rank opens the engine the same way; rank 0 (`engine.is_driver`) takes the
jobs, and the others run its passes on their rows and tokens until rank 0 closes the engine:

    with sencache.Engine.from_bundle("bundles/tiny-wan-torch", parallel="sp=2") as engine:
        if engine.is_driver:
            video = engine.generate(prompt="one small red circle static on black", seed=1)
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sencache.runtime.backends.registry import BACKENDS
from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import CachePolicy
from sencache.runtime.errors import BadInput, Cancelled, Failed, RankFailure
from sencache.runtime.images import as_image, check_image_fits
from sencache.runtime.model import Model
from sencache.runtime.parallel.boundary import Follower
from sencache.runtime.parallel.config import ParallelConfig
from sencache.runtime.parallel.group import RankGroup
from sencache.runtime.parallel.sequence import shard_sequence
from sencache.runtime.request import GenerationParams, Progress, Result
from sencache.runtime.scheduler import Batching, admission
from sencache.runtime.stepping import StepEngine

__all__ = ["Engine", "Job", "Progress", "Video"]


@dataclass(frozen=True)
class Video:
    """A generated video: frames [T, H, W, 3] float32 in [0, 1], and what it took (model,
    cache settings, NFE, per-step decisions and trace, timing)."""

    frames: np.ndarray
    stats: dict[str, Any]


class Job:
    """A submitted generation: its progress, cancellation and result."""

    def __init__(self, engine: Engine, job_id: int, request: GenerationParams, policy: CachePolicy) -> None:
        self._engine = engine
        self._id = job_id
        self._request = request
        self._policy = policy
        self._ended = threading.Event()
        self._lock = threading.Lock()
        self._final: Progress | None = None
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._video: Video | None = None

    @property
    def id(self) -> int:
        return self._id

    @property
    def progress(self) -> Progress:
        """State ("queued", "running", "done", "cancelled", "failed"), steps taken of its steps, NFE."""
        if self._ended.is_set():
            return self._settled()
        return self._engine._poll(self)

    def done(self) -> bool:
        """Whether the job has ended (done, cancelled or failed)."""
        return self._ended.is_set()

    def cancel(self) -> bool:
        """Cancel the job; its rows are free at the next step. False when it has already ended."""
        return self._engine._cancel(self)

    def result(self, timeout: float | None = None) -> Video:
        """Wait for the video (at most `timeout` seconds). Raises TimeoutError, Cancelled, or
        Failed (with the job's error as its cause)."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"job {self._id} did not finish within {timeout} s")
        state = self._settled().state
        if state == "cancelled":
            raise Cancelled(f"job {self._id} was cancelled")
        if state == "failed":
            raise Failed(f"job {self._id} failed: {self._error}") from self._error
        assert self._result is not None, "a job that ended done has its result"
        with self._lock:
            if self._video is None:
                self._video = self._engine._video(self._request, self._policy, self._result)
            return self._video

    def _settled(self) -> Progress:
        """The progress the job ended with (once `_ended` is set)."""
        assert self._final is not None, "_settle sets the final progress before the job ends"
        return self._final

    def _settle(self, final: Progress, result: Result | None, error: BaseException | None) -> None:
        self._final, self._result, self._error = final, result, error
        self._ended.set()


class Engine:
    """A loaded bundle serving generations: `generate` for one video, `submit` for a Job."""

    def __init__(self, model: Model, batching: Batching = "step", ranks: RankGroup | None = None) -> None:
        """Serve `model`; `batching` is how queued jobs join: "step" (at every step boundary while
        rows are free) or "static" (a group starts only when the previous one has ended). With
        `ranks`, this process is one rank of the engine: rank 0 serves, the others follow it."""
        self.model = model
        self.batching = batching
        self.ranks = ranks
        self._stepper = StepEngine(model, admission(batching), ranks if ranks is None or ranks.is_driver else None)
        self._wake = threading.Condition()
        self._jobs: dict[int, Job] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._follower_error: BaseException | None = None
        if ranks is not None:  # from the start: an idle rank 0 still meets the others within the group's timeout
            target, name = (
                (self._drive, "sencache-step-engine") if ranks.is_driver else (self._follow, "sencache-rank-follower")
            )
            self._thread = threading.Thread(target=target, name=name, daemon=True)
            self._thread.start()

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        backend: str = "auto",
        device: str = "cpu",
        threads: int = 0,
        batching: Batching = "step",
        parallel: str | ParallelConfig | None = None,
        group: RankGroup | None = None,
    ) -> Engine:
        """Load the bundle at `path` and open its backend ("auto": the one it was built for) on
        `device` with `threads` CPU threads (0: all); `batching` as for the constructor.
        `parallel` ("sp=2,cfg=2") splits the engine over sp x cfg ranks: this process joins the
        group `group`, or torchrun's (RANK, WORLD_SIZE, MASTER_ADDR/PORT); on CUDA each rank takes
        its LOCAL_RANK's GPU (`device="cuda"` also puts a TensorRT bundle's group on NCCL; that
        backend picks the rank's GPU itself)."""
        admission(batching)  # refused before the bundle is loaded
        config = ParallelConfig.parse(parallel if group is None else group.config)
        if config.world == 1:
            return cls(Model.open(path, backend, device, threads), batching)
        ranks = group or RankGroup.join(config, device=device)
        bundle = Bundle.load(Path(path))
        chosen = BACKENDS.get(bundle.manifest.backend if backend == "auto" else str(backend))
        takes_device = chosen is not None and chosen.takes_device
        model = Model.open(bundle, backend, str(ranks.device) if takes_device else "cpu", threads)
        shard_sequence(model, ranks)
        return cls(model, batching, ranks)

    @property
    def is_driver(self) -> bool:
        """Whether this process takes jobs: the only rank of a one-process engine, or rank 0."""
        return self.ranks is None or self.ranks.is_driver

    @property
    def broken(self) -> RankFailure | None:
        """Why the engine's rank group failed (a rank died or did not answer), None while it works:
        a broken engine refuses new jobs, and only a new one (on a new group) runs again."""
        return self._stepper.broken

    def generate(
        self,
        prompt: str,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_2: float | None = None,
        cache: str = "sencache",
        knobs: dict[str, float | str] | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        dynamic_cfg: bool = False,
        sampling: str = "engine",
        image: Any = None,
    ) -> Video:
        """Generate one video and wait for it (see `submit` for the parameters)."""
        return self.submit(
            prompt=prompt,
            seed=seed,
            steps=steps,
            guidance=guidance,
            guidance_2=guidance_2,
            cache=cache,
            knobs=knobs,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            dynamic_cfg=dynamic_cfg,
            sampling=sampling,
            image=image,
        ).result()

    def submit(
        self,
        prompt: str,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_2: float | None = None,
        cache: str = "sencache",
        knobs: dict[str, float | str] | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        dynamic_cfg: bool = False,
        sampling: str = "engine",
        image: Any = None,
    ) -> Job:
        """Queue one video. `steps` and `guidance` default to the bundle's (`guidance_2`, a two-expert
        model's second expert's scale: the bundle's, or `guidance` when that is given); `cache` is a method of
        `sencache.runtime.cache.METHODS` with `knobs` from its table (unset ones: the bundle's
        defaults); `prompt_embeds` ([tokens, channels] or [1, tokens, channels]) replace the
        text encoder, `prompt` then only labels the video; `sampling="reference"` runs the authors'
        sampling schedule (Wan: shift 5.0) instead of the bundle's; `image` (image-to-video models,
        which require it: a path, encoded bytes, a PIL image or RGB uint8 [H, W, 3] pixels) is the
        first frame, resized to the video as the model's pipeline does. Raises BadInput, naming the
        parameter, before anything is queued."""
        manifest = self.model.bundle.manifest
        pixels = as_image(image)
        check_image_fits(manifest.family, manifest.model, pixels is not None)
        request = GenerationParams.resolve(
            self.model.bundle.manifest.defaults,
            [prompt],
            [seed],
            steps=steps,
            guidance=guidance,
            guidance_2=guidance_2,
            cache=cache,
            knobs=knobs,
            prompt_embeds=_one(prompt_embeds, "prompt_embeds"),
            negative_prompt_embeds=_one(negative_prompt_embeds, "negative_prompt_embeds"),
            dynamic_cfg=dynamic_cfg,
            sampling=sampling,
            image=pixels,
        )
        return self.enqueue(request)

    def enqueue(self, request: GenerationParams) -> Job:
        """Queue a resolved request of one sample (`GenerationParams.resolve` against this bundle's
        defaults); BadInput, before anything is queued, for what the engine refuses."""
        if len(request.prompts) != 1:
            raise BadInput(f"a job is one video; got {len(request.prompts)} prompts", param="prompt")
        return self._queue(request)

    def denoise(self, request: GenerationParams, policy: CachePolicy | None = None, progress: bool = False) -> Result:
        """Run a resolved request of any number of samples as one batch under `policy` (None: its
        cache method's rule), in this engine's passes, and wait for its undecoded latents, decisions
        and timing (with a progress bar when `progress`): what the command line writes, on one
        process or on rank 0 of several. Raises the error the request met (BadInput before anything
        is queued; RankFailure when the rank group broke under it)."""
        job = self._queue(request, policy)
        label = f"denoise ({job._policy.name})"
        with tqdm(total=request.steps, desc=label, unit="step", disable=not progress, leave=False) as bar:
            while not job._ended.wait(0.1):
                bar.update(job.progress.step - bar.n)
        final = job._settled()
        if final.state == "cancelled":
            raise Cancelled(f"job {job.id} was cancelled")
        if final.state == "failed":
            assert job._error is not None, "a failed job keeps the error it met"
            raise job._error
        assert job._result is not None, "a job that ended done has its result"
        return job._result

    def _queue(self, request: GenerationParams, policy: CachePolicy | None = None) -> Job:
        """Prepare and queue `request` as one job (any number of samples)."""
        if not self.is_driver:
            raise RuntimeError(f"rank {self.ranks.rank if self.ranks else 0} follows rank 0: submit jobs on rank 0")
        if self.broken is not None:
            raise RuntimeError(f"the engine's rank group failed; open the engine again: {self.broken}")
        if self._closed:
            raise RuntimeError("the engine is closed")
        prepared = self._stepper.prepare(request, policy)  # text encoding: outside every lock
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            job_id = self._stepper.enqueue(prepared)
            job = self._jobs[job_id] = Job(self, job_id, request, prepared.policy)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drive, name="sencache-step-engine", daemon=True)
                self._thread.start()
            self._wake.notify()
        return job

    def stats(self) -> dict[str, float]:
        """Counters and gauges for monitoring: queue depth, active requests and rows, steps and
        their seconds, NFE run and saved, requests submitted, finished, cancelled, failed."""
        return self._stepper.stats()

    def close(self) -> None:
        """Stop the background thread; jobs still queued or running end cancelled. Over several
        ranks, rank 0 then lets the others go, and every other rank waits here until it does
        (RankFailure when the group broke before)."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        if self.is_driver:
            self._settle(self._stepper.end_all("cancelled"))
            try:
                self._stepper.stop()
            finally:
                if self.ranks is not None:
                    self.ranks.close()
            return
        assert self.ranks is not None, "only a rank of a group follows"
        self.ranks.close()
        if self._follower_error is not None:
            raise self._follower_error

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drive(self) -> None:
        """The background thread: step while any job is pending, report the jobs that ended.
        Over several ranks, an idle engine still meets the others within the group's timeout."""
        heartbeat = None if self.ranks is None else self.ranks.timeout_s / 4
        while True:
            with self._wake:
                while not self._closed and not self._stepper.busy:
                    if not self._wake.wait(heartbeat) and self._stepper.broken is None:
                        break
                if self._closed:
                    return
            if not self._stepper.busy:
                with contextlib.suppress(RankFailure):  # broken: the next job is refused with the reason
                    self._stepper.idle()
                continue
            try:
                ended = self._stepper.step()
            except Exception as e:  # a fault outside any one request: no job is left pending
                ended = self._stepper.end_all("failed", e)
            self._settle(ended)

    def _follow(self) -> None:
        """A rank other than 0: run rank 0's passes until it closes the engine."""
        try:
            Follower(self.model, self.ranks).run()  # type: ignore[arg-type]
        except BaseException as e:  # reported by close()
            self._follower_error = e

    def _settle(self, ended: list[int]) -> None:
        for job_id in ended:
            with self._wake:
                job = self._jobs.pop(job_id)
            final = self._stepper.poll(job_id)
            result = error = None
            try:
                result = self._stepper.result(job_id)
            except (Cancelled, Failed) as e:
                error = e.__cause__
            self._stepper.release(job_id)
            job._settle(final, result, error)

    def _poll(self, job: Job) -> Progress:
        try:
            return self._stepper.poll(job.id)
        except KeyError:  # released between the check and the poll: it has ended
            job._ended.wait()
            return job._settled()

    def _cancel(self, job: Job) -> bool:
        if job.done():
            return False
        try:
            cancelled = self._stepper.cancel(job.id)
        except KeyError:
            return False
        with self._wake:
            self._wake.notify()
        return cancelled

    def _video(self, request: GenerationParams, policy: CachePolicy, result: Result) -> Video:
        """Decode a finished job (on the caller's thread, not the stepping one) with its stats."""
        model = self.model
        frames = model.decode(result.latents)[0]
        stats = {
            "model": model.preset.name,
            "backend": model.backend.name,
            "precision": model.bundle.manifest.precision,
            "prompt": request.prompts[0],
            "seed": request.seeds[0],
            "steps": request.steps,
            "guidance": request.guidance,
            "dynamic_cfg": request.dynamic_cfg,
            "sampling": request.sampling,
            "cache": policy.settings(),
            "timesteps": result.timesteps,
            "nfe": result.nfe[0],
            "decisions": result.decisions[0],
            "trace": result.trace[0],
            "timing": dict(result.timing),
            "warnings": result.warnings,
        }
        return Video(frames=frames, stats=stats)


def _one(embeds: np.ndarray | None, name: str) -> np.ndarray | None:
    """One prompt's embeddings as a batch of one."""
    if embeds is None:
        return None
    if not isinstance(embeds, np.ndarray):
        raise BadInput(f"{name} must be a NumPy array [tokens, channels], got {type(embeds).__name__}", param=name)
    return embeds[None] if embeds.ndim == 2 else embeds
