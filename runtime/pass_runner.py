"""One pass of the step engine: every planned request advances its denoiser by one step in shared
head, blocks and tail calls (SPEC sections 2 and 3). The runner never touches the queue: it takes
a `PassPlan` from the scheduler and gives back a `PassResult`, which the scheduler applies.

A pass:
1. measure the drift from the anchor of every sample whose rule wants it, as ONE reduction;
2. run the head on the rows of every planned request (a row is a (sample, CFG branch) pair; each
   row carries its own timestep, so requests at different steps share the call);
3. wait for the drift (the pass's only host wait) and let each request's rule decide;
4. run the blocks on the rows of running samples of all requests, gathered into one sub-batch,
   and add each other row's cached residual;
5. run the tail on every row. For requests whose rule learns from observed reuse errors
   (`ReuseObserver`), the rows that ran after an earlier run also go through the tail with their
   cached residual, and the rule receives the guided output's difference per sample (one more
   tail call, for them alone).

A row that runs uses the blocks' output as is, so a request that never reuses is bit-identical to
the uncached run of the same rows, and a request's outputs do not depend on who shares its pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sencache.runtime.cache import ReuseObserver, StepDecision
from sencache.runtime.chain import block_streams, blocks_feeds, guide, tail_feeds
from sencache.runtime.denoiser import Denoiser
from sencache.runtime.families.base import NOISE
from sencache.runtime.request import RequestState

Streams = dict[str, torch.Tensor]


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
class Decided:
    """A planned request once its rule has decided the step: which of its rows run the blocks,
    as its own row indices and as the pass's, computed once."""

    job: RequestState
    begin: int
    """Its first row in the pass."""
    decision: StepDecision
    local: np.ndarray
    """Its rows that run, among its own rows."""

    @property
    def rows(self) -> np.ndarray:
        """Its rows that run, among the pass's rows."""
        return self.begin + self.local

    @property
    def end(self) -> int:
        return self.begin + self.job.rows


@dataclass(frozen=True)
class Outcome:
    """What a pass gives one request: its tail output and decision, the reuse errors its rule
    observes (observing rules only), or the failure that took it out of the pass."""

    noise: torch.Tensor | None = None
    decision: StepDecision | None = None
    reuse_error: np.ndarray | None = None
    failure: BaseException | None = None


@dataclass(frozen=True)
class PassResult:
    """Each planned request's outcome, by request id."""

    outcomes: dict[int, Outcome]


class PassRunner:
    """Runs planned passes on one model; holds only what is reused across passes."""

    def __init__(self, model: Denoiser) -> None:
        self.model = model
        self._text_rows: tuple[tuple[int, ...], torch.Tensor] | None = None

    def execute(self, plan: PassPlan) -> PassResult:
        """One denoising step of every planned request, sharing each stage call. An error in a
        request's own rule fails that request alone; an error in a shared stage call fails every
        request of the pass."""
        outcomes: dict[int, Outcome] = {}
        if not plan.jobs:
            return PassResult(outcomes)
        try:
            with self.model.stream():
                self._execute(plan, outcomes)
        except Exception as e:  # a stage or the drift failed: the rows of every request were in it
            for job in plan.jobs:
                if job.id not in outcomes or outcomes[job.id].failure is None:
                    outcomes[job.id] = Outcome(failure=e)
        return PassResult(outcomes)

    def _execute(self, plan: PassPlan, outcomes: dict[int, Outcome]) -> None:
        for job in plan.jobs:
            if job.trajectory is not None:
                job.trajectory.append(job.x.to("cpu", copy=True).numpy())
        head, drift, shared_s = self._head(plan)
        decided = self._decide(plan, head, drift, shared_s, outcomes)
        reused = self._reused_streams(head, decided)
        streams = self._blocks(head, plan, decided)
        noise = self.model.backend.run("tail", tail_feeds(self.model.layout, streams, head))[NOISE].float()
        errors = self._reuse_errors(head, noise, reused)
        for d in decided:
            outcomes[d.job.id] = Outcome(noise[d.begin : d.end], d.decision, errors.get(d.job.id))

    def _head(self, plan: PassPlan) -> tuple[Streams, dict[int, np.ndarray], float]:
        """The head on every row, with the drift of every request whose rule wants it (measured
        in one reduction, started before the head and collected after it) and the host seconds
        spent on both outside the stage."""
        model = self.model
        tick = time.perf_counter()
        measured = [j for j in plan.jobs if j.policy.needs_drift and j.step > 0]
        meter = model.drift_meter() if measured else None
        if meter is not None:
            meter.start(torch.cat([j.x for j in measured]), torch.cat([j.anchor for j in measured]))
        shared_s = time.perf_counter() - tick
        latent = torch.cat([j.x for j in plan.jobs for _ in range(j.branches)])
        t_rows = np.concatenate([np.full(j.rows, j.timesteps[j.step], np.float32) for j in plan.jobs])
        head = model.backend.run(
            "head", {"latent": latent, "timestep": self._upload(t_rows), "text": self._text(plan.jobs)}
        )
        tick = time.perf_counter()
        drift: dict[int, np.ndarray] = {}
        if meter is not None:
            values, starts = meter.result(), np.cumsum([0] + [j.batch for j in measured])
            drift = {j.id: values[starts[i] : starts[i + 1]] for i, j in enumerate(measured)}
        return head, drift, shared_s + time.perf_counter() - tick

    def _decide(
        self,
        plan: PassPlan,
        head: Streams,
        drift: dict[int, np.ndarray],
        shared_s: float,
        outcomes: dict[int, Outcome],
    ) -> list[Decided]:
        """Each request's rule decides its step; a rule that raises takes its request out of the
        pass (its outcome is the failure)."""
        tick = time.perf_counter()
        modulation = self._modulation(plan, head)
        shared_s += time.perf_counter() - tick
        decided = []
        for k, job in enumerate(plan.jobs):
            tick = time.perf_counter()
            try:
                decision = job.policy.decide(
                    job.step, job.timesteps[job.step], drift.get(job.id), modulation.get(job.id)
                )
            except Exception as e:  # this request's rule: its rows leave the pass
                outcomes[job.id] = Outcome(failure=e)
                continue
            job.decision_s += shared_s + time.perf_counter() - tick
            decided.append(Decided(job, int(plan.offsets[k]), decision, np.flatnonzero(decision.run[job.row_sample])))
        return decided

    def _modulation(self, plan: PassPlan, head: Streams) -> dict[int, np.ndarray]:
        """The head's modulated input of the conditional rows of the requests whose rule reads it,
        brought to the host in one copy."""
        wanting = [(k, j) for k, j in enumerate(plan.jobs) if j.policy.needs_modulation]
        if not wanting:
            return {}
        rows = np.concatenate([plan.offsets[k] + np.arange(j.batch) for k, j in wanting])
        signal = head[self.model.adapter.modulation]
        values = signal.index_select(0, self._index(rows)).detach().cpu().numpy()
        starts = np.cumsum([0] + [j.batch for _, j in wanting])
        return {j.id: values[starts[i] : starts[i + 1]] for i, (_, j) in enumerate(wanting)}

    def _blocks(self, head: Streams, plan: PassPlan, decided: list[Decided]) -> Streams:
        """Streams after the blocks for every row: computed for the running rows in one call, the
        request's cached residual added on the others; the residuals of the rows that ran are
        stored for the requests whose rule may reuse them."""
        layout, backend = self.model.layout, self.model.backend
        run_rows = np.concatenate([d.rows for d in decided]) if decided else np.zeros(0, int)
        if len(run_rows) == plan.rows:
            streams = block_streams(layout, backend.run("blocks", blocks_feeds(layout, head)))
            self._store_all(head, streams, decided)
            return streams
        streams = {}
        for s in layout.streams:
            pieces = [
                j.cache[s] if j.cache is not None else head[s].new_zeros((j.rows, *head[s].shape[1:]))
                for j in plan.jobs
            ]
            streams[s] = head[s] + torch.cat(pieces)
        if len(run_rows):
            index = self._index(run_rows)
            inputs = {
                k: v if k in layout.shared else v.index_select(0, index) for k, v in blocks_feeds(layout, head).items()
            }
            fresh = block_streams(layout, backend.run("blocks", inputs))
            for s in layout.streams:
                streams[s].index_copy_(0, index, fresh[s])
            self._store_gathered(head, fresh, decided)
        return streams

    @staticmethod
    def _store_all(head: Streams, fresh: Streams, decided: list[Decided]) -> None:
        """Every row ran: each reusing request's residuals are one slice of the pass."""
        for d in decided:
            if d.job.policy.may_reuse and len(d.local):
                d.job.cache = {s: fresh[s][d.begin : d.end] - head[s][d.begin : d.end] for s in fresh}

    def _store_gathered(self, head: Streams, fresh: Streams, decided: list[Decided]) -> None:
        """Some rows ran, gathered in `fresh` in the order of `decided`: each reusing request's
        residuals of the rows it ran replace those rows of its cache."""
        position = 0
        for d in decided:
            job, first, count = d.job, position, len(d.local)
            position += count
            if not job.policy.may_reuse or not count:
                continue
            index = self._index(d.rows)
            rows = {s: fresh[s][first : first + count] - head[s].index_select(0, index) for s in fresh}
            if count == job.rows:
                job.cache = rows
                continue
            if job.cache is None:
                job.cache = {s: r.new_zeros((job.rows, *r.shape[1:])) for s, r in rows.items()}
            target = self._index(d.local)
            for s in rows:
                job.cache[s].index_copy_(0, target, rows[s])

    def _reused_streams(self, head: Streams, decided: list[Decided]) -> list[tuple[Decided, Streams]]:
        """For each request whose rule observes reuse errors and which holds a cached residual:
        the tail's streams of its running rows as reuse would have made them (head + cached
        residual), taken before this step's residuals replace the cache."""
        out = []
        for d in decided:
            job = d.job
            if not isinstance(job.policy, ReuseObserver) or job.cache is None or not len(d.local):
                continue
            index, target = self._index(d.rows), self._index(d.local)
            cache = job.cache
            rows = {
                s: head[s].index_select(0, index) + cache[s].index_select(0, target)
                for s in self.model.layout.tail_stream_names
            }
            out.append((d, rows))
        return out

    def _reuse_errors(
        self, head: Streams, noise: torch.Tensor, reused: list[tuple[Decided, Streams]]
    ) -> dict[int, np.ndarray]:
        """Per observing request, per sample: the squared L2 norm of the guided output from the
        cached residual minus the fresh guided output (NaN for samples that did not run), from
        one tail call over all their rows and one copy to the host."""
        if not reused:
            return {}
        layout = self.model.layout
        index = self._index(np.concatenate([d.rows for d, _ in reused]))
        feeds = {
            **{s: torch.cat([r[s] for _, r in reused]) for s in layout.tail_stream_names},
            **{c: head[c].index_select(0, index) for c in layout.tail_context},
        }
        from_cache = self.model.backend.run("tail", feeds)[NOISE].float()
        fresh = noise.index_select(0, index)
        sums, position = [], 0
        for d, _ in reused:
            job, samples, count = d.job, int(d.decision.run.sum()), len(d.local)
            scale = job.scales[job.step]
            cached = guide(from_cache[position : position + count], samples, job.request.cfg, scale)
            now = guide(fresh[position : position + count], samples, job.request.cfg, scale)
            sums.append((cached.double() - now.double()).pow(2).flatten(1).sum(1))
            position += count
        host = torch.cat(sums).cpu().numpy()
        errors, position = {}, 0
        for d, _ in reused:
            ran = np.flatnonzero(d.decision.run)
            error = np.full(d.job.batch, np.nan)
            error[ran] = host[position : position + len(ran)]
            errors[d.job.id] = error
            position += len(ran)
        return errors

    def _text(self, jobs: Sequence[RequestState]) -> torch.Tensor:
        """The text rows of `jobs`, concatenated once per set of planned requests."""
        key = tuple(j.id for j in jobs)
        if self._text_rows is None or self._text_rows[0] != key:
            self._text_rows = (key, torch.cat([j.text for j in jobs]))
        return self._text_rows[1]

    def _index(self, rows: np.ndarray) -> torch.Tensor:
        """Row indices on the backend's device."""
        return upload(rows.astype(np.int64), self.model.backend.device)

    def _upload(self, values: np.ndarray) -> torch.Tensor:
        return upload(values, self.model.backend.device)


def upload(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on `device`; on a GPU through pinned memory, so the host does not wait
    for the copy."""
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
