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
from sencache.runtime.cache.plan import cheapest_shares, costs_at, least_costs, make_plan_policy, plan_schedule
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


def test_the_first_step_must_be_forced():
    with pytest.raises(ValueError, match="first step"):
        plan_schedule(np.zeros((3, 3)), 2, np.array([False, False, True]), 3)


def measured(steps: int = 6) -> ReuseCosts:
    a, i = np.meshgrid(np.arange(steps), np.arange(steps), indexing="ij")
    cost = np.where(i > a, (i - a) * (1.0 + 0.1 * i), 0.0)
    return ReuseCosts(steps, tuple(tuple(row) for row in cost.tolist()))


def test_the_costs_are_read_at_the_same_fractions_of_another_step_count():
    costs = measured()
    assert np.array_equal(costs_at(costs, 6), np.asarray(costs.cost))
    for steps in (3, 11):
        at = costs_at(costs, steps)
        assert at.shape == (steps, steps) and np.all(np.tril(at) == 0)
        assert at[0, -1] == pytest.approx(costs.cost[0][-1])  # the corners are measured points


def test_corrupt_reuse_costs_are_refused_and_tables_without_them_say_recalibrate():
    for broken in (
        {"steps": 6, "cost": [[0.0] * 6] * 5},
        {"steps": 2, "cost": [[0.0, -1.0], [0.0, 0.0]]},
        {"steps": 2, "cost": [[0.0, 1.0], [2.0, 0.0]]},
        {"steps": 2, "cost": [[0.0, "x"], [0.0, 0.0]]},
    ):
        with pytest.raises(ValueError):
            ReuseCosts.from_dict(broken)
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


def test_calibration_records_the_costs_and_every_sample_runs_the_plan(calibrated_bundle):
    engine = engine_for(calibrated_bundle)
    table = engine.bundle.sensitivity()
    costs = table.budget_curves().costs
    assert costs is not None and costs.steps == 8
    cost = np.asarray(costs.cost)
    assert np.all(cost[np.triu_indices(8, k=1)] > 0) and np.all(np.tril(cost) == 0)
    assert table.meta["online_curve_samples"] == 2  # the calibration's samples (curve_samples not given)
    prompts = ["two small red circles static on black", "one large blue square moving left slow on texture"]
    request = GenerationParams(prompts, [3, 4], 12, 4.0)
    policy = engine.policy("sencache-plan", 12, 2, {"nfe": 6})
    schedule = np.array([c == "R" for c in policy.settings()["schedule"]])
    assert schedule.sum() == 6 and schedule[0] and schedule[-1]
    result = engine.generate(request, policy)
    assert result.nfe == [6, 6]
    alone = engine.generate(
        GenerationParams(prompts[:1], [3], 12, 4.0), engine.policy("sencache-plan", 12, 1, {"nfe": 6})
    )
    np.testing.assert_allclose(alone.latents[0], result.latents[0], atol=1e-5)
