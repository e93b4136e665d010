"""The deterministic drift sencache-online scores: the latent less the noise a stochastic sampler
injected since each sample's anchor (`Sampler.injected`, `progression.carry_noise`).

On CogVideoX's DPM-Solver++ SDE the carried noise is exactly what the step's linear map makes of the
draws, so with a denoiser whose clean prediction does not see the noise, x - n is the same whatever
was drawn; a sampler that injects nothing leaves the plain latent drift."""

from __future__ import annotations

import torch

from sencache.runtime.families import resolve
from sencache.runtime.families.parts import make_scheduler
from sencache.runtime.progression import carry_noise

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
