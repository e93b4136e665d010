"""sencache-plan (issue 26): the cheapest schedule of a budget's runs over the calibrated reuse
costs, the costs' format, and the rule in the engine on a calibrated bundle."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from budget_tables import TABLE, curves
from conftest import engine_for
from sencache.runtime.cache.plan import (
    ObservingPlanPolicy,
    SenCachePlanPolicy,
    cheapest_shares,
    costs_at,
    drift_scale,
    later_costs,
    least_costs,
    make_plan_policy,
    plan_schedule,
    runs_now,
    scores_at,
)
from sencache.runtime.errors import BadInput
from sencache.runtime.request import GenerationParams
from sencache.runtime.sensitivity import ReuseCosts, SensitivityTable


def schedule_cost(cost: np.ndarray, runs: np.ndarray) -> float:
    anchor, total = 0, 0.0
    for i, run in enumerate(runs):
        if run:
            anchor = i
        else:
            total += cost[anchor, i]
    return total


def longest_reuse(runs: np.ndarray) -> int:
    longest = gap = 0
    for run in runs:
        gap = 0 if run else gap + 1
        longest = max(longest, gap)
    return longest


def test_the_plan_is_the_cheapest_schedule_of_its_runs_with_forced_steps_and_max_reuse():
    rng = np.random.default_rng(3)
    for _ in range(300):
        steps, cap = int(rng.integers(2, 9)), int(rng.integers(0, 4))
        runs = int(rng.integers(1, steps + 1))
        cost = np.triu(rng.random((steps, steps)), k=1)
        forced = np.zeros(steps, bool)
        forced[0], forced[-1] = True, bool(rng.random() < 0.5)
        best = None
        for chosen in itertools.combinations(range(steps), runs):
            flags = np.zeros(steps, bool)
            flags[list(chosen)] = True
            if flags[forced].all() and longest_reuse(flags) <= cap:
                total = schedule_cost(cost, flags)
                best = total if best is None else min(best, total)
        plan = plan_schedule(cost, runs, forced, cap)
        if best is None:
            assert plan is None
        else:
            assert plan is not None and int(plan.sum()) == runs and plan[forced].all()
            assert longest_reuse(plan) <= cap
            assert schedule_cost(cost, plan) == pytest.approx(best, abs=1e-12)


def test_the_least_costs_are_those_of_the_plan_at_every_number_of_runs():
    rng = np.random.default_rng(4)
    for _ in range(100):
        steps, cap = int(rng.integers(2, 12)), int(rng.integers(0, 5))
        cost = np.triu(rng.random((steps, steps)), k=1)
        forced = np.zeros(steps, bool)
        forced[0], forced[-1] = True, bool(rng.random() < 0.5)
        least = least_costs(cost, forced, cap)
        assert least.shape == (steps + 1,) and least[0] == np.inf
        for runs in range(1, steps + 1):
            plan = plan_schedule(cost, runs, forced, cap)
            expected = np.inf if plan is None else schedule_cost(cost, plan)
            assert least[runs] == pytest.approx(expected, abs=1e-12)


def test_the_shares_of_a_budget_over_experts_are_the_cheapest_split():
    rng = np.random.default_rng(5)
    for _ in range(200):
        parts = [rng.random(int(rng.integers(2, 7))) for _ in range(int(rng.integers(1, 4)))]
        for costs in parts:
            costs[: int(rng.integers(1, 3))] = np.inf  # too few runs for a part's forced steps
        runs = int(rng.integers(0, sum(len(c) for c in parts)))
        best = None
        for split in itertools.product(*(range(len(c)) for c in parts)):
            total = sum(c[k] for c, k in zip(parts, split, strict=True))
            if sum(split) == runs and np.isfinite(total) and (best is None or total < best[0]):
                best = (total, list(split))
        shares = cheapest_shares(parts, runs)
        if best is None:
            assert shares is None
        else:
            assert shares is not None and sum(shares) == runs
            assert sum(c[k] for c, k in zip(parts, shares, strict=True)) == pytest.approx(best[0], abs=1e-12)


def random_problem(rng: np.random.Generator, most: int) -> tuple[np.ndarray, np.ndarray, int]:
    steps, cap = int(rng.integers(2, most)), int(rng.integers(0, 4))
    cost = np.triu(rng.random((steps, steps)), k=1)
    forced = np.zeros(steps, bool)
    forced[0], forced[-1] = True, bool(rng.random() < 0.5)
    return cost, forced, cap


def completions(steps: int, start: int, left: int, forced: np.ndarray) -> list[np.ndarray]:
    """Every run flags of the steps start .. steps - 1 with exactly `left` runs, forced ones run."""
    out = []
    for chosen in itertools.combinations(range(start, steps), left):
        flags = np.zeros(steps - start, bool)
        flags[[c - start for c in chosen]] = True
        if flags[forced[start:]].all():
            out.append(flags)
    return out


def completion_cost(cost: np.ndarray, anchor: int, start: int, flags: np.ndarray, cap: int, scale: float) -> float:
    """The cost of reusing from `anchor` up to the first run in `flags` (steps from `start`), scaled,
    then the costs as measured; inf past max_reuse."""
    total, current, gap = 0.0, anchor, start - anchor - 1
    for offset, run in enumerate(flags):
        i = start + offset
        if run:
            current, gap = i, 0
            continue
        gap += 1
        if gap > cap:
            return np.inf
        total += (scale if current == anchor else 1.0) * cost[current, i]
    return total


def test_the_later_costs_are_the_cheapest_suffixes_after_a_run():
    rng = np.random.default_rng(6)
    for _ in range(150):
        cost, forced, cap = random_problem(rng, 9)
        steps = len(cost)
        runs = int(rng.integers(0, steps))
        later = later_costs(cost, runs, forced, cap)
        assert later.shape == (steps, runs + 1)
        for m in range(steps):
            for r in range(runs + 1):
                tails = [completion_cost(cost, m, m + 1, f, cap, 1.0) for f in completions(steps, m + 1, r, forced)]
                assert later[m, r] == pytest.approx(min(tails, default=np.inf), abs=1e-12)


def test_a_sample_runs_now_where_the_cheapest_completion_of_its_runs_does():
    """Each decision against every completion of the sample's runs, its anchor's costs scaled."""
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(300):
        cost, forced, cap = random_problem(rng, 9)
        steps = len(cost)
        runs = int(rng.integers(1, steps + 1))
        if plan_schedule(cost, runs, forced, cap) is None:
            continue
        later = later_costs(cost, runs, forced, cap)
        anchor, left, flags = 0, runs - 1, [True]
        for step in range(1, steps):
            if forced[step]:
                run = True
            else:
                scale = float(np.exp(rng.normal(0.0, 2.0)))
                run = runs_now(cost[anchor], later, forced, step, anchor, left, cap, scale)
                options = [
                    (completion_cost(cost, anchor, step, f, cap, scale), bool(f[0]))
                    for f in completions(steps, step, left, forced)
                ]
                cheapest = min(c for c, _ in options)
                assert np.isfinite(cheapest)
                cheapest_now = min((c for c, now in options if now), default=np.inf)
                assert run == (cheapest_now <= cheapest + 1e-12), (step, anchor, left, scale)
                checked += 1
            flags.append(run)
            left -= run
            anchor = step if run else anchor
        assert sum(flags) == runs and np.asarray(flags)[forced].all() and longest_reuse(np.asarray(flags)) <= cap
    assert checked > 300


def test_a_sample_that_drifts_as_the_calibration_did_follows_the_plan():
    rng = np.random.default_rng(8)
    for _ in range(200):
        cost, forced, cap = random_problem(rng, 16)
        steps = len(cost)
        runs = int(rng.integers(1, steps + 1))
        plan = plan_schedule(cost, runs, forced, cap)
        if plan is None:
            continue
        later = later_costs(cost, runs, forced, cap)
        anchor, left, flags = 0, runs - 1, np.zeros(steps, bool)
        flags[0] = True
        for step in range(1, steps):
            flags[step] = forced[step] or runs_now(cost[anchor], later, forced, step, anchor, left, cap, 1.0)
            left -= flags[step]
            anchor = step if flags[step] else anchor
        assert schedule_cost(cost, flags) == pytest.approx(schedule_cost(cost, plan), abs=1e-12)


def test_the_drift_scale_is_the_squared_score_ratio_squared():
    assert drift_scale(3.0, 4.0) == (9.0 / 4.0) ** 2
    assert drift_scale(1e200, 1.0) == 1.0  # overflows: the calibration's plan
    assert drift_scale(0.0, 4.0) == 0.0
    for score, mean in ((np.nan, 1.0), (1.0, 0.0), (np.inf, 1.0), (1.0, np.nan)):
        assert drift_scale(score, mean) == 1.0  # the calibration's plan


def test_the_first_step_must_be_forced():
    with pytest.raises(ValueError, match="first step"):
        plan_schedule(np.zeros((3, 3)), 2, np.array([False, False, True]), 3)


def measured(steps: int = 6) -> ReuseCosts:
    a, i = np.meshgrid(np.arange(steps), np.arange(steps), indexing="ij")
    cost = np.where(i > a, (i - a) * (1.0 + 0.1 * i), 0.0)
    return ReuseCosts(steps, tuple(tuple(row) for row in cost.tolist()))


def test_the_costs_are_read_at_the_same_fractions_of_another_step_count():
    costs = measured()
    scored = dataclasses.replace(costs, score_sq=tuple(tuple(2.0 * v for v in row) for row in costs.cost))
    assert np.array_equal(costs_at(costs, 6), np.asarray(costs.cost)) and scores_at(costs, 6) is None
    for steps in (3, 11):
        at = costs_at(costs, steps)
        assert at.shape == (steps, steps) and np.all(np.tril(at) == 0)
        assert at[0, -1] == pytest.approx(costs.cost[0][-1])  # the corners are measured points
        np.testing.assert_array_equal(scores_at(scored, steps), 2.0 * at)  # read alike


def test_corrupt_reuse_costs_are_refused_and_tables_without_them_say_recalibrate():
    ok = [[0.0, 1.0], [0.0, 0.0]]
    for broken, needle in (
        ({"steps": 6, "cost": [[0.0] * 6] * 5}, "reuse costs must be a 6 x 6"),
        ({"steps": 2, "cost": [[0.0, -1.0], [0.0, 0.0]]}, "reuse costs must be finite"),
        ({"steps": 2, "cost": [[0.0, 1.0], [2.0, 0.0]]}, "reuse costs must be finite"),
        ({"steps": 2, "cost": [[0.0, "x"], [0.0, 0.0]]}, "lists of numbers"),
        ({"steps": 2, "cost": ok, "score_sq": [[0.0, 1.0]]}, "mean squared scores must be a 2 x 2"),
        ({"steps": 2, "cost": ok, "score_sq": [[0.0, np.inf], [0.0, 0.0]]}, "mean squared scores must be finite"),
        ({"steps": 2, "cost": ok, "error_sq": [[1.0]]}, "observed reuse errors must be a 2 x depth"),
        ({"steps": 2, "cost": ok, "error_sq": [[1.0], [np.nan]]}, "observed reuse errors must be finite"),
    ):
        with pytest.raises(ValueError, match=needle):
            ReuseCosts.from_dict(broken)
    assert ReuseCosts.from_dict({"steps": 2, "cost": ok}).score_sq is None  # calibrated before them
    table = SensitivityTable(
        TABLE.timesteps, TABLE.jx, TABLE.jt, budget=dataclasses.replace(curves(), costs=measured())
    )
    again = SensitivityTable.parse(table.to_bytes(), "t.json")
    assert again.budget == table.budget
    document = json.loads(table.to_bytes())
    document["budget"]["costs"]["cost"][1][0] = 1.0
    with pytest.raises(BadInput, match=r"corrupt NFE-budget curves in t.json .*recalibrate"):
        SensitivityTable.parse(json.dumps(document).encode(), "t.json")
    without = SensitivityTable(TABLE.timesteps, TABLE.jx, TABLE.jt, budget=curves())
    with pytest.raises(BadInput, match="no reuse costs.*recalibrate"):
        make_plan_policy({"nfe": 5}, without, 10, 1)


def test_a_budget_the_plan_cannot_meet_under_max_reuse_is_refused():
    table = SensitivityTable(
        TABLE.timesteps, TABLE.jx, TABLE.jt, budget=dataclasses.replace(curves(), costs=measured())
    )
    max_reuse = table.budget_curves().max_reuse
    with pytest.raises(BadInput, match=f"reusing at most {max_reuse} steps in a row"):
        make_plan_policy({"nfe": 2}, table, 20, 1)
    with pytest.raises(BadInput, match="budget needs an NFE budget"):
        make_plan_policy({}, table, 20, 1)


def test_calibration_records_the_costs_and_every_sample_runs_its_budget(calibrated_bundle):
    engine = engine_for(calibrated_bundle)
    table = engine.bundle.sensitivity()
    costs = table.budget_curves().costs
    assert costs is not None and costs.steps == 8 and costs.score_sq is not None
    for matrix in (np.asarray(costs.cost), np.asarray(costs.score_sq)):
        assert np.all(matrix[np.triu_indices(8, k=1)] > 0) and np.all(np.tril(matrix) == 0)
    assert table.meta["online_curve_samples"] == 2  # the calibration's samples (curve_samples not given)
    prompts = ["two small red circles static on black", "one large blue square moving left slow on texture"]
    request = GenerationParams(prompts, [3, 4], 12, 4.0)
    policy = engine.policy("sencache-plan", 12, 2, {"nfe": 6})
    settings = policy.settings()
    assert settings["per_sample"] == "drift" and policy.needs_drift and policy.deterministic_drift
    schedule = np.array([c == "R" for c in settings["schedule"]])
    assert schedule.sum() == 6 and schedule[0] and schedule[-1]
    result = engine.generate(request, policy)
    assert result.nfe == [6, 6]
    assert all(d[0] == d[-1] == "run" for d in result.decisions)
    scales = [[s["score"] for s in trace if not s["forced"]] for trace in result.trace]
    assert all(scale is not None and scale > 0 for row in scales for scale in row) and scales[0] != scales[1]
    alone = engine.generate(
        GenerationParams(prompts[:1], [3], 12, 4.0), engine.policy("sencache-plan", 12, 1, {"nfe": 6})
    )
    np.testing.assert_allclose(alone.latents[0], result.latents[0], atol=1e-5)


def observed_table(steps: int, rng: np.random.Generator) -> SensitivityTable:
    """A table whose costs have random mean squared scores and mean observed errors (depth 4)."""
    costs = measured(steps)
    scores = np.triu(rng.exponential(1.0, (steps, steps)), k=1)
    errors = rng.exponential(1.0, (steps, 4))
    errors[-1] = 0.0  # the last step is never observed
    costs = dataclasses.replace(
        costs,
        score_sq=tuple(tuple(row) for row in scores.tolist()),
        error_sq=tuple(tuple(row) for row in errors.tolist()),
    )
    return SensitivityTable(TABLE.timesteps, TABLE.jx, TABLE.jt, budget=dataclasses.replace(curves(), costs=costs))


def drive(policy, steps: int, rng: np.random.Generator, ratio: np.ndarray, numel: int) -> np.ndarray:
    """Run flags [steps, batch] of `policy` on random drifts; an observing one sees, at each run,
    `ratio` (per sample) times the calibration's mean error of its anchor and reuses."""
    errors = np.asarray(policy.live.table.budget_curves().costs.error_sq)
    anchor, flags = np.zeros(policy.batch, dtype=np.int64), []
    for step in range(steps):
        decision = policy.decide(step, float(steps - step), rng.exponential(1.0, policy.batch))
        if isinstance(policy, ObservingPlanPolicy) and step > 0:
            d = step - anchor
            mean = np.array(
                [errors[a, k - 1] if k <= errors.shape[1] else np.nan for a, k in zip(anchor, d, strict=True)]
            )
            policy.observe(step, np.where(decision.run, ratio * mean * numel, np.nan))
        anchor = np.where(decision.run, step, anchor)
        flags.append(decision.run)
    return np.array(flags)


def test_a_sample_that_observes_the_calibration_errors_re_plans_from_its_drift_alone():
    rng = np.random.default_rng(11)
    for _ in range(40):
        steps, batch, numel = int(rng.integers(6, 20)), int(rng.integers(1, 4)), int(rng.integers(1, 50))
        table = observed_table(steps, rng)
        runs = int(rng.integers(steps // 2, steps))
        observing = make_plan_policy({"nfe": runs}, table, steps, batch, numel)
        assert isinstance(observing, ObservingPlanPolicy)
        assert observing.settings()["per_sample"] == "drift and observed reuse errors"
        drift_only = SenCachePlanPolicy(
            observing.schedule,
            observing.forced,
            batch,
            observing.budget,
            observing.max_reuse,
            dataclasses.replace(observing.live, error_sq=None),
        )
        seed = int(rng.integers(1 << 30))
        ones = np.ones(batch)
        same = drive(observing, steps, np.random.default_rng(seed), ones, numel)
        np.testing.assert_array_equal(same, drive(drift_only, steps, np.random.default_rng(seed), ones, numel))
        np.testing.assert_allclose(observing.online.factor, 1.0, rtol=1e-12)


def test_a_sample_whose_reuses_cost_more_than_the_calibration_s_runs_sooner():
    rng = np.random.default_rng(12)
    sooner = later = 0
    for _ in range(60):
        steps = int(rng.integers(12, 24))
        table = observed_table(steps, rng)
        policy = make_plan_policy({"nfe": steps // 2}, table, steps, 2, 10)
        flags = drive(policy, steps, np.random.default_rng(0), np.array([4.0, 0.25]), 10)
        assert np.all(flags.sum(axis=0) == steps // 2)  # each sample runs exactly the budget
        when = [np.flatnonzero(flags[:, b]).mean() for b in range(2)]  # where its runs lie
        sooner += when[0] < when[1]
        later += when[0] > when[1]
    assert policy.online.factor[0] > 1.0 > policy.online.factor[1]
    assert sooner > 3 * later


class Recording(SenCachePlanPolicy):
    """Every step run, the reuse errors the engine observes kept per step."""

    def __init__(self, steps: int, batch: int) -> None:
        super().__init__(np.ones(steps, bool), np.arange(steps) == 0, batch, {}, 1)
        self.errors: dict[int, np.ndarray] = {}

    def observe(self, step: int, error_sumsq: np.ndarray) -> None:
        self.errors[step] = np.asarray(error_sumsq, dtype=np.float64)


def test_calibration_records_the_mean_reuse_errors_a_run_observes(calibrated_bundle):
    engine = engine_for(calibrated_bundle)
    table = engine.bundle.sensitivity()
    costs = table.budget_curves().costs
    errors = np.asarray(costs.error_sq)
    depth = table.budget_curves().max_reuse + 1
    assert errors.shape == (8, depth)
    for a in range(8):
        for d in range(1, depth + 1):
            # measured where the observed run is followed by a pass (not the last step) within the run
            assert (errors[a, d - 1] > 0) == (a + d <= 6), (a, d)
    # along an uncached run every step's anchor is the step before: the first column, independently
    meta = table.meta
    recording = Recording(8, len(meta["prompts"]))
    engine.generate(GenerationParams(meta["prompts"], meta["seeds"], 8, meta["guidance"]), recording)
    assert sorted(recording.errors) == list(range(1, 7))
    for i, observed in recording.errors.items():
        assert errors[i - 1, 0] == pytest.approx(np.mean(observed) / engine.numel, rel=1e-4)
    observing = engine.policy("sencache-plan", 8, 2, {"nfe": 5})
    assert isinstance(observing, ObservingPlanPolicy) and observing.scale == np.sqrt(engine.numel)
    assert observing.settings()["per_sample"] == "drift and observed reuse errors"
    request = GenerationParams(meta["prompts"], meta["seeds"], 8, meta["guidance"])
    result = engine.generate(request, observing)
    assert result.nfe == [5, 5] and np.all(observing.online.observations > 0)  # the engine fed it errors
    assert np.all(observing.factor != 1.0)
    alone = engine.policy("sencache-plan", 8, 1, {"nfe": 5})
    first = engine.generate(GenerationParams(meta["prompts"][:1], meta["seeds"][:1], 8, meta["guidance"]), alone)
    np.testing.assert_allclose(first.latents[0], result.latents[0], atol=1e-5)
    assert alone.factor[0] == pytest.approx(observing.factor[0], rel=1e-5)
    assert type(engine.policy("sencache-plan", 12, 1, {"nfe": 6})) is SenCachePlanPolicy  # other steps: drift alone
