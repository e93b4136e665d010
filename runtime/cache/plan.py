"""sencache-plan: a request's NFE budget spent where the calibrated reuse costs say it buys most,
as pure code: no I/O, no device, no model.

Calibration measures, on its uncached trajectories at N steps (`ReuseCosts`), what reusing costs
the final video: cost[a, i] is the predicted final-latent error of reusing at step i the residual
of an anchor run at step a < i, the mean over the calibration samples of
    G_i x ||f_i - f_a||^2 / numel
with f the guided denoiser output along the trajectory and G_i the measured gain from an output
error at step i to the final latent (reuse step i alone, measure the final latent's change, divide
by ||f_i - f_{i-1}||^2). A request for K runs of n steps gets the schedule of K runs that minimises
the summed cost of its reused steps (`plan_schedule`, dynamic programming), each reused step charged
from its anchor, with the forced steps run and no more than max_reuse steps reused in a row (the
costs are measured along the uncached trajectory, which a long reuse leaves behind). Every sample
of the request follows that schedule, so each runs exactly K steps.

Why a schedule and not a live score: on tiny-wan the best schedule chosen with hindsight for each
sample was 0.0-1.4 dB above the best one schedule for all of them, and both were 2-4 dB above every
rule that thresholds a live score (benchmarks/results/online, "Fourth round"): what matters most is
where the runs go, which the costs say from calibration alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sencache.runtime.cache.base import StepDecision
from sencache.runtime.cache.budget import budget_target
from sencache.runtime.cache.knobs import BUDGET_TARGETS
from sencache.runtime.cache.registry import Rule, RuleContext, register_rule
from sencache.runtime.conventions import engine_conventions
from sencache.runtime.errors import BadInput
from sencache.runtime.sensitivity import ReuseCosts, SensitivityTable


def costs_at(costs: ReuseCosts, steps: int) -> np.ndarray:
    """The cost matrix at `steps` steps: the measured one, or read at the same fractions of the run
    (bilinear; the DP's choice does not depend on the costs' overall scale)."""
    measured = np.asarray(costs.cost, dtype=np.float64)
    if steps == costs.steps:
        return measured.copy()
    grid = np.linspace(0.0, 1.0, costs.steps)
    at = np.linspace(0.0, 1.0, steps)
    rows = np.array([np.interp(at, grid, row) for row in measured])
    out = np.array([np.interp(at, grid, column) for column in rows.T]).T
    return np.triu(out, k=1)


def _plan_tables(
    cost: np.ndarray, runs: int, forced: np.ndarray, max_reuse: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DP of `plan_schedule` for up to `runs` runs: best[m, r], the least cost of steps 0..m-1
    with r runs the last of which is step m (inf where none); back[m, r], that run's anchor; and
    gap[a, m], the cost of reusing steps a+1 .. m-1 from anchor a (inf across a forced step or
    past max_reuse)."""
    steps = len(cost)
    if not forced[0]:
        raise ValueError("the first step must be forced: a sample has no residual before it")
    gap = np.full((steps, steps + 1), np.inf)
    for a in range(steps):
        total = 0.0
        for m in range(a + 1, min(steps, a + 1 + max_reuse) + 1):
            gap[a, m] = total
            if m == steps or forced[m]:
                break
            total += cost[a, m]
    best = np.full((steps, runs + 1), np.inf)
    back = np.zeros((steps, runs + 1), dtype=np.int64)
    best[0, 1] = 0.0
    for m in range(1, steps):
        candidates = best[:m, :-1] + gap[:m, m, None]  # [anchor, runs before m]
        back[m, 1:] = np.argmin(candidates, axis=0)
        best[m, 1:] = candidates[back[m, 1:], np.arange(runs)]
    return best, back, gap


def plan_schedule(cost: np.ndarray, runs: int, forced: np.ndarray, max_reuse: int) -> np.ndarray | None:
    """The run flags [steps] of the schedule with exactly `runs` runs that minimises the summed
    cost[anchor, i] of its reused steps i (anchor: the last run before i), running every `forced`
    step (the first must be one) and reusing at most `max_reuse` steps in a row; None where no such
    schedule exists. Ties go to the earliest anchors."""
    steps = len(cost)
    best, back, gap = _plan_tables(cost, runs, forced, max_reuse)
    ends = best[:, runs] + gap[:, steps]
    last = int(np.argmin(ends))
    if not math.isfinite(ends[last]):
        return None
    schedule = np.zeros(steps, dtype=bool)
    m, r = last, runs
    while True:
        schedule[m] = True
        if m == 0:
            break
        m, r = int(back[m, r]), r - 1
    return schedule


def least_costs(cost: np.ndarray, forced: np.ndarray, max_reuse: int) -> np.ndarray:
    """[steps + 1]: for each number of runs, the summed cost of `plan_schedule`'s schedule with
    that many runs (inf where none exists)."""
    steps = len(cost)
    best, _, gap = _plan_tables(cost, steps, forced, max_reuse)
    return np.min(best + gap[:, steps, None], axis=0)


class SenCachePlanPolicy:
    """Every sample runs the steps of one schedule (`plan_schedule` over the calibrated costs)."""

    name = "sencache-plan"
    needs_drift = False
    deterministic_drift = False
    needs_modulation = False
    may_reuse = True

    def __init__(
        self, schedule: np.ndarray, forced: np.ndarray, batch: int, budget: dict[str, Any], max_reuse: int
    ) -> None:
        self.schedule = np.asarray(schedule, dtype=bool)
        self.forced = np.asarray(forced, dtype=bool)
        self.batch = batch
        self.budget = budget
        self.max_reuse = max_reuse

    def settings(self) -> dict[str, Any]:
        """The budget, max_reuse and the schedule ("R" run, "." reuse)."""
        runs = "".join("R" if r else "." for r in self.schedule)
        return {"method": self.name, "max_reuse": self.max_reuse, "budget": self.budget, "schedule": runs}

    def warnings(self) -> list[str]:
        return []

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        run = bool(self.schedule[step])
        return StepDecision(np.full(self.batch, run), np.full(self.batch, np.nan), math.nan, bool(self.forced[step]))


def _plan_inputs(table: SensitivityTable, steps: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(the cost matrix, the forced steps, max_reuse) of a plan of `steps` steps on `table`;
    BadInput where the table has no reuse costs."""
    curves = table.budget_curves()
    if curves.costs is None:
        raise BadInput(
            "cache sencache-plan: the bundle's sensitivity table has no reuse costs (calibrated before them); "
            "recalibrate it (`sencache calibrate`)",
            param="cache",
        )
    conventions = engine_conventions(curves.switch_frac, curves.force_last)
    forced = np.array([conventions.forced(i, steps) for i in range(steps)])
    return costs_at(curves.costs, steps), forced, curves.max_reuse


def make_plan_policy(
    knobs: Mapping[str, object], table: SensitivityTable, steps: int, batch: int
) -> SenCachePlanPolicy:
    """sencache-plan for a request with an NFE budget (`nfe`, `speedup` or `speed`; `budget`
    threshold or hard, met exactly either way); BadInput where the table has no reuse costs or
    the budget cannot be met."""
    cost, forced, max_reuse = _plan_inputs(table, steps)
    param, fraction, target = budget_target(knobs, steps, int(forced.sum()))
    mode = str(knobs.get("budget", "threshold"))
    if mode not in ("threshold", "hard"):
        raise BadInput(f"budget must be threshold or hard, got {mode!r}", param="budget")
    schedule = plan_schedule(cost, target, forced, max_reuse)
    if schedule is None:
        raise _unreachable(param, knobs[param], target, steps, forced, max_reuse)
    budget = {"mode": mode, "nfe": target, "requested_nfe": fraction * steps}
    return SenCachePlanPolicy(schedule, forced, batch, budget, max_reuse)


def share_plan_budget(knobs: Mapping[str, object], contexts: list[RuleContext]) -> list[dict[str, object]]:
    """A request's budget shared out over its experts' runs of steps (`contexts`, one per run) where
    the calibrated costs say the runs buy most: the shares with the least summed cost of each run's
    own plan (the costs of every expert are in the same units, the final latent's error: its gains
    were measured over the whole run), each met exactly. Each share is that run's `nfe`."""
    inputs = [_plan_inputs(c.sensitivity(), c.steps) for c in contexts]
    steps = sum(c.steps for c in contexts)
    param, _, target = budget_target(knobs, steps, sum(int(forced.sum()) for _, forced, _ in inputs))
    shares = cheapest_shares([least_costs(*plan) for plan in inputs], target)
    if shares is None:
        forced = np.concatenate([f for _, f, _ in inputs])
        raise _unreachable(param, knobs[param], target, steps, forced, min(r for _, _, r in inputs))
    budget = {k: v for k, v in knobs.items() if k not in BUDGET_TARGETS}
    return [{**budget, "nfe": share} for share in shares]


def cheapest_shares(costs: list[np.ndarray], runs: int) -> list[int] | None:
    """The runs of each part, summing to `runs`, with the least summed cost, where costs[p][k] is
    part p's cost with k runs (`least_costs`); None where no shares have a finite cost. Ties go
    to the earlier parts."""
    total = np.zeros(1)  # total[k]: the least cost of the parts so far with k runs in all
    picks: list[np.ndarray] = []
    for own in costs:
        merged = np.full(len(total) + len(own) - 1, np.inf)
        pick = np.zeros(len(merged), dtype=np.int64)
        for k in range(len(merged)):
            for j in range(max(0, k - len(total) + 1), min(k, len(own) - 1) + 1):
                if total[k - j] + own[j] < merged[k]:
                    merged[k], pick[k] = total[k - j] + own[j], j
        total, picks = merged, [*picks, pick]
    if runs >= len(total) or not math.isfinite(total[runs]):
        return None
    shares = []
    for pick in reversed(picks):
        shares.append(int(pick[runs]))
        runs -= shares[-1]
    return shares[::-1]


def _unreachable(param: str, value: object, target: int, steps: int, forced: np.ndarray, max_reuse: int) -> BadInput:
    fewest = math.ceil((steps - int(forced[-1])) / (max_reuse + 1)) + int(forced[-1])
    return BadInput(
        f"{param} {value} asks for {target} runs of {steps} steps; reusing at most {max_reuse} steps "
        f"in a row (the calibrated max_reuse) needs at least about {fewest}",
        param=param,
    )


register_rule(
    Rule(
        "sencache-plan",
        "SenCache's plan: a budget's runs where the calibrated reuse costs predict the largest error (needs nfe, "
        "speedup or speed)",
        (*BUDGET_TARGETS, "budget"),
        lambda knobs, context: make_plan_policy(knobs, context.sensitivity(), context.steps, context.batch),
        ("sensitivity",),
        share=share_plan_budget,
    )
)
