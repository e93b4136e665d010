"""`sencache serve --gpus-per-replica 2 --parallel cfg=2` over real HTTP on 127.0.0.1: one Ray
Serve replica whose engine spans two ranks (the replica and one Ray actor in its placement group,
gloo on the CPU) on the ONNX Runtime tiny-wan.

A served video equals the one-process engine's; killing the worker actor fails the running job
with the rank group's reason within the group's timeout, and the replica, rebuilt on a new group,
serves the next job."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")

import sencache  # noqa: E402
from sencache.runtime.parallel.group import TIMEOUT_S  # noqa: E402
from sencache.serving import app as serving  # noqa: E402
from sencache.serving.options import free_port  # noqa: E402
from served import PROMPT, create, running, until, wait  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray instance: all on one worker


@pytest.fixture(scope="module")
def server(calibrated_bundle: Path):
    """One replica of two ranks (cfg=2), one CPU each, on a free loopback port; Ray shut down afterwards."""
    options = serving.ServeOptions(
        engine=calibrated_bundle, port=free_port(), threads=1, gpus_per_replica=2, parallel="cfg=2"
    )
    with running(options, num_cpus=2) as base:
        yield base


def _workers() -> list[dict]:
    """The live rank worker actors (named `sencache-rank<r>-...`)."""
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("sencache-rank")]


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--gpus-per-replica", "2"], "--parallel sp=1,cfg=1 is 1 rank(s), one per GPU of a replica"),
        (["--gpus-per-replica", "2", "--parallel", "sp=2"], "sequence parallelism runs on torch bundles"),
        (["--gpus-per-replica", "0"], "--gpus-per-replica must be >= 1"),
        (["--parallel", "cfg=3"], "--parallel cfg must be 1 or 2"),
    ],
    ids=["no-parallel", "sp-on-onnx", "zero-ranks", "bad-cfg"],
)
def test_serve_refuses_ranks_that_do_not_fit_before_ray_starts(calibrated_bundle, capsys, flags, reason):
    from sencache.cli import main

    assert main(["serve", "--engine", str(calibrated_bundle), "--port", str(free_port()), *flags]) == 2
    err = capsys.readouterr().err
    assert reason in err and len(err.strip().splitlines()) == 1, err
    assert not ray.is_initialized()


def test_two_ranks_serve_the_one_process_video(server, calibrated_bundle):
    assert len(_workers()) == 1
    reply = create(server, seed=3, steps=8, cache={"method": "sencache", "knobs": {"eps_main": 0.6}})
    assert reply.status_code == 200, reply.text
    done = wait(server, reply.json()["id"])
    assert done["status"] == "completed", done
    content = requests.get(f"{server}/v1/videos/{done['id']}/content", params={"variant": "frames"}, timeout=30)
    frames = np.load(io.BytesIO(content.content))
    with sencache.Engine.from_bundle(calibrated_bundle, threads=1) as engine:
        video = engine.generate(prompt=PROMPT, seed=3, steps=8, cache="sencache", knobs={"eps_main": 0.6})
    np.testing.assert_allclose(frames, video.frames, atol=1e-5, rtol=0)
    assert done["nfe"] == video.stats["nfe"] < 8  # the same decisions, some steps reused


def test_a_killed_rank_fails_its_job_and_the_replica_serves_on(server):
    reply = create(server, steps=200, cache={"preset": "reference"})
    assert reply.status_code == 200, reply.text
    job = reply.json()
    until(lambda: requests.get(f"{server}/v1/videos/{job['id']}", timeout=30).json()["step"] > 0, "a step")
    (worker,) = _workers()
    killed = time.monotonic()
    ray.kill(ray.get_actor(worker["name"], namespace=worker["namespace"]), no_restart=True)

    failed = wait(server, job["id"])
    assert time.monotonic() - killed < TIMEOUT_S
    assert failed["status"] == "failed" and failed["step"] < 200, failed
    assert failed["error"]["code"] == "generation_failed"
    assert "collective failed (a rank died" in failed["error"]["message"], failed["error"]

    again = create(server, seed=1, steps=3)
    assert again.status_code == 200, again.text
    assert wait(server, again.json()["id"])["status"] == "completed"
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200
    (new,) = _workers()
    assert new["name"] != worker["name"]  # a new group, with a new worker
