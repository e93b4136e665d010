"""The hard NFE budget's plan (issue 21): the table it looks up per step takes the decisions of the
per-step bisection it replaced, checked against that bisection, which the decision-overhead
benchmark keeps as the oracle it times the table against."""

import numpy as np
import pytest

from budget_tables import TABLE
from sencache.benchmarks.decision_overhead import OracleHardBudget, oracle_thresholds
from sencache.runtime.cache.budget import SenCacheHardBudget, run_thresholds
from sencache.runtime.cache.sencache import SenCacheSettings


def test_the_oracle_meets_the_runs_left_on_the_profile():
    increments, forced = np.full(8, 1.0), np.zeros(8, bool)
    tau = oracle_thresholds(np.array([0.0, 0.0]), np.array([2, 4]), increments, forced)
    # a score rising by 1 a step: at most 4 runs at steps 4 and 8, at most 2 runs at 2, 4, 6, 8
    assert tau == pytest.approx([4.0, 2.0], abs=1e-6)


def random_profile(rng: np.random.Generator, steps: int) -> np.ndarray:
    """A calibrated-looking profile: 0 at the forced first step, then smooth, rough or with zeros."""
    shape = rng.integers(3)
    if shape == 0:
        profile = np.linspace(rng.uniform(0.01, 0.2), rng.uniform(0.01, 0.2), steps)
    elif shape == 1:
        profile = rng.lognormal(-2.5, 1.0, steps)
    else:
        profile = rng.lognormal(-2.5, 1.0, steps) * (rng.random(steps) < 0.7)
    profile[0] = 0.0
    return profile


def run_both(seed: int, steps: int, batch: int, nfe: int, force_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """The runs [steps, batch] of the hard mode and of the oracle on one random trace of drifts."""
    rng = np.random.default_rng(seed)
    settings = SenCacheSettings(0.0, 0.0, 3, force_last=force_last)
    profile = random_profile(rng, steps)
    policies = [cls(settings, TABLE, steps, batch, 4, nfe, profile) for cls in (SenCacheHardBudget, OracleHardBudget)]
    runs = np.zeros((2, steps, batch), bool)
    timesteps = np.sort(rng.uniform(0.0, 1000.0, steps))[::-1]
    for i in range(steps):
        # heavy-tailed drifts, some samples far from the profile, some not moving at all
        drift = rng.lognormal(-3.0, 1.5, batch) ** 2 * rng.choice([0.0, 1.0, 50.0], batch)
        for p, policy in enumerate(policies):
            runs[p, i] = policy.decide(i, float(timesteps[i]), None if i == 0 else drift).run
    return runs[0], runs[1]


@pytest.mark.parametrize(("steps", "seeds"), [(3, 12), (6, 12), (10, 12), (23, 4)])
def test_the_table_takes_the_oracles_decisions_at_every_budget(steps, seeds):
    for seed in range(seeds):
        for nfe in range(1 + (seed % 2 == 0), steps + 1):
            batch = 1 + seed % 4
            mine, oracle = run_both(1000 * steps + 100 * seed + nfe, steps, batch, nfe, force_last=seed % 2 == 0)
            assert (mine == oracle).all(), (steps, seed, nfe)
            assert mine.sum(axis=0).tolist() == [nfe] * batch


def test_the_table_takes_the_oracles_decisions_on_long_runs():
    for seed in range(4):
        for nfe in (12, 25, 37):
            mine, oracle = run_both(seed, 50, 1 + seed % 4, nfe, force_last=seed % 2 == 0)
            assert (mine == oracle).all(), (seed, nfe)


def test_the_tables_entries_are_the_best_blocks_of_the_profile():
    # a score rising by 1 a step over 8 steps after step 0: a sample that skips step 0 runs at step 1,
    # and its other L - 1 runs need L - 1 blocks of the steps 2..8, each above its score
    thresholds = run_thresholds(np.ones(9), np.zeros(9, bool))
    assert thresholds[0, 1:5].tolist() == [np.inf, 7.0, 3.0, 2.0]  # 7 steps; 3 + 3 (+1); 2 + 2 + 2 (+1)
    assert thresholds[7, 1:4].tolist() == [np.inf, -np.inf, -np.inf]  # one step left: a second run must be now
    forced = np.zeros(9, bool)
    forced[[0, 5]] = True
    blocked = run_thresholds(np.ones(9), forced)  # step 5 always runs and restarts the score
    assert blocked[1, 1:5].tolist() == [np.inf, 3.0, 2.0, 1.0]  # blocks within 3..4 (2) and 6..8 (3)
    assert blocked[4, 1:4].tolist() == [3.0, 1.0, 1.0]  # skipping at 4, all its runs are after step 5


def test_a_score_at_the_threshold_runs_and_one_just_below_skips():
    settings = SenCacheSettings(0.0, 0.0, 3, force_last=False)
    for drift, runs in ((2.25, True), (np.nextafter(2.25, 0.0), False)):
        policy = SenCacheHardBudget(settings, TABLE, 9, 1, 1, 4, np.ones(9))
        policy.decide(0, 500.0)
        # score Jx(500) * sqrt(2.25) = 3 at step 1 with 3 runs left: 3 is the best of two blocks of steps 3..8
        assert policy.thresholds[1, 3] == 3.0
        assert policy.decide(1, 500.0, np.array([drift])).run.tolist() == [runs]


def test_the_oracle_differs_only_where_it_rounds():
    # the table holds the plan's exact decision; the oracle's differs in two bands, where it runs a
    # sample that the table (and the plan in exact arithmetic) skips:
    # 1. its bisection stops up to (score + profile left + 1) * 2**-40 below the planned threshold
    profile, forced = np.full(9, 0.1), np.zeros(9, bool)
    exact = run_thresholds(profile, forced)[0, 3]  # two blocks of steps 2..8: 0.1 * 3 and 0.1 * 4
    below = np.nextafter(exact, 0.0)
    band = (exact + profile[1:].sum() + 1.0) * 2.0**-40
    for score, oracle_runs in ((below, True), (exact - band, False), (exact, True)):
        tau = oracle_thresholds(np.array([score]), np.array([3]), profile[1:], forced[1:])[0]
        assert (score >= tau, score >= exact) == (oracle_runs, score == exact)
    # 2. a score over 2**53 times the next steps' profile does not grow by it in floating point
    profile, forced = np.array([0.0, 1e-20, 1.0, 1.0]), np.zeros(4, bool)
    assert run_thresholds(profile, forced)[0, 2] == 2.0  # skipping, it would run at step 1, then after
    tau = oracle_thresholds(np.array([1.0]), np.array([2]), profile[1:], forced[1:])[0]
    assert tau <= 1.0  # the oracle sees 1 + 1e-20 == 1, so no run at step 1: only one run left if it skips
