"""The SenCache rule, step by step, against hand-computed values (SPEC sections 1 and 3)."""

import math

import numpy as np
import pytest

from budget_tables import TABLE
from sencache.runtime.cache import KNOBS, METHODS, Knob, NoCache, make_policy
from sencache.runtime.cache.baselines import FixedPolicy, FixedSettings
from sencache.runtime.cache.knobs import register_knob
from sencache.runtime.cache.registry import RULES, Rule, register_rule
from sencache.runtime.cache.sencache import SenCachePolicy, SenCacheSettings
from sencache.runtime.errors import BadInput
from sencache.runtime.sensitivity import SensitivityTable


def policy(eps_start=0.1, eps_main=1.0, max_reuse=3, steps=10, batch=1, numel=4, **kw):
    return SenCachePolicy(SenCacheSettings(eps_start, eps_main, max_reuse, **kw), TABLE, steps, batch, numel)


def test_first_and_last_steps_are_forced():
    p = policy(eps_start=1e9, eps_main=1e9, max_reuse=100, steps=5)
    runs = [bool(p.decide(i, 1000.0 - i, np.zeros(1)).run[0]) for i in range(5)]
    assert runs == [True, False, False, False, True]


def test_last_step_not_forced_when_disabled():
    p = policy(eps_start=1e9, eps_main=1e9, max_reuse=100, steps=3, force_last=False)
    assert [bool(p.decide(i, 900.0, np.zeros(1)).run[0]) for i in range(3)] == [True, False, False]


def test_score_is_first_order_bound_in_rms_form():
    p = policy(eps_start=10.0, eps_main=10.0, numel=4)
    p.decide(0, 500.0, None)  # anchor at t=500: Jx=2, Jt=0.02
    d = p.decide(1, 400.0, np.array([9.0]))  # ||dx|| = 3
    expected = (2.0 * 3.0 + 0.02 * 100.0) / math.sqrt(4)
    assert d.score[0] == pytest.approx(expected)
    assert not d.run[0]


def test_threshold_switches_at_round_switch_frac_times_steps():
    p = policy(eps_start=0.1, eps_main=1.0, steps=10)
    assert [p.threshold(i) for i in (0, 1, 2)] == [0.1, 0.1, 1.0]  # round(0.2 * 10) = 2
    p = policy(steps=7)
    assert p.switch_step == 1  # round(1.4)
    assert p.threshold(0) == 0.1 and p.threshold(1) == 1.0


def test_drift_is_measured_from_the_anchor_not_summed():
    p = policy(eps_start=0.0, eps_main=0.5, max_reuse=10, steps=20, numel=1)
    p.decide(0, 500.0, None)
    assert not p.decide(5, 500.0, np.array([0.2**2])).run[0]  # score 2 * 0.2 = 0.4
    d = p.decide(6, 500.0, np.array([0.45**2]))  # total drift from anchor: 0.9 -> run
    assert d.run[0] and d.score[0] == pytest.approx(0.9)


def test_max_reuse_limits_consecutive_reuses():
    p = policy(eps_start=1e9, eps_main=1e9, max_reuse=2, steps=10)
    runs = [bool(p.decide(i, 500.0, np.zeros(1)).run[0]) for i in range(8)]
    assert runs == [True, False, False, True, False, False, True, False]


@pytest.mark.parametrize("settings", [dict(eps_start=0.0, eps_main=0.0), dict(max_reuse=0)])
def test_zero_eps_or_zero_max_reuse_always_runs(settings):
    p = policy(**{"eps_start": 5.0, "eps_main": 5.0, "max_reuse": 3, **settings})
    assert all(p.decide(i, 500.0, np.zeros(1)).run[0] for i in range(10))


def test_anchor_sensitivities_are_interpolated_at_the_run_timestep():
    p = policy(eps_start=100.0, eps_main=100.0, numel=1)
    p.decide(0, 750.0, None)
    assert p.jx[0] == pytest.approx(3.0) and p.jt[0] == pytest.approx(0.025)
    assert p.anchor_t[0] == 750.0


def test_samples_decide_independently_of_their_batch():
    rng = np.random.default_rng(0)
    drifts = rng.uniform(0, 0.05, size=(10, 3))
    ts = np.linspace(1000, 950, 10)
    batched = policy(eps_start=0.3, eps_main=0.6, batch=3, numel=1)
    together = np.stack([batched.decide(i, ts[i], drifts[i]).run for i in range(10)])
    for b in range(3):
        alone = policy(eps_start=0.3, eps_main=0.6, batch=1, numel=1)
        runs = [alone.decide(i, ts[i], drifts[i, b : b + 1]).run[0] for i in range(10)]
        np.testing.assert_array_equal(together[:, b], runs)
    assert not (together == together[:, :1]).all(), "the drifts should make samples decide differently"


def test_lookups_outside_the_table_are_recorded():
    table = SensitivityTable(np.array([100.0, 900.0]), np.array([1.0, 1.0]), np.array([0.0, 0.0]))
    p = SenCachePolicy(SenCacheSettings(0.0, 0.0, 1), table, 4, 1, 1)
    p.decide(0, 999.0, None)
    p.decide(1, 500.0, np.zeros(1))
    assert p.outside_table == [999.0]


def test_bad_settings_are_rejected():
    with pytest.raises(BadInput):
        SenCacheSettings(-1.0, 1.0, 3)
    with pytest.raises(BadInput):
        SenCacheSettings(0.1, float("nan"), 3)
    with pytest.raises(BadInput):
        SenCacheSettings(0.1, 1.0, -1)


def test_no_cache_runs_everything():
    d = NoCache(3).decide(4, 10.0, None)
    assert d.run.all() and d.forced


def test_sencache_max_uses_the_larger_sensitivity_of_anchor_and_now():
    from sencache.runtime.cache.sencache import SenCacheMaxPolicy

    settings = SenCacheSettings(1e9, 1e9, 5)
    plain = SenCachePolicy(settings, TABLE, 10, 1, 1)
    wider = SenCacheMaxPolicy(settings, TABLE, 10, 1, 1)
    for p in (plain, wider):
        p.decide(0, 500.0, None)  # anchor: Jx 2, Jt 0.02
    up = [p.decide(1, 1000.0, np.array([1.0])).score[0] for p in (plain, wider)]
    assert up[0] == pytest.approx(2.0 + 0.02 * 500) and up[1] == pytest.approx(4.0 + 0.03 * 500)
    assert wider.decide(2, 0.0, np.array([1.0])).score[0] == pytest.approx(2.0 + 0.02 * 500)


def online(eps=5.0, max_reuse=3, steps=10, batch=2, numel=4, rate=1.0, bound=4.0):
    from sencache.runtime.cache.sencache import SenCacheOnlinePolicy, SenCacheOnlineSettings

    settings = SenCacheOnlineSettings(eps, eps, max_reuse, online_rate=rate, online_bound=bound)
    return SenCacheOnlinePolicy(settings, TABLE, steps, batch, numel)


def error_sumsq(rms: np.ndarray, numel: int = 4) -> np.ndarray:
    """The squared L2 norm whose RMS-form error (over sqrt(numel), as the score) is `rms`."""
    return (np.asarray(rms, float) * math.sqrt(numel)) ** 2


def test_online_without_observations_decides_as_sencache():
    rng = np.random.default_rng(3)
    plain, learning = policy(eps_start=0.5, eps_main=3.0, batch=3, steps=12), online(batch=3, steps=12)
    plain.config = learning.config  # same eps, max_reuse and switch
    for i in range(12):
        drift = rng.uniform(0.0, 8.0, 3)
        a, b = plain.decide(i, 1000.0 - 80 * i, drift), learning.decide(i, 1000.0 - 80 * i, drift)
        assert np.array_equal(a.run, b.run)
        np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(learning.factor, np.ones(3))


def test_a_sample_costlier_than_predicted_runs_more_and_a_cheaper_one_reuses_more():
    p, plain = online(rate=1.0), online(rate=1.0)
    for q in (p, plain):
        q.decide(0, 500.0, None)  # anchor t=500: Jx 2, Jt 0.02
        d = q.decide(1, 400.0, np.array([81.0, 81.0]))  # raw 2*9 + 0.02*100 = 20: S_table 10 > eps 5
        assert d.run.all()
    np.testing.assert_allclose(p.online.predicted, [10.0, 10.0])
    p.observe(1, error_sumsq([20.0, 5.0]))  # observed 2x and 0.5x the prediction
    np.testing.assert_allclose(p.factor, [2.0, 0.5])
    np.testing.assert_array_equal(p.online.observations, [1, 1])
    # anchor t=400: Jx 1.8, Jt 0.018; a drift giving S_table = 4 < eps 5
    drift = ((8.0 - 0.018 * 100) / 1.8) ** 2
    learnt, table = (q.decide(2, 300.0, np.array([drift, drift])) for q in (p, plain))
    np.testing.assert_allclose(table.score, [4.0, 4.0])
    np.testing.assert_allclose(learnt.score, [8.0, 2.0])
    assert list(table.run) == [False, False] and list(learnt.run) == [True, False]


def test_online_factor_is_a_clipped_moving_average_of_log_ratios():
    p = online(rate=0.5, bound=4.0, batch=3)
    p.decide(0, 500.0, None)
    p.decide(1, 400.0, np.full(3, 81.0))  # S_table 10
    p.observe(1, error_sumsq([40.0, 1e6, 0.0]))  # ratios 4, far above the bound, 0
    np.testing.assert_allclose(p.online.log_factor, [0.5 * math.log(4.0), 0.5 * math.log(4.0), -0.5 * math.log(4.0)])
    p.decide(2, 300.0, np.full(3, 1e4))  # runs: S_table well above eps
    p.observe(2, error_sumsq(p.online.predicted * 4.0))
    np.testing.assert_allclose(p.online.log_factor[0], 0.75 * math.log(4.0))
    assert np.all(p.factor <= 4.0 + 1e-12) and np.all(p.factor >= 0.25 - 1e-12)


def test_online_learns_nothing_where_unobserved_or_forced():
    p = online(rate=1.0)
    p.decide(0, 500.0, None)  # forced: no prediction
    assert np.isnan(p.online.predicted).all()
    p.observe(0, error_sumsq([3.0, 3.0]))
    p.decide(1, 400.0, np.array([81.0, 81.0]))
    p.observe(1, np.array([np.nan, error_sumsq(30.0)]))  # sample 0 not observed
    np.testing.assert_allclose(p.factor, [1.0, 3.0])
    with pytest.raises(ValueError, match="must follow decide"):
        p.observe(0, error_sumsq([1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        p.observe(1, np.ones(3))


def test_online_knobs_are_checked_and_belong_to_the_online_rule():
    from sencache.runtime.cache import check_knobs
    from sencache.runtime.cache.sencache import SenCacheOnlineSettings

    assert check_knobs("sencache-online", {"online_rate": 0.3, "online_bound": 2}) == {
        "online_rate": 0.3,
        "online_bound": 2.0,
    }
    with pytest.raises(BadInput, match="online_rate must be a number in"):
        SenCacheOnlineSettings(0.1, 1.0, 3, online_rate=1.5)
    with pytest.raises(BadInput, match="online_bound"):
        SenCacheOnlineSettings(0.1, 1.0, 3, online_bound=0.5)
    with pytest.raises(BadInput, match="does not apply"):
        check_knobs("sencache", {"online_rate": 0.3})


def test_a_new_rule_is_its_module_and_an_import_line() -> None:
    """What docs/development.md shows: a rule and its knob registered (as a new module would) are
    known to the method list, the knob table and its checks, and the factory, with nothing else edited."""
    register_knob(Knob("period", int, 1, 10, "every-third: run every period-th step"))
    register_rule(
        Rule(
            "every-third",
            "run every third step",
            ("period", "warmup"),
            lambda knobs, context: FixedPolicy(
                FixedSettings(knobs.get("period", 3), knobs.get("warmup", 0)), context.steps, context.batch
            ),
        )
    )
    try:
        assert METHODS["every-third"] == "run every third step"
        assert KNOBS["period"].methods == ("every-third",)
        assert KNOBS["warmup"].methods == ("fixed", "every-third")
        policy = make_policy("every-third", {}, 9, 2, None, 1)  # a rule that needs nothing never reads the bundle
        assert [bool(policy.decide(i, 0.0).run[0]) for i in range(9)] == [i in (0, 3, 6, 8) for i in range(9)]
        with pytest.raises(BadInput, match=r"period must be an integer in \[1, 10\], got 11"):
            make_policy("every-third", {"period": 11}, 9, 2, None, 1)
        with pytest.raises(BadInput, match="eps_main does not apply to cache 'every-third'"):
            make_policy("every-third", {"eps_main": 0.1}, 9, 2, None, 1)
    finally:
        del RULES["every-third"], METHODS["every-third"], KNOBS["period"]
