"""The one table of cache knobs: the command line, the Python API, the server and the cache rules'
own settings all read it, so a knob is named, typed, bounded and explained once; which methods
take a knob is what the rules register (`registry`). Its errors name the knob as the Python API
does (each front end spells it its own way)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from sencache.runtime.cache.registry import RULES, rule_knobs
from sencache.runtime.conventions import NAMES as CONVENTIONS
from sencache.runtime.errors import BadInput
from sencache.runtime.limits import MAX_STEPS


@dataclass(frozen=True)
class Knob:
    """One setting of a cache rule."""

    name: str
    type: type
    """int, float, or str (then one of `choices`)."""
    low: float
    high: float
    help: str
    choices: tuple[str, ...] = ()
    """The values a str knob takes."""

    def check(self, value: object) -> int | float | str:
        """`value` as this knob's type, or a BadInput naming the knob and its range or choices."""
        if self.type is str:
            if value not in self.choices:
                raise BadInput(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}", param=self.name)
            return str(value)
        span = f"[{self.low:g}, {'inf' if math.isinf(self.high) else f'{self.high:g}'}]"
        wrong = BadInput(
            f"{self.name} must be {'an integer' if self.type is int else 'a number'} in {span}, got {value!r}",
            param=self.name,
        )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if self.type is int and not float(value).is_integer():
            raise wrong
        number = self.type(value) if math.isfinite(value) else value
        if not (math.isfinite(number) and self.low <= number <= self.high):
            raise wrong
        return number

    @property
    def methods(self) -> tuple[str, ...]:
        """The cache methods that take this knob, in the order they are registered."""
        return tuple(method for method, rules in RULES.items() if any(self.name in r.knobs for r in rules))


SPEEDS: dict[str, float] = {"lossless": 0.9, "high": 0.75, "balanced": 0.6, "fast": 0.45}
"""Named NFE budgets of the `speed` knob, each the fraction of the steps a sample runs (a speed-up
of 1/fraction at any step count); named for the trade-off they aim at, not a quality guarantee."""
BUDGET_TARGETS = ("nfe", "speedup", "speed")
"""The knobs that ask for an NFE budget instead of thresholds: at most one per request."""
BUDGET_MODES = ("threshold", "hard")
KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("eps_start", float, 0.0, math.inf, "sencache: threshold of the first 20% of steps"),
        Knob("eps_main", float, 0.0, math.inf, "sencache: threshold after that"),
        Knob("max_reuse", int, 0, MAX_STEPS, "sencache, magcache: most reuses in a row"),
        Knob(
            "conventions",
            str,
            0,
            0,
            "sencache: engine (default) or reference (the authors' code for the model's "
            "family: step counting, forced steps, nearest-timestep table, fixed score constant)",
            CONVENTIONS,
        ),
        Knob(
            "online_rate",
            float,
            0.0,
            1.0,
            "sencache-online: weight of the newest observed/predicted reuse-error log-ratio in each "
            "sample's moving average (0: plain sencache)",
        ),
        Knob("online_bound", float, 1.0, 1e6, "sencache-online: the learnt factor stays within [1/bound, bound]"),
        Knob(
            "online_prior",
            float,
            0.0,
            1e6,
            "sencache-online: observations at which the learnt factor gets half its weight (0: full weight at once)",
        ),
        Knob("nfe", int, 1, MAX_STEPS, "sencache, sencache-online: NFE budget per sample instead of eps (see budget)"),
        Knob("speedup", float, 1.0, MAX_STEPS, "sencache, sencache-online: NFE budget as steps/NFE instead of eps"),
        Knob(
            "speed",
            str,
            0,
            0,
            "sencache, sencache-online: a named NFE budget instead of eps, the fraction of steps run: "
            + ", ".join(f"{k} {v:g}" for k, v in SPEEDS.items()),
            tuple(SPEEDS),
        ),
        Knob(
            "budget",
            str,
            0,
            0,
            "with nfe/speedup/speed: threshold (default: NFE on average; sencache: eps from calibrated "
            "curves, sencache-online: the planned budget, max_reuse still applies) or hard (exactly that NFE)",
            BUDGET_MODES,
        ),
        Knob("interval", int, 1, MAX_STEPS, "fixed: run every K-th step"),
        Knob("warmup", int, 0, MAX_STEPS, "fixed: run all of the first W steps"),
        Knob("threshold", float, 0.0, math.inf, "teacache, magcache: accumulated-error threshold"),
        Knob("retention", float, 0.0, 1.0, "magcache: fraction of first steps always run"),
    )
}


def register_knob(knob: Knob) -> Knob:
    """Add a knob that a newly registered rule takes (the table's own knobs are listed above)."""
    if knob.name in KNOBS:
        raise ValueError(f"cache knob {knob.name!r} is registered twice")
    KNOBS[knob.name] = knob
    return knob


def method_knobs(method: str) -> tuple[str, ...]:
    """The knobs `method` takes, in the table's order, or a BadInput listing the methods."""
    allowed = rule_knobs(method)
    return tuple(name for name in KNOBS if name in allowed)


def check_knobs(method: str, knobs: Mapping[str, object] | None) -> dict[str, int | float | str]:
    """The set knobs of `method` (None values dropped), each checked against the table."""
    allowed = method_knobs(method)
    given = {k: v for k, v in (knobs or {}).items() if v is not None}
    for name in sorted(given):
        if name not in KNOBS:
            raise BadInput(f"knobs has an unknown cache knob {name!r} (known: {', '.join(KNOBS)})", param="knobs")
        if name not in allowed:
            raise BadInput(f"{name} does not apply to cache {method!r}", param=name)
    checked = {name: KNOBS[name].check(value) for name, value in given.items()}
    _check_budget(checked)
    return checked


def _check_budget(knobs: Mapping[str, object]) -> None:
    """A budget is one of nfe, speedup, speed, instead of the rule's own thresholds."""
    targets = [name for name in BUDGET_TARGETS if name in knobs]
    if len(targets) > 1:
        raise BadInput(f"{targets[1]} cannot be given with {targets[0]}: ask for one NFE budget", param=targets[1])
    if "budget" in knobs and not targets:
        raise BadInput("budget needs an NFE budget: nfe, speedup or speed", param="budget")
    if targets:
        clash = [name for name in ("eps_start", "eps_main", "max_reuse", "conventions") if name in knobs]
        if clash:
            raise BadInput(
                f"{clash[0]} cannot be given with {targets[0]}: an NFE budget chooses the thresholds "
                f"(under the engine's conventions and the calibrated max_reuse)",
                param=clash[0],
            )


def check_settings(settings: object, *names: str) -> None:
    """Check the knobs `names` of a cache rule's settings against the table, so a rule's settings
    are bounded exactly as its knobs are; a BadInput names the first bad one."""
    for name in names:
        KNOBS[name].check(getattr(settings, name))
