"""A cache rule over a model of several experts (Wan 2.2 A14B): one rule per expert's run of steps.

Each expert's steps are a run of their own for its rule, made by the same method and knobs with
that expert's calibration tables and step count: the rule's first step (the expert's first) runs
every sample and sets the anchor, its warm-up, reuse count, accumulators and online correction
start afresh, and nothing it decides reads what the other expert's rule saw. The step engine
drops the other expert's residuals at the switch (runtime/pass_runner.py), so a residual never
crosses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sencache.runtime.cache.base import CachePolicy, ReuseObserver, StepDecision
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import expert_of


class ExpertSegments:
    """One rule per run of an expert's steps, each deciding its steps as a run of its own."""

    def __init__(self, rules: list[CachePolicy], segments: list[tuple[int, int, int]], boundary: float) -> None:
        """`rules[i]` decides the steps `segments[i]` = (expert, first, end) of the request."""
        self.rules, self.segments, self.boundary = rules, segments, boundary
        first = rules[0]
        self.name = first.name
        self.needs_drift = any(r.needs_drift for r in rules)
        self.deterministic_drift = any(r.deterministic_drift for r in rules)
        self.needs_modulation = any(r.needs_modulation for r in rules)
        self.may_reuse = any(r.may_reuse for r in rules)

    def _segment(self, step: int) -> tuple[int, CachePolicy, int]:
        """(expert, rule, the step's index in its segment) of `step`."""
        for (expert, first, end), rule in zip(self.segments, self.rules, strict=True):
            if first <= step < end:
                return expert, rule, step - first
        raise BadInput(f"step {step} is past the {self.segments[-1][2]} steps the cache rule was made for")

    def settings(self) -> dict[str, Any]:
        return {
            **self.rules[0].settings(),
            "experts": [
                {"expert": e + 1, "steps": [first, end], **r.settings()}
                for (e, first, end), r in zip(self.segments, self.rules, strict=True)
            ],
        }

    def warnings(self) -> list[str]:
        return [
            f"expert {e + 1}: {w}" for (e, _, _), r in zip(self.segments, self.rules, strict=True) for w in r.warnings()
        ]

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        expert, rule, local = self._segment(step)
        if expert_of(t, self.boundary) != expert:
            raise BadInput(
                f"step {step} (t={t:g}) belongs to expert {expert_of(t, self.boundary) + 1}, but the cache rule "
                f"was made for the bundle's schedule, where it is expert {expert + 1}'s"
            )
        if local == 0:  # the expert's first step: nothing of the other expert is read
            drift_sumsq = modulation_change = None
        return rule.decide(local, t, drift_sumsq, modulation_change)


class ObservingExpertSegments(ExpertSegments):
    """Expert segments where a rule learns from observed reuse errors (sencache-online; sencache-plan
    where an expert's table has the observed errors at its steps): each error goes to its step's
    rule where that one learns."""

    def observe(self, step: int, error_sumsq: np.ndarray) -> None:
        _, rule, local = self._segment(step)
        if isinstance(rule, ReuseObserver):
            rule.observe(local, error_sumsq)


def expert_segments(rules: list[CachePolicy], segments: list[tuple[int, int, int]], boundary: float) -> ExpertSegments:
    """The rule of a request over `segments`, each decided by its rule."""
    cls = ObservingExpertSegments if any(isinstance(r, ReuseObserver) for r in rules) else ExpertSegments
    return cls(rules, segments, boundary)
