"""Per-step decision time of the hard NFE budget (issue 21): the table planned once per request
(`SenCacheHardBudget`) against the per-step bisection it replaced, kept here as the oracle that
tests/test_hard_budget.py checks the table's decisions against.

    python -m sencache.benchmarks.decision_overhead [--out benchmarks/results/decision_overhead]

For each step count and batch, every round is one request of both rules on the same random
trace of drifts; their decisions alternate in order step by step, each timed alone, and must
agree. Also timed: building the table (once per request), reported per step too. Pure NumPy,
one thread (torch.set_num_threads(1)). Writes report.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sencache.benchmarks.capi_overhead import summary
from sencache.runtime.cache.base import StepDecision
from sencache.runtime.cache.budget import SenCacheHardBudget
from sencache.runtime.cache.sencache import SenCacheSettings
from sencache.runtime.files import write_atomic
from sencache.runtime.sensitivity import SensitivityTable

TABLE = SensitivityTable(np.array([0.0, 500.0, 1000.0]), np.array([1.0, 2.0, 4.0]), np.array([0.01, 0.02, 0.03]))


# The oracle: the hard mode's decisions as they were made before the table, by bisecting a
# threshold per sample at every step (verbatim but for names); tests/test_hard_budget.py checks
# the table against it.

ORACLE_ITERATIONS = 40


def oracle_thresholds(
    scores: np.ndarray, runs_left: np.ndarray, increments: np.ndarray, forced: np.ndarray
) -> np.ndarray:
    """Per sample, the largest threshold under which the runs expected from now on reach
    `runs_left`, by bisection."""

    def runs(tau: np.ndarray) -> np.ndarray:
        count = (scores >= tau).astype(np.int64)
        acc = np.where(count > 0, 0.0, scores)
        for increment, is_forced in zip(increments, forced, strict=True):
            if is_forced:
                acc = np.zeros_like(acc)
                continue
            acc = acc + increment
            hit = acc >= tau
            count += hit
            acc = np.where(hit, 0.0, acc)
        return count

    low = np.zeros_like(scores)
    high = scores + float(np.sum(increments)) + 1.0
    for _ in range(ORACLE_ITERATIONS):
        middle = (low + high) / 2
        enough = runs(middle) >= runs_left
        low, high = np.where(enough, middle, low), np.where(enough, high, middle)
    return low


class OracleHardBudget(SenCacheHardBudget):
    """The hard mode deciding by `oracle_thresholds` at every step."""

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation: np.ndarray | None = None
    ) -> StepDecision:
        batch = len(self.spent)
        forced = bool(self.forced_steps[step])
        if forced:
            run, score = np.ones(batch, bool), np.full(batch, np.nan)
        else:
            _, score = self._scores(t, drift_sumsq)
            left = self.nfe - self.spent - self.forced_after[step]
            run = left >= self.free_from[step]
            open_ = (left > 0) & ~run
            if open_.any():
                tau = oracle_thresholds(
                    score[open_], left[open_], self.profile[step + 1 :], self.forced_steps[step + 1 :]
                )
                run[open_] = score[open_] >= tau
        self.spent += run
        self._commit(step, t, run)
        return StepDecision(run, score, math.nan, forced)


def measure(oracle: type[SenCacheHardBudget], steps: int, batch: int, rounds: int) -> dict[str, object]:
    """Per-step decision times (seconds) of the table and the oracle, and the table's build time,
    for a budget of half the steps over `rounds` requests of random drifts."""
    settings = SenCacheSettings(0.0, 0.0, 3)
    profile = np.linspace(0.05, 0.2, steps)
    profile[0] = 0.0
    nfe = steps // 2
    table_s: list[float] = []
    oracle_s: list[float] = []
    build_s: list[float] = []
    for r in range(rounds):
        rng = np.random.default_rng(r)
        drifts = rng.lognormal(-3.0, 1.5, (steps, batch)) ** 2 * rng.choice([0.0, 1.0, 50.0], (steps, batch))
        start = time.perf_counter()
        mine = SenCacheHardBudget(settings, TABLE, steps, batch, 4, nfe, profile)
        build_s.append(time.perf_counter() - start)
        old = oracle(settings, TABLE, steps, batch, 4, nfe, profile)
        for i in range(steps):
            t, drift = 1000.0 * (1 - i / steps), None if i == 0 else drifts[i]
            order = ((mine, table_s), (old, oracle_s)) if (r + i) % 2 else ((old, oracle_s), (mine, table_s))
            runs = []
            for policy, times in order:
                start = time.perf_counter()
                runs.append(policy.decide(i, t, drift).run)
                times.append(time.perf_counter() - start)
            if not (runs[0] == runs[1]).all():
                raise RuntimeError(f"the table and the oracle disagree at step {i} of round {r}")
    return {
        "steps": steps,
        "batch": batch,
        "nfe": nfe,
        "rounds": rounds,
        "table_decide": summary(table_s),
        "oracle_decide": summary(oracle_s),
        "table_build": summary(build_s),
        "table_build_per_step_us": float(np.median(build_s)) * 1e6 / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decision_overhead"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = []
    for steps in args.steps:
        for batch in args.batch:
            cases.append(measure(OracleHardBudget, steps, batch, args.rounds))
            print(json.dumps(cases[-1]), flush=True)
    report = {
        "tool": "sencache.benchmarks.decision_overhead",
        "machine": {
            "cpu": platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "threads": torch.get_num_threads(),
        },
        "cases": cases,
    }
    write_atomic(args.out / "report.json", (json.dumps(report, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
