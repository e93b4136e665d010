"""Per-request NFE budgets for SenCache (issue 12), as pure code: no I/O, no device, no model.

A request asks for a budget (`nfe`, `speedup` or a named `speed`) instead of thresholds, in one
of two modes:
- threshold: eps is chosen per request by inverting the mean-NFE-vs-eps curve that calibration
  recorded by replaying the SenCache rule on its trajectories (interpolated in the step count), so
  the mean NFE over many samples meets the budget and each sample still follows the rule;
- hard: every sample runs exactly the NFE asked for. At each step, from the calibrated score
  profile of the steps left, the rule plans a per-sample threshold under which the expected runs
  left equal the runs left in the budget, and re-plans at the next step with the score it then sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sencache.runtime.cache.base import CachePolicy, StepDecision
from sencache.runtime.cache.knobs import BUDGET_TARGETS, SPEEDS
from sencache.runtime.cache.registry import Rule, register_rule
from sencache.runtime.cache.sencache import SenCachePolicy, SenCacheSettings
from sencache.runtime.conventions import engine_conventions
from sencache.runtime.errors import BadInput
from sencache.runtime.sensitivity import BudgetCurves, SensitivityTable

PLAN_ITERATIONS = 40
"""Bisection steps of the hard mode's per-sample threshold."""


def replay(policy: CachePolicy, trajectory: np.ndarray, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run `policy` over a recorded trajectory [steps, batch, ...] (the inputs x_i of each step),
    as the engine calls it: at step i the drift of x_i from each sample's anchor, the input of its
    last run step. Returns (runs [steps, batch] bool, scores [steps, batch])."""
    steps, batch = trajectory.shape[:2]
    flat = trajectory.reshape(steps, batch, -1).astype(np.float64)
    anchor = flat[0].copy()
    runs, scores = np.zeros((steps, batch), bool), np.full((steps, batch), np.nan)
    for i in range(steps):
        drift = None if i == 0 else np.sum((flat[i] - anchor) ** 2, axis=1)
        decision = policy.decide(i, float(timesteps[i]), drift)
        runs[i], scores[i] = decision.run, decision.score
        anchor[decision.run] = flat[i][decision.run]
    return runs, scores


def record_curves(
    trajectories: Mapping[int, tuple[np.ndarray, np.ndarray]],
    rule: Callable[[SenCacheSettings, int, int], SenCachePolicy],
    defaults: Mapping[str, Any],
    grid_points: int = 48,
) -> BudgetCurves:
    """The budget curves of SenCache from uncached `trajectories` ({steps: (trajectory [steps,
    batch, ...], timesteps)}): mean NFE fraction over a geometric grid of eps_main around the
    bundle's default (eps_start in the default's ratio to it), and the mean one-step score profile.
    `rule(settings, steps, batch)` makes the policy, the same code inference runs."""
    eps_main, max_reuse = float(defaults["eps_main"]), int(defaults["max_reuse"])
    if eps_main <= 0:
        raise BadInput("the bundle's default eps_main must be positive to record NFE-budget curves")
    ratio = float(defaults["eps_start"]) / eps_main
    grid = np.concatenate([[0.0], eps_main * np.geomspace(1e-3, 100.0, grid_points - 1)])
    fractions, profiles = [], []
    for steps in sorted(trajectories):
        trajectory, timesteps = trajectories[steps]
        batch = trajectory.shape[1]
        row = []
        for eps in grid:
            settings = SenCacheSettings(eps_start=ratio * eps, eps_main=eps, max_reuse=max_reuse)
            runs, _ = replay(rule(settings, steps, batch), trajectory, timesteps)
            row.append(float(runs.sum(axis=0).mean()) / steps)
        # every step runs at eps 0, so each score is anchored at the step before
        every = SenCacheSettings(eps_start=0.0, eps_main=0.0, max_reuse=max_reuse)
        _, scores = replay(rule(every, steps, batch), trajectory, timesteps)
        fractions.append(tuple(np.minimum.accumulate(row).tolist()))
        profiles.append(tuple(np.nan_to_num(scores).mean(axis=1).tolist()))
    return BudgetCurves(
        steps=tuple(sorted(trajectories)),
        eps_grid=tuple(grid.tolist()),
        fractions=tuple(fractions),
        profiles=tuple(profiles),
        eps_ratio=ratio,
        max_reuse=max_reuse,
        switch_frac=every.switch_frac,
        force_last=every.force_last,
    )


def fraction_curve(curves: BudgetCurves, steps: int) -> np.ndarray:
    """Mean NFE / steps against `curves.eps_grid` at `steps` steps: linear in log(steps) between
    the recorded step counts, the nearest one's outside them."""
    recorded = np.log(np.asarray(curves.steps, dtype=np.float64))
    table = np.asarray(curves.fractions, dtype=np.float64)
    at = math.log(steps)
    curve = np.array([np.interp(at, recorded, table[:, g]) for g in range(table.shape[1])])
    return np.minimum.accumulate(curve)


def eps_for_fraction(curves: BudgetCurves, steps: int, fraction: float) -> float | None:
    """The eps_main whose recorded mean NFE / steps at `steps` steps is `fraction`, by inverting
    the monotone curve; None when no eps of the grid runs that few steps."""
    curve = fraction_curve(curves, steps)
    if fraction < curve[-1] - 1e-9:
        return None
    if fraction >= curve[0]:
        return float(curves.eps_grid[0])
    # the curve falls with eps: reversed, it rises, as np.interp needs
    return float(np.interp(fraction, curve[::-1], np.asarray(curves.eps_grid)[::-1]))


def step_profile(curves: BudgetCurves, steps: int) -> np.ndarray:
    """The expected one-step score of each of `steps` steps: the recorded profile of the nearest
    step count (in log), read at the same fraction of the run, scaled by the step size ratio."""
    nearest = int(np.argmin([abs(math.log(n / steps)) for n in curves.steps]))
    recorded, profile = curves.steps[nearest], np.asarray(curves.profiles[nearest])
    if steps == recorded:
        return profile.copy()
    place = np.linspace(0.0, 1.0, steps)
    return np.interp(place, np.linspace(0.0, 1.0, recorded), profile) * (recorded - 1) / max(steps - 1, 1)


def requested_fraction(knobs: Mapping[str, object]) -> tuple[str, float]:
    """(the knob that set it, the fraction of steps to run) of a budget's knobs."""
    for name in BUDGET_TARGETS:
        if name in knobs:
            value = knobs[name]
            if name == "speedup":
                return name, 1.0 / float(value)  # type: ignore[arg-type]
            if name == "speed":
                return name, SPEEDS[str(value)]
            return name, math.nan
    raise BadInput("budget needs an NFE budget: nfe, speedup or speed", param="budget")


def make_budget_policy(
    knobs: Mapping[str, object], table: SensitivityTable, steps: int, batch: int, numel: int
) -> SenCachePolicy:
    """The SenCache rule for a request with an NFE budget (`nfe`, `speedup` or `speed`, and
    `budget` = threshold or hard); BadInput when the budget cannot be met at `steps` steps."""
    curves = table.budget_curves()
    settings = SenCacheSettings(
        eps_start=0.0,
        eps_main=0.0,
        max_reuse=curves.max_reuse,
        switch_frac=curves.switch_frac,
        force_last=curves.force_last,
    )
    conventions = engine_conventions(settings.switch_frac, settings.force_last)
    forced = sum(conventions.forced(i, steps) for i in range(steps))
    param, fraction = requested_fraction(knobs)
    target = int(knobs["nfe"]) if param == "nfe" else round(steps * fraction)  # type: ignore[call-overload]
    if param == "nfe":
        fraction = target / steps
    if not forced <= target <= steps:
        raise BadInput(
            f"{param} {knobs[param]} asks for {target} runs of {steps} steps; a budget must lie in "
            f"[{forced}, {steps}] runs ({forced} steps always run)",
            param=param,
        )
    mode = str(knobs.get("budget", "threshold"))
    if mode == "hard":
        return SenCacheHardBudget(settings, table, steps, batch, numel, target, step_profile(curves, steps))
    eps = eps_for_fraction(curves, steps, fraction)
    if eps is None:
        fewest = fraction_curve(curves, steps)[-1] * steps
        raise BadInput(
            f"{param} {knobs[param]} asks for {fraction * steps:.1f} runs of {steps} steps, fewer than the "
            f"threshold rule reaches (about {fewest:.1f}, at max_reuse {curves.max_reuse}): ask for budget hard",
            param=param,
        )
    chosen = SenCacheSettings(
        eps_start=curves.eps_ratio * eps,
        eps_main=eps,
        max_reuse=curves.max_reuse,
        switch_frac=curves.switch_frac,
        force_last=curves.force_last,
    )
    return SenCachePolicy(
        chosen, table, steps, batch, numel, budget={"mode": "threshold", "requested_nfe": fraction * steps}
    )


def planned_thresholds(
    scores: np.ndarray, runs_left: np.ndarray, increments: np.ndarray, forced: np.ndarray
) -> np.ndarray:
    """Per sample, the largest threshold under which the runs expected from now on reach
    `runs_left`: the sample runs now when its score meets it, and afterwards its score is expected
    to grow by `increments` per step (the calibrated profile of the steps after this one), a run
    resetting it, as does each `forced` step (which the budget has already reserved)."""

    def runs(tau: np.ndarray) -> np.ndarray:
        count = (scores >= tau).astype(np.int64)
        acc = np.where(count > 0, 0.0, scores)
        for increment, is_forced in zip(increments, forced, strict=True):
            if is_forced:
                acc = np.zeros_like(acc)
                continue
            acc = acc + increment
            hit = acc >= tau
            count += hit
            acc = np.where(hit, 0.0, acc)
        return count

    low = np.zeros_like(scores)
    high = scores + float(np.sum(increments)) + 1.0
    for _ in range(PLAN_ITERATIONS):
        middle = (low + high) / 2
        enough = runs(middle) >= runs_left
        low, high = np.where(enough, middle, low), np.where(enough, high, middle)
    return low


class SenCacheHardBudget(SenCachePolicy):
    """SenCache under a hard NFE budget: every sample runs exactly `nfe` of the `num_steps` steps.

    The forced steps are reserved from the budget. At each other step, a sample runs when the
    steps left leave it no choice (its runs left equal its free steps left), never once its runs
    left are spent, and otherwise when its score (SenCache's, from its anchor) meets the threshold
    planned from the calibrated profile of the steps left (`planned_thresholds`), so it spends its
    runs where its scores are highest, knowing only the scores so far. max_reuse does not apply."""

    def __init__(
        self,
        settings: SenCacheSettings,
        table: SensitivityTable,
        num_steps: int,
        batch: int,
        numel: int,
        nfe: int,
        profile: np.ndarray,
    ) -> None:
        super().__init__(settings, table, num_steps, batch, numel, budget={"mode": "hard", "nfe": nfe})
        self.forced_steps = np.array([self.forced(i) for i in range(num_steps)])
        if not int(self.forced_steps.sum()) <= nfe <= num_steps:
            raise BadInput(f"nfe must be in [{int(self.forced_steps.sum())}, {num_steps}], got {nfe}", param="nfe")
        if len(profile) != num_steps:
            raise ValueError(f"profile must have {num_steps} scores")
        self.nfe = nfe
        self.profile = np.asarray(profile, dtype=np.float64)
        self.spent = np.zeros(batch, dtype=np.int64)
        # per step i: forced steps after i, and free (not forced) steps from i on
        after = np.cumsum(self.forced_steps[::-1])[::-1]
        self.forced_after = np.append(after[1:], 0)
        self.free_from = np.cumsum((~self.forced_steps)[::-1])[::-1]

    def settings(self) -> dict[str, Any]:
        """The budget and the conventions; no eps or max_reuse, which the hard mode does not use."""
        kept = ("switch_frac", "force_last", "conventions")
        return {
            "method": self.name,
            **{k: v for k, v in super().settings().items() if k in kept},
            "budget": self.budget,
        }

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation: np.ndarray | None = None
    ) -> StepDecision:
        batch = len(self.spent)
        forced = bool(self.forced_steps[step])
        if forced:
            run, score = np.ones(batch, bool), np.full(batch, np.nan)
        else:
            _, score = self._scores(t, drift_sumsq)
            left = self.nfe - self.spent - self.forced_after[step]
            run = left >= self.free_from[step]
            open_ = (left > 0) & ~run
            if open_.any():
                tau = planned_thresholds(
                    score[open_], left[open_], self.profile[step + 1 :], self.forced_steps[step + 1 :]
                )
                run[open_] = score[open_] >= tau
        self.spent += run
        self._commit(step, t, run)
        return StepDecision(run, score, math.nan, forced)


register_rule(
    Rule(
        "sencache",
        "SenCache held to an NFE budget",
        (*BUDGET_TARGETS, "budget"),
        lambda knobs, context: make_budget_policy(
            knobs, context.sensitivity(), context.steps, context.batch, context.numel
        ),
        ("sensitivity",),
        selected_by=BUDGET_TARGETS,
    )
)
