"""What the cache rules of a pass read, measured on this rank's part of the elements of each
request and summed over the ranks in ONE collective (the identity on one rank), so every rank's
rules decide on the same numbers:
- the squared drift of each sample's latent from its anchor (SenCache), by the fused reduction,
  started before the head and collected after it;
- the sums of |m - m_prev| and |m_prev| of the head's modulated input m of the conditional rows,
  whose ratio is TeaCache's relative L1 change;
- the reuse errors observing rules (`ReuseObserver`) saw in the previous pass, measured after its
  tail and given to the rule before its next decision, when it next uses them.
"""

from __future__ import annotations

import numpy as np
import torch

from sencache.runtime.cache import ReuseObserver
from sencache.runtime.chain import guide
from sencache.runtime.denoiser import Denoiser, DriftMeter
from sencache.runtime.parallel.ranks import Ranks
from sencache.runtime.placement import Decided, Placed
from sencache.runtime.request import RequestState

Measured = dict[int, list[np.ndarray]]
"""Per request id, the summed values its rule reads, in the order it reads them."""


class RuleInputs:
    """The measurements of one pass on one rank, and their one collective."""

    def __init__(self, model: Denoiser, ranks: Ranks) -> None:
        self.model, self.ranks = model, ranks
        self._drifting: list[RequestState] = []
        self._meter: DriftMeter | None = None

    def start(self, placed: list[Placed]) -> None:
        """Start measuring the drift of the requests whose rule reads it (all but a first step)."""
        self._drifting = [p.job for p in placed if p.job.policy.needs_drift and p.job.step > 0]
        self._meter = None
        if not self._drifting:
            return
        part = self.ranks.elements(self.model.numel)
        self._meter = self.model.drift_meter(part.stop - part.start)
        self._meter.start(
            part_of(torch.cat([scored_latent(j) for j in self._drifting]), part),
            part_of(torch.cat([j.anchor for j in self._drifting]), part),
        )

    def collect(self, placed: list[Placed], head: dict[str, torch.Tensor]) -> Measured:
        """Every request's measurements summed over the ranks in one collective; the reuse errors
        observed in the last pass go to their rules."""
        parts = self._parts(placed, head)
        flat = [v for p in placed for v in parts[p.job.id]]
        total = self.ranks.reduce(np.concatenate(flat)) if flat else np.zeros(0)
        out: Measured = {}
        position = 0
        for p in placed:
            out[p.job.id] = []
            for v in parts[p.job.id]:
                out[p.job.id].append(total[position : position + len(v)])
                position += len(v)
            if p.job.observed is not None:
                assert isinstance(p.job.policy, ReuseObserver), "errors are measured for observing rules"
                p.job.policy.observe(p.job.observed[0], out[p.job.id].pop(0))
                p.job.observed = None
        return out

    def _parts(self, placed: list[Placed], head: dict[str, torch.Tensor]) -> Measured:
        """This rank's parts, per request in the order its rule takes them: the last pass's reuse
        errors, the drift, TeaCache's signal sums."""
        parts: Measured = {p.job.id: [] for p in placed}
        for p in placed:
            if p.job.observed is not None:
                parts[p.job.id].append(p.job.observed[1])
        if self._meter is not None:
            values, starts = self._meter.result(), np.cumsum([0] + [j.batch for j in self._drifting])
            for i, job in enumerate(self._drifting):
                parts[job.id].append(values[starts[i] : starts[i + 1]])
        for p in placed:
            if p.job.policy.needs_modulation:
                parts[p.job.id].append(self._signal_sums(p, head))
        return parts

    def _signal_sums(self, p: Placed, head: dict[str, torch.Tensor]) -> np.ndarray:
        """This rank's part of the per-sample sums of |m - m_prev| and |m_prev| of the request's
        conditional rows: zero on ranks without them, and at the request's first step."""
        job, sums = p.job, np.zeros(2 * p.job.batch)
        if not p.count or self.ranks.branch != 0:
            return sums
        signal = head[self.model.adapter.modulation]
        part = self.ranks.branch_elements(int(np.prod(signal.shape[1:])))
        assert part is not None, "the conditional branch's ranks hold its elements"
        current = part_of(signal[p.begin : p.begin + job.batch], part).double()
        if job.signal is not None:
            sums = torch.cat([(current - job.signal).abs().sum(1), job.signal.abs().sum(1)]).cpu().numpy()
        job.signal = current
        return sums

    def measure_reuse(
        self, noise: dict[int, torch.Tensor], from_cache: dict[int, torch.Tensor], observing: list[Decided]
    ) -> None:
        """Per observing request, per sample: this rank's part of the squared L2 norm of the guided
        output from the cached residual minus the fresh guided output (NaN for samples that did
        not run), kept for the next pass's collective."""
        part = self.ranks.elements(self.model.numel)
        for d in observing:
            job = d.job
            ran = np.flatnonzero(d.decision.run)
            rows = torch.from_numpy(np.concatenate([ran + b * job.batch for b in range(job.branches)]))
            scale = job.scales[job.step]
            cached = guide(from_cache[job.id], len(ran), job.request.cfg, scale)
            now = guide(noise[job.id].index_select(0, rows.to(noise[job.id].device)), len(ran), job.request.cfg, scale)
            sums = part_of(cached.double() - now.double(), part).pow(2).sum(1).cpu().numpy()
            error = np.full(job.batch, np.nan)
            error[ran] = sums
            job.observed = (job.step, error)


def scored_latent(job: RequestState) -> torch.Tensor:
    """The latent whose drift from the anchor the request's rule reads: the latent less the noise
    injected since the anchor where the rule scores the deterministic drift, else the latent."""
    return job.x if job.injected is None else job.x - job.injected


def part_of(tensor: torch.Tensor, part: slice) -> torch.Tensor:
    """Elements `part` of each row of `tensor`, flattened per row (contiguous: the drift kernel's input)."""
    flat = tensor.flatten(1)
    if part.start == 0 and part.stop == flat.shape[1]:
        return flat
    return flat[:, part].contiguous()
