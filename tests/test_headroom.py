"""The per-sample headroom benchmark: its hindsight plans are each sample's optimum under what they
know, and what it measures is what a plain run of the same schedule does."""

import numpy as np
import torch
from test_plan import schedule_cost

from sencache.benchmarks.headroom import HINDSIGHT, Hindsight, Schedules, chunks_of, hindsight_plans, measure
from sencache.benchmarks.online import DEV_DRAW
from sencache.runtime.cache import NoCache
from sencache.runtime.cache.plan import plan_schedule
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams


def test_each_sample_plans_the_least_cost_of_its_own_changes_and_gains():
    rng = np.random.default_rng(3)
    samples, steps, runs, max_reuse = 5, 12, 6, 3
    forced = np.zeros(steps, bool)
    forced[[0, -1]] = True
    changes = np.triu(rng.lognormal(0.0, 1.0, (samples, steps, steps)), k=1)
    moved = np.concatenate([np.zeros((samples, 1)), rng.lognormal(0.0, 1.0, (samples, steps - 1))], axis=1)
    seen = Hindsight(changes, moved, [])
    shared = plan_schedule(np.triu(np.ones((steps, steps)), k=1), runs, forced, max_reuse)
    plans = hindsight_plans(seen, shared, forced, max_reuse, runs)
    assert list(plans) == list(HINDSIGHT)
    for schedules in plans.values():
        assert schedules.shape == (samples, steps)
        assert (schedules.sum(axis=1) == runs).all() and schedules[:, forced].all()
    one_step = np.zeros((samples, steps))
    one_step[:, 1:] = changes[:, np.arange(steps - 1), np.arange(1, steps)]
    gains = np.divide(moved, one_step, out=np.zeros_like(moved), where=one_step > 0)
    for b in range(samples):
        own = changes[b] * gains[b][None]
        best = schedule_cost(own, plans["own changes and gains"][b])
        assert all(best <= schedule_cost(own, plans[name][b]) + 1e-12 for name in HINDSIGHT)


def test_a_steps_measured_effect_is_what_a_run_reusing_that_step_alone_does(cogvideox_torch_calibrated):
    torch.set_num_threads(1)
    engine = Model.open(cogvideox_torch_calibrated, threads=1)
    steps = 8
    chunks = chunks_of(engine, DEV_DRAW, 2)
    seen = measure(engine, chunks, steps)
    assert seen.changes.shape == (2, steps, steps) and seen.moved.shape == (2, steps)
    assert (seen.moved[:, 0] == 0).all() and (seen.moved[:, 1:] > 0).all()
    prompts, seeds = chunks[0]
    guidance = engine.bundle.manifest.defaults.guidance
    request = GenerationParams(prompts, seeds, steps, guidance)
    first = np.arange(steps) == 0
    uncached = np.asarray(engine.generate(request, NoCache(2)).latents, np.float64)
    runs = np.ones((2, steps), bool)
    runs[:, 3] = False
    reused = engine.generate(request, Schedules(runs, first))
    assert reused.nfe == [steps - 1, steps - 1]
    change = np.mean((np.asarray(reused.latents, np.float64) - uncached).reshape(2, -1) ** 2, axis=1)
    np.testing.assert_allclose(change, seen.moved[:, 3], rtol=1e-6)
