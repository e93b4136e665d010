"""Per-request NFE budgets for SenCache (issue 12), as pure code: no I/O, no device, no model.

A request asks for a budget (`nfe`, `speedup` or a named `speed`) instead of thresholds, in one
of two modes:
- threshold: eps is chosen per request by inverting the mean-NFE-vs-eps curve that calibration
  recorded by replaying the SenCache rule on its trajectories (interpolated in the step count), so
  the mean NFE over many samples meets the budget and each sample still follows the rule;
- hard: every sample runs exactly the NFE asked for. At each step, from the calibrated score
  profile of the steps left, the rule plans a per-sample threshold under which the expected runs
  left equal the runs left in the budget, and re-plans at the next step with the score it then sees;
  the plan's decisions are tabulated once per request over (step, runs left), so a step looks them up.

sencache-online takes the same budgets. Threshold mode: the online rule itself (each sample's
score scaled by its learnt factor, compared with eps, max_reuse applying), its eps chosen per
request by inverting the mean-NFE-vs-eps curve that calibration measured by running that rule
(`OnlineCurve`), so the mean NFE meets the budget while each sample's runs follow its own observed
reuse errors. Hard mode (and threshold mode on tables without that curve): each sample follows the
hard mode's plan with its score scaled by its learnt factor (`SenCacheOnlineBudget`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from sencache.runtime.cache.base import CachePolicy, StepDecision
from sencache.runtime.cache.knobs import BUDGET_TARGETS, SPEEDS
from sencache.runtime.cache.registry import Rule, register_rule
from sencache.runtime.cache.sencache import (
    ONLINE_KNOBS,
    OnlineFactor,
    SenCacheOnlinePolicy,
    SenCacheOnlineSettings,
    SenCachePolicy,
    SenCacheSettings,
)
from sencache.runtime.conventions import engine_conventions
from sencache.runtime.errors import BadInput
from sencache.runtime.sensitivity import BudgetCurves, OnlineCurve, SensitivityTable


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
    # the C library's log, as the native rule's (NumPy's own AVX-512 log rounds differently)
    recorded = np.array([math.log(n) for n in curves.steps], dtype=np.float64)
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


def budget_target(knobs: Mapping[str, object], steps: int, forced: int) -> tuple[str, float, int]:
    """(the knob that set it, the fraction of steps asked for, the runs per sample that are) of a
    request's budget; BadInput when those runs fall outside [forced, steps]."""
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
    return param, fraction, target


def _planned_settings(curves: BudgetCurves) -> SenCacheSettings:
    """The engine's conventions and the calibrated max_reuse, with no eps (a plan needs none)."""
    return SenCacheSettings(
        eps_start=0.0,
        eps_main=0.0,
        max_reuse=curves.max_reuse,
        switch_frac=curves.switch_frac,
        force_last=curves.force_last,
    )


def _forced_count(settings: SenCacheSettings, steps: int) -> int:
    conventions = engine_conventions(settings.switch_frac, settings.force_last)
    return sum(conventions.forced(i, steps) for i in range(steps))


def make_budget_policy(
    knobs: Mapping[str, object], table: SensitivityTable, steps: int, batch: int, numel: int
) -> SenCachePolicy:
    """The SenCache rule for a request with an NFE budget (`nfe`, `speedup` or `speed`, and
    `budget` = threshold or hard); BadInput when the budget cannot be met at `steps` steps."""
    curves = table.budget_curves()
    settings = _planned_settings(curves)
    param, fraction, target = budget_target(knobs, steps, _forced_count(settings, steps))
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


ONLINE_GRID_POINTS = 10
"""The eps_main at which calibration runs sencache-online to measure its curve."""
ONLINE_FRACTIONS = (0.4, 0.8)
"""The fractions of the steps its grid spans: from a quarter of SenCache's eps for the larger to
1.5 times SenCache's eps for the smaller (the learnt factor lowers a sample's score, and so its runs;
measured: about half SenCache's eps gives the same mean NFE on the tiny models)."""


def online_settings(
    curves: BudgetCurves, eps_main: float, rate: float, bound: float, prior: float
) -> SenCacheOnlineSettings:
    """sencache-online at `eps_main` with the curves' eps_ratio, max_reuse and conventions: the one
    rule calibration measures and a threshold budget runs."""
    return SenCacheOnlineSettings(
        eps_start=curves.eps_ratio * eps_main,
        eps_main=eps_main,
        max_reuse=curves.max_reuse,
        switch_frac=curves.switch_frac,
        force_last=curves.force_last,
        online_rate=rate,
        online_bound=bound,
        online_prior=prior,
    )


def online_eps_grid(curves: BudgetCurves, steps: int) -> np.ndarray:
    """The eps_main grid of sencache-online's curve at `steps` steps (`ONLINE_FRACTIONS`)."""
    grid = np.asarray(curves.eps_grid)
    low, high = (eps_for_fraction(curves, steps, f) for f in sorted(ONLINE_FRACTIONS, reverse=True))
    low = 0.25 * (low if low else grid[1])
    high = max(1.5 * high if high is not None else grid[-1], 2.0 * low)
    return np.geomspace(low, high, ONLINE_GRID_POINTS)


def measure_online_curve(
    curves: BudgetCurves, steps: int, fraction_at: Callable[[SenCacheOnlineSettings], float]
) -> OnlineCurve:
    """sencache-online's curve at `steps` steps and the budget's online knobs:
    `fraction_at(settings)` runs the rule (the engine, on the calibration samples) and returns its
    mean NFE / steps; the curve is made non-increasing in eps (a sample's runs fall with eps)."""
    defaults = SenCacheOnlineSettings(0.0, 0.0, 0)
    knobs = (defaults.online_rate, defaults.online_bound, BUDGET_PRIOR)
    grid = online_eps_grid(curves, steps)
    fractions = [fraction_at(online_settings(curves, float(eps), *knobs)) for eps in grid]
    return OnlineCurve(steps, tuple(grid.tolist()), tuple(np.minimum.accumulate(fractions).tolist()), *knobs)


def online_eps_for_fraction(curves: BudgetCurves, steps: int, fraction: float) -> float | None:
    """sencache-online's eps_main for a mean NFE / steps of `fraction` at `steps` steps: its
    measured curve inverted at the steps it was measured at, carried to other step counts in the
    ratio of SenCache's eps at the two; None where the curve does not reach `fraction`."""
    online = curves.online
    assert online is not None, "the caller checks that the curve was measured"
    measured = np.asarray(online.fractions)
    if not measured[-1] - 1e-9 <= fraction <= measured[0] + 1e-9:
        return None
    # the grid is geometric: interpolated in log eps (the C library's exp and log, as in fraction_curve)
    logs = np.array([math.log(e) if e > 0 else -math.inf for e in online.eps_grid[::-1]], dtype=np.float64)
    eps = math.exp(float(np.interp(fraction, measured[::-1], logs)))
    there, here = eps_for_fraction(curves, online.steps, fraction), eps_for_fraction(curves, steps, fraction)
    if steps == online.steps or not there or here is None:
        return eps
    return eps * here / there


def make_online_budget_policy(
    knobs: Mapping[str, object], table: SensitivityTable, steps: int, batch: int, numel: int
) -> SenCachePolicy:
    """The sencache-online rule for a request with an NFE budget: in threshold mode, the online
    rule at the eps its measured curve gives for the budget (`online_eps_for_fraction`); in hard
    mode, or where the table has no such curve, the hard mode's plan over the calibrated profile,
    each sample's score scaled by its learnt factor (`SenCacheOnlineBudget`)."""
    curves = table.budget_curves()
    planned = _planned_settings(curves)
    param, fraction, target = budget_target(knobs, steps, _forced_count(planned, steps))
    mode = str(knobs.get("budget", "threshold"))
    if mode == "threshold" and curves.online is not None:
        return _online_threshold(knobs, param, fraction, curves, table, steps, batch, numel)
    online = {"online_prior": BUDGET_PRIOR, **{k: knobs[k] for k in ONLINE_KNOBS if k in knobs}}
    settings = SenCacheOnlineSettings(**{**planned.__dict__, **online})
    return SenCacheOnlineBudget(
        settings,
        table,
        steps,
        batch,
        numel,
        target,
        step_profile(curves, steps),
        mode,
        fraction * steps,
        curves.eps_ratio,
    )


def budget_rule(tables: Sequence[SensitivityTable]) -> str:
    """The rule a named speed runs on a bundle with these tables (one per expert): sencache-plan
    where every table holds its reuse costs (on fresh draws of both trained models it met every
    request exactly and was ahead of sencache-online's budget at 6 of 17 matched NFE, behind at 1:
    benchmarks/results/online, "Fourth round");
    sencache-online, at the eps of its measured curve, where every table holds that curve;
    SenCache's own budget otherwise (bundles calibrated before either)."""
    curves = [t.budget for t in tables]
    if not curves or any(c is None for c in curves):
        return "sencache"
    if all(c is not None and c.costs is not None for c in curves):
        return "sencache-plan"
    return "sencache-online" if all(c is not None and c.online is not None for c in curves) else "sencache"


def _online_threshold(
    knobs: Mapping[str, object],
    param: str,
    fraction: float,
    curves: BudgetCurves,
    table: SensitivityTable,
    steps: int,
    batch: int,
    numel: int,
) -> SenCacheOnlinePolicy:
    """sencache-online at the eps its measured curve gives for the budget; BadInput for online knobs
    other than those the curve was measured with, or a budget outside it."""
    online = curves.online
    assert online is not None
    measured = {"online_rate": online.rate, "online_bound": online.bound, "online_prior": online.prior}
    other = {k: knobs[k] for k in ONLINE_KNOBS if k in knobs and float(knobs[k]) != measured[k]}  # type: ignore[arg-type]
    if other:
        raise BadInput(
            f"{', '.join(other)}: a threshold budget runs the online rule with the knobs its curve was measured "
            f"with ({', '.join(f'{k} {v:g}' for k, v in measured.items())}); ask for budget hard",
            param=next(iter(other)),
        )
    eps = online_eps_for_fraction(curves, steps, fraction)
    if eps is None:
        reach = f"{online.fractions[-1] * steps:.1f}-{online.fractions[0] * steps:.1f}"
        raise BadInput(
            f"{param} {knobs[param]} asks for {fraction * steps:.1f} runs of {steps} steps, outside what the online "
            f"rule's measured curve reaches (about {reach}): ask for budget hard",
            param=param,
        )
    settings = online_settings(curves, eps, online.rate, online.bound, online.prior)
    budget = {"mode": "threshold", "requested_nfe": fraction * steps}
    return SenCacheOnlinePolicy(settings, table, steps, batch, numel, budget=budget)


def run_thresholds(profile: np.ndarray, forced: np.ndarray) -> np.ndarray:
    """The hard mode's plan, once per request: entry [i, L] is the score at or above which a sample
    with L runs left (besides the forced steps) runs at the free step i; -inf where it must run.

    The plan is SenCache's on the calibrated `profile`: from a run, a sample's score is expected to
    grow by the profile of each later step until its next run, and to restart at each `forced` step.
    At step i it plans the largest threshold under which its runs from now on reach L (it runs now
    when its score meets that threshold). That holds exactly when skipping now would leave fewer than
    L runs at every threshold above its score s; skipping, it runs at the next step whose profile is
    positive (its score then passes any threshold just above s), and its L - 1 other runs need as
    many blocks of later steps, none across a forced step, each summing to more than s (the most
    runs a threshold allows are the blocks it cuts greedily). So the entry is the largest smallest
    block sum over L - 1 such blocks after that step (over L after a forced step reached first); a
    sample's score never enters the table, so one table serves every sample and step."""
    steps = len(profile)
    next_forced = np.full(steps, steps)
    for p in range(steps - 2, -1, -1):
        next_forced[p] = p + 1 if forced[p + 1] else next_forced[p + 1]
    # blocks[p, k]: the largest smallest sum of k blocks after step p, each summed from 0 step by step
    # as the score grows (inf for none, -inf where k blocks do not fit)
    blocks = np.full((steps, steps + 1), -np.inf)
    blocks[:, 0] = np.inf
    for p in range(steps - 2, -1, -1):
        end = next_forced[p]
        sums = np.cumsum(profile[p + 1 : end])
        best = np.minimum(sums[:, None], blocks[p + 1 : end, :-1]).max(axis=0, initial=-np.inf)
        blocks[p, 1:] = best if end == steps else np.maximum(best, blocks[end, 1:])
    thresholds = np.full((steps, steps + 1), -np.inf)
    for i in np.flatnonzero(~forced):
        end = next_forced[i]
        positive = np.flatnonzero(profile[i + 1 : end] > 0)
        if positive.size:
            thresholds[i, 1:] = blocks[i + 1 + positive[0], :-1]
        elif end < steps:
            thresholds[i, 1:] = blocks[end, 1:]
    return thresholds


class SenCacheHardBudget(SenCachePolicy):
    """SenCache under a hard NFE budget: every sample runs exactly `nfe` of the `num_steps` steps.

    The forced steps are reserved from the budget. At each other step, a sample runs when the
    steps left leave it no choice (its runs left equal its free steps left), never once its runs
    left are spent, and otherwise when its score (SenCache's, from its anchor) meets the threshold
    planned from the calibrated profile of the steps left for its runs left (`run_thresholds`), so
    it spends its runs where its scores are highest, knowing only the scores so far. max_reuse does
    not apply."""

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
        self.thresholds = run_thresholds(self.profile, self.forced_steps)

    def settings(self) -> dict[str, Any]:
        """The budget and the conventions; no eps or max_reuse, which the hard mode does not use."""
        kept = ("switch_frac", "force_last", "conventions")
        return {
            "method": self.name,
            **{k: v for k, v in super().settings().items() if k in kept},
            "budget": self.budget,
        }

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        batch = len(self.spent)
        forced = bool(self.forced_steps[step])
        if forced:
            run, score = np.ones(batch, bool), np.full(batch, np.nan)
        else:
            _, score = self._scores(t, drift_sumsq)
            left = self.nfe - self.spent - self.forced_after[step]
            run = (left >= self.free_from[step]) | self._capped()
            open_ = (left > 0) & ~run
            run[open_] = score[open_] >= self.thresholds[step, left[open_]]
        self.spent += run
        self._commit(step, t, run)
        return StepDecision(run, score, math.nan, forced)

    def _capped(self) -> np.ndarray:
        """Samples that run whatever their plan says (none: the hard mode never passes its budget)."""
        return np.zeros(len(self.spent), bool)


BUDGET_PRIOR = 2.0
"""The budget rule's default online_prior: a sample's learnt factor gets half its weight after two
observations (measured on the development draw: see benchmarks/results/online)."""
MIN_EPS_RATIO = 1e-6
"""The smallest eps_start / eps_main a plan weighs by (a calibrated eps_start of 0 runs every early
step, as a weight of 1e6 does)."""


class SenCacheOnlineBudget(SenCacheHardBudget):
    """sencache-online held to an NFE budget of `nfe` runs per sample.

    Each sample follows the hard mode's plan (`run_thresholds` over the calibrated profile: the
    budget goes to the steps where the table predicts the largest reuse error, so the early,
    sensitive steps get the runs the table justifies and no warm-up is set by hand), with its score
    scaled by its learnt factor (`OnlineFactor`, the engine's observations as for sencache-online).
    Mode "hard": exactly `nfe` runs. Mode "threshold": also runs a sample that has reused
    max_reuse steps in a row, so it may pass its budget (the mean NFE is reported, not promised
    exact)."""

    name = "sencache-online"

    def __init__(
        self,
        settings: SenCacheOnlineSettings,
        table: SensitivityTable,
        num_steps: int,
        batch: int,
        numel: int,
        nfe: int,
        profile: np.ndarray,
        mode: str,
        requested_nfe: float,
        eps_ratio: float = 1.0,
    ) -> None:
        switch = engine_conventions(settings.switch_frac, settings.force_last).switch_step(num_steps)
        self.weights = np.where(np.arange(num_steps) < switch, 1.0 / max(eps_ratio, MIN_EPS_RATIO), 1.0)
        """Each step's weight on its score: 1 / eps_ratio over the steps where calibrated SenCache
        compares with eps_start (eps_ratio x eps_main), so the plan weighs the early steps as the
        calibrated thresholds do; 1 after."""
        self.step_weight = 1.0
        super().__init__(settings, table, num_steps, batch, numel, nfe, np.asarray(profile) * self.weights)
        if mode not in ("threshold", "hard"):
            raise BadInput(f"budget must be threshold or hard, got {mode!r}", param="budget")
        self.mode = mode
        self.budget = {"mode": mode, "nfe": nfe, "requested_nfe": requested_nfe}
        self.online = OnlineFactor(batch, settings.online_rate, settings.online_bound, settings.online_prior)

    def settings(self) -> dict[str, Any]:
        """The budget, the conventions and the online knobs (and max_reuse where it applies)."""
        config = self.config
        kept = [*ONLINE_KNOBS, *(("max_reuse",) if self.mode == "threshold" else ())]
        return {**super().settings(), **{k: getattr(config, k) for k in kept}}

    @property
    def factor(self) -> np.ndarray:
        """Each sample's correction factor as applied."""
        return self.online.factor

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        self.online.start(step)
        self.step_weight = float(self.weights[step])
        return super().decide(step, t, drift_sumsq, modulation_change)

    def _capped(self) -> np.ndarray:
        """In threshold mode, samples that have reused max_reuse steps in a row."""
        if self.mode == "hard":
            return super()._capped()
        return self.reuses >= self.config.max_reuse

    def _corrected(self, raw: np.ndarray) -> np.ndarray:
        return self.online.corrected(raw, self.scale) * self.step_weight

    def observe(self, step: int, error_sumsq: np.ndarray) -> None:
        """As `SenCacheOnlinePolicy.observe`."""
        self.online.observe(step, np.sqrt(np.asarray(error_sumsq, dtype=np.float64)) / self.scale)


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
register_rule(
    Rule(
        "sencache-online",
        "sencache-online held to an NFE budget (the hard mode's plan, scores scaled by the learnt factor)",
        (*BUDGET_TARGETS, "budget", *ONLINE_KNOBS),
        lambda knobs, context: make_online_budget_policy(
            knobs, context.sensitivity(), context.steps, context.batch, context.numel
        ),
        ("sensitivity",),
        selected_by=BUDGET_TARGETS,
    )
)
