"""The baselines' rules against hand-computed traces (SPEC section 5)."""

import numpy as np
import pytest

from sencache.runtime.cache.base import relative_l1
from sencache.runtime.cache.baselines import (
    BaselineTables,
    FixedPolicy,
    FixedSettings,
    MagCachePolicy,
    MagCacheSettings,
    TeaCachePolicy,
    TeaCacheSettings,
    resample_ratios,
)
from sencache.runtime.errors import BadInput


def runs(policy, steps, **kw):
    return [bool(policy.decide(i, 1000.0 - i, **{k: v[i] for k, v in kw.items()}).run[0]) for i in range(steps)]


def test_fixed_interval_with_warmup_and_forced_ends():
    assert runs(FixedPolicy(FixedSettings(3), 8, 1), 8) == [True, False, False, True, False, False, True, True]
    assert runs(FixedPolicy(FixedSettings(3, warmup=4), 8, 1), 8) == [True, True, True, True, False, False, True, True]
    assert runs(FixedPolicy(FixedSettings(1), 5, 1), 5) == [True] * 5


def test_teacache_accumulates_polynomial_of_relative_l1_change():
    # poly(d) = 2 d: modulation 1.0, 1.1, ... -> d = 0.1 / previous value (the engine measures d)
    mods = [np.full((1, 4), v) for v in (1.0, 1.1, 1.2, 1.3, 1.4, 1.5)]
    policy = TeaCachePolicy(TeaCacheSettings(0.3, (2.0, 0.0)), 6, 1)
    changes = [None] + [relative_l1(mods[i], mods[i - 1]) for i in range(1, 6)]
    decisions = [policy.decide(i, 0.0, modulation_change=changes[i]) for i in range(6)]
    # acc: 0.2 (reuse), 0.2 + 0.1818 (run, reset), 0.1667 (reuse), 0.1667 + 0.1538 (run), last forced
    assert [bool(d.run[0]) for d in decisions] == [True, False, True, False, True, True]
    assert decisions[1].score[0] == pytest.approx(0.2)
    assert decisions[2].score[0] == pytest.approx(0.2 + 2 * 0.1 / 1.1)
    assert decisions[3].score[0] == pytest.approx(2 * 0.1 / 1.2)
    assert decisions[4].score[0] == pytest.approx(2 * 0.1 / 1.2 + 2 * 0.1 / 1.3)


def test_teacache_decides_per_sample():
    mods = [np.array([[1.0], [1.0]]), np.array([[1.01], [2.0]]), np.array([[1.02], [3.0]])]
    policy = TeaCachePolicy(TeaCacheSettings(0.5, (1.0, 0.0)), 4, 2)
    policy.decide(0, 0.0)
    d = policy.decide(1, 0.0, modulation_change=relative_l1(mods[1], mods[0]))
    assert d.run.tolist() == [False, True]


def test_teacache_refuses_a_step_without_the_change():
    policy = TeaCachePolicy(TeaCacheSettings(0.5, (1.0, 0.0)), 4, 1)
    policy.decide(0, 0.0)
    with pytest.raises(ValueError, match="relative L1 change"):
        policy.decide(1, 0.0)


def test_magcache_error_and_max_reuse():
    ratios = (1.0, 1.0, 0.9, 0.9, 0.99, 0.99, 0.99, 0.99, 0.99, 1.0)
    policy = MagCachePolicy(MagCacheSettings(0.12, 2, ratios, retention=0.2), 10, 1)
    trace = [policy.decide(i, 0.0) for i in range(10)]
    # steps 0, 1 retained; step 2: R=0.9, err=0.1 reuse; step 3: R=0.81, err=0.29 -> run, reset
    # step 4: R=.99 err=.01; step 5: R=.9801 err=.0299; step 6: reused 3 > K=2 -> run; 7, 8 reuse; 9 forced
    assert [bool(d.run[0]) for d in trace] == [True, True, False, True, False, False, True, False, False, True]
    assert trace[2].score[0] == pytest.approx(0.1)
    assert trace[5].score[0] == pytest.approx(0.01 + (1 - 0.99 * 0.99))


def test_magcache_ratios_resample_to_other_step_counts():
    np.testing.assert_allclose(resample_ratios((1.0, 0.8), 3), [1.0, 0.9, 0.8])
    np.testing.assert_allclose(resample_ratios((1.0, 0.9, 0.8), 3), [1.0, 0.9, 0.8])


def test_bad_knobs():
    with pytest.raises(BadInput):
        FixedSettings(0)
    with pytest.raises(BadInput):
        TeaCacheSettings(-0.1, (1.0,))
    with pytest.raises(BadInput):
        MagCacheSettings(0.1, 2, (1.0, 0.0))


def test_tables_round_trip_and_reject_corruption():
    tables = BaselineTables((1.0, -2.0, 0.5), (1.0, 0.99, 0.98), {"model": "tiny-wan"})
    assert BaselineTables.parse(tables.to_bytes(), "b.json") == tables
    for corrupt in (
        '{"format": "sencache-baselines/1", "teacache": {}}',
        "[]",
        "not json",
        '{"format": "sencache-baselines/1", "teacache": {"coefficients": [true]}, "magcache": null}',
    ):
        with pytest.raises(BadInput, match="corrupt baseline tables b.json"):
            BaselineTables.parse(corrupt.encode(), "b.json")


def test_tables_without_magcache_ratios_round_trip():
    """CogVideoX and LTX have published TeaCache polynomials but no MagCache ratios."""
    tables = BaselineTables((1.0, 2.0, 3.0), None, {"model": "cogvideox-5b"})
    loaded = BaselineTables.parse(tables.to_bytes(), "baselines.json")
    assert loaded.teacache_coefficients == (1.0, 2.0, 3.0) and loaded.magcache_ratios is None
