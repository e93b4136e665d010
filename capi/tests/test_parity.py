"""The native rule (libsencache_policy through ctypes) against the Python rule, decision for
decision and score for score (bitwise), over 100,000 random traces: step counts, timesteps inside
and outside the table, drifts, settings, batches and tables off any grid; and the table readers
(JSON as the runtime writes it, the authors' .npz stored and deflated) against the Python ones."""

from __future__ import annotations

import multiprocessing
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import native  # noqa: E402

from sencache.runtime.cache.sencache import SenCacheMaxPolicy, SenCachePolicy, SenCacheSettings  # noqa: E402
from sencache.runtime.sensitivity import SensitivityTable  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN and inf drifts, on purpose
TRACES = int(os.environ.get("SENCACHE_PARITY_TRACES", 100_000))


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


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality, NaN equal to NaN."""
    return (
        np.array_equal(np.asarray(a, np.float64).view(np.int64), np.asarray(b, np.float64).view(np.int64))
        or np.array_equal(a, b, equal_nan=True)
        and np.array_equal(np.signbit(a), np.signbit(b))
    )


def run_traces(chunk: int, count: int) -> tuple[int, int, int]:
    """`count` random traces from seed (20261201, chunk): (decisions, runs, clamped look-ups).
    Raises AssertionError at the first difference."""
    lib = native.load()
    rng = np.random.default_rng((20261201, chunk))
    decisions = runs = outside = 0
    for trace in range(count):
        table = random_table(rng)
        lo, hi = table.timesteps[0], table.timesteps[-1]
        steps = int(rng.integers(1, 30))
        batch = int(rng.integers(1, 5))
        numel = int(rng.choice([1, 7, 4096, int(rng.integers(1, 10**7))]))
        max_reuse = int(rng.integers(0, 6))
        switch = float(rng.choice([0.0, 0.2, 0.5, 1.0, rng.random()]))
        force_last = bool(rng.random() < 0.8)
        maximal = bool(rng.random() < 0.3)
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
        settings = SenCacheSettings(eps_start, eps_main, max_reuse, switch, force_last)
        rule = (SenCacheMaxPolicy if maximal else SenCachePolicy)(settings, table, steps, batch, numel)
        theirs = native.Table.from_json(lib, table.to_bytes())
        ours = native.Policy(
            lib, theirs, int(maximal), eps_start, eps_main, max_reuse, switch, force_last, steps, batch, numel
        )
        theirs.close()
        for step in range(steps):
            t = float(ts[step])
            want = rule.decide(step, t, drifts[step])
            run, score, threshold, forced = ours.decide(step, t, drifts[step])
            where = f"chunk {chunk} trace {trace} step {step}"
            assert np.array_equal(run, want.run), f"{where}: run {run} != {want.run}"
            assert same(score, want.score), f"{where}: score {score!r} != {want.score!r}"
            assert threshold == want.threshold and forced == want.forced, where
            decisions += batch
            runs += int(run.sum())
        assert ours.outside() == len(rule.outside_table)
        outside += ours.outside()
        ours.close()
    return decisions, runs, outside


def test_random_traces():
    """TRACES traces in chunks over the CPUs (each chunk its own seed, so the set is fixed)."""
    chunks = 16
    sizes = [TRACES // chunks + (k < TRACES % chunks) for k in range(chunks)]
    with multiprocessing.get_context("fork").Pool(min(chunks, os.cpu_count() or 1)) as pool:
        results = pool.starmap(run_traces, enumerate(sizes))
    decisions, runs, outside = (sum(r[i] for r in results) for i in range(3))
    reuses = decisions - runs
    print(
        f"\nparity: {TRACES} traces, {decisions} per-sample decisions ({runs} run, {reuses} reuse), "
        f"{outside} clamped look-ups, 0 mismatches"
    )
    assert runs > decisions // 10 and reuses > decisions // 10  # both ways, plenty of each


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
