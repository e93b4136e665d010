"""The rules SenCache is measured against, inside the same runtime (SPEC section 5).

Only the decision differs: the cache mechanics (residual per sample and branch, head and tail on
every step) are the engine's. All rules keep per-sample state so they can share the loop, though
TeaCache and MagCache on Wan decide the same for every sample (their signals depend on t alone).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sencache.runtime.cache.base import StepDecision, forced_step
from sencache.runtime.cache.knobs import check_settings
from sencache.runtime.cache.registry import DefaultsSection, Rule, RuleContext, register_defaults, register_rule
from sencache.runtime.errors import BadInput


@dataclass(frozen=True)
class FixedSettings:
    interval: int
    warmup: int = 0
    force_last: bool = True

    def __post_init__(self) -> None:
        check_settings(self, "interval", "warmup")


class FixedPolicy:
    """Run every `interval`-th step (i % interval == 0), all of the first `warmup` steps, and the
    first and last step; reuse otherwise."""

    name = "fixed"
    needs_drift = False
    deterministic_drift = False
    needs_modulation = False
    may_reuse = True

    def __init__(self, settings: FixedSettings, num_steps: int, batch: int) -> None:
        self.config, self.num_steps, self.batch = settings, num_steps, batch

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self.config)}

    def warnings(self) -> list[str]:
        return []

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        forced = forced_step(step, self.num_steps, self.config.force_last)
        run = forced or step < self.config.warmup or step % self.config.interval == 0
        return StepDecision(np.full(self.batch, run), np.full(self.batch, np.nan), math.nan, forced)


@dataclass(frozen=True)
class TeaCacheDefaults:
    """The bundle's default TeaCache knobs (the manifest's defaults.teacache)."""

    threshold: float

    def __post_init__(self) -> None:
        check_settings(self, "threshold")


@dataclass(frozen=True)
class TeaCacheSettings:
    threshold: float
    coefficients: tuple[float, ...]
    """numpy.poly1d coefficients, highest power first, mapping input change to output change."""
    force_last: bool = True

    def __post_init__(self) -> None:
        check_settings(self, "threshold")
        if not self.coefficients or not all(math.isfinite(c) for c in self.coefficients):
            raise BadInput("TeaCache coefficients must be finite numbers")


class TeaCachePolicy:
    """TeaCache: accumulate poly(relative L1 change of the modulated input) since the last run;
    reuse while the sum stays below the threshold, else run and reset."""

    name = "teacache"
    needs_drift = False
    deterministic_drift = False
    needs_modulation = True
    may_reuse = True

    def __init__(self, settings: TeaCacheSettings, num_steps: int, batch: int) -> None:
        self.config, self.num_steps = settings, num_steps
        self.accumulated = np.zeros(batch)

    def settings(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "threshold": self.config.threshold,
            "coefficients": list(self.config.coefficients),
            "force_last": self.config.force_last,
        }

    def warnings(self) -> list[str]:
        return []

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        forced = forced_step(step, self.num_steps, self.config.force_last)
        batch = len(self.accumulated)
        if forced:
            run = np.ones(batch, bool)
            self.accumulated[:] = 0.0
        else:
            if modulation_change is None:
                raise ValueError("TeaCache needs the relative L1 change of the modulated input after its first step")
            self.accumulated += np.polyval(self.config.coefficients, modulation_change)
            run = self.accumulated >= self.config.threshold
        score = np.full(batch, np.nan) if forced else self.accumulated.copy()
        self.accumulated[run] = 0.0
        return StepDecision(run, score, self.config.threshold, forced)


@dataclass(frozen=True)
class MagCacheDefaults:
    """The bundle's default MagCache knobs (the manifest's defaults.magcache)."""

    threshold: float
    max_reuse: int
    retention: float

    def __post_init__(self) -> None:
        check_settings(self, "threshold", "max_reuse", "retention")


@dataclass(frozen=True)
class MagCacheSettings:
    threshold: float
    max_reuse: int
    ratios: tuple[float, ...]
    """Per-step magnitude ratio gamma of the residual (cond branch), calibrated at some step count."""
    retention: float = 0.2
    force_last: bool = True

    def __post_init__(self) -> None:
        check_settings(self, "threshold", "max_reuse", "retention")
        if len(self.ratios) < 2 or not all(math.isfinite(r) and r > 0 for r in self.ratios):
            raise BadInput("MagCache ratios must be at least two positive numbers")


def resample_ratios(ratios: tuple[float, ...], steps: int) -> np.ndarray:
    """Ratios calibrated at len(ratios) steps, linearly interpolated to `steps` steps."""
    source = np.linspace(0.0, 1.0, len(ratios))
    return np.interp(np.linspace(0.0, 1.0, steps), source, np.asarray(ratios, np.float64))


class MagCachePolicy:
    """MagCache: from the retention step on, multiply the calibrated ratios since the last run and
    add up |1 - product|; reuse while that error is below the threshold and at most max_reuse
    steps in a row reuse, else run and reset."""

    name = "magcache"
    needs_drift = False
    deterministic_drift = False
    needs_modulation = False
    may_reuse = True

    def __init__(self, settings: MagCacheSettings, num_steps: int, batch: int) -> None:
        self.config, self.num_steps = settings, num_steps
        self.gamma = resample_ratios(settings.ratios, num_steps)
        self.retention_step = int(settings.retention * num_steps)
        self.ratio = np.ones(batch)
        self.error = np.zeros(batch)
        self.reused = np.zeros(batch, dtype=np.int64)

    def settings(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "threshold": self.config.threshold,
            "max_reuse": self.config.max_reuse,
            "retention": self.config.retention,
            "force_last": self.config.force_last,
            "ratios_calibrated_steps": len(self.config.ratios),
        }

    def warnings(self) -> list[str]:
        return []

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        batch = len(self.ratio)
        forced = forced_step(step, self.num_steps, self.config.force_last)
        if forced or step < self.retention_step:
            run, score = np.ones(batch, bool), np.full(batch, np.nan)
        else:
            self.ratio = self.ratio * self.gamma[step]
            self.error = self.error + np.abs(1.0 - self.ratio)
            self.reused = self.reused + 1
            score = self.error.copy()
            run = ~((self.error < self.config.threshold) & (self.reused <= self.config.max_reuse))
        self.ratio[run], self.error[run], self.reused[run] = 1.0, 0.0, 0
        return StepDecision(run, score, self.config.threshold, forced)


BASELINES_FORMAT = "sencache-baselines/1"


@dataclass
class BaselineTables:
    """The baselines' calibrated constants for one bundle (stored as `baselines.json`)."""

    teacache_coefficients: tuple[float, ...]
    magcache_ratios: tuple[float, ...] | None
    """None where only TeaCache constants are published for a model (calibrate to get ratios)."""
    meta: dict[str, Any]

    def to_bytes(self) -> bytes:
        magcache = None if self.magcache_ratios is None else {"ratios": list(self.magcache_ratios)}
        document = {
            "format": BASELINES_FORMAT,
            "teacache": {"coefficients": list(self.teacache_coefficients)},
            "magcache": magcache,
            "meta": self.meta,
        }
        return json.dumps(document, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes, source: str) -> BaselineTables:
        """Tables from the bytes of a `baselines.json`; BadInput names `source` and the fault."""
        try:
            document = json.loads(data)
            if document.get("format") != BASELINES_FORMAT:
                raise ValueError(f"not a {BASELINES_FORMAT} file")
            magcache = document["magcache"]
            tables = cls(
                tuple(_number(c) for c in document["teacache"]["coefficients"]),
                None if magcache is None else tuple(_number(r) for r in magcache["ratios"]),
                dict(document.get("meta", {})),
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise BadInput(f"corrupt baseline tables {source}: {e}") from None
        if not all(math.isfinite(v) for v in tables.teacache_coefficients + (tables.magcache_ratios or ())):
            raise BadInput(f"corrupt baseline tables {source}: NaN or infinite values")
        if not tables.teacache_coefficients or tables.magcache_ratios == ():
            raise BadInput(f"corrupt baseline tables {source}: empty coefficient or ratio list")
        return tables


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _teacache(knobs: dict[str, Any], context: RuleContext) -> TeaCachePolicy:
    coefficients = context.baselines().teacache_coefficients
    return TeaCachePolicy(
        TeaCacheSettings(**{**context.defaults, **knobs}, coefficients=coefficients), context.steps, context.batch
    )


def _magcache(knobs: dict[str, Any], context: RuleContext) -> MagCachePolicy:
    ratios = context.baselines().magcache_ratios
    if ratios is None:
        raise BadInput(
            f"cache 'magcache' needs MagCache ratios and none are published for {context.bundle.manifest.model}: "
            f"calibrate the bundle (`sencache calibrate`) to measure them",
            param="cache",
        )
    return MagCachePolicy(
        MagCacheSettings(**{**context.defaults, **knobs}, ratios=ratios), context.steps, context.batch
    )


register_rule(
    Rule(
        "fixed",
        "run every interval-th step, reuse the others",
        ("interval", "warmup"),
        lambda knobs, context: FixedPolicy(FixedSettings(**{"interval": 2, **knobs}), context.steps, context.batch),
    )
)
register_defaults(DefaultsSection("teacache", TeaCacheDefaults))
register_rule(
    Rule(
        "teacache",
        "TeaCache: reuse while the accumulated rescaled change of the modulated input stays small",
        ("threshold",),
        _teacache,
        ("baselines",),
        section="teacache",
    )
)
register_defaults(DefaultsSection("magcache", MagCacheDefaults))
register_rule(
    Rule(
        "magcache",
        "MagCache: reuse while the accumulated residual-magnitude error stays small",
        ("threshold", "max_reuse", "retention"),
        _magcache,
        ("baselines",),
        section="magcache",
    )
)
