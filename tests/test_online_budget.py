"""sencache-online held to an NFE budget (issue 26): the hard mode's exact budget, the threshold
mode's max_reuse guard, the learnt factor's shrinkage toward the table, and the knobs that select it."""

import math
from dataclasses import replace

import numpy as np
import pytest

from budget_tables import TABLE, curves
from sencache.runtime.cache.budget import (
    SenCacheHardBudget,
    SenCacheOnlineBudget,
    budget_rule,
    make_online_budget_policy,
    measure_online_curve,
    online_eps_for_fraction,
    step_profile,
)
from sencache.runtime.cache.knobs import check_knobs
from sencache.runtime.cache.registry import rule_for
from sencache.runtime.cache.sencache import (
    OnlineFactor,
    SenCacheOnlinePolicy,
    SenCacheOnlineSettings,
    SenCacheSettings,
)
from sencache.runtime.errors import BadInput
from sencache.runtime.sensitivity import OnlineCurve, ReuseCosts, SensitivityTable

CURVES = curves()
CALIBRATED = SensitivityTable(TABLE.timesteps, TABLE.jx, TABLE.jt, budget=CURVES)


def online_budget(steps: int, batch: int, nfe: int, mode: str, max_reuse: int = 3, **online) -> SenCacheOnlineBudget:
    settings = SenCacheOnlineSettings(0.0, 0.0, max_reuse, **online)
    profile = step_profile(CURVES, steps)
    return SenCacheOnlineBudget(settings, TABLE, steps, batch, 4, nfe, profile, mode, float(nfe))


def run_trace(policy, rng: np.random.Generator, steps: int, batch: int, observe: bool) -> np.ndarray:
    """The runs [steps, batch] of `policy` on random drifts, with random observed reuse errors."""
    runs = np.zeros((steps, batch), bool)
    for i in range(steps):
        drift = rng.lognormal(-3.0, 1.5, batch) ** 2 * rng.choice([0.0, 1.0, 50.0], batch)
        runs[i] = policy.decide(i, 1000.0 * (1 - i / steps), None if i == 0 else drift).run
        if observe:
            policy.observe(i, rng.lognormal(0.0, 2.0, batch) * np.where(rng.random(batch) < 0.2, np.nan, 1.0))
    return runs


@pytest.mark.parametrize("steps", [6, 13, 30])
def test_the_hard_mode_gives_every_learning_sample_exactly_its_budget(steps):
    rng = np.random.default_rng(steps)
    for nfe in range(2, steps + 1):
        policy = online_budget(steps, 5, nfe, "hard", online_rate=0.7, online_prior=1.0)
        runs = run_trace(policy, rng, steps, 5, observe=True)
        assert runs.sum(axis=0).tolist() == [nfe] * 5, (steps, nfe)


def test_without_observations_the_plan_is_the_hard_modes():
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    steps = 20
    for nfe in (8, 10, 14):
        mine = run_trace(online_budget(steps, 4, nfe, "hard"), rng_a, steps, 4, observe=False)
        profile = step_profile(CURVES, steps)
        hard = SenCacheHardBudget(SenCacheSettings(0.0, 0.0, 3), TABLE, steps, 4, 4, nfe, profile)
        assert (mine == run_trace(hard, rng_b, steps, 4, observe=False)).all()


def longest_reuse(runs: np.ndarray) -> int:
    longest = 0
    for column in runs.T:
        gaps = np.diff(np.flatnonzero(column)) - 1
        longest = max(longest, int(gaps.max(initial=0)))
    return longest


def test_the_threshold_mode_reuses_at_most_max_reuse_in_a_row_and_runs_at_least_its_budget():
    rng = np.random.default_rng(1)
    steps, batch = 30, 6
    for nfe in (12, 15, 18, 21):
        runs = run_trace(online_budget(steps, batch, nfe, "threshold", max_reuse=2), rng, steps, batch, True)
        assert longest_reuse(runs) <= 2
        assert (runs.sum(axis=0) >= nfe).all()
        hard = run_trace(online_budget(steps, batch, nfe, "hard", max_reuse=2), rng, steps, batch, True)
        assert (hard.sum(axis=0) == nfe).all()
    # with a cap the plan never reaches, threshold and hard take the same decisions
    a, b = (
        run_trace(online_budget(20, 3, 14, m, max_reuse=20), np.random.default_rng(2), 20, 3, True)
        for m in ("threshold", "hard")
    )
    assert (a == b).all()


def test_the_learnt_factor_is_shrunk_toward_the_table_by_its_evidence():
    factor = OnlineFactor(2, rate=1.0, bound=100.0, prior=2.0)
    factor.start(1)
    factor.corrected(np.array([1.0, 1.0]), 1.0)
    factor.observe(1, np.array([4.0, np.nan]))  # one observation of 4x the prediction
    assert factor.factor == pytest.approx([math.exp(math.log(4.0) / 3.0), 1.0])
    factor.start(2)
    factor.corrected(np.array([1.0, 1.0]), 1.0)
    factor.observe(2, np.array([4.0, 0.25]))
    assert factor.factor == pytest.approx([math.exp(math.log(4.0) / 2.0), math.exp(-math.log(4.0) / 3.0)])
    assert OnlineFactor(1, 1.0, 4.0).factor.tolist() == [1.0]


def test_a_budget_selects_the_online_budget_rule_and_refuses_thresholds():
    knobs = check_knobs("sencache-online", {"speed": "fast", "budget": "hard", "online_rate": 0.3})
    assert rule_for("sencache-online", knobs).selected_by
    policy = make_online_budget_policy(knobs, CALIBRATED, 20, 2, 4)
    assert isinstance(policy, SenCacheOnlineBudget) and policy.nfe == 9
    assert policy.settings()["budget"] == {"mode": "hard", "nfe": 9, "requested_nfe": pytest.approx(9.0)}
    assert policy.settings()["online_rate"] == 0.3 and "max_reuse" not in policy.settings()
    threshold = make_online_budget_policy(check_knobs("sencache-online", {"nfe": 12}), CALIBRATED, 20, 1, 4)
    assert threshold.mode == "threshold" and threshold.settings()["max_reuse"] == 3
    with pytest.raises(BadInput, match="eps_main cannot be given with nfe"):
        check_knobs("sencache-online", {"nfe": 10, "eps_main": 0.2})
    with pytest.raises(BadInput, match=r"a budget must lie in \[2, 20\]"):
        make_online_budget_policy({"nfe": 1}, CALIBRATED, 20, 1, 4)


def test_the_servers_presets_are_budgets_at_the_named_speeds_of_the_bundles_rule():
    from sencache.serving.schema import CacheSpec

    assert CacheSpec(preset="reference").resolve("sencache-online") == ("none", {})
    for rule in ("sencache", "sencache-online", "sencache-plan"):
        for preset, speed in (("quality", "high"), ("balanced", "balanced"), ("fast", "fast")):
            method, knobs = CacheSpec(preset=preset).resolve(rule)
            assert (method, knobs) == (rule, {"speed": speed})
            assert check_knobs(method, knobs) == knobs


def test_a_bundle_runs_named_speeds_with_the_plan_or_sencache_online_only_where_every_table_has_them():
    assert budget_rule([PLANNED]) == budget_rule([PLANNED, PLANNED]) == "sencache-plan"
    assert budget_rule([PLANNED, MEASURED]) == "sencache-online"
    assert budget_rule([PLANNED, CALIBRATED]) == "sencache"
    assert budget_rule([MEASURED]) == "sencache-online"
    assert budget_rule([MEASURED, MEASURED]) == "sencache-online"
    assert budget_rule([MEASURED, CALIBRATED]) == "sencache"
    assert budget_rule([CALIBRATED]) == "sencache"
    assert budget_rule([TABLE]) == "sencache"
    assert budget_rule([]) == "sencache"


ONLINE = OnlineCurve(steps=10, eps_grid=(0.05, 0.1, 0.2), fractions=(0.9, 0.7, 0.5), rate=0.5, bound=4.0, prior=2.0)
MEASURED = SensitivityTable(TABLE.timesteps, TABLE.jx, TABLE.jt, budget=replace(CURVES, online=ONLINE))
COSTS = ReuseCosts(3, ((0.0, 1.0, 2.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0)))
PLANNED = SensitivityTable(TABLE.timesteps, TABLE.jx, TABLE.jt, budget=replace(CURVES, online=ONLINE, costs=COSTS))


def test_the_online_curve_is_inverted_and_carried_to_other_step_counts_by_sencaches_eps():
    # halfway between 0.7 at eps 0.1 and 0.5 at 0.2, in log eps
    assert online_eps_for_fraction(MEASURED.budget, 10, 0.6) == pytest.approx(math.sqrt(0.02))
    # SenCache's eps for 0.6 is 0.2 at 10 steps and 0.1 at 20: the online eps halves with it
    assert online_eps_for_fraction(MEASURED.budget, 20, 0.6) == pytest.approx(math.sqrt(0.02) / 2)
    assert online_eps_for_fraction(MEASURED.budget, 10, 0.95) is None
    assert online_eps_for_fraction(MEASURED.budget, 10, 0.45) is None


def test_a_threshold_budget_runs_the_online_rule_at_the_curves_eps():
    policy = make_online_budget_policy(check_knobs("sencache-online", {"nfe": 6}), MEASURED, 10, 2, 4)
    assert type(policy) is SenCacheOnlinePolicy
    settings = policy.settings()
    assert settings["eps_main"] == pytest.approx(math.sqrt(0.02))
    assert settings["eps_start"] == pytest.approx(0.25 * math.sqrt(0.02))
    assert (settings["max_reuse"], settings["online_prior"], settings["online_rate"]) == (3, 2.0, 0.5)
    assert settings["budget"] == {"mode": "threshold", "requested_nfe": pytest.approx(6.0)}
    same = make_online_budget_policy({"nfe": 6, "online_prior": 2.0}, MEASURED, 10, 1, 4)
    assert same.settings()["eps_main"] == pytest.approx(math.sqrt(0.02))
    with pytest.raises(BadInput, match="online_rate: a threshold budget runs the online rule with the knobs its"):
        make_online_budget_policy({"nfe": 6, "online_rate": 0.3}, MEASURED, 10, 1, 4)
    with pytest.raises(BadInput, match=r"nfe 4 asks for 4.0 runs of 10 steps, outside .* \(about 5.0-9.0\)"):
        make_online_budget_policy({"nfe": 4}, MEASURED, 10, 1, 4)
    hard = make_online_budget_policy({"nfe": 4, "budget": "hard"}, MEASURED, 10, 1, 4)
    assert isinstance(hard, SenCacheOnlineBudget)


def test_the_online_curve_is_measured_on_its_grid_with_the_budgets_knobs_and_made_monotone():
    seen = []

    def fraction_at(settings: SenCacheOnlineSettings) -> float:
        seen.append(settings)
        return [0.9, 0.8, 0.85, 0.6, 0.5, 0.55, 0.4, 0.3, 0.3, 0.2][len(seen) - 1]

    curve = measure_online_curve(CURVES, 10, fraction_at)
    # SenCache's eps for 80% of 10 steps is 0.1 (a quarter of it starts the grid), for 40% none: the grid's top
    assert curve.eps_grid == pytest.approx(tuple(np.geomspace(0.025, 0.4, 10)))
    assert curve.fractions == (0.9, 0.8, 0.8, 0.6, 0.5, 0.5, 0.4, 0.3, 0.3, 0.2)
    assert [s.eps_main for s in seen] == pytest.approx(list(curve.eps_grid))
    assert all(s.eps_start == pytest.approx(0.25 * s.eps_main) and s.max_reuse == 3 for s in seen)
    assert (curve.steps, curve.rate, curve.bound, curve.prior) == (10, 0.5, 4.0, 2.0)
    # at 20 steps SenCache's eps for 80% is 0.05 and for 40% 0.2 (its top, 1.5 times that)
    assert measure_online_curve(CURVES, 20, lambda _: 0.5).eps_grid == pytest.approx(
        tuple(np.geomspace(0.0125, 0.3, 10))
    )
    table = SensitivityTable.parse(MEASURED.to_bytes(), "t.json")
    assert table.budget == MEASURED.budget
    with pytest.raises(ValueError, match="must not grow with eps"):
        replace(ONLINE, fractions=(0.5, 0.7, 0.9))
