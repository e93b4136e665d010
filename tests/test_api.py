"""The Python API: sencache.Engine over the step engine, from one thread and from many."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import sencache
from conftest import engine_for
from sencache.cli import parser
from sencache.runtime.cache import KNOBS, METHODS, check_knobs
from sencache.runtime.errors import BadInput, Cancelled
from sencache.runtime.request import GenerationParams

PROMPT = "one small red circle static on black"


@pytest.fixture
def engine(calibrated_bundle):
    with sencache.Engine.from_bundle(calibrated_bundle, threads=1) as engine:
        yield engine


def solo_frames(bundle, seed: int, steps: int, guidance: float, cache: str, knobs: dict) -> tuple[np.ndarray, list]:
    model = engine_for(bundle)
    result = model.generate(GenerationParams([PROMPT], [seed], steps, guidance), model.policy(cache, steps, 1, knobs))
    return model.decode(result.latents)[0], result.decisions[0]


def test_import_sencache_does_not_load_the_engine():
    code = "import sys, sencache; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == [
        "False",
        "False",
    ]


def test_generate_returns_frames_and_stats(engine, calibrated_bundle):
    video = engine.generate(prompt=PROMPT, seed=1, steps=6, guidance=None, cache="sencache", knobs={"eps_main": 0.3})
    assert video.frames.shape == (8, 32, 32, 3) and video.frames.dtype == np.float32
    assert video.frames.min() >= 0.0 and video.frames.max() <= 1.0
    stats = video.stats
    assert stats["steps"] == 6 and stats["guidance"] == 4.0 and stats["cache"]["eps_main"] == 0.3
    assert stats["nfe"] == stats["decisions"].count("run") and len(stats["trace"]) == 6
    assert {"denoise_s", "decision_s", "queue_s"} <= set(stats["timing"])
    frames, decisions = solo_frames(calibrated_bundle, 1, 6, 4.0, "sencache", {"eps_main": 0.3})
    assert stats["decisions"] == decisions
    np.testing.assert_allclose(video.frames, frames, atol=1e-5, rtol=0)


def test_jobs_from_many_threads_share_passes_and_equal_their_solo_runs(engine, calibrated_bundle):
    settings = [
        (seed, 3 + seed % 4, [1.0, 4.0, 6.0][seed % 3], ["sencache", "none", "fixed", "teacache"][seed % 4])
        for seed in range(8)
    ]
    knobs = {"sencache": {"eps_main": 0.3}, "none": {}, "fixed": {"interval": 2}, "teacache": {"threshold": 0.3}}
    jobs: dict[int, sencache.Job] = {}

    def submit(seed: int, steps: int, guidance: float, cache: str) -> None:
        jobs[seed] = engine.submit(
            prompt=PROMPT, seed=seed, steps=steps, guidance=guidance, cache=cache, knobs=knobs[cache]
        )

    threads = [threading.Thread(target=submit, args=s) for s in settings]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, steps, guidance, cache in settings:
        video = jobs[seed].result(timeout=600)
        frames, decisions = solo_frames(calibrated_bundle, seed, steps, guidance, cache, knobs[cache])
        assert video.stats["decisions"] == decisions
        np.testing.assert_allclose(video.frames, frames, atol=1e-5, rtol=0)
        assert jobs[seed].progress.state == "done" and jobs[seed].progress.step == steps
    stats = engine.stats()
    assert stats["requests_finished_total"] == len(settings) and stats["queue_depth"] == 0
    assert stats["steps_total"] < sum(s[1] for s in settings)  # requests shared passes
    assert stats["nfe_run_total"] + stats["nfe_saved_total"] == sum(s[1] for s in settings)


def test_cancel_and_timeout(engine):
    long = engine.submit(prompt=PROMPT, seed=3, steps=200, cache="none")
    with pytest.raises(TimeoutError):
        long.result(timeout=0.01)
    deadline = time.monotonic() + 60
    while long.progress.step < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert long.progress.state == "running"
    assert long.cancel()
    with pytest.raises(Cancelled):
        long.result(timeout=60)
    assert long.progress.state == "cancelled" and long.progress.step < 200 and not long.cancel()
    assert engine.stats()["requests_cancelled_total"] == 1


@pytest.mark.parametrize(
    "kwargs,message,param",
    [
        ({"steps": 0}, "steps must be in [1, 1000], got 0", "steps"),
        ({"steps": 2.5}, "steps must be in [1, 1000]", "steps"),
        ({"seed": -1}, "seed must be", "seed"),
        ({"guidance": float("inf")}, "guidance must be", "guidance"),
        ({"prompt": 7}, "prompt must be text", "prompt"),
        ({"cache": "deepcache"}, "cache must be one of none, ", "cache"),
        ({"cache": 3}, "cache must be the name of a method", "cache"),
        ({"knobs": [1]}, "knobs must be a mapping", "knobs"),
        ({"knobs": {"eps_main": -1.0}}, "eps_main must be a number in [0, inf]", "eps_main"),
        ({"knobs": {"max_reuse": 1.5}}, "max_reuse must be an integer", "max_reuse"),
        ({"knobs": {"interval": 2}}, "interval does not apply to cache 'sencache'", "interval"),
        ({"knobs": {"velocity": 2}}, "knobs has an unknown cache knob 'velocity'", "knobs"),
        ({"prompt_embeds": [[0.0]]}, "prompt_embeds must be a NumPy array", "prompt_embeds"),
        ({"prompt_embeds": np.zeros((3, 4), np.float32)}, "prompt_embeds has shape [3, 4]", "prompt_embeds"),
    ],
)
def test_bad_requests_are_refused_before_queueing(engine, kwargs, message, param):
    """The Python API raises the runtime's BadInput as it is: the parameter's own name, no flag."""
    with pytest.raises(BadInput) as error:
        engine.submit(**{"prompt": PROMPT, "seed": 1, "steps": 2, **kwargs})
    assert message in str(error.value) and "--" not in str(error.value)
    assert error.value.param == param
    assert engine.stats()["requests_submitted_total"] == 0


def test_close_ends_pending_jobs(calibrated_bundle):
    engine = sencache.Engine.from_bundle(calibrated_bundle, threads=1)
    jobs = [engine.submit(prompt=PROMPT, seed=s, steps=100, cache="none") for s in range(5)]
    engine.close()
    for job in jobs:
        with pytest.raises(Cancelled):
            job.result(timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(prompt=PROMPT, seed=1, steps=2)
    assert engine.stats()["requests_cancelled_total"] == 5


def test_one_knob_table_for_every_surface():
    options = {action.dest: action for action in parser()._subparsers._group_actions[0].choices["generate"]._actions}
    for name, knob in KNOBS.items():
        assert options[name].type is knob.type and options[name].option_strings == ["--" + name.replace("_", "-")]
    assert tuple(options["cache"].choices) == tuple(METHODS)
    assert check_knobs("magcache", {"max_reuse": 3.0, "threshold": None}) == {"max_reuse": 3}
    assert all(name in KNOBS for method in METHODS for name in check_knobs(method, {}))
