"""The official `openai` SDK, unchanged, against the video API on 127.0.0.1 (Ray Serve, two
tiny-wan replicas): every call the SDK's `videos` resource makes that this server serves, the
error body it reads, and this project's own fields through `extra_body`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

import sencache  # noqa: E402
from sencache.serving import app as serving  # noqa: E402
from sencache.serving.options import free_port  # noqa: E402
from served import PROMPT, running  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("ray"),  # one Ray instance: all on one worker
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),  # OpenAI's own Videos API; not ours
]

POLL_MS = 100


@pytest.fixture(scope="module")
def client(calibrated_bundle: Path):
    """An `openai.OpenAI` client of the app (2 replicas) on a free loopback port; Ray shut down afterwards."""
    options = serving.ServeOptions(engine=calibrated_bundle, port=free_port(), replicas=2, threads=1)
    with running(options, num_cpus=2) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(calibrated_bundle: Path) -> dict[str, str]:
    """The size and seconds the bundle makes (at the MP4's 8 frames per second), and its model."""
    from sencache.runtime.bundle import Bundle

    manifest = Bundle.load(calibrated_bundle).manifest
    shapes = manifest.shapes
    return {"model": manifest.model, "size": f"{shapes.width}x{shapes.height}", "seconds": f"{shapes.frames / 8:g}"}


def test_create_and_poll_then_download_every_variant(client, served, calibrated_bundle):
    """Multipart as the SDK sends it, with our fields in extra_body: the video is Engine.generate's."""
    cache = {"method": "sencache", "knobs": {"eps_main": 0.3}}
    video = client.videos.create_and_poll(
        prompt=PROMPT,
        model=served["model"],
        size=served["size"],
        seconds=served["seconds"],
        poll_interval_ms=POLL_MS,
        extra_body={"seed": 3, "steps": 8, "cache": cache},
    )
    assert isinstance(video, openai.types.Video)
    assert (video.status, video.progress, video.object) == ("completed", 100, "video")
    assert (video.model, video.size, video.seconds, video.prompt) == (
        served["model"],
        served["size"],
        served["seconds"],
        PROMPT,
    )
    assert video.error is None and video.completed_at >= video.created_at
    extra = video.model_extra
    assert (extra["seed"], extra["steps"], extra["cache"]) == (3, 8, "sencache") and extra["latency_s"] > 0

    with sencache.Engine.from_bundle(calibrated_bundle, threads=1) as engine:
        alone = engine.generate(prompt=PROMPT, seed=3, steps=8, cache="sencache", knobs={"eps_main": 0.3})
    frames = np.load(io.BytesIO(client.videos.download_content(video.id, extra_query={"variant": "frames"}).read()))
    np.testing.assert_allclose(frames, alone.frames, atol=1e-5, rtol=0)
    assert extra["nfe"] == alone.stats["nfe"]

    mp4 = client.videos.download_content(video.id)
    assert mp4.response.headers["content-type"] == "video/mp4" and mp4.read()[4:8] == b"ftyp"
    png = client.videos.download_content(video.id, variant="thumbnail")
    assert png.response.headers["content-type"] == "image/png" and png.read()[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.videos.retrieve(video.id) == video


def test_json_body_and_prompt_embeds(client, calibrated_bundle):
    """The same create sent as JSON, and one from embeddings (a JSON-encoded field in a form,
    the prompt left out): both the prompt's video."""
    with sencache.Engine.from_bundle(calibrated_bundle, threads=1) as engine:
        embeds = engine.model.encode([PROMPT])[0].tolist()
    as_json = client.videos.create(
        prompt=PROMPT,
        extra_headers={"Content-Type": "application/json"},
        extra_body={"seed": 5, "steps": 3, "cache": {"preset": "reference"}},
    )
    from_embeds = client.videos.create(
        prompt=PROMPT,
        extra_body={
            "prompt": None,
            "prompt_embeds": json.dumps(embeds),
            "seed": 5,
            "steps": 3,
            "cache": {"preset": "reference"},
        },
    )
    videos = []
    for job in (as_json, from_embeds):
        assert job.status in ("queued", "in_progress")
        assert client.videos.poll(job.id, poll_interval_ms=POLL_MS).status == "completed"
        videos.append(
            np.load(io.BytesIO(client.videos.download_content(job.id, extra_query={"variant": "frames"}).read()))
        )
    assert client.videos.retrieve(from_embeds.id).prompt is None
    np.testing.assert_allclose(videos[1], videos[0], atol=1e-5, rtol=0)


def test_list_pages_by_cursor(client):
    ids = [client.videos.create(prompt=PROMPT, extra_body={"seed": k, "steps": 1}).id for k in range(3)]
    for video_id in ids:
        client.videos.poll(video_id, poll_interval_ms=POLL_MS)
    newest_first = [v.id for v in client.videos.list(limit=1)]  # auto-pagination: one request per page
    assert newest_first[:3] == ids[::-1]
    page = client.videos.list(limit=2, order="asc", after=ids[0])
    assert [v.id for v in page.data][:2] == ids[1:3]
    assert page.object == "list" and page.last_id == ids[2] and page.model_extra["first_id"] == ids[1]
    last = client.videos.list(after=newest_first[-2], limit=5)
    assert [v.id for v in last.data] == newest_first[-1:] and last.has_more is False
    assert list(client.videos.list(after=newest_first[-1])) == []


def test_delete_cancels_a_running_job_and_removes_it(client):
    job = client.videos.create(prompt=PROMPT, extra_body={"steps": 200, "cache": {"preset": "reference"}})
    deleted = client.videos.delete(job.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (job.id, "video.deleted", True)
    with pytest.raises(openai.NotFoundError) as gone:
        client.videos.retrieve(job.id)
    assert gone.value.code == "video_deleted" and gone.value.param == "video_id"
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(job.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(job.id)
    assert job.id not in [v.id for v in client.videos.list(limit=100)]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"size": "1280x720"}, "size"),
        ({"seconds": "12"}, "seconds"),
        ({"model": "sora-2"}, "model"),
        ({"extra_body": {"steps": 0}}, "steps"),
        ({"extra_body": {"cache": {"method": "warp"}}}, "cache.method"),
        ({"extra_body": {"prompt_embeds": [[0.0, 1.0]]}}, "prompt_embeds"),
        ({"extra_body": {"guidance": "much"}}, "guidance"),
    ],
)
def test_refusals_are_openai_errors(client, served, fields, param):
    before = [v.id for v in client.videos.list(limit=100)]
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.videos.create(prompt=PROMPT, **fields)
    error = refused.value
    assert error.status_code == 422 and error.param == param and error.type == "invalid_request_error"
    assert error.body["message"].startswith(param) and error.code  # the SDK prefixes its .message
    if param in ("size", "seconds", "model"):
        assert repr(served[param]) in error.message  # names what this server serves
    assert [v.id for v in client.videos.list(limit=100)] == before  # never queued


def test_unknown_ids_and_unready_content(client):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.videos.retrieve("video_0_" + "0" * 32)
    assert unknown.value.code == "video_not_found" and "video_0_" in unknown.value.message
    job = client.videos.create(prompt=PROMPT, extra_body={"steps": 200, "cache": {"preset": "reference"}})
    with pytest.raises(openai.ConflictError) as early:
        client.videos.download_content(job.id)
    assert early.value.code == "video_not_ready"
    with pytest.raises(openai.UnprocessableEntityError) as variant:
        client.videos.download_content(job.id, variant="spritesheet")
    assert variant.value.param == "variant"
    with pytest.raises(openai.NotFoundError) as cursor:
        client.videos.list(after="video_9_nope")
    assert cursor.value.param == "after"
    client.videos.delete(job.id)
