"""What every cache rule gives the denoising loop, and the rule that never reuses.

A rule is pure code (no I/O, no device, no model) over the per-sample state of ONE request: at
each of its steps it sees the step index, the timestep, the per-sample squared drift of the
latent from its anchor and, for rules that want it, the per-sample relative L1 change of the
head's modulated input since the last step (both measured by the engine, summed over its ranks),
and says which samples RUN the blocks and which REUSE their cached residual (SPEC sections 1-3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sencache.runtime.cache.registry import Rule, register_rule


@dataclass(frozen=True)
class StepDecision:
    """The decision of one step for every sample of the batch."""

    run: np.ndarray
    """bool [B]: True where the sample runs the blocks."""
    score: np.ndarray
    """float [B]: the rule's score (NaN where the step is forced)."""
    threshold: float
    forced: bool


def forced_step(step: int, steps: int, force_last: bool) -> bool:
    """Whether a rule must run `step` of `steps`: the first always, the last when `force_last`."""
    return step == 0 or (force_last and step == steps - 1)


def relative_l1(current: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Per-sample relative L1 change mean|current - previous| / mean|previous| (TeaCache's signal),
    computed in the arrays' own dtype."""
    cur, prev = current.reshape(len(current), -1), previous.reshape(len(previous), -1)
    return np.abs(cur - prev).mean(axis=1) / np.abs(prev).mean(axis=1)


class CachePolicy(Protocol):
    """What the denoising loop asks of a cache rule."""

    name: str
    needs_drift: bool
    deterministic_drift: bool
    """Whether the drift the rule reads leaves out the noise a stochastic sampler injected since each
    sample's anchor (`Sampler.injected`); the plain latent drift otherwise (SenCache's own)."""
    needs_modulation: bool
    may_reuse: bool

    def settings(self) -> dict[str, Any]:
        """The knobs in use, as written to stats.json under "cache"."""

    def warnings(self) -> list[str]:
        """What the request's result should say about how the rule ran (empty when nothing)."""

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        """Decide step `step` at timestep `t` and update the per-sample state."""


@runtime_checkable
class ReuseObserver(Protocol):
    """A rule that also learns, at steps where a sample runs after an earlier run, what reusing
    its cached residual would have cost: the loop passes the tail's output from the cached
    residual against the fresh one (only rules with `observe` pay for that extra tail call)."""

    def observe(self, step: int, error_sumsq: np.ndarray) -> None:
        """Per sample of step `step` (the step just decided), the squared L2 norm of the guided
        output with the cached residual minus the fresh output; NaN where not observed."""


class NoCache:
    """Every step runs every sample: the reference the cached runs are measured against."""

    name = "none"
    needs_drift = False
    deterministic_drift = False
    needs_modulation = False
    may_reuse = False

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def settings(self) -> dict[str, Any]:
        return {"method": "none"}

    def warnings(self) -> list[str]:
        return []

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        return StepDecision(np.ones(self.batch, bool), np.full(self.batch, np.nan), math.nan, True)


register_rule(
    Rule(
        "none",
        "no cache: every step runs every sample (the reference)",
        (),
        lambda _, context: NoCache(context.batch),
    )
)
