"""The deterministic drift sencache-online scores: the latent less the noise a stochastic sampler
injected since each sample's anchor (`Sampler.injected`, `progression.carry_noise`).

On CogVideoX's DPM-Solver++ SDE the carried noise is exactly what the step's linear map makes of the
draws, so with a denoiser whose clean prediction does not see the noise, x - n is the same whatever
was drawn; a sampler that injects nothing leaves the plain latent drift."""

from __future__ import annotations

import math

import numpy as np
import torch

from conftest import engine_for
from sencache.calibration.calibrate import DriftWalk
from sencache.runtime.cache.base import StepDecision
from sencache.runtime.families import resolve
from sencache.runtime.families.parts import make_scheduler
from sencache.runtime.progression import carry_noise
from sencache.runtime.request import GenerationParams
from sencache.runtime.stepping import StepEngine

SHAPE = (2, 4, 3, 8, 8)


def sampler_of(model: str, steps: int):
    adapter, preset = resolve(model)
    return adapter.sampler(make_scheduler(adapter, preset), steps, preset, None)


def ideal_run(seeds: list[int], steps: int, anchor: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tiny-cogvideox's DPM from one start latent with a denoiser whose clean prediction is a fixed
    target (v = (sqrt(a) x - x0) / sqrt(1 - a)), its noise drawn from fixed seeds before step
    `anchor` and from `seeds` from there, where the noise is carried from, up to step `stop` (the
    last step lands on the target whatever was drawn). Returns the latent, the noise carried since
    `anchor` and the anchor's latent."""
    sampler = sampler_of("tiny-cogvideox", steps)
    alphas = sampler.scheduler.alphas_cumprod
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    carried, anchored = None, x
    for index in range(stop):
        a = alphas[sampler.timesteps[index]].double()
        v = ((a.sqrt() * x.double() - target.double()) / (1 - a).sqrt()).float()
        if index == anchor:
            carried, anchored = None, x
            generators = [torch.Generator().manual_seed(s) for s in seeds]
        x = sampler.step(index, v, x, generators)
        if index >= anchor:
            carried = carry_noise(carried, sampler.injected())
    assert carried is not None
    return x, carried, anchored


def test_the_carried_noise_is_the_whole_stochastic_part_of_the_dpm_drift():
    """Two runs that differ only in their noise draws: their latents differ by the carried noise
    alone (the deterministic drift x - n - x_a is the same), and their plain drifts do not."""
    x_a, n_a, start_a = ideal_run([10, 11], 12, 3, 9)
    x_b, n_b, start_b = ideal_run([20, 21], 12, 3, 9)
    assert torch.equal(start_a, start_b)
    plain = (x_a - x_b).abs().max()
    deterministic = ((x_a - n_a) - (x_b - n_b)).abs().max()
    assert plain > 0.1
    assert deterministic < 1e-5 * plain


def test_the_carried_noise_is_the_injected_terms_through_the_steps_factors():
    """n_{i+1} = mult[0] * n_i + mult_noise * draw_i, the draw the step added (diffusers' order: one
    draw on the first-order first step, the second of two on a second-order one)."""
    steps = 6
    sampler = sampler_of("tiny-cogvideox", steps)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    replay = [torch.Generator().manual_seed(s) for s in (3, 4)]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    carried, by_hand = None, torch.zeros(SHAPE)
    for index in range(steps):
        x = sampler.step(index, torch.randn(SHAPE, generator=torch.Generator().manual_seed(index)), x, generators)
        draws = [torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in replay]) for _ in range(1 + (index > 0))]
        c = sampler._steps[index]
        injected = sampler.injected()
        assert injected is not None
        assert injected[0] == float(c.mult[0])
        assert torch.equal(injected[1], c.mult_noise * draws[-1])
        by_hand = float(c.mult[0]) * by_hand + c.mult_noise * draws[-1]
        carried = carry_noise(carried, injected)
        assert torch.equal(carried, by_hand)


def test_a_sampler_without_noise_leaves_the_plain_drift():
    """Wan's UniPC and CogVideoX's DDIM (eta 0) inject nothing: no noise is carried."""
    for model in ("tiny-wan", "cogvideox-2b"):
        sampler = sampler_of(model, 4)
        x = torch.randn(SHAPE)
        sampler.step(0, torch.randn(SHAPE), x, [torch.Generator().manual_seed(0)] * 2)
        assert sampler.injected() is None
        assert carry_noise(None, sampler.injected()) is None


class _RunFirstAndLast:
    """A rule that runs the first and last steps and reuses between them, recording the drift the
    engine hands it (the deterministic one)."""

    name = "run-first-and-last"
    needs_drift = deterministic_drift = may_reuse = True
    needs_modulation = False

    def __init__(self, batch: int, steps: int) -> None:
        self.batch, self.steps, self.seen = batch, steps, {}

    def settings(self):
        return {"method": self.name}

    def warnings(self):
        return []

    def decide(self, step, t, drift_sumsq=None, modulation_change=None):
        if drift_sumsq is not None:
            self.seen[step] = np.asarray(drift_sumsq, dtype=np.float64)
        forced = step in (0, self.steps - 1)
        return StepDecision(np.full(self.batch, forced), np.full(self.batch, np.nan), math.nan, forced)


def test_calibration_measures_the_drift_the_engine_hands_a_rule(cogvideox_bundle):
    """sencache-plan's mean squared scores are measured on the drift its rule reads: on the SDE
    sampler, `DriftWalk` (calibration) gives each sample's drift from its anchor less the noise
    carried since, as the engine does for a rule that reuses from step 0 on."""
    engine = engine_for(cogvideox_bundle)
    steps = 7
    request = GenerationParams(
        ["two small red circles static on black", "one large blue square moving left slow on texture"],
        [5, 6],
        steps,
        4.0,
    )
    rule = _RunFirstAndLast(2, steps)
    stepping = StepEngine(engine)
    job = stepping.prepare(request, rule)
    stepping.enqueue(job)
    walk = DriftWalk(job.x, steps)
    while job.step < steps - 1:
        stepping.step()
        assert job.sampler is not None and job.sampler.injected() is not None  # it injects noise
        walk.advance(job.x, job.sampler.injected())
    stepping.end_all("cancelled")
    assert sorted(rule.seen) == list(range(1, steps - 1))
    for step, drift_sumsq in rule.seen.items():
        np.testing.assert_allclose(walk.drifts[:, 0, step] ** 2, drift_sumsq, rtol=1e-4)
