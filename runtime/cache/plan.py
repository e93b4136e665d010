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
costs are measured along the uncached trajectory, which a long reuse leaves behind). Where the
costs have nothing more, every sample of the request follows that schedule, so each runs exactly K
steps.

Why a plan and not a threshold on a live score: on tiny-wan the best schedule chosen with hindsight
for each sample was 0.0-1.4 dB above the best one schedule for all of them, and both were 2-4 dB
above every rule that thresholds a live score (benchmarks/results/online, "Fourth round"): what
matters most is where the runs go, which the costs say from calibration alone.

Where the costs also hold the calibration's mean squared SenCache score (`ReuseCosts.score_sq`),
each sample re-plans at every step from its own drift (`runs_now`): the costs of its current
anchor's row are scaled by (s^2 / E[s^2])^2, s its SenCache bound since the anchor and
E[s^2] the calibration's mean at the same (anchor, step), and it runs now if the cheapest plan of its
remaining runs from there does. A sample that drifts more than the calibration's runs sooner, one
that drifts less reuses longer, and every sample still runs exactly the budget's steps. The plan
after the next run is the calibration's (`later_costs`), computed once per request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sencache.runtime.cache.base import StepDecision
from sencache.runtime.cache.budget import budget_target
from sencache.runtime.cache.knobs import BUDGET_TARGETS
from sencache.runtime.cache.registry import Rule, RuleContext, register_rule
from sencache.runtime.cache.sencache import OnlineFactor
from sencache.runtime.conventions import engine_conventions
from sencache.runtime.errors import BadInput
from sencache.runtime.sensitivity import ReuseCosts, SensitivityTable


def costs_at(costs: ReuseCosts, steps: int) -> np.ndarray:
    """The cost matrix at `steps` steps: the measured one, or read at the same fractions of the run
    (bilinear; the DP's choice does not depend on the costs' overall scale)."""
    return _at_steps(np.asarray(costs.cost, dtype=np.float64), steps)


def scores_at(costs: ReuseCosts, steps: int) -> np.ndarray | None:
    """The mean squared scores (`ReuseCosts.score_sq`) at `steps` steps, read as `costs_at` reads
    the costs; None where the costs have none."""
    if costs.score_sq is None:
        return None
    return _at_steps(np.asarray(costs.score_sq, dtype=np.float64), steps)


def _at_steps(measured: np.ndarray, steps: int) -> np.ndarray:
    """An upper-triangular [a, i] matrix measured at its own step count, at `steps` steps."""
    if steps == len(measured):
        return measured.copy()
    grid = np.linspace(0.0, 1.0, len(measured))
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
    gap = _gaps(cost, forced, max_reuse)
    best = np.full((steps, runs + 1), np.inf)
    back = np.zeros((steps, runs + 1), dtype=np.int64)
    best[0, 1] = 0.0
    for m in range(1, steps):
        candidates = best[:m, :-1] + gap[:m, m, None]  # [anchor, runs before m]
        back[m, 1:] = np.argmin(candidates, axis=0)
        best[m, 1:] = candidates[back[m, 1:], np.arange(runs)]
    return best, back, gap


def _gaps(cost: np.ndarray, forced: np.ndarray, max_reuse: int) -> np.ndarray:
    """gap[a, m]: the cost of reusing steps a+1 .. m-1 from anchor a (inf across a forced step or
    past max_reuse), for m up to the number of steps (the end)."""
    steps = len(cost)
    gap = np.full((steps, steps + 1), np.inf)
    for a in range(steps):
        total = 0.0
        for m in range(a + 1, min(steps, a + 1 + max_reuse) + 1):
            gap[a, m] = total
            if m == steps or forced[m]:
                break
            total += cost[a, m]
    return gap


def later_costs(cost: np.ndarray, runs: int, forced: np.ndarray, max_reuse: int) -> np.ndarray:
    """[steps, runs + 1]: later[m, r], the least summed cost of the steps after a run at step m with
    exactly r more runs (inf where none): the plan's suffix, which `runs_now` completes."""
    steps = len(cost)
    gap = _gaps(cost, forced, max_reuse)
    later = np.full((steps, runs + 1), np.inf)
    later[:, 0] = gap[:, steps]
    reach = range(1, min(max_reuse + 1, steps - 1) + 1)  # the next run d steps on: gap is inf past these
    diagonals = {d: gap[np.arange(steps - d), np.arange(d, steps)] for d in reach}
    for r in range(1, runs + 1):
        for d in reach:
            np.minimum(later[: steps - d, r], diagonals[d] + later[d:, r - 1], out=later[: steps - d, r])
    return later


def runs_now(
    row: np.ndarray,
    later: np.ndarray,
    forced: np.ndarray,
    step: int,
    anchor: int,
    left: int,
    max_reuse: int,
    scale: float,
) -> bool:
    """Whether a sample runs the step `step` (not forced) that it reaches with its anchor at step
    `anchor` and `left` runs to spend: true where running now is the cheapest way on, each step it
    reuses from here charged scale x row[i] (row: its anchor's costs), and the steps after its next
    run as `later` (`later_costs`) says. Ties go to running now."""
    steps = len(row)
    now = _after(later, step, left)
    total = 0.0
    for m in range(step + 1, min(steps, anchor + 1 + max_reuse) + 1):
        if forced[m - 1]:
            break
        total += scale * row[m - 1]
        if total + _after(later, m, left) < now:
            return False
    if not math.isfinite(now):
        raise AssertionError(f"no plan of {left} runs from step {step} (anchor {anchor}): the budget's plan is broken")
    return True


def _after(later: np.ndarray, m: int, left: int) -> float:
    """The least cost from a run at step m (the end where m is the number of steps) on, with
    `left` runs counting that one."""
    if m == len(later):
        return 0.0 if left == 0 else math.inf
    return float(later[m, left - 1]) if left > 0 else math.inf


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


@dataclass(frozen=True)
class LivePlan:
    """What a sample needs to re-plan from its own drift (`runs_now`): the request's costs, the
    plan's suffix (`later_costs`), the calibration's mean squared scores, all at the request's
    steps, and the table that gives each anchor's Jx, Jt; and, to re-plan from the reuse errors
    it observes too, the calibration's mean observed errors (`ReuseCosts.error_sq`, None: not
    observed) and the elements of a sample's output."""

    cost: np.ndarray
    later: np.ndarray
    score_sq: np.ndarray
    table: SensitivityTable
    nearest: bool
    error_sq: np.ndarray | None = None
    numel: int = 1


OBSERVED_RATE = 0.5
"""Weight of the newest observation in a sample's running log-ratio of observed to calibrated reuse
error (`ObservingPlanPolicy`)."""
OBSERVED_BOUND = 4.0
"""The observed/calibrated reuse-error ratio a sample learns stays within [1 / bound, bound]."""
OBSERVED_PRIOR = 4.0
"""Observations at which a sample's learnt factor gets half its weight: one observed error varies
more between steps than a sample's errors differ from the calibration's on the whole (on
tiny-cogvideox's calibration, a log-ratio spread of about 0.4 per observation against 0.2 between
samples), so the factor is shrunk toward 1 until the evidence adds up. Rate 0.5 without it lost
0.4-0.5 dB on looked-at draws where this gained (benchmarks/results/online, "Ninth round")."""


class SenCachePlanPolicy:
    """Every sample runs the budget's steps: those of one schedule (`plan_schedule` over the
    calibrated costs), or, with a `live` plan, the ones each sample re-plans from its drift."""

    name = "sencache-plan"
    needs_modulation = False
    may_reuse = True

    def __init__(
        self,
        schedule: np.ndarray,
        forced: np.ndarray,
        batch: int,
        budget: dict[str, Any],
        max_reuse: int,
        live: LivePlan | None = None,
    ) -> None:
        self.schedule = np.asarray(schedule, dtype=bool)
        self.forced = np.asarray(forced, dtype=bool)
        self.batch = batch
        self.budget = budget
        self.max_reuse = max_reuse
        self.live = live
        self.needs_drift = self.deterministic_drift = live is not None
        self.left = np.full(batch, int(self.schedule.sum()))
        self.anchor = np.zeros(batch, dtype=np.int64)
        self.anchor_t = np.zeros(batch)
        self.jx = np.zeros(batch)
        self.jt = np.zeros(batch)

    def settings(self) -> dict[str, Any]:
        """The budget, max_reuse and the calibration's schedule ("R" run, "." reuse), which a live
        plan follows where a sample drifts as the calibration did."""
        runs = "".join("R" if r else "." for r in self.schedule)
        out = {"method": self.name, "max_reuse": self.max_reuse, "budget": self.budget, "schedule": runs}
        return out if self.live is None else {**out, "per_sample": "drift"}

    def warnings(self) -> list[str]:
        return []

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        """The step's runs; with a live plan, each sample's score is the factor its anchor's costs
        were scaled by (NaN where the step is forced)."""
        forced = bool(self.forced[step])
        scores = np.full(self.batch, np.nan)
        if self.live is None:
            return StepDecision(np.full(self.batch, bool(self.schedule[step])), scores, math.nan, forced)
        live = self.live
        if forced:
            run = np.ones(self.batch, dtype=bool)
        else:
            if drift_sumsq is None:
                raise ValueError("sencache-plan re-plans from the drift: pass drift_sumsq")
            drift = np.sqrt(np.asarray(drift_sumsq, dtype=np.float64))
            factors = self._factors()
            run = np.zeros(self.batch, dtype=bool)
            for b in range(self.batch):
                a = int(self.anchor[b])
                score = float(self.jx[b]) * float(drift[b]) + float(self.jt[b]) * abs(t - float(self.anchor_t[b]))
                scores[b] = drift_scale(score, float(live.score_sq[a, step])) * float(factors[b])
                run[b] = runs_now(
                    live.cost[a], live.later, self.forced, step, a, int(self.left[b]), self.max_reuse, float(scores[b])
                )
        self.left -= run
        if run.any() and step < len(self.forced) - 1:
            jx, jt, _ = live.table.lookup(t, nearest=live.nearest)
            self.anchor[run], self.anchor_t[run], self.jx[run], self.jt[run] = step, t, jx, jt
        return StepDecision(run, scores, math.nan, forced)

    def _factors(self) -> np.ndarray:
        """Each sample's factor on its drift's scale of its anchor's costs (1: the drift alone)."""
        return np.ones(self.batch)


class ObservingPlanPolicy(SenCachePlanPolicy):
    """sencache-plan re-planned from each sample's drift and from the reuse errors it observes
    (`ReuseObserver`): at each run after an earlier one, the error reusing would have made,
    against the calibration's mean of the same (`ReuseCosts.error_sq`, the same anchor and the
    same reuses before). A sample's running log-ratio of the two (`OnlineFactor`, weight
    OBSERVED_RATE, each ratio within OBSERVED_BOUND, shrunk toward 1 by OBSERVED_PRIOR) squared
    (the costs are squared errors) multiplies its drift's scale: a sample whose reuses cost more
    than the calibration's runs sooner. Every sample still runs exactly the budget's steps."""

    def __init__(
        self,
        schedule: np.ndarray,
        forced: np.ndarray,
        batch: int,
        budget: dict[str, Any],
        max_reuse: int,
        live: LivePlan,
    ) -> None:
        if live.error_sq is None:
            raise ValueError("an observing plan needs the calibration's mean observed reuse errors")
        super().__init__(schedule, forced, batch, budget, max_reuse, live)
        self.error_sq = live.error_sq
        self.scale = math.sqrt(live.numel)
        """What the root of an observed squared error is divided by: per element, as calibrated."""
        self.online = OnlineFactor(batch, OBSERVED_RATE, OBSERVED_BOUND, OBSERVED_PRIOR)

    @property
    def factor(self) -> np.ndarray:
        """Each sample's learnt factor on its observed reuse errors (squared on its costs)."""
        return self.online.factor

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "per_sample": "drift and observed reuse errors"}

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        """As `SenCachePlanPolicy.decide`, its scale times the learnt factor squared; a run now is
        expected to observe the calibration's mean error from the same anchor."""
        self.online.start(step)
        depth = self.error_sq.shape[1]
        expected = np.full(self.batch, np.nan)
        for b in range(self.batch):
            d = step - int(self.anchor[b])
            mean = float(self.error_sq[int(self.anchor[b]), d - 1]) if 1 <= d <= depth else 0.0
            expected[b] = math.sqrt(mean) if mean > 0 else math.nan
        self.online.expect(expected)
        return super().decide(step, t, drift_sumsq, modulation_change)

    def _factors(self) -> np.ndarray:
        factor = self.factor
        return factor * factor

    def observe(self, step: int, error_sumsq: np.ndarray) -> None:
        """Learn from the reuse errors observed at `step` (the step just decided): per sample the
        squared L2 norm of the guided output from the cached residual minus the fresh output, NaN
        where the sample did not run."""
        self.online.observe(step, np.sqrt(np.asarray(error_sumsq, dtype=np.float64)) / self.scale)


def drift_scale(score: float, mean_sq: float) -> float:
    """The factor on an anchor's costs of a sample whose score since it is `score` where the
    calibration's mean squared score is `mean_sq`: (score^2 / mean_sq)^2; 1 (the calibration's
    plan) where that is not a finite number. The power is a rule constant, not a per-model knob:
    on tiny-wan's looked-at draws 3 was less stable and 4-6 worse (benchmarks/results/online,
    "Sixth round")."""
    ratio = score * score / mean_sq if mean_sq > 0 else math.nan
    return ratio * ratio if math.isfinite(ratio * ratio) else 1.0


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
    knobs: Mapping[str, object], table: SensitivityTable, steps: int, batch: int, numel: int = 1
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
    live = _live_plan(table, cost, target, forced, max_reuse, numel)
    if live is not None and live.error_sq is not None:
        return ObservingPlanPolicy(schedule, forced, batch, budget, max_reuse, live)
    return SenCachePlanPolicy(schedule, forced, batch, budget, max_reuse, live)


def _live_plan(
    table: SensitivityTable, cost: np.ndarray, runs: int, forced: np.ndarray, max_reuse: int, numel: int
) -> LivePlan | None:
    """The per-sample re-plan of a request of `runs` runs; None where the table's costs have no
    mean squared scores (calibrated before them): every sample then follows the schedule. The
    observed errors join where the costs have them and the request runs their steps."""
    curves = table.budget_curves()
    assert curves.costs is not None, "the caller checked the costs are there"
    score_sq = scores_at(curves.costs, len(cost))
    if score_sq is None:
        return None
    nearest = engine_conventions(curves.switch_frac, curves.force_last).nearest_lookup
    errors = curves.costs.error_sq if curves.costs.steps == len(cost) else None
    error_sq = None if errors is None else np.asarray(errors, dtype=np.float64)
    later = later_costs(cost, runs, forced, max_reuse)
    return LivePlan(cost, later, score_sq, table, nearest, error_sq, numel)


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
        lambda knobs, context: make_plan_policy(
            knobs, context.sensitivity(), context.steps, context.batch, context.numel
        ),
        ("sensitivity",),
        share=share_plan_budget,
    )
)
