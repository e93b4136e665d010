"""How a SenCache rule counts, forces, looks up and scales: the engine's conventions, or those of
the authors' code for one family (vita-epfl/SenCache), as pure data and rules (no I/O, no model).

The rule itself is the same under both (SPEC section 1); only these four conventions differ, and a
user who brings the authors' tables and thresholds gets the authors' decisions with `reference`.
Each family adapter provides its reference record; the policy reads a record, never a family.

What `reference` does not match: the authors' LTX code caches another residual. It stores
norm_out(blocks(h)) * (1 + scale_a) + shift_a - h, with h = proj_in(x) and the ANCHOR step's
modulation, and a reused step outputs proj_out(proj_in(x_i) + cached), so the current timestep
never reaches its tail; the engine caches blocks(h) - h and a reused step runs the final norm with
the CURRENT timestep's modulation (SPEC section 2). Matching it would move LTX's final norm and
modulation from the tail into the blocks stage (another stage split and export, for one family),
which is not built: under `reference` an LTX run takes the authors' decisions, and a reused step
still computes the engine's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NAMES = ("engine", "reference")
"""The values of the `conventions` knob."""


@dataclass(frozen=True)
class SenCacheConventions:
    """One set of conventions of the SenCache rule for runs of `N` steps."""

    switch_frac: float
    """eps_main applies from model call round(N * switch_calls * switch_frac) of the run's
    N * switch_calls calls on (eps_start before)."""
    switch_calls: int = 1
    """Model calls per step that the switch counts: 2 where cond and uncond are separate calls
    (the authors' Wan), so step i is call 2i of 2N."""
    retain_steps: int = 0
    """Steps always run at each end, besides the first (which has no anchor to reuse from)."""
    retain_frac: float = 0.0
    """Further steps always run at each end: int(round(retain_frac * N))."""
    nearest_lookup: bool = False
    """Read Jx, Jt at the nearest tabulated timestep instead of interpolating linearly."""
    score_constant: float | None = None
    """The fixed constant the threshold is multiplied by before it meets the unnormalised score;
    None: the score is divided by sqrt(numel) of the run's latent instead."""

    def switch_step(self, steps: int) -> int:
        """The first step that uses eps_main, in a run of `steps` steps."""
        switch_call = round(steps * self.switch_calls * self.switch_frac)
        return -(-switch_call // self.switch_calls)

    def retained(self, steps: int) -> int:
        """Steps always run at each end of a run of `steps` steps (besides the first)."""
        return self.retain_steps + int(round(steps * self.retain_frac))

    def forced(self, step: int, steps: int) -> bool:
        """Whether `step` of a run of `steps` steps always runs."""
        kept = self.retained(steps)
        return step < max(1, kept) or step >= steps - kept

    def scale(self, numel: int) -> float:
        """What eps is multiplied by to meet the unnormalised score (sqrt(numel) by default)."""
        return math.sqrt(numel) if self.score_constant is None else self.score_constant


def engine_conventions(switch_frac: float = 0.2, force_last: bool = True) -> SenCacheConventions:
    """The engine's own conventions (SPEC section 1): switch at round(switch_frac * N) steps, the
    first (and, with `force_last`, the last) step forced, interpolated look-ups, and the score
    normalised by sqrt(numel) of the run's latent."""
    return SenCacheConventions(switch_frac=switch_frac, retain_steps=1 if force_last else 0)
