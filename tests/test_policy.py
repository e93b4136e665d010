"""The SenCache rule, step by step, against hand-computed values (SPEC sections 1 and 3)."""

import math

import numpy as np
import pytest

from sencache.runtime.cache import NoCache
from sencache.runtime.cache.sencache import SenCachePolicy, SenCacheSettings
from sencache.runtime.errors import BadInput
from sencache.runtime.sensitivity import SensitivityTable

TABLE = SensitivityTable(np.array([0.0, 500.0, 1000.0]), np.array([1.0, 2.0, 4.0]), np.array([0.01, 0.02, 0.03]))


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
