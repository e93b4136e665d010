"""One pass of the step engine: every planned request advances its denoiser by one step in shared
head, blocks and tail calls (SPEC sections 2 and 3). The runner never touches the queue: it takes
a `PassPlan` from the scheduler and gives back a `PassResult`, which the scheduler applies.

A pass, on each rank of the engine (one, or sp x cfg of a group, runtime/parallel/):
1. measure, on this rank's part of the elements, each request's per-sample statistics its rule
   reads (the drift of the latent from its anchor, TeaCache's change of the modulated input, and
   the reuse errors observed in the previous pass), and sum every rank's parts in ONE collective
   (the identity on one rank), so that every rank's rules decide on the same numbers;
2. run the head on this rank's rows of every planned request (a row is a (sample, CFG branch) pair;
   each row carries its own timestep, so requests at different steps share the call);
3. let each request's rule decide (after the measurement, the pass's only host wait);
4. run the blocks on this rank's tokens of the running rows of all requests, gathered into one
   sub-batch, and add each other row's cached residual;
5. gather the rows' tokens from every shard and run the tail on this rank's rows; exchange the
   branches' outputs, so every rank holds each request's whole rows. For requests whose rule
   learns from observed reuse errors (`ReuseObserver`), the rows that ran after an earlier run
   also go through the tail with their cached residual, and the guided outputs' difference is
   measured for the next pass's collective (it only informs the decisions after this one).

A row that runs uses the blocks' output as is, so a request that never reuses is bit-identical to
the uncached run of the same rows, and a request's outputs do not depend on who shares its pass.

With two experts (runtime/experts.py) each stage call runs each expert on its own rows, chosen by
the row's timestep, so requests on either side of the boundary share the pass. A request whose
expert changed since its last step drops its cached residuals first: a residual of one expert is
never added to the other's stream, and a rule that reuses where no residual of the current expert
exists fails its request instead of running on a wrong residual.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from sencache.runtime.cache import StepDecision
from sencache.runtime.chain import block_streams, blocks_feeds
from sencache.runtime.denoiser import Denoiser
from sencache.runtime.experts import run_routed
from sencache.runtime.families.base import NOISE
from sencache.runtime.parallel.ranks import Ranks, SingleRank
from sencache.runtime.placement import Decided, PassPlan, Placed, place
from sencache.runtime.rule_inputs import Measured, RuleInputs

Streams = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Outcome:
    """What a pass gives one request: its whole rows of the tail's output and its decision, or
    the failure that took it out of the pass."""

    noise: torch.Tensor | None = None
    decision: StepDecision | None = None
    failure: BaseException | None = None


@dataclass(frozen=True)
class PassResult:
    """Each planned request's outcome, by request id."""

    outcomes: dict[int, Outcome]


class PassRunner:
    """Runs planned passes on one model and one rank; holds only what is reused across passes."""

    def __init__(self, model: Denoiser, ranks: Ranks | None = None) -> None:
        self.model = model
        self.ranks: Ranks = ranks or SingleRank()
        self.inputs = RuleInputs(model, self.ranks)
        self._text_rows: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._experts = np.zeros(0, int)
        """The expert of each of this rank's rows in the current pass."""

    def execute(self, plan: PassPlan) -> PassResult:
        """One denoising step of every planned request, sharing each stage call. An error in a
        request's own rule fails that request alone (on every rank: they decide on the same
        numbers); an error in a shared stage call or collective fails every request of the pass."""
        outcomes: dict[int, Outcome] = {}
        if not plan.jobs:
            return PassResult(outcomes)
        try:
            with self.model.stream():
                self._execute(plan, outcomes)
        except Exception as e:  # a stage, a measurement or a collective failed: every request was in it
            for job in plan.jobs:
                if job.id not in outcomes or outcomes[job.id].failure is None:
                    outcomes[job.id] = Outcome(failure=e)
        return PassResult(outcomes)

    def _execute(self, plan: PassPlan, outcomes: dict[int, Outcome]) -> None:
        for job in plan.jobs:
            if job.trajectory is not None:
                job.trajectory.append(job.x.to("cpu", copy=True).numpy())
            if job.cache_expert != job.expert:  # the switch: the other expert's residuals go
                job.cache, job.cache_expert = None, job.expert
        branches = [place(plan, self.ranks.config, b) for b in range(self.ranks.config.cfg)]
        placed = branches[self.ranks.branch]
        tick = time.perf_counter()
        self.inputs.start(placed)
        shared_s = time.perf_counter() - tick
        self._experts = np.concatenate([np.full(p.count, p.job.expert) for p in placed]) if placed else np.zeros(0)
        head = self._head(placed)
        tick = time.perf_counter()
        measured = self.inputs.collect(placed, head)
        shared_s += time.perf_counter() - tick
        decided = self._decide(placed, measured, shared_s, outcomes)
        observing = [d for d in decided if d.observes]
        reused = self._reused_streams(head, observing)
        streams = self._blocks(head, placed, decided)
        outputs = self._tail(head, streams, reused)
        noise, from_cache = self._whole_rows(outputs, branches, decided, observing)
        self.inputs.measure_reuse(noise, from_cache, observing)
        for d in decided:
            outcomes[d.job.id] = Outcome(noise[d.job.id], d.decision)

    def _head(self, placed: list[Placed]) -> Streams:
        """The head on this rank's rows of every planned request (nothing when it has none)."""
        if not any(p.count for p in placed):
            return {}
        latent = torch.cat([p.job.x for p in placed for _ in range(p.count // p.job.batch)])
        t_rows = np.concatenate([np.full(p.count, p.job.timesteps[p.job.step], np.float32) for p in placed])
        conditions = {k: torch.cat([p.job.conditions[k][p.rows] for p in placed]) for k in self.model.layout.conditions}
        feeds = {"latent": latent, "timestep": self._upload(t_rows), "text": self._text(placed), **conditions}
        return self._run("head", feeds, self._experts)

    def _run(self, stage: str, feeds: Streams, experts: np.ndarray) -> Streams:
        """`stage` on rows whose experts are `experts`, each expert on its own rows."""
        return run_routed(self.model.backend.run, stage, feeds, experts, self.model.layout.shared)

    def _decide(
        self, placed: list[Placed], measured: Measured, shared_s: float, outcomes: dict[int, Outcome]
    ) -> list[Decided]:
        """Each request's rule decides its step; a rule that raises takes its request out of the
        pass (its outcome is the failure)."""
        decided = []
        for p in placed:
            job, values = p.job, measured[p.job.id]
            tick = time.perf_counter()
            try:
                drift = values.pop(0) if job.policy.needs_drift and job.step > 0 else None
                change = None
                if job.policy.needs_modulation:
                    sums = values.pop(0)
                    change = sums[: job.batch] / sums[job.batch :] if job.step > 0 else None
                decision = job.policy.decide(job.step, job.timesteps[job.step], drift, change)
                if job.switched and not decision.run.all():
                    raise RuntimeError(
                        f"the {job.policy.name} rule reused a residual at step {job.step}, where the request "
                        f"holds none of expert {job.expert + 1} (the first step of an expert always runs)"
                    )
            except Exception as e:  # this request's rule: its rows leave the pass
                outcomes[job.id] = Outcome(failure=e)
                continue
            job.decision_s += shared_s + time.perf_counter() - tick
            decided.append(Decided(p, decision, np.flatnonzero(decision.run[job.row_sample[p.rows]])))
        return decided

    def _blocks(self, head: Streams, placed: list[Placed], decided: list[Decided]) -> Streams:
        """This rank's tokens of the streams after the blocks for every row of this rank: computed
        for the running rows in one call, the request's cached residual added on the others; the
        residuals of the rows that ran are stored for the requests whose rule may reuse them."""
        layout = self.model.layout
        total = placed[-1].end if placed else 0
        if not total:
            return {}
        head = self._shard(head)
        run_rows = np.concatenate([d.rows for d in decided]) if decided else np.zeros(0, int)
        if len(run_rows) == total:
            streams = block_streams(layout, self._run("blocks", blocks_feeds(layout, head), self._experts))
            self._store_all(head, streams, decided)
            return streams
        streams = {}
        for s in layout.streams:
            pieces = [
                p.job.cache[s] if p.job.cache is not None else head[s].new_zeros((p.count, *head[s].shape[1:]))
                for p in placed
            ]
            streams[s] = head[s] + torch.cat(pieces)
        if len(run_rows):
            index = self._index(run_rows)
            inputs = {
                k: v if k in layout.shared else v.index_select(0, index) for k, v in blocks_feeds(layout, head).items()
            }
            fresh = block_streams(layout, self._run("blocks", inputs, self._experts[run_rows]))
            for s in layout.streams:
                streams[s].index_copy_(0, index, fresh[s])
            self._store_gathered(head, fresh, decided)
        return streams

    def _shard(self, head: Streams) -> Streams:
        """The head's outputs with this rank's tokens of the per-token ones (sequence parallelism)."""
        if self.ranks.config.sp == 1:
            return head
        tokens = self.model.layout.tokens
        return {k: v[:, self.ranks.tokens(v.shape[1])].contiguous() if k in tokens else v for k, v in head.items()}

    @staticmethod
    def _store_all(head: Streams, fresh: Streams, decided: list[Decided]) -> None:
        """Every row ran: each reusing request's residuals are one slice of the pass."""
        for d in decided:
            p = d.placed
            if d.job.policy.may_reuse and len(d.local):
                d.job.cache = {s: fresh[s][p.begin : p.end] - head[s][p.begin : p.end] for s in fresh}

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
            if count == d.placed.count:
                job.cache = rows
                continue
            if job.cache is None:
                job.cache = {s: r.new_zeros((d.placed.count, *r.shape[1:])) for s, r in rows.items()}
            target = self._index(d.local)
            for s in rows:
                job.cache[s].index_copy_(0, target, rows[s])

    def _reused_streams(self, head: Streams, observing: list[Decided]) -> list[tuple[torch.Tensor, Streams]]:
        """For each observing request with rows on this rank: the pass's indices of its running
        rows, and this rank's tokens of their tail streams as reuse would have made them (head +
        cached residual), taken before this step's residuals replace the cache."""
        out = []
        head = self._shard(head)
        for d in observing:
            if not len(d.local):
                continue
            assert d.job.cache is not None, "a request that ran an earlier step holds its residuals"
            index, target, cache = self._index(d.rows), self._index(d.local), d.job.cache
            names = self.model.layout.tail_stream_names
            out.append((index, {s: head[s].index_select(0, index) + cache[s].index_select(0, target) for s in names}))
        return out

    def _tail(self, head: Streams, streams: Streams, reused: list[tuple[torch.Tensor, Streams]]) -> torch.Tensor:
        """The tail's output of this rank's rows, then of its observing requests' running rows
        from the cache: whole rows, their tokens gathered from every shard in one collective."""
        layout = self.model.layout
        if not streams:
            return torch.zeros((0, *self.model.latent_shape), device=self.model.backend.device)
        names = layout.tail_stream_names
        fresh = len(streams[names[0]])
        whole = {
            s: self.ranks.gather_tokens(
                torch.cat([streams[s], *(r[s] for _, r in reused)]) if reused else streams[s], 1
            )
            for s in names
        }
        feeds = {**{s: whole[s][:fresh] for s in names}, **{c: head[c] for c in layout.tail_context}}
        outputs = [self._run("tail", feeds, self._experts)]
        if reused:
            index = torch.cat([i for i, _ in reused])
            context = {c: head[c].index_select(0, index) for c in layout.tail_context}
            experts = self._experts[index.cpu().numpy()]
            outputs.append(self._run("tail", {**{s: whole[s][fresh:] for s in names}, **context}, experts))
        return torch.cat([o[NOISE].float() for o in outputs])

    def _whole_rows(
        self, mine: torch.Tensor, branches: list[list[Placed]], decided: list[Decided], observing: list[Decided]
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Each request's whole rows [cond x batch, uncond x batch] of the tail's output, and each
        observing request's rows of its running samples from the cache, from every branch's rows
        (one exchange with CFG parallelism)."""
        ran = {d.job.id: int(d.decision.run.sum()) for d in observing}
        at = [{p.job.id: p for p in branch} for branch in branches]

        def reuse_rows(b: int, d: Decided) -> int:
            return at[b][d.job.id].count // d.job.batch * ran[d.job.id]

        counts = tuple(
            (branch[-1].end if branch else 0) + sum(reuse_rows(b, d) for d in observing)
            for b, branch in enumerate(branches)
        )
        parts = [mine] if len(branches) == 1 else self.ranks.exchange_branches(mine, counts)
        noise = {
            d.job.id: torch.cat([parts[b][at[b][d.job.id].begin : at[b][d.job.id].end] for b in range(len(parts))])
            for d in decided
        }
        from_cache: dict[int, list[torch.Tensor]] = {d.job.id: [] for d in observing}
        for b, branch in enumerate(branches):
            position = branch[-1].end if branch else 0
            for d in observing:
                rows = reuse_rows(b, d)
                from_cache[d.job.id].append(parts[b][position : position + rows])
                position += rows
        return noise, {k: torch.cat(v) for k, v in from_cache.items()}

    def _text(self, placed: list[Placed]) -> torch.Tensor:
        """This rank's text rows of the planned requests, concatenated once per set of requests."""
        key = tuple(p.job.id for p in placed)
        if self._text_rows is None or self._text_rows[0] != key:
            self._text_rows = (key, torch.cat([p.job.text[p.rows] for p in placed]))
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
