"""Helpers of the tests that drive a real server over HTTP: wait for a condition, create a job,
wait for a job to end."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests

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
