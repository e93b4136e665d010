"""The native rules (libsencache_policy through ctypes) against the Python rules, decision for
decision and score for score (bitwise), over 100,000 random traces: step counts, timesteps inside
and outside the table, drifts, settings, batches and tables off any grid, for sencache,
sencache-max and sencache-online (its knobs, and observed reuse errors fed back after decisions:
NaN, infinite, zero, negative, far outside the bound; its learnt factor bitwise too); the online
knobs refused alike; and the table readers (JSON as the runtime writes it, the authors' .npz
stored and deflated) against the Python ones."""

from __future__ import annotations

import multiprocessing
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import native  # noqa: E402

from sencache.runtime.cache.plan import ObservingPlanPolicy  # noqa: E402
from sencache.runtime.cache.sencache import (  # noqa: E402
    SenCacheMaxPolicy,
    SenCacheOnlinePolicy,
    SenCacheOnlineSettings,
    SenCachePolicy,
    SenCacheSettings,
)
from sencache.runtime.errors import BadInput  # noqa: E402
from sencache.runtime.sensitivity import SensitivityTable  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN and inf drifts, on purpose
TRACES = int(os.environ.get("SENCACHE_PARITY_TRACES", 100_000))
SENCACHE, SENCACHE_MAX, SENCACHE_ONLINE = 0, 1, 2  # sc_rule
ODD_ERRORS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0, 1e300, 1e-300, 5e-324])


@pytest.fixture(scope="module")
def lib():
    return native.load()


def random_table(rng: np.random.Generator) -> SensitivityTable:
    n = int(rng.integers(2, 40))
    scale = float(10 ** rng.uniform(-1, 3))
    t = rng.uniform(-0.1, 1.0, n) * scale
    jx = rng.exponential(1.0, n) * 10 ** rng.uniform(-2, 2)
    jt = rng.exponential(1.0, n) * 10 ** rng.uniform(-5, 0)
    if rng.random() < 0.1:
        jx[rng.integers(n)] = 0.0
    return SensitivityTable(t, jx, jt)


def decide_both(rule: Any, ours: native.Policy, step: int, t: float, drift: np.ndarray, where: str) -> Any:
    """The Python rule's decision at `step`, asserted equal, bit for bit, to the native policy's
    (run flags, scores, threshold, forced); returns the Python one."""
    want = rule.decide(step, t, drift)
    run, score, threshold, forced = ours.decide(step, t, drift)
    assert np.array_equal(run, want.run), f"{where}: run {run} != {want.run}"
    assert same(score, want.score), f"{where}: score {score!r} != {want.score!r}"
    assert same(np.array([threshold]), np.array([want.threshold])), f"{where}: threshold {threshold!r}"
    assert forced == want.forced, where
    return want


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality, NaN equal to NaN."""
    return (
        np.array_equal(np.asarray(a, np.float64).view(np.int64), np.asarray(b, np.float64).view(np.int64))
        or np.array_equal(a, b, equal_nan=True)
        and np.array_equal(np.signbit(a), np.signbit(b))
    )


def random_online(rng: np.random.Generator) -> tuple[float, float, float]:
    """online_rate, online_bound, online_prior: their edges, defaults, and values between."""
    rate = float(rng.choice([0.0, 1.0, 0.5, rng.random()]))
    bound = float(rng.choice([1.0, 4.0, 10 ** rng.uniform(0, 6), 1e6]))
    prior = float(rng.choice([0.0, 0.0, 2.0, rng.uniform(0, 10), 5e-324, 1e6]))
    return rate, bound, prior


def random_errors(rng: np.random.Generator, rule: SenCacheOnlinePolicy, run: np.ndarray) -> np.ndarray:
    """Squared reuse errors around what the table predicted (so learnt ratios go both ways and past
    the bound), NaN for most samples that reused, and odd values now and then."""
    batch = len(run)
    predicted = np.where(np.isfinite(rule.online.predicted), rule.online.predicted, 1e-3)
    error = predicted * rng.lognormal(0.0, 1.5, batch) * 10 ** rng.choice([-3.0, 0.0, 0.0, 0.0, 3.0])
    sumsq = (error * rule.scale) ** 2
    sumsq[~run & (rng.random(batch) < 0.8)] = np.nan
    odd = rng.random(batch) < 0.1
    sumsq[odd] = rng.choice(ODD_ERRORS, int(odd.sum()))
    return sumsq


def observe_both(
    rng: np.random.Generator,
    step: int,
    run: np.ndarray,
    rule: SenCacheOnlinePolicy | ObservingPlanPolicy,
    ours: native.Policy,
    where: str,
) -> int:
    """Feed the same observed errors to both, now and then at a step that was not just decided
    (both refuse it), and compare the learnt factors. Returns the observations learnt."""
    if rng.random() < 0.05:
        wrong = step + int(rng.choice([-1, 1]))
        sumsq = np.full(len(ours.factor()), 1.0)
        with pytest.raises(ValueError, match="must follow decide"):
            rule.observe(wrong, sumsq)
        with pytest.raises(native.NativeError, match="must follow the decision") as refused:
            ours.observe(wrong, sumsq)
        assert refused.value.status == native.SC_ERR_STATE, where
    before = int(rule.online.observations.sum())
    for _ in range(2 if rng.random() < 0.1 else 1):  # observing a step twice learns twice
        sumsq = random_errors(rng, rule, run)
        rule.observe(step, sumsq)
        ours.observe(step, sumsq)
    assert same(ours.factor(), rule.factor), f"{where}: factor {ours.factor().tolist()} != {rule.factor.tolist()}"
    return int(rule.online.observations.sum()) - before


def run_traces(chunk: int, count: int) -> tuple[int, int, int, int, int]:
    """`count` random traces from seed (20261201, chunk): (decisions, runs, clamped look-ups,
    decisions of the online rule, observations it learnt from). Raises AssertionError at the
    first difference."""
    lib = native.load()
    rng = np.random.default_rng((20261201, chunk))
    decisions = runs = outside = online_decisions = observed = 0
    for trace in range(count):
        table = random_table(rng)
        lo, hi = table.timesteps[0], table.timesteps[-1]
        steps = int(rng.integers(1, 30))
        batch = int(rng.integers(1, 5))
        numel = int(rng.choice([1, 7, 4096, int(rng.integers(1, 10**7))]))
        max_reuse = int(rng.integers(0, 6))
        switch = float(rng.choice([0.0, 0.2, 0.5, 1.0, rng.random()]))
        force_last = bool(rng.random() < 0.8)
        kind = int(rng.choice([SENCACHE, SENCACHE_MAX, SENCACHE_ONLINE], p=[0.4, 0.2, 0.4]))
        # Timesteps: decreasing, from a little above the table to a little below (clamped look-ups),
        # or on the table's own grid points.
        span = hi - lo
        ts = np.sort(rng.uniform(lo - 0.1 * span, hi + 0.1 * span, steps))[::-1]
        if rng.random() < 0.3:
            ts = np.sort(rng.choice(table.timesteps, steps))[::-1]
        # eps around the scores this trace will see, so decisions go both ways.
        eps_main = float(np.median(table.jx) * 1e-2 * 10 ** rng.uniform(-1.5, 1.5))
        eps_start = float(eps_main * rng.choice([0.0, 0.1, 1.0]))
        drifts = (rng.exponential(1.0, (steps, batch)) * numel * 1e-4 * 10 ** rng.uniform(-2, 2, (steps, 1))).astype(
            np.float32
        )
        odd = rng.random(steps) < 0.02  # zero, infinite, NaN and negative drifts now and then
        drifts[odd, rng.integers(batch)] = rng.choice(np.array([0.0, np.inf, np.nan, -1.0], np.float32), int(odd.sum()))
        online = random_online(rng) if kind == SENCACHE_ONLINE else None
        rule: SenCachePolicy
        if online is None:
            settings = SenCacheSettings(eps_start, eps_main, max_reuse, switch, force_last)
            rule = (SenCacheMaxPolicy if kind == SENCACHE_MAX else SenCachePolicy)(settings, table, steps, batch, numel)
        else:
            online_settings = SenCacheOnlineSettings(
                eps_start, eps_main, max_reuse, switch, force_last, "engine", *online
            )
            rule = SenCacheOnlinePolicy(online_settings, table, steps, batch, numel)
        theirs = native.Table.from_json(lib, table.to_bytes())
        ours = native.Policy(
            lib, theirs, kind, eps_start, eps_main, max_reuse, switch, force_last, steps, batch, numel, online
        )
        theirs.close()
        for step in range(steps):
            t = float(ts[step])
            where = f"chunk {chunk} trace {trace} step {step}"
            want = decide_both(rule, ours, step, t, drifts[step], where)
            decisions += batch
            runs += int(want.run.sum())
            if isinstance(rule, SenCacheOnlinePolicy):
                online_decisions += batch
                if rng.random() < 0.7:
                    observed += observe_both(rng, step, want.run, rule, ours, where)
        assert ours.outside() == len(rule.outside_table)
        outside += ours.outside()
        ours.close()
    return decisions, runs, outside, online_decisions, observed


def test_random_traces():
    """TRACES traces in chunks over the CPUs (each chunk its own seed, so the set is fixed)."""
    chunks = 16
    sizes = [TRACES // chunks + (k < TRACES % chunks) for k in range(chunks)]
    with multiprocessing.get_context("fork").Pool(min(chunks, os.cpu_count() or 1)) as pool:
        results = pool.starmap(run_traces, enumerate(sizes))
    decisions, runs, outside, online, observed = (sum(r[i] for r in results) for i in range(5))
    reuses = decisions - runs
    print(
        f"\nparity: {TRACES} traces, {decisions} per-sample decisions ({runs} run, {reuses} reuse; "
        f"{online} of them sencache-online's, learning from {observed} observed errors), "
        f"{outside} clamped look-ups, 0 mismatches"
    )
    assert runs > decisions // 10 and reuses > decisions // 10  # both ways, plenty of each
    assert online > decisions // 4 and observed > online // 10


@pytest.mark.parametrize(
    ("knob", "value", "refused"),
    [
        ("online_rate", 0.0, False),
        ("online_rate", 1.0, False),
        ("online_rate", -0.0, False),
        ("online_rate", -1e-9, True),
        ("online_rate", 1.5, True),
        ("online_rate", np.nan, True),
        ("online_bound", 1.0, False),
        ("online_bound", 1e6, False),
        ("online_bound", 0.5, True),
        ("online_bound", -4.0, True),
        ("online_bound", np.inf, True),
        ("online_bound", np.nan, True),
        ("online_prior", 0.0, False),
        ("online_prior", 1e6, False),
        ("online_prior", -1.0, True),
        ("online_prior", 2e6, True),
        ("online_prior", np.inf, True),
        ("online_prior", np.nan, True),
    ],
)
def test_online_knobs_refused_alike(lib, knob, value, refused):
    """The native rule refuses exactly the online knobs that SenCacheOnlineSettings refuses."""
    knobs = {"online_rate": 0.5, "online_bound": 4.0, "online_prior": 0.0, knob: value}
    table = SensitivityTable(np.array([0.0, 1000.0]), np.array([1.0, 2.0]), np.array([0.1, 0.2]))
    theirs = native.Table.from_json(lib, table.to_bytes())
    online = (knobs["online_rate"], knobs["online_bound"], knobs["online_prior"])
    if refused:
        with pytest.raises(BadInput, match=knob):
            SenCacheOnlineSettings(0.1, 0.1, 3, **knobs)
        with pytest.raises(native.NativeError, match=f"extra->{knob} must be a number in") as error:
            native.Policy(lib, theirs, SENCACHE_ONLINE, 0.1, 0.1, 3, 0.2, True, 10, 2, 100, online)
        assert error.value.status == 1  # SC_ERR_INVALID_ARGUMENT
    else:
        SenCacheOnlineSettings(0.1, 0.1, 3, **knobs)
        native.Policy(lib, theirs, SENCACHE_ONLINE, 0.1, 0.1, 3, 0.2, True, 10, 2, 100, online).close()
    theirs.close()


def test_online_defaults(lib):
    """sc_policy_create (no extra) gives SenCacheOnlineSettings' defaults: after the same
    observations the factors agree with a rule made with the Python defaults."""
    table = SensitivityTable(np.array([0.0, 1000.0]), np.array([1.0, 2.0]), np.array([0.1, 0.2]))
    theirs = native.Table.from_json(lib, table.to_bytes())
    ours = native.Policy(lib, theirs, SENCACHE_ONLINE, 0.0, 0.0, 3, 0.2, True, 4, 2, 100)
    rule = SenCacheOnlinePolicy(SenCacheOnlineSettings(0.0, 0.0, 3), table, 4, 2, 100)
    theirs.close()
    for step, t in enumerate([1000.0, 700.0, 400.0]):
        drift = np.array([4.0, 9.0], np.float32)
        rule.decide(step, t, drift)
        ours.decide(step, t, drift)
        errors = np.array([1e4, 1e-4]) * (step + 1)
        rule.observe(step, errors)
        ours.observe(step, errors)
    assert same(ours.factor(), rule.factor) and not np.allclose(rule.factor, 1.0)
    ours.close()


def test_lookup_matches_numpy_interp(lib):
    rng = np.random.default_rng(7)
    for _ in range(2000):
        table = random_table(rng)
        ours = native.Table.from_json(lib, table.to_bytes())
        lo, hi = table.timesteps[0], table.timesteps[-1]
        points = np.concatenate([rng.uniform(lo - 1, hi + 1, 20), table.timesteps, [lo, hi, np.nextafter(hi, 0)]])
        for t in points:
            assert ours.lookup(float(t)) == table.lookup(float(t))
        ours.close()


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_npz_import(lib, tmp_path, compressed, dtype):
    rng = np.random.default_rng(3)
    t = np.array([999.0, 750.5, 500.25, 250.0, 0.0]).astype(dtype)
    arrays = {
        "timesteps": t,
        "J_x_norm": (rng.random(5) * 9).astype(dtype),
        "J_t_norm": (rng.random(5) * 9).astype(dtype),
        "sample_counts": np.arange(5),
        "other": np.array(["x"]),
    }
    path = tmp_path / "table.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    want = SensitivityTable.from_npz(path)
    ours = native.Table.from_npz(lib, str(path))
    for x in np.linspace(-10, 1010, 257):
        assert ours.lookup(float(x)) == want.lookup(float(x))
    ours.close()


def test_npz_refusals(lib, tmp_path):
    np.savez(tmp_path / "missing.npz", timesteps=np.arange(3.0), J_x_norm=np.ones(3))
    np.savez(tmp_path / "two_d.npz", timesteps=np.arange(4.0).reshape(2, 2), J_x_norm=np.ones(4), J_t_norm=np.ones(4))
    good = tmp_path / "good.npz"
    np.savez_compressed(good, timesteps=np.arange(3.0), J_x_norm=np.ones(3), J_t_norm=np.ones(3))
    damaged = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        first = z.infolist()[0]
    local = first.header_offset
    data = (
        local
        + 30
        + int.from_bytes(damaged[local + 26 : local + 28], "little")
        + int.from_bytes(damaged[local + 28 : local + 30], "little")
    )
    damaged[data + 5] ^= 0xFF  # inside its deflated data
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    for name, needle in (("missing", "missing J_t_norm"), ("two_d", "one-dimensional"), ("damaged", "damaged|CRC")):
        with pytest.raises(ValueError, match=needle):
            native.Table.from_npz(lib, str(tmp_path / f"{name}.npz"))
