"""The engine's solver steps against diffusers' own scheduler.step, step by step over whole runs:
UniPC (Wan, scalars computed on the host) and CogVideoX's DPM (noise drawn per sample on the host
in diffusers' order). Equal within 1e-6 (on the CPU they are the same operations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sencache.runtime.families import resolve
from sencache.runtime.families.parts import make_scheduler

TOLERANCE = 1e-6


def trajectory(
    sampler, reference, steps: int, shape: tuple[int, ...], start: int = 0, seeds: list[int] | None = None
) -> float:
    """Step both with the same model outputs from `start` to the end; the largest difference."""
    outputs = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=outputs)
    ours, theirs = x.clone(), x.clone()
    ours_g = [torch.Generator().manual_seed(s) for s in seeds] if seeds else None
    theirs_g = [torch.Generator().manual_seed(s) for s in seeds] if seeds else None
    worst = 0.0
    for index in range(start, steps):
        output = torch.randn(shape, generator=outputs)
        ours = sampler.step(index, output, ours, ours_g)
        theirs = reference(index, output, theirs, theirs_g)
        worst = max(worst, float((ours - theirs).abs().max()))
        assert torch.isfinite(ours).all()
    return worst


@pytest.mark.parametrize("model", ["tiny-wan", "wan2.1-t2v-14b"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 12, 50])
def test_unipc_equals_diffusers(model, steps):
    adapter, preset = resolve(model)
    sampler = adapter.sampler(make_scheduler(adapter, preset), steps, preset, None)
    scheduler = make_scheduler(adapter, preset)
    scheduler.set_timesteps(steps)

    def reference(index, output, x, generators):
        return scheduler.step(output, scheduler.timesteps[index], x, return_dict=False)[0]

    assert trajectory(sampler, reference, steps, (2, 3, 4, 8, 8)) <= TOLERANCE


@pytest.mark.parametrize("start", [1, 4])
def test_unipc_from_a_fresh_state_mid_run_equals_diffusers(start):
    """Calibration steps once from a fresh scheduler at step k (diffusers' set_begin_index)."""
    adapter, preset = resolve("tiny-wan")
    sampler = adapter.sampler(make_scheduler(adapter, preset), 8, preset, None)
    sampler.start_at(start)
    scheduler = make_scheduler(adapter, preset)
    scheduler.set_timesteps(8)
    scheduler.set_begin_index(start)

    def reference(index, output, x, generators):
        return scheduler.step(output, scheduler.timesteps[index], x, return_dict=False)[0]

    assert trajectory(sampler, reference, 8, (1, 3, 2, 4, 4), start=start) <= TOLERANCE


@pytest.mark.parametrize("steps", [1, 2, 5, 30])
@pytest.mark.parametrize("seeds", [[3], [3, 4]])
def test_cogvideox_dpm_equals_diffusers(steps, seeds):
    adapter, preset = resolve("tiny-cogvideox")
    sampler = adapter.sampler(make_scheduler(adapter, preset), steps, preset, None)
    scheduler = make_scheduler(adapter, preset)
    scheduler.set_timesteps(steps)
    previous = {"x0": None}

    def reference(index, output, x, generators):
        back = scheduler.timesteps[index - 1] if index > 0 else None
        x, previous["x0"] = scheduler.step(
            output,
            previous["x0"],
            scheduler.timesteps[index],
            back,
            x,
            eta=0.0,
            generator=generators,
            return_dict=False,
        )
        return x

    shape = (len(seeds), 4, 3, 8, 8)
    assert trajectory(sampler, reference, steps, shape, seeds=seeds) <= TOLERANCE


def test_dpm_noise_is_each_samples_own():
    """A sample's stepping depends on its own generator only, not on the others in its batch."""
    adapter, preset = resolve("tiny-cogvideox")
    outputs = torch.randn((2, 4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    runs = []
    for seeds in ([5, 6], [5, 9]):
        sampler = adapter.sampler(make_scheduler(adapter, preset), 4, preset, None)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        x = outputs.clone()
        for index in range(4):
            x = sampler.step(index, outputs * (index + 1), x, generators)
        runs.append(x.numpy())
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert not np.allclose(runs[0][1], runs[1][1])
