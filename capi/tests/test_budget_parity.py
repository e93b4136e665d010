"""NFE budgets in the native rule (sc_policy_create_budget, ABI 4) against the Python rules,
decision for decision and score for score (bitwise), over random traces: random tables with random
budget curves (one to three recorded step counts; with and without sencache-online's measured
curve), random budgets (nfe, speedup, speed; threshold and hard; in range and out), step counts on
and between the recorded ones, sencache and sencache-online (its knobs given or not, observed reuse
errors fed back), each built as the runtime builds it from a request's knobs (check_knobs, then
make_budget_policy or make_online_budget_policy); a budget either refuses is refused by both, the
message the same where it comes from the budget (not from a field's own check); and the tables'
curves read from JSON as the runtime writes them."""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import native  # noqa: E402
from test_parity import decide_both, observe_both, random_table, same  # noqa: E402

from sencache.runtime.cache.budget import (  # noqa: E402
    SenCacheOnlineBudget,
    make_budget_policy,
    make_online_budget_policy,
)
from sencache.runtime.cache.knobs import SPEEDS, check_knobs  # noqa: E402
from sencache.runtime.cache.plan import ObservingPlanPolicy, make_plan_policy  # noqa: E402
from sencache.runtime.cache.sencache import SenCacheOnlinePolicy  # noqa: E402
from sencache.runtime.errors import BadInput  # noqa: E402
from sencache.runtime.sensitivity import BudgetCurves, OnlineCurve, ReuseCosts, SensitivityTable  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf drifts, on purpose
TRACES = int(os.environ.get("SENCACHE_BUDGET_TRACES", 20_000))
SENCACHE, SENCACHE_MAX, SENCACHE_ONLINE = 0, 1, 2  # sc_rule
METHODS = {SENCACHE: "sencache", SENCACHE_MAX: "sencache-max", SENCACHE_ONLINE: "sencache-online"}
SPEED_NAMES = tuple(SPEEDS)  # sc_budget_speed's order
ONLINE_KNOBS = ("online_rate", "online_bound", "online_prior")


@pytest.fixture(scope="module")
def lib():
    return native.load()


def falling(rng: np.random.Generator, n: int, top: float) -> tuple[float, ...]:
    """n fractions in (0, 1], not growing, flat stretches now and then."""
    steps = rng.exponential(1.0, n) * (rng.random(n) < 0.8)
    values = top - np.cumsum(steps) / (steps.sum() + rng.exponential(0.5) + 1e-9) * top * rng.uniform(0.3, 0.95)
    return tuple(np.clip(values, 1e-3, 1.0).tolist())


def random_online_curve(rng: np.random.Generator, steps: tuple[int, ...], grid: np.ndarray) -> OnlineCurve:
    points = int(rng.integers(2, 11))
    low = float(grid[1] if grid[0] == 0 else grid[0]) * 10 ** rng.uniform(-1, 0.5)
    eps = np.geomspace(low, low * 10 ** rng.uniform(0.3, 3), points)
    at = int(rng.choice([*steps, int(rng.integers(2, 80))]))
    knobs = (0.5, 4.0, 2.0) if rng.random() < 0.7 else (float(rng.random()), float(10 ** rng.uniform(0, 2)), 0.0)
    return OnlineCurve(at, tuple(eps.tolist()), falling(rng, points, float(rng.uniform(0.5, 1.0))), *knobs)


def random_curves(rng: np.random.Generator) -> BudgetCurves:
    counts = int(rng.integers(1, 4))
    steps = tuple(sorted(int(s) for s in rng.choice(np.arange(2, 61), counts, replace=False)))
    points = int(rng.integers(2, 12))
    top = float(10 ** rng.uniform(-3, 1))
    grid = np.concatenate([[0.0] if rng.random() < 0.7 else [], top * np.geomspace(1e-3, 1.0, points)])[:points]
    fractions = tuple(falling(rng, points, 1.0 if rng.random() < 0.7 else float(rng.uniform(0.6, 1.0))) for _ in steps)
    profiles = []
    for n in steps:
        profile = rng.exponential(1.0, n) * top * 10 ** rng.uniform(-1, 1)
        profile[rng.random(n) < 0.15] = 0.0
        profiles.append(tuple(profile.tolist()))
    return BudgetCurves(
        steps=steps,
        eps_grid=tuple(grid.tolist()),
        fractions=fractions,
        profiles=tuple(profiles),
        eps_ratio=float(rng.choice([0.0, 0.25, 1.0, rng.uniform(0, 2)])),
        max_reuse=int(rng.integers(0, 6)),
        switch_frac=float(rng.choice([0.0, 0.2, 0.5, 1.0, rng.random()])),
        force_last=bool(rng.random() < 0.8),
        online=random_online_curve(rng, steps, grid) if rng.random() < 0.6 else None,
    )


def random_budget(rng: np.random.Generator, steps: int) -> tuple[dict[str, Any], native.Budget]:
    """A request's budget knobs and the same as an sc_budget: mostly in range, now and then not."""
    kind = int(rng.choice([native.SC_BUDGET_NFE, native.SC_BUDGET_SPEEDUP, native.SC_BUDGET_SPEED], p=[0.4, 0.3, 0.3]))
    mode = int(rng.choice([native.SC_BUDGET_THRESHOLD, native.SC_BUDGET_HARD]))
    value, speed = 0.0, 0
    knobs: dict[str, Any] = {"budget": ("threshold", "hard")[mode]}
    if kind == native.SC_BUDGET_NFE:
        odd = [rng.integers(0, steps + 3), 2.5, 1001, 0]
        value = float(rng.integers(1, steps + 1) if rng.random() < 0.85 else rng.choice(odd))
        knobs["nfe"] = int(value) if value.is_integer() else value
    elif kind == native.SC_BUDGET_SPEEDUP:
        value = float(rng.choice([rng.uniform(1, 4), rng.uniform(1, 1.5), 2.0, 1.0]))
        value = float(rng.choice([0.5, 1001.0, np.nan])) if rng.random() < 0.1 else value
        knobs["speedup"] = value
    else:
        speed = int(rng.integers(0, 4))
        knobs["speed"] = SPEED_NAMES[speed]
    return knobs, native.Budget(ctypes.sizeof(native.Budget), kind, mode, value, speed)


def python_policy(method: str, knobs: dict[str, Any], table: SensitivityTable, steps: int, batch: int, numel: int):
    """The rule as the runtime builds it for a request's knobs (BadInput where it refuses them)."""
    checked = check_knobs(method, knobs)
    make = make_online_budget_policy if method == "sencache-online" else make_budget_policy
    return make(checked, table, steps, batch, numel)


def check_refusal(python: BadInput, ours: native.NativeError, where: str) -> str:
    """Both refused: the budget's own refusals word alike; a field's checks say the same thing."""
    theirs, mine = str(python), str(ours)
    assert ours.status == native.SC_ERR_INVALID_ARGUMENT, f"{where}: {mine}"
    if " must be " in theirs and ", got " in theirs:  # a knob's range (Knob.check)
        assert theirs.split(", got")[0] in mine, f"{where}: {mine!r} vs {theirs!r}"
        return "field"
    if "does not apply to cache" in theirs:  # sencache-max takes no budget
        assert mine.endswith("budget does not apply to cache 'sencache-max'"), f"{where}: {mine!r} vs {theirs!r}"
        return "field"
    assert mine == theirs, f"{where}: {mine!r} != {theirs!r}"
    return "budget"


def run_traces(chunk: int, count: int) -> dict[str, int]:
    """`count` random traces from seed (20261203, chunk); raises at the first difference."""
    lib = native.load()
    rng = np.random.default_rng((20261203, chunk))
    tally = dict.fromkeys(
        (
            "traces",
            "decisions",
            "runs",
            "hard",
            "threshold",
            "online eps",
            "plan",
            "online plan, threshold",
            "online",
            "observed",
            "field",
            "budget",
        ),
        0,
    )
    for trace in range(count):
        table = random_table(rng)
        table.budget = random_curves(rng)
        curves = table.budget
        recorded = curves.steps
        steps = int(rng.choice([*recorded, int(rng.integers(1, 90)), int(rng.integers(recorded[0], recorded[-1] + 1))]))
        batch = int(rng.integers(1, 5))
        numel = int(rng.choice([1, 7, 4096, int(rng.integers(1, 10**7))]))
        rule = int(rng.choice([SENCACHE, SENCACHE_MAX, SENCACHE_ONLINE], p=[0.45, 0.05, 0.5]))
        knobs, budget = random_budget(rng, steps)
        online: tuple[float, ...] | None = None
        if rule == SENCACHE_ONLINE and rng.random() < 0.4:
            measured = (0.5, 4.0, 2.0)
            if curves.online is not None:
                measured = (curves.online.rate, curves.online.bound, curves.online.prior)
            online = tuple(measured if rng.random() < 0.5 else (0.5, 4.0, 0.0))[: int(rng.integers(1, 4))]
            knobs.update(zip(ONLINE_KNOBS, online, strict=False))
        where = f"chunk {chunk} trace {trace} ({METHODS[rule]} {knobs}, {steps} steps)"
        theirs_table = native.Table.from_json(lib, table.to_bytes())
        assert theirs_table.has_budget() == (2 if curves.online else 1), where
        try:
            want = python_policy(METHODS[rule], knobs, table, steps, batch, numel)
        except BadInput as refused:
            with pytest.raises(native.NativeError) as error:
                native.Policy.with_budget(lib, theirs_table, rule, budget, steps, batch, numel, online)
            tally[check_refusal(refused, error.value, where)] += 1
            theirs_table.close()
            continue
        ours = native.Policy.with_budget(lib, theirs_table, rule, budget, steps, batch, numel, online)
        theirs_table.close()
        plan = isinstance(want, SenCacheOnlineBudget) or want.budget.get("mode") == "hard"
        tally["plan" if plan else "threshold"] += 1
        tally["online eps"] += not plan and isinstance(want, SenCacheOnlinePolicy)
        tally["online plan, threshold"] += isinstance(want, SenCacheOnlineBudget) and want.mode == "threshold"
        tally["hard"] += knobs["budget"] == "hard"
        eps_start, eps_main, nfe = ours.budget()
        if plan:
            assert np.isnan(eps_main) and nfe == want.nfe, where
        else:
            assert (eps_start, eps_main) == (want.config.eps_start, want.config.eps_main), where
        lo, hi = table.timesteps[0], table.timesteps[-1]
        span = hi - lo
        ts = np.sort(rng.uniform(lo - 0.1 * span, hi + 0.1 * span, steps))[::-1]
        drifts = (rng.exponential(1.0, (steps, batch)) * numel * 1e-4 * 10 ** rng.uniform(-3, 2, (steps, 1))).astype(
            np.float32
        )
        odd = rng.random(steps) < 0.02
        drifts[odd, rng.integers(batch)] = rng.choice(np.array([0.0, np.inf, np.nan], np.float32), int(odd.sum()))
        learns = isinstance(want, (SenCacheOnlinePolicy, SenCacheOnlineBudget))
        spent = np.zeros(batch, np.int64)
        for step in range(steps):
            t = float(ts[step])
            at = f"{where} step {step}"
            decision = decide_both(want, ours, step, t, drifts[step], at)
            spent += decision.run
            tally["decisions"] += batch
            tally["runs"] += int(decision.run.sum())
            if learns:
                tally["online"] += batch
                if rng.random() < 0.7:
                    tally["observed"] += observe_both(rng, step, decision.run, want, ours, at)
        if knobs["budget"] == "hard":
            assert np.all(spent == want.nfe), f"{where}: spent {spent} of {want.nfe}"
        ours.close()
        tally["traces"] += 1
    return tally


def in_chunks(traces: Callable[[int, int], dict[str, int]], count: int, chunks: int) -> dict[str, int]:
    """`count` traces of `traces(chunk, size)` split into `chunks` chunks (each its own seed, so the
    set is fixed whatever the CPUs) run over the CPUs; their tallies summed."""
    sizes = [count // chunks + (k < count % chunks) for k in range(chunks)]
    with multiprocessing.get_context("fork").Pool(min(chunks, os.cpu_count() or 1)) as pool:
        results = pool.starmap(traces, enumerate(sizes))
    return {key: sum(r[key] for r in results) for key in results[0]}


def test_random_budget_traces():
    """TRACES random budgets, in chunks over the CPUs."""
    total = in_chunks(run_traces, TRACES, 16)
    print(
        f"\nbudget parity: {TRACES} budgets, {total['traces']} built alike ({total['threshold']} resolved to an eps, "
        f"{total['online eps']} of them sencache-online's; {total['plan']} planned, "
        f"{total['online plan, threshold']} of them sencache-online's threshold mode; {total['hard']} hard), "
        f"{total['decisions']} per-sample decisions "
        f"({total['runs']} run; {total['online']} sencache-online's, learning from {total['observed']} observed "
        f"errors); refused alike: {total['budget']} by the budget (same message), {total['field']} by a field's "
        f"range; 0 mismatches"
    )
    assert total["threshold"] > TRACES // 10 and total["plan"] > TRACES // 10 and total["hard"] > TRACES // 10
    assert total["budget"] > TRACES // 50 and total["field"] > TRACES // 50
    assert total["online eps"] > TRACES // 50 and total["online plan, threshold"] > TRACES // 50
    assert 0 < total["runs"] < total["decisions"] and total["observed"] > 0


@pytest.mark.parametrize(
    ("rule", "mode", "steps"),
    [
        (SENCACHE, "hard", 1000),
        (SENCACHE, "threshold", 1000),
        (SENCACHE_ONLINE, "hard", 300),
        (SENCACHE_ONLINE, "threshold", 300),
    ],
)
def test_long_requests(lib, rule, mode, steps):
    """Step counts far past the recorded ones (the plan's table of 1000 x 1001 included): the same
    decisions, scores and learnt factors."""
    rng = np.random.default_rng((11, rule, steps))
    table = SensitivityTable(np.linspace(0.0, 1000.0, 9), rng.exponential(1.0, 9), rng.exponential(1e-3, 9))
    grid = np.concatenate([[0.0], np.geomspace(1e-3, 1.0, 11)])
    rows = tuple(tuple(np.minimum.accumulate(np.linspace(1.0, f, 12)).tolist()) for f in (0.5, 0.3, 0.2))
    profiles = tuple(tuple((rng.exponential(1.0, n) * 1e-2).tolist()) for n in (20, 50, 250))
    table.budget = BudgetCurves((20, 50, 250), tuple(grid.tolist()), rows, profiles, 0.25, 3, 0.2, True)
    knobs = {"speed": "balanced", "budget": mode}
    want = python_policy(METHODS[rule], knobs, table, steps, 2, 4096)
    theirs = native.Table.from_json(lib, table.to_bytes())
    budget = native.Budget(
        ctypes.sizeof(native.Budget), native.SC_BUDGET_SPEED, ("threshold", "hard").index(mode), 0, 2
    )
    ours = native.Policy.with_budget(lib, theirs, rule, budget, steps, 2, 4096)
    theirs.close()
    ts = np.linspace(1000.0, 0.0, steps)
    drifts = (rng.exponential(1.0, (steps, 2)) * 0.4).astype(np.float32)
    reuses = 0
    for step in range(steps):
        decision = want.decide(step, float(ts[step]), drifts[step])
        run, score, threshold, forced = ours.decide(step, float(ts[step]), drifts[step])
        assert np.array_equal(run, decision.run) and same(score, decision.score), f"step {step}"
        assert same(np.array([threshold]), np.array([decision.threshold])) and forced == decision.forced
        if rule == SENCACHE_ONLINE:
            observe_both(rng, step, decision.run, want, ours, f"step {step}")
        reuses += int((~run).sum())
    ours.close()
    assert 0 < reuses < steps * 2


def test_table_without_curves(lib):
    """A table without budget curves (an older bundle, or an .npz): the budget is refused as in Python."""
    table = SensitivityTable(np.array([0.0, 1000.0]), np.array([1.0, 2.0]), np.array([0.1, 0.2]))
    ours = native.Table.from_json(lib, table.to_bytes())
    assert ours.has_budget() == 0
    with pytest.raises(BadInput) as theirs:
        python_policy("sencache", {"nfe": 5}, table, 10, 1, 100)
    budget = native.Budget(ctypes.sizeof(native.Budget), native.SC_BUDGET_NFE, native.SC_BUDGET_HARD, 5.0, 0)
    with pytest.raises(native.NativeError) as error:
        native.Policy.with_budget(lib, ours, SENCACHE, budget, 10, 1, 100)
    assert str(error.value) == str(theirs.value) and error.value.status == native.SC_ERR_INVALID_ARGUMENT
    ours.close()


def test_budget_struct_size(lib):
    """A size past this library's sc_budget is unsupported, a short one invalid; a plain policy has no budget."""
    table = SensitivityTable(np.array([0.0, 1000.0]), np.array([1.0, 2.0]), np.array([0.1, 0.2]))
    table.budget = random_curves(np.random.default_rng(1))
    ours = native.Table.from_json(lib, table.to_bytes())
    sizes = ((ctypes.sizeof(native.Budget) + 8, native.SC_ERR_UNSUPPORTED), (8, native.SC_ERR_INVALID_ARGUMENT))
    for size, status in sizes:
        budget = native.Budget(size, native.SC_BUDGET_NFE, native.SC_BUDGET_HARD, 5.0, 0)
        with pytest.raises(native.NativeError, match="budget->size") as error:
            native.Policy.with_budget(lib, ours, SENCACHE, budget, 10, 1, 100)
        assert error.value.status == status
    plain = native.Policy(lib, ours, SENCACHE, 0.1, 0.1, 3, 0.2, True, 10, 1, 100)
    with pytest.raises(native.NativeError, match="without a budget"):
        plain.budget()
    plain.close()
    ours.close()


def test_reset_replays(lib):
    """sc_policy_reset restarts a planned request: the same decisions again."""
    rng = np.random.default_rng(5)
    table = SensitivityTable(np.array([0.0, 1000.0]), np.array([1.0, 2.0]), np.array([0.1, 0.2]))
    table.budget = random_curves(rng)
    ours = native.Table.from_json(lib, table.to_bytes())
    steps = 12
    budget = native.Budget(ctypes.sizeof(native.Budget), native.SC_BUDGET_NFE, native.SC_BUDGET_HARD, 6.0, 0)
    policy = native.Policy.with_budget(lib, ours, SENCACHE_ONLINE, budget, steps, 2, 100)
    drifts = rng.exponential(1.0, (steps, 2)).astype(np.float32)
    ts = np.linspace(1000, 0, steps)
    first = [policy.decide(i, float(ts[i]), drifts[i])[0].tolist() for i in range(steps)]
    policy.reset()
    again = [policy.decide(i, float(ts[i]), drifts[i])[0].tolist() for i in range(steps)]
    assert first == again and all(sum(r[b] for r in first) == 6 for b in range(2))
    policy.close()
    ours.close()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"format": "other"}, "not sencache-budget/1 curves"),
        ({"steps": [10, 10]}, "steps must be increasing"),
        ({"steps": [1, 20]}, "steps must be at least 2"),
        ({"eps_grid": [0.2, 0.1, 0.3, 0.4]}, "eps_grid must be finite"),
        ({"fractions": [[1.0, 0.8, 0.9, 0.5], [1.0, 0.6, 0.4, 0.3]]}, "fractions must not grow"),
        ({"fractions": [[1.0, 0.8, 0.6, 0.0], [1.0, 0.6, 0.4, 0.3]]}, "one fraction in"),
        ({"profiles": [[0.1] * 9, [0.1] * 20]}, "one finite non-negative score per step"),
        ({"eps_ratio": -1.0}, "eps_ratio"),
        ({"force_last": 1}, "true or false"),
        (
            {
                "online": {
                    "steps": 10,
                    "eps_grid": [0.1, 0.2],
                    "fractions": [0.5, 0.9],
                    "rate": 0.5,
                    "bound": 4,
                    "prior": 2,
                }
            },
            "must not grow",
        ),
        ({"max_reuse": None}, "expected"),
        ({"costs": {"steps": 2, "cost": [[0.0, 1.0], [1.0, 0.0]]}}, "0 on and below the diagonal"),
        ({"costs": {"steps": 3, "cost": [[0.0, 1.0], [0.0, 0.0]]}}, "must be a 3 x 3 matrix"),
        ({"costs": {"steps": 2, "cost": [[0.0, -1.0], [0.0, 0.0]]}}, "non-negative"),
        (
            {"costs": {"steps": 2, "cost": [[0.0, 1.0], [0.0, 0.0]], "score_sq": [[0.0, 1.0]]}},
            "mean squared scores must be a 2 x 2 matrix",
        ),
        (
            {"costs": {"steps": 2, "cost": [[0.0, 1.0], [0.0, 0.0]], "score_sq": [[0.0, 1.0], [1.0, 0.0]]}},
            "mean squared scores must be finite, non-negative, and 0 on and below the diagonal",
        ),
        (
            {"costs": {"steps": 2, "cost": [[0.0, 1.0], [0.0, 0.0]], "error_sq": [[1.0, 2.0], [1.0]]}},
            "mean observed reuse errors must be a 2 x depth matrix",
        ),
        (
            {"costs": {"steps": 2, "cost": [[0.0, 1.0], [0.0, 0.0]], "error_sq": [[], []]}},
            "mean observed reuse errors must be a 2 x depth matrix",
        ),
        (
            {"costs": {"steps": 2, "cost": [[0.0, 1.0], [0.0, 0.0]], "error_sq": [[1.0], [-1.0]]}},
            "mean observed reuse errors must be finite and non-negative",
        ),
    ],
)
def test_corrupt_curves_refused_alike(lib, change, needle):
    """Curves the runtime refuses to load, the native reader refuses too, in the same words."""
    import json

    sys.path.insert(0, str(Path(__file__).parents[2] / "tests"))
    from budget_tables import TABLE, curves

    document = TABLE.to_dict()
    document["budget"] = {**curves().to_dict(), **change}
    data = json.dumps(document).encode()
    with pytest.raises(BadInput, match="corrupt NFE-budget curves") as theirs:
        SensitivityTable.parse(data, "(memory)")
    with pytest.raises(ValueError, match="corrupt NFE-budget curves") as ours:
        native.Table.from_json(lib, data)
    assert needle in str(theirs.value) and needle in str(ours.value)


SENCACHE_PLAN = 3  # sc_rule, ABI 5
PLAN_TRACES = int(os.environ.get("SENCACHE_PLAN_TRACES", 4_000))


def random_costs(rng: np.random.Generator) -> ReuseCosts:
    """An upper-triangular cost matrix: exponential entries, some zero, some repeated (ties); in
    most, mean squared scores alike (the plan re-planned per sample from its drift)."""
    steps = int(rng.integers(2, 40))
    cost = rng.exponential(1.0, (steps, steps)) * 10 ** rng.uniform(-6, 2)
    cost[rng.random((steps, steps)) < 0.1] = 0.0
    if rng.random() < 0.3:
        cost = np.round(cost, 1)  # ties between schedules
    score_sq = None
    if rng.random() < 0.7:
        scores = rng.exponential(1.0, (steps, steps)) * 10 ** rng.uniform(-3, 3)
        scores[rng.random((steps, steps)) < 0.05] = 0.0  # no ratio: the calibration's plan
        score_sq = tuple(tuple(row) for row in np.triu(scores, k=1).tolist())
    error_sq = None
    if score_sq is not None and rng.random() < 0.6:
        errors = rng.exponential(1.0, (steps, int(rng.integers(1, 6)))) * 10 ** rng.uniform(-4, 2)
        errors[rng.random(errors.shape) < 0.1] = 0.0  # not measured: nothing expected
        error_sq = tuple(tuple(row) for row in errors.tolist())
    return ReuseCosts(steps, tuple(tuple(row) for row in np.triu(cost, k=1).tolist()), score_sq, error_sq)


def random_drifts(rng: np.random.Generator, batch: int) -> np.ndarray:
    """Squared drifts over six decades, now and then NaN or inf."""
    drift = rng.exponential(1.0, batch) * 10 ** rng.uniform(-3, 3)
    drift[rng.random(batch) < 0.01] = np.nan
    drift[rng.random(batch) < 0.01] = np.inf
    return drift.astype(np.float32)


def plan_traces(chunk: int, count: int) -> dict[str, int]:
    """`count` random sencache-plan requests from seed (20261204, chunk): the same decisions (every
    step's run flags, scores, NaN threshold, forced; each sample re-planned from random drifts where
    the costs have mean squared scores) or the same refusal."""
    lib = native.load()
    rng = np.random.default_rng((20261204, chunk))
    tally = dict.fromkeys(
        ("traces", "live", "observing", "observed", "decisions", "runs", "budget", "field", "read"), 0
    )
    for trace in range(count):
        table = random_table(rng)
        table.budget = dataclasses.replace(random_curves(rng), costs=random_costs(rng) if rng.random() < 0.9 else None)
        costs = table.budget.costs
        measured = costs.steps if costs is not None else 10
        steps = int(rng.choice([measured, int(rng.integers(1, 90))]))
        batch = int(rng.integers(1, 5))
        knobs, budget = random_budget(rng, steps)
        where = f"chunk {chunk} trace {trace} (sencache-plan {knobs}, {steps} steps)"
        theirs_table = native.Table.from_json(lib, table.to_bytes())
        tally["read"] += 1
        try:
            want = make_plan_policy(check_knobs("sencache-plan", knobs), table, steps, batch, 100)
        except BadInput as refused:
            with pytest.raises(native.NativeError) as error:
                native.Policy.with_budget(lib, theirs_table, SENCACHE_PLAN, budget, steps, batch, 100)
            tally[check_refusal(refused, error.value, where)] += 1
            theirs_table.close()
            continue
        ours = native.Policy.with_budget(lib, theirs_table, SENCACHE_PLAN, budget, steps, batch, 100)
        theirs_table.close()
        assert ours.budget()[2] == want.budget["nfe"], where
        live = want.live is not None
        for step in range(steps):
            t = float(steps - step)
            if live and not want.forced[step] and rng.random() < 0.05:
                with pytest.raises(ValueError, match="re-plans each sample from its drift"):
                    ours.decide(step, t, None)
            drift = random_drifts(rng, batch) if live else None
            decision = decide_both(want, ours, step, t, drift, f"{where} step {step}")
            assert live or np.all(np.isnan(decision.score)), f"{where} step {step}"
            tally["decisions"] += batch
            tally["runs"] += int(decision.run.sum())
            if isinstance(want, ObservingPlanPolicy):
                tally["observed"] += observe_both(rng, step, decision.run, want, ours, f"{where} step {step}")
        assert not live or np.all(want.left == 0), where  # every sample ran exactly the budget
        ours.close()
        tally["traces"] += 1
        tally["live"] += live
        tally["observing"] += isinstance(want, ObservingPlanPolicy)
    return tally


def test_random_plan_traces():
    """PLAN_TRACES sencache-plan requests on random reuse costs (read at the measured and at other
    step counts, ties included), in chunks over the CPUs."""
    total = in_chunks(plan_traces, PLAN_TRACES, 8)
    print(
        f"\nplan parity: {PLAN_TRACES} budgets, {total['traces']} planned alike ({total['live']} re-planned per "
        f"sample from random drifts, {total['observing']} of them also from {total['observed']} observed errors), "
        f"{total['decisions']} per-sample "
        f"decisions ({total['runs']} run); refused alike: {total['budget']} by the budget (same message), "
        f"{total['field']} by a field's range; 0 mismatches"
    )
    assert total["traces"] > PLAN_TRACES // 3 and total["budget"] > PLAN_TRACES // 50
    assert total["traces"] // 2 < total["live"] < total["traces"]
    assert total["live"] // 4 < total["observing"] < total["live"] and total["observed"] > total["observing"]
    assert 0 < total["runs"] < total["decisions"]
