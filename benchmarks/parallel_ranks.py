"""What the parallelism benchmarks run on each rank: the rank group with its decision all-reduce
timed, the requests they generate, and rank 0's loop over the step engine's passes."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from sencache.runtime.model import Model
from sencache.runtime.parallel.group import RankGroup
from sencache.runtime.request import GenerationParams
from sencache.runtime.stepping import StepEngine

PROMPTS = ("one small red circle moving right slow on black", "two large blue squares static on gradient")


class TimedGroup(RankGroup):
    """The rank group, with each decision all-reduce timed (the real collective, nothing else)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reduce_s: list[float] = []

    def reduce(self, partial: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        total = super().reduce(partial)
        self.reduce_s.append(time.perf_counter() - start)
        return total


def requests(model: Model, samples: int, steps: int, knobs: dict[str, Any]) -> list[GenerationParams]:
    """`samples` one-sample guided requests of `steps` steps under SenCache with `knobs` set."""
    defaults = model.bundle.manifest.defaults
    return [
        GenerationParams.resolve(defaults, [PROMPTS[i % len(PROMPTS)]], [i + 1], steps=steps, knobs=knobs)
        for i in range(samples)
    ]


def drive(
    stepper: StepEngine, batch: list[GenerationParams], timed: TimedGroup | None
) -> tuple[list[int], list[dict[str, float]]]:
    """Rank 0 (or a lone rank): run `batch` to its end in shared passes. Returns the requests' ids
    and, per pass that issued the decision all-reduce on `timed`, the pass's time, the reduce's and
    its index among the group's reduces (every rank issues the same ones, in the same order)."""
    ids = [stepper.submit(request) for request in batch]
    passes = []
    while stepper.busy:
        reduced = len(timed.reduce_s) if timed is not None else 0
        start = time.perf_counter()
        stepper.step()
        took = time.perf_counter() - start
        if timed is not None and len(timed.reduce_s) > reduced:
            passes.append({"pass_s": took, "reduce_s": timed.reduce_s[-1], "index": len(timed.reduce_s) - 1})
    return ids, passes


def shares(passes: list[dict[str, float]], reduce_s: list[list[float]]) -> dict[str, float]:
    """The decision all-reduce's cost against its pass, from rank 0's `passes` and every rank's
    reduce times. A collective's first rank to arrive also waits for the last: the last rank's
    time is the collective's own cost (the share), rank 0's includes that wait (share_rank0)."""
    own = np.array([min(times[int(p["index"])] for times in reduce_s) for p in passes])
    first = np.array([p["reduce_s"] for p in passes])
    total = np.array([p["pass_s"] for p in passes])
    share = own / total
    return {
        "passes": len(passes),
        "pass_ms_median": float(np.median(total)) * 1e3,
        "reduce_us_median": float(np.median(own)) * 1e6,
        "reduce_us_q25": float(np.percentile(own, 25)) * 1e6,
        "reduce_us_q75": float(np.percentile(own, 75)) * 1e6,
        "share_median": float(np.median(share)),
        "share_q25": float(np.percentile(share, 25)),
        "share_q75": float(np.percentile(share, 75)),
        "share_max": float(share.max()),
        "share_rank0_median": float(np.median(first / total)),
    }
