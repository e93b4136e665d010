"""SenCache's decision rule, as pure code: no I/O, no device, no model (SPEC sections 1 and 3).

Every backend calls the same code, so a decision never depends on where the model runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sencache.runtime.cache.base import StepDecision
from sencache.runtime.cache.knobs import check_settings
from sencache.runtime.cache.registry import (
    DefaultsSection,
    Need,
    Rule,
    RuleContext,
    register_defaults,
    register_rule,
)
from sencache.runtime.conventions import SenCacheConventions, engine_conventions
from sencache.runtime.errors import BadInput
from sencache.runtime.sensitivity import SensitivityTable


@dataclass(frozen=True)
class SenCacheDefaults:
    """The bundle's calibrated SenCache knobs (the manifest's defaults.sencache), shared by every
    SenCache variant."""

    eps_start: float
    eps_main: float
    max_reuse: int

    def __post_init__(self) -> None:
        check_settings(self, "eps_start", "eps_main", "max_reuse")


@dataclass(frozen=True)
class SenCacheSettings:
    eps_start: float
    eps_main: float
    max_reuse: int
    switch_frac: float = 0.2
    force_last: bool = True
    conventions: str = "engine"
    """"engine" (switch_frac, force_last and the rest of SPEC section 1) or "reference" (the
    authors' code for the bundle's family: its record replaces switch_frac and force_last)."""

    def __post_init__(self) -> None:
        check_settings(self, "eps_start", "eps_main", "max_reuse", "conventions")
        if not 0.0 <= self.switch_frac <= 1.0:
            raise BadInput(f"switch_frac must be in [0, 1], got {self.switch_frac}", param="switch_frac")


class SenCachePolicy:
    """SenCache (SPEC section 1) with per-sample anchors, sensitivities and reuse counters.

    Score of sample b at step i, anchored at its last run step a:
        S = (Jx(t_a) * ||x_i - x_a||_2 + Jt(t_a) * |t_i - t_a|) / sqrt(numel)
    It reuses when the step is not forced, S < eps(i), and it has reused fewer than max_reuse
    steps in a row; otherwise it runs and its anchor moves to (x_i, t_i). `conventions` say
    which steps are forced, where eps switches, how Jx, Jt are read and what S is divided by
    (`sencache.runtime.conventions`); by default the engine's, from the settings.
    """

    name = "sencache"
    needs_drift = True
    deterministic_drift = False
    needs_modulation = False
    may_reuse = True

    def __init__(
        self,
        settings: SenCacheSettings,
        table: SensitivityTable,
        num_steps: int,
        batch: int,
        numel: int,
        conventions: SenCacheConventions | None = None,
        budget: dict[str, Any] | None = None,
    ) -> None:
        if num_steps <= 0 or batch <= 0 or numel <= 0:
            raise BadInput("steps, batch and latent size must be positive")
        self.config = settings
        self.table = table
        self.num_steps = num_steps
        self.numel = numel
        self.conventions = conventions or engine_conventions(settings.switch_frac, settings.force_last)
        self.switch_step = self.conventions.switch_step(num_steps)
        self.scale = self.conventions.scale(numel)
        self.anchor_t = np.zeros(batch)
        self.jx = np.zeros(batch)
        self.jt = np.zeros(batch)
        self.reuses = np.zeros(batch, dtype=np.int64)
        self.outside_table: list[float] = []
        self.budget = budget
        """The NFE budget the thresholds were chosen for, reported with the settings (None: none)."""

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self.config), **({} if self.budget is None else {"budget": self.budget})}

    def warnings(self) -> list[str]:
        """Look-ups of the sensitivity table that fell outside its timesteps and were clamped."""
        outside = self.outside_table
        if not outside:
            return []
        return [
            f"{len(outside)} sensitivity look-ups fell outside the table's timesteps "
            f"(t={min(outside):.1f}..{max(outside):.1f}) and were clamped to its edge"
        ]

    def threshold(self, step: int) -> float:
        return self.config.eps_start if step < self.switch_step else self.config.eps_main

    def forced(self, step: int) -> bool:
        return self.conventions.forced(step, self.num_steps)

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        batch = len(self.reuses)
        eps = self.threshold(step)
        if self.forced(step):
            run, score = np.ones(batch, bool), np.full(batch, np.nan)
        else:
            raw, score = self._scores(t, drift_sumsq)
            # a fixed constant meets the raw score as the authors compare it (eps x constant), bit for bit
            below = score < eps if self.conventions.score_constant is None else raw < eps * self.scale
            run = ~(below & (self.reuses < self.config.max_reuse))
        self._commit(step, t, run)
        return StepDecision(run, score, eps, self.forced(step))

    def _scores(self, t: float, drift_sumsq: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The unnormalised and the normalised score of every sample at timestep `t`."""
        batch = len(self.reuses)
        if drift_sumsq is None or drift_sumsq.shape != (batch,):
            raise ValueError(f"drift_sumsq must have shape ({batch},)")
        drift = np.sqrt(np.asarray(drift_sumsq, dtype=np.float64))
        jx, jt = self._sensitivities(t)
        raw = self._corrected(jx * drift + jt * np.abs(t - self.anchor_t))
        return raw, raw / self.scale

    def _sensitivities(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """The anchor's Jx, Jt (SPEC section 1)."""
        return self.jx, self.jt

    def _corrected(self, raw: np.ndarray) -> np.ndarray:
        """The raw score as the rule compares it: the table's bound itself."""
        return raw

    def _commit(self, step: int, t: float, run: np.ndarray) -> None:
        self.reuses = np.where(run, 0, self.reuses + 1)
        if run.any() and step < self.num_steps - 1:
            jx, jt, inside = self.table.lookup(t, nearest=self.conventions.nearest_lookup)
            if not inside:
                self.outside_table.append(float(t))
            self.anchor_t[run] = t
            self.jx[run] = jx
            self.jt[run] = jt


class SenCacheMaxPolicy(SenCachePolicy):
    """SenCache-max, a named variant (not the paper's rule): the bound uses the larger of the
    sensitivities at the anchor and at the current timestep, so a stretch over which the model
    grows more sensitive (late, low-noise steps) is not judged by the calmer anchor alone."""

    name = "sencache-max"

    def _sensitivities(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        jx_now, jt_now, _ = self.table.lookup(t, nearest=self.conventions.nearest_lookup)
        return np.maximum(self.jx, jx_now), np.maximum(self.jt, jt_now)


@dataclass(frozen=True)
class SenCacheOnlineSettings(SenCacheSettings):
    online_rate: float = 0.5
    """Weight of the newest observation in each sample's running log-ratio of observed to
    predicted reuse error (0: never learn, the rule is sencache; 1: the last observation alone)."""
    online_bound: float = 4.0
    """The correction factor stays within [1 / online_bound, online_bound]."""
    online_prior: float = 0.0
    """Observations at which the learnt factor gets half its weight (shrunk toward the table
    before that; 0: applied in full from the first observation)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_settings(self, "online_rate", "online_bound", "online_prior")


class OnlineFactor:
    """Each sample's factor c_b between the reuse error it was observed to cost and the table's
    score that predicted it, learnt as the run goes (pure state, shared by the online rules).

    log c_b moves towards log(e_b / S_table) by an exponential moving average with weight `rate`,
    each observation clipped to +-log(bound). The factor a rule applies is shrunk toward the table
    (c = 1) by how much evidence the sample has: log c_b x n / (n + prior) after n observations,
    so one early observation does not swing a sample (prior 0: no shrinkage).

    exp and log are the C library's (`math`), element by element, not NumPy's: NumPy's float64
    exp and log run its own AVX-512 code on CPUs that have it and the C library's elsewhere, which
    round differently, so a factor (and at the edge a decision) differed between CPUs with and
    without AVX-512, and the native rule (libsencache_policy, which calls the same C library's)
    could not reproduce it bit for bit."""

    def __init__(self, batch: int, rate: float, bound: float, prior: float = 0.0) -> None:
        self.rate = rate
        self.log_bound = math.log(bound)
        self.prior = prior
        self.log_factor = np.zeros(batch)
        self.observations = np.zeros(batch, dtype=np.int64)
        self.predicted = np.full(batch, np.nan)
        """The table's score S_table of the last decided step (NaN where it was forced)."""
        self.decided_step = -1

    @property
    def factor(self) -> np.ndarray:
        """Each sample's factor as applied: the learnt one shrunk by its evidence."""
        n = self.observations
        weight = n / np.maximum(n + self.prior, 1e-300) if self.prior > 0 else np.ones(len(n))
        return np.array([math.exp(v) for v in (self.log_factor * weight).tolist()], dtype=np.float64)

    def start(self, step: int) -> None:
        """A step is being decided: nothing predicted yet (a forced step predicts nothing)."""
        self.predicted = np.full(len(self.log_factor), np.nan)
        self.decided_step = step

    def expect(self, predicted: np.ndarray) -> None:
        """What this step's observation is expected to be, per sample (NaN: nothing expected)."""
        self.predicted = np.asarray(predicted, dtype=np.float64)

    def corrected(self, raw: np.ndarray, scale: float) -> np.ndarray:
        """The factor applied to the table's raw score; raw / `scale` (the score in the error's
        units) is kept as the prediction."""
        self.predicted = raw / scale
        return raw * self.factor

    def observe(self, step: int, error: np.ndarray) -> None:
        """Learn from the normalised reuse error observed at `step` (NaN where not observed)."""
        batch = len(self.log_factor)
        if step != self.decided_step:
            raise ValueError(f"observe(step={step}) must follow decide of that step (last: {self.decided_step})")
        if error.shape != (batch,):
            raise ValueError(f"error_sumsq must have shape ({batch},)")
        seen = np.isfinite(error) & np.isfinite(self.predicted) & (self.predicted > 0)
        if not seen.any():
            return
        with np.errstate(over="ignore"):
            quotient = error[seen] / self.predicted[seen]
        # log(0) is -inf (math.log refuses it), log(inf) inf: both clipped to the bound
        log_ratio = np.array([math.log(q) if q > 0 else -math.inf for q in quotient.tolist()])
        ratio = np.clip(log_ratio, -self.log_bound, self.log_bound)
        self.log_factor[seen] = (1.0 - self.rate) * self.log_factor[seen] + self.rate * ratio
        self.observations[seen] += 1


class SenCacheOnlinePolicy(SenCachePolicy):
    """SenCache-online, a named variant (not the paper's rule): each sample's score is the
    table's bound times a factor c_b learnt from what reusing would have cost that sample.

    At a step where sample b runs after an earlier run, the engine also passes its cached
    residual through the tail and reports ||f(reused) - f(fresh)||^2 of the guided output
    (`observe`): the true error the table's score S_table predicted at that step, in the same
    units (SPEC section 1 bounds the output change). log c_b moves towards log(e_b / S_table)
    by an exponential moving average with weight `online_rate`, clipped to
    +-log(online_bound) (`OnlineFactor`); the decision compares c_b * S_table with eps as
    sencache compares S_table. A sample whose reuse costs more than the table says runs more, one
    that costs less reuses more. Without observations c_b stays 1 and the decisions are sencache's.

    Its drift is the deterministic part of the latent's change, ||x_i - n_i - x_a||, where n_i is the
    noise a stochastic sampler injected since the anchor (`deterministic_drift`): on CogVideoX's SDE
    sampler that noise dominates the plain drift whatever the sample shows.
    """

    name = "sencache-online"
    deterministic_drift = True

    def __init__(
        self,
        settings: SenCacheOnlineSettings,
        table: SensitivityTable,
        num_steps: int,
        batch: int,
        numel: int,
        conventions: SenCacheConventions | None = None,
        budget: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(settings, table, num_steps, batch, numel, conventions, budget)
        self.online = OnlineFactor(batch, settings.online_rate, settings.online_bound, settings.online_prior)

    @property
    def factor(self) -> np.ndarray:
        """Each sample's correction factor c_b."""
        return self.online.factor

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        self.online.start(step)
        return super().decide(step, t, drift_sumsq, modulation_change)

    def _corrected(self, raw: np.ndarray) -> np.ndarray:
        return self.online.corrected(raw, self.scale)

    def observe(self, step: int, error_sumsq: np.ndarray) -> None:
        """Learn from the reuse error observed at `step` (the step just decided): per sample the
        squared L2 norm of guided output from the cached residual minus the fresh output, NaN
        where the sample did not run or had no cached residual."""
        self.online.observe(step, np.sqrt(np.asarray(error_sumsq, dtype=np.float64)) / self.scale)


def _conventions(settings: SenCacheSettings, context: RuleContext) -> SenCacheConventions | None:
    return context.reference() if settings.conventions == "reference" else None


def _build(settings: SenCacheSettings, context: RuleContext, rule: type[SenCachePolicy]) -> SenCachePolicy:
    return rule(
        settings, context.sensitivity(), context.steps, context.batch, context.numel, _conventions(settings, context)
    )


def _online(knobs: dict[str, Any], context: RuleContext) -> SenCachePolicy:
    settings = SenCacheOnlineSettings(**{**context.defaults, **knobs})
    return SenCacheOnlinePolicy(
        settings, context.sensitivity(), context.steps, context.batch, context.numel, _conventions(settings, context)
    )


register_defaults(DefaultsSection("sencache", SenCacheDefaults, required=True))
_THRESHOLDS = ("eps_start", "eps_main", "max_reuse", "conventions")
_NEEDS: tuple[Need, ...] = ("sensitivity", "reference")
ONLINE_KNOBS = ("online_rate", "online_bound", "online_prior")
"""The knobs of the learnt factor, with or without an NFE budget."""
register_rule(
    Rule(
        "sencache",
        "SenCache: reuse while the sensitivity-weighted drift from the anchor stays below eps",
        _THRESHOLDS,
        lambda knobs, context: _build(SenCacheSettings(**{**context.defaults, **knobs}), context, SenCachePolicy),
        _NEEDS,
        section="sencache",
    )
)
register_rule(
    Rule(
        "sencache-max",
        "SenCache with the larger of the anchor's and the current sensitivities",
        _THRESHOLDS,
        lambda knobs, context: _build(SenCacheSettings(**{**context.defaults, **knobs}), context, SenCacheMaxPolicy),
        _NEEDS,
        section="sencache",
    )
)
register_rule(
    Rule(
        "sencache-online",
        "SenCache with a per-sample factor learnt online from the observed cost of reusing (experimental)",
        (*_THRESHOLDS, *ONLINE_KNOBS),
        _online,
        _NEEDS,
        section="sencache",
    )
)
