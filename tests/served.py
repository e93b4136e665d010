"""Helpers of the tests that drive a real server over HTTP: run the app on a loopback port, wait for
a condition, create a job, wait for a job to end, count the submitted jobs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests

from sencache.serving import app as serving

PROMPT = "one small red circle moving left slow on black"
DEADLINE_S = 120.0


def until(check: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    """The first true value of `check()`, polled every 0.1 s; AssertionError after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def create(base: str, **body: Any) -> requests.Response:
    """POST /v1/videos with PROMPT and `body`."""
    return requests.post(f"{base}/v1/videos", json={"prompt": PROMPT, **body}, timeout=30)


def wait(base: str, video_id: str, states: tuple[str, ...] = ("completed", "failed")) -> dict[str, Any]:
    """The job once its status is one of `states`."""

    def ended() -> dict[str, Any] | None:
        job = requests.get(f"{base}/v1/videos/{video_id}", timeout=30).json()
        return job if job["status"] in states else None

    return until(ended, f"{video_id} to end")


@contextmanager
def running(options: serving.ServeOptions, num_cpus: int) -> Iterator[str]:
    """The app started with `options` (its port on 127.0.0.1) and healthy: yields its base URL; Ray is
    shut down afterwards, also when the server never came up."""
    serving.start(options, num_cpus=num_cpus)
    base = f"http://127.0.0.1:{options.port}"
    try:
        until(lambda: _healthy(base), "healthz")
        yield base
    finally:
        serving.stop()


def _healthy(base: str) -> bool:
    """Whether /healthz answers 200; a proxy still coming up may drop the connection instead."""
    try:
        return requests.get(f"{base}/healthz", timeout=10).status_code == 200
    except requests.ConnectionError:
        return False


def submitted(base: str) -> float:
    """How many jobs the server's metrics count as submitted."""
    text = requests.get(f"{base}/metrics", timeout=30).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("sencache_requests_total{") and 'outcome="submitted"' in line
    )
