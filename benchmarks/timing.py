"""Speed-ups that survive a shared machine: cached runs interleaved with uncached ones.

The runs form one chain, uncached and cached alternating: U C1 U C2 U ... Cn U, repeated. Each
cached run pairs with the uncached run just before it and the one just after it; each pair's ratio
is a speed-up. Load from other processes shifts neighbouring runs about alike, so a ratio is
steadier than either time, and pairing with both neighbours balances a load that grows or fades.
The speed-up reported is the median ratio with its range; when the range is wider than
`MAX_SPREAD` of the median the figure is marked as not to be trusted, and a speed-up above what the
loop's floor allows (it cannot run faster than its own steps) is marked as disturbed timing. With
one repeat a disturbance that hits only the cached run is not seen in the spread (it lowers both
of its ratios alike); more repeats see it.

The statistics here are pure; `run_chain` only calls the given timed functions in order.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_SPREAD = 0.2
"""Widest (max - min) / median of the pairs' ratios whose median is still reported as trusted."""
FLOOR_TOLERANCE = 0.03
"""How far above its floor's speed-up a measured one may lie before it is flagged: the floor is
itself timed, so a few percent either way is measurement noise; beyond that the timing was disturbed."""


@dataclass(frozen=True)
class PairedTiming:
    """Seconds of each pair's uncached and cached run, and what they say about the speed-up."""

    uncached_s: tuple[float, ...]
    cached_s: tuple[float, ...]
    max_spread: float = MAX_SPREAD

    def __post_init__(self) -> None:
        if not self.uncached_s or len(self.uncached_s) != len(self.cached_s):
            raise ValueError(f"pairs need as many uncached as cached times, got {self.uncached_s} and {self.cached_s}")
        if min(self.uncached_s + self.cached_s) <= 0:
            raise ValueError("timed runs must take a positive time")

    @property
    def ratios(self) -> tuple[float, ...]:
        """Each pair's speed-up: its uncached over its cached time."""
        return tuple(u / c for u, c in zip(self.uncached_s, self.cached_s, strict=True))

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def low(self) -> float:
        return min(self.ratios)

    @property
    def high(self) -> float:
        return max(self.ratios)

    @property
    def spread(self) -> float:
        """(max - min) / median of the ratios: 0 when every pair agrees."""
        return (self.high - self.low) / self.median

    @property
    def warning(self) -> str | None:
        """Why the median should not be trusted, or None when it can be."""
        if len(self.ratios) < 2:
            return "one pair only: the spread is unmeasured, so the speed-up may be disturbed"
        if self.spread > self.max_spread:
            return (
                f"the {len(self.ratios)} pairs disagree by {self.spread:.0%} of the median (more than "
                f"{self.max_spread:.0%}): the machine was busy; do not trust this speed-up"
            )
        return None

    def describe(self) -> str:
        """`1.52x (1.48-1.60 over 4 pairs)`."""
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f} over {len(self.ratios)} pairs)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "pairs": len(self.ratios),
            "uncached_s": list(self.uncached_s),
            "cached_s": list(self.cached_s),
            "ratios": list(self.ratios),
            "median": self.median,
            "low": self.low,
            "high": self.high,
            "spread": self.spread,
            "max_spread": self.max_spread,
            "warning": self.warning,
        }


def run_chain(
    uncached: Callable[[], float],
    cached: Sequence[Callable[[int], float]],
    repeats: int,
    max_spread: float = MAX_SPREAD,
) -> list[PairedTiming]:
    """Call U, then `repeats` times C_1 U C_2 U ... C_n U, where U is `uncached()` and C_i is
    `cached[i](repeat)`; each returns the seconds of its timed part. Returns, per cached function,
    its 2 x `repeats` pairs with the uncached runs on either side."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not cached:
        raise ValueError("nothing to time: no cached runs")
    before = uncached()
    pairs: list[tuple[list[float], list[float]]] = [([], []) for _ in cached]
    for repeat in range(repeats):
        for run, (uncached_s, cached_s) in zip(cached, pairs, strict=True):
            seconds = run(repeat)
            after = uncached()
            uncached_s += [before, after]
            cached_s += [seconds, seconds]
            before = after
    return [PairedTiming(tuple(u), tuple(c), max_spread) for u, c in pairs]


def floor_speedup(steps: int, mean_nfe: float, reuse_share: float) -> float:
    """The most a cached loop can gain: steps full steps against `mean_nfe` full steps and
    steps - mean_nfe steps that reuse, each costing `reuse_share` of a full step."""
    if not 0 < mean_nfe <= steps:
        raise ValueError(f"mean NFE must be in (0, {steps}], got {mean_nfe}")
    return steps / (mean_nfe + (steps - mean_nfe) * reuse_share)


def below_floor(speedup: float, ceiling: float, tolerance: float = FLOOR_TOLERANCE) -> bool:
    """True when `speedup` beats the floor's `ceiling` by more than `tolerance`: impossible for
    the loop itself, so the timing was disturbed."""
    return speedup > ceiling * (1 + tolerance)
