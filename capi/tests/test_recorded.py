"""The native rule against the engine's own decisions on recorded tiny-wan runs: the Python step
engine runs requests (batches of 1 and 2, several knobs, both rules) with each request's rule
recording what it was given; the native policy, loaded from the same bundle (its table and its
default settings read natively), replays the inputs and must decide the same, step for step."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import native  # noqa: E402

from sencache.runtime.bundle import Bundle  # noqa: E402
from sencache.runtime.model import Model  # noqa: E402
from sencache.runtime.request import GenerationParams  # noqa: E402
from sencache.runtime.stepping import StepEngine  # noqa: E402

BUNDLE = os.environ.get("SENCACHE_TEST_BUNDLE", "")
PROMPTS = [
    "one small red circle static on black",
    "two small blue squares moving right slow on black",
    "one large green square moving down fast on gradient",
]


class Recording:
    """A rule that records every decide() call and its decision, and otherwise is the rule."""

    def __init__(self, rule) -> None:
        self.rule = rule
        self.calls: list[tuple[int, float, np.ndarray | None, np.ndarray]] = []

    def __getattr__(self, name: str):
        return getattr(self.rule, name)

    def decide(self, step, t, drift_sumsq=None, modulation=None):
        decision = self.rule.decide(step, t, drift_sumsq, modulation)
        drift = None if drift_sumsq is None else np.array(drift_sumsq, dtype=np.float32)
        self.calls.append((step, t, drift, decision.run.copy()))
        return decision


@pytest.mark.skipif(not BUNDLE, reason="SENCACHE_TEST_BUNDLE names no bundle (ctest sets it)")
def test_recorded_runs_match():
    lib = native.load()
    bundle = Bundle.load(Path(BUNDLE))
    model = Model.open(bundle, threads=1)
    table = ctypes.c_void_p()
    assert lib.sc_table_load_bundle(BUNDLE.encode(), ctypes.byref(table)) == 0, lib.sc_last_error()
    lib.sc_policy_settings_from_bundle.argtypes = [ctypes.c_char_p, ctypes.POINTER(native.Settings)]
    defaults = native.Settings()
    assert lib.sc_policy_settings_from_bundle(BUNDLE.encode(), ctypes.byref(defaults)) == 0, lib.sc_last_error()
    manifest = bundle.manifest.defaults.knobs("sencache")
    assert (defaults.eps_start, defaults.eps_main, defaults.max_reuse) == (
        manifest["eps_start"],
        manifest["eps_main"],
        manifest["max_reuse"],
    )
    engine = StepEngine(model)
    runs = []
    cases = [
        ("sencache", {}, 1),
        ("sencache", {"eps_main": manifest["eps_main"] * 3, "max_reuse": 4}, 2),
        ("sencache-max", {}, 1),
        ("sencache", {"eps_start": 0.0, "eps_main": manifest["eps_main"] / 3}, 2),
    ]
    for k, (method, knobs, batch) in enumerate(cases):
        steps = 10 + 4 * k
        request = GenerationParams(PROMPTS[:batch], list(range(k, k + batch)), steps, bundle.manifest.defaults.guidance)
        rule = Recording(model.policy(method, steps, batch, knobs))
        engine.submit(request, rule)
        runs.append((method, knobs, batch, steps, rule))
    while engine.busy:
        engine.step()
    decisions = reuses = 0
    for method, knobs, batch, steps, rule in runs:
        s = rule.rule.config
        ours = native.Policy(
            lib,
            native.Table(lib, table),
            int(method == "sencache-max"),
            s.eps_start,
            s.eps_main,
            s.max_reuse,
            s.switch_frac,
            s.force_last,
            steps,
            batch,
            model.numel,
        )
        assert len(rule.calls) == steps
        for step, t, drift, want in rule.calls:
            run, _, _, _ = ours.decide(step, t, drift)
            assert np.array_equal(run, want), f"{method} {knobs}: step {step}: {run} != {want}"
            decisions += batch
            reuses += int((~want).sum())
        ours.close()
    lib.sc_table_destroy(table)
    print(
        f"\nrecorded tiny-wan runs: {len(runs)} requests, {decisions} per-sample decisions "
        f"({reuses} reuse), 0 mismatches"
    )
    assert reuses > 0


class RecordingObserver(Recording):
    """A Recording of a rule that learns: the reuse errors the engine observes are recorded too."""

    def __init__(self, rule) -> None:
        super().__init__(rule)
        self.observed: dict[int, list[np.ndarray]] = {}

    def observe(self, step, error_sumsq):
        self.observed.setdefault(step, []).append(np.array(error_sumsq, dtype=np.float64))
        self.rule.observe(step, error_sumsq)


@pytest.mark.skipif(not BUNDLE, reason="SENCACHE_TEST_BUNDLE names no bundle (ctest sets it)")
def test_recorded_budgets_match():
    """Requests with NFE budgets (sencache and sencache-online, threshold and hard) run by the
    engine; the native rule made by sc_policy_create_budget from the bundle's table (its budget
    curves read natively) replays their inputs and observed errors, and must decide the same."""
    lib = native.load()
    bundle = Bundle.load(Path(BUNDLE))
    model = Model.open(bundle, threads=1)
    handle = ctypes.c_void_p()
    assert lib.sc_table_load_bundle(BUNDLE.encode(), ctypes.byref(handle)) == 0, lib.sc_last_error()
    table = native.Table(lib, handle)
    assert table.has_budget() > 0, "the bundle's table carries no budget curves"
    engine = StepEngine(model)
    cases = [  # (method, knobs, batch, steps, the same budget as an sc_budget)
        ("sencache", {"nfe": 6, "budget": "hard"}, 2, 12, (native.SC_BUDGET_NFE, native.SC_BUDGET_HARD, 6.0, 0)),
        ("sencache", {"speed": "fast"}, 1, 16, (native.SC_BUDGET_SPEED, native.SC_BUDGET_THRESHOLD, 0.0, 3)),
        ("sencache-online", {"nfe": 7, "budget": "hard"}, 2, 14, (native.SC_BUDGET_NFE, native.SC_BUDGET_HARD, 7.0, 0)),
        ("sencache-online", {"speedup": 2.0}, 1, 20, (native.SC_BUDGET_SPEEDUP, native.SC_BUDGET_THRESHOLD, 2.0, 0)),
    ]
    runs = []
    for k, (method, knobs, batch, steps, budget) in enumerate(cases):
        request = GenerationParams(PROMPTS[:batch], list(range(k, k + batch)), steps, bundle.manifest.defaults.guidance)
        rule = model.policy(method, steps, batch, knobs)
        recording = RecordingObserver(rule) if method == "sencache-online" else Recording(rule)
        engine.submit(request, recording)
        runs.append((method, knobs, batch, steps, budget, recording))
    while engine.busy:
        engine.step()
    decisions = reuses = observed = 0
    for method, knobs, batch, steps, budget, recording in runs:
        rule_id = 2 if method == "sencache-online" else 0
        ours = native.Policy.with_budget(
            lib, table, rule_id, native.Budget(ctypes.sizeof(native.Budget), *budget), steps, batch, model.numel
        )
        assert len(recording.calls) == steps
        for step, t, drift, want in recording.calls:
            run, _, _, _ = ours.decide(step, t, drift)
            assert np.array_equal(run, want), f"{method} {knobs}: step {step}: {run} != {want}"
            for error_sumsq in getattr(recording, "observed", {}).get(step, []):
                ours.observe(step, error_sumsq)
                observed += 1
            decisions += batch
            reuses += int((~want).sum())
        if method == "sencache-online":  # the host meter's float64 drift reaches the ABI as float32:
            # the table's scores, so the learnt factors, agree to float32's precision, not bitwise
            np.testing.assert_allclose(ours.factor(), recording.rule.factor, rtol=1e-5, err_msg=f"{method} {knobs}")
        ours.close()
    table.close()
    print(
        f"\nrecorded tiny-wan budget runs: {len(runs)} requests, {decisions} per-sample decisions "
        f"({reuses} reuse, {observed} observations), 0 mismatches"
    )
    assert reuses > 0 and observed > 0
