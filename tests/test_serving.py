"""The video API over real HTTP on 127.0.0.1: Ray Serve with two tiny-wan engine replicas.

Every endpoint and error path: a served video equals `Engine.generate` (1e-5), bad requests are
422 and never queued, a full queue is 429 with Retry-After, unknown ids 404, cancellation, the
metrics, and a job whose replica is killed is reported failed while the server stays up."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")

import sencache  # noqa: E402
from sencache.serving import app as serving  # noqa: E402
from sencache.serving.options import free_port  # noqa: E402
from served import PROMPT, create, running, submitted, until, wait  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray instance: all on one worker


@pytest.fixture(scope="module")
def server(calibrated_bundle: Path):
    """The app with 2 replicas of queue 2 on a free loopback port; Ray shut down afterwards."""
    options = serving.ServeOptions(engine=calibrated_bundle, port=free_port(), replicas=2, max_queue=2, threads=1)
    with running(options, num_cpus=2) as base:
        yield base


TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAFklEQVR4nGNgGAWjYBSMglEwCqgNAAIQAAEvD3PVAAAAAElFTkSuQmCC"
"""A 16 x 16 black RGB PNG in base64: an image a text-to-video bundle refuses."""


def test_served_video_equals_engine_generate(server, calibrated_bundle):
    reply = create(server, seed=3, steps=8, cache={"method": "sencache", "knobs": {"eps_main": 0.3}})
    assert reply.status_code == 200, reply.text
    job = reply.json()
    assert set(job) >= {"id", "status"} and job["status"] in ("queued", "in_progress")
    done = wait(server, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["step"] == done["steps"] == 8
    assert 1 <= done["nfe"] <= 8

    frames = np.load(
        io.BytesIO(
            requests.get(f"{server}/v1/videos/{job['id']}/content", params={"variant": "frames"}, timeout=30).content
        )
    )
    with sencache.Engine.from_bundle(calibrated_bundle, threads=1) as engine:
        video = engine.generate(prompt=PROMPT, seed=3, steps=8, cache="sencache", knobs={"eps_main": 0.3})
    assert frames.shape == video.frames.shape
    np.testing.assert_allclose(frames, video.frames, atol=1e-5, rtol=0)
    assert done["nfe"] == video.stats["nfe"]

    mp4 = requests.get(f"{server}/v1/videos/{job['id']}/content", timeout=30)
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    assert mp4.content[4:8] == b"ftyp" and len(mp4.content) > 1000

    metrics = requests.get(f"{server}/metrics", timeout=30).text
    for name in (
        "sencache_queue_depth",
        "sencache_active_rows",
        "sencache_steps_per_second",
        "sencache_nfe_saved_total",
        "sencache_reuse_ratio",
        "sencache_request_latency_seconds_bucket",
        "sencache_queue_wait_seconds_sum",
    ):
        assert name in metrics, name
    latencies = [line for line in metrics.splitlines() if line.startswith("sencache_request_latency_seconds_count")]
    assert sum(float(line.split()[-1]) for line in latencies) >= 1


def test_prompt_embeds_give_the_prompts_video(server, calibrated_bundle):
    with sencache.Engine.from_bundle(calibrated_bundle, threads=1) as engine:
        embeds = engine.model.encode([PROMPT])[0]
    videos = []
    for text in ({"prompt": PROMPT}, {"prompt": None, "prompt_embeds": embeds.tolist()}):
        reply = create(server, **text, seed=5, steps=3, cache={"preset": "reference"})
        assert reply.status_code == 200, reply.text
        assert wait(server, reply.json()["id"])["status"] == "completed"
        content = requests.get(
            f"{server}/v1/videos/{reply.json()['id']}/content", params={"variant": "frames"}, timeout=30
        )
        videos.append(np.load(io.BytesIO(content.content)))
    np.testing.assert_allclose(videos[1], videos[0], atol=1e-5, rtol=0)


def test_openapi_reads_the_knob_table(server):
    from sencache.runtime.cache import KNOBS

    doc = requests.get(f"{server}/openapi.json", timeout=30).json()
    assert {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content", "/metrics", "/healthz"} <= set(
        doc["paths"]
    )
    knobs = doc["components"]["schemas"]["CacheKnobs"]["properties"]
    assert set(knobs) == set(KNOBS)
    assert requests.get(f"{server}/docs", timeout=30).status_code == 200


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"steps": 0}, "steps"),
        ({"cache": {"method": "teacache", "knobs": {"eps_main": 0.2}}}, "eps_main"),
        ({"cache": {"method": "warp"}}, "method"),
        ({"cache": {"preset": "fast", "method": "none"}}, "preset"),
        ({"guidance": -1}, "guidance"),
        ({"prompt": "a purple elephant"}, "vocabulary"),
        ({"prompt": None, "prompt_embeds": [[0.0] * 3] * 2}, "prompt_embeds has shape"),
        ({"prompt": None}, "prompt"),
        ({"sampling": "shift5"}, "sampling"),
        ({"image": TINY_PNG}, "image: tiny-wan is a text-to-video model and takes none"),
        ({"image": "not base64!"}, "image is not base64"),
    ],
)
def test_bad_requests_are_422_and_never_queued(server, body, reason):
    before = submitted(server)
    reply = create(server, **body)
    assert reply.status_code == 422, reply.text
    assert reason in reply.text
    assert submitted(server) == before


def test_unknown_ids_are_404(server):
    for video_id in ("video_0_" + "0" * 32, "video_7_abc", "nonsense"):
        for method, path in (("get", ""), ("get", "/content"), ("delete", "")):
            reply = requests.request(method, f"{server}/v1/videos/{video_id}{path}", timeout=30)
            assert reply.status_code == 404, (video_id, path, reply.text)


def test_full_queue_is_429_then_cancel_frees_it(server):
    """2 replicas x (3 running + 2 queued): long jobs are refused with Retry-After by the 11th
    at the latest (earlier while jobs wait for the next step boundary to take free rows)."""
    ids = []
    for _ in range(11):
        reply = create(server, steps=200, cache={"preset": "reference"})
        if reply.status_code == 429:
            break
        assert reply.status_code == 200, reply.text
        ids.append(reply.json()["id"])
    assert reply.status_code == 429, reply.text
    assert int(reply.headers["Retry-After"]) >= 1 and "full" in reply.json()["error"]["message"]
    assert len(ids) >= 4 and {i.split("_")[1] for i in ids} == {"0", "1"}  # both replicas' queues filled

    for video_id in ids:
        reply = requests.delete(f"{server}/v1/videos/{video_id}", timeout=60)
        assert reply.status_code == 200 and reply.json() == {"id": video_id, "object": "video.deleted", "deleted": True}
    gone = requests.get(f"{server}/v1/videos/{ids[0]}/content", timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "video_deleted"
    again = create(server, steps=2)
    assert again.status_code == 200
    assert wait(server, again.json()["id"])["status"] == "completed"


def test_a_dead_replica_fails_its_jobs_and_the_server_stays_up(server):
    job = None
    for _ in range(4):  # round robin: one of the next two lands on replica 0
        reply = create(server, steps=200, cache={"preset": "reference"})
        assert reply.status_code == 200
        if reply.json()["id"].startswith("video_0_"):
            job = reply.json()
            break
        requests.delete(f"{server}/v1/videos/{reply.json()['id']}", timeout=60)
    assert job is not None
    until(lambda: requests.get(f"{server}/v1/videos/{job['id']}", timeout=30).json()["step"] > 0, "a step")

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"] and "engine-0" in a["name"]
    ]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)

    failed = wait(server, job["id"])
    assert failed["status"] == "failed" and "replica died" in failed["error"]["message"]
    until(lambda: requests.get(f"{server}/healthz", timeout=10).status_code == 200, "the replica to restart")
    for _ in range(2):  # both replicas take new work
        reply = create(server, steps=2)
        assert reply.status_code == 200
        assert wait(server, reply.json()["id"])["status"] == "completed"


@pytest.mark.parametrize("batching", ["static", "step"])
def test_batching_modes_admit_as_documented(calibrated_bundle, batching):
    """Static: a job arriving while a group runs starts after the whole group ends; step-level:
    it joins at the next step and a short one ends first. Either way its video is its solo run's."""
    from sencache.serving.schema import VideoRequest
    from sencache.serving.service import VideoService

    engine = sencache.Engine.from_bundle(calibrated_bundle, threads=1, batching=batching)
    manifest = engine.model.bundle.manifest
    service = VideoService(engine, model=manifest.model, defaults=manifest.defaults)
    try:
        t_first = time.perf_counter()
        first = service.submit(VideoRequest(prompt=PROMPT, seed=1, steps=10, cache={"preset": "reference"}))
        until(lambda: service.status(first.id).step >= 1, "the first job's first step")
        t_second = time.perf_counter()
        second = service.submit(VideoRequest(prompt=PROMPT, seed=2, steps=3, cache={"preset": "reference"}))
        for job in (first, second):
            until(lambda job=job: service.status(job.id).status == "completed", job.id)
        first, second = service.status(first.id), service.status(second.id)
        first_end = t_first + first.latency_s
        second_start = t_second + second.queue_wait_s
        if batching == "static":
            assert second_start >= first_end - 0.05
        else:
            assert t_second + second.latency_s < first_end  # joined, took 3 steps, left while the first ran
        frames = np.load(io.BytesIO(service.content(second.id, "frames")))
        alone = engine.generate(prompt=PROMPT, seed=2, steps=3, cache="none")
        np.testing.assert_allclose(frames, alone.frames, atol=1e-5, rtol=0)
    finally:
        service.close()


def test_serve_refuses_a_missing_bundle(tmp_path, capsys):
    from sencache.cli import main

    assert main(["serve", "--engine", str(tmp_path / "nothing")]) == 2
    assert "no engine bundle" in capsys.readouterr().err
