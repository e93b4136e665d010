"""Bad request bodies against the real server on 127.0.0.1 (Ray Serve, one tiny-wan replica).

A few hundred generated bodies (wrong types, NaN and infinities anywhere, bodies over the size
limit with and without Content-Length, deep nesting, bad UTF-8, broken JSON, wrong content types)
each get a 4xx with a JSON error body that quotes at most a short prefix of the input; none is
queued (the submitted counter does not move), and the server is healthy after all of them."""

from __future__ import annotations

import http.client
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")

from sencache.runtime.manifest import read_manifest  # noqa: E402
from sencache.serving import app as serving  # noqa: E402
from sencache.serving.guard import default_max_body  # noqa: E402
from sencache.serving.options import free_port  # noqa: E402
from sencache.serving.schema import VideoRequest  # noqa: E402
from served import PROMPT, running, submitted  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray instance: all on one worker

FIELDS = ("prompt", "seed", "steps", "guidance", "dynamic_cfg", "sampling", "cache", "prompt_embeds", "extra")
WRONG = [None, True, -1, 2**64, 1.5, "", "x" * 300, [], [1, "a"], {}, {"a": {"b": []}}, [[0.5]], [[]], -1e308]
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999")
MOST_ERROR_BYTES = 4000
"""An error body never holds more than a short prefix of the input: well under this."""
BOUND_S = 180.0


@pytest.fixture(scope="module")
def server(calibrated_bundle: Path):
    """The app with 1 replica on a free loopback port; Ray shut down afterwards."""
    with running(serving.ServeOptions(engine=calibrated_bundle, port=free_port(), threads=1), num_cpus=1) as base:
        yield base


def _json_bodies(rng: random.Random) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """(what, body, headers) for JSON bodies the API must refuse."""
    plain = {"content-type": "application/json"}
    for name in FIELDS:
        for value in WRONG:
            yield from _refused_by_schema(f"{name}={value!r:.40}", {"prompt": PROMPT, name: value})
    for k in range(80):
        where = rng.choice((*FIELDS, "cache.knobs.eps_main", "cache.method", "cache.preset", "cache.knobs"))
        body: dict[str, Any] = {"prompt": PROMPT}
        inner = body
        *path, last = where.split(".")
        for part in path:
            inner = inner.setdefault(part, {})
        inner[last] = _random_value(rng, 3)
        yield from _refused_by_schema(f"random {where} #{k}", body)
    for place in (
        '"guidance": {}',
        '"seed": {}',
        '"steps": {}',
        '"cache": {{"method": "sencache", "knobs": {{"eps_main": {}}}}}',
        '"cache": {{"knobs": {{"eps_start": {}}}}}',
        '"prompt": null, "prompt_embeds": [[0.5, {}]]',
        '"extra": [[[{}]]]',
    ):
        for constant in NON_FINITE:
            text = f'{{"prompt": "{PROMPT}", {place.format(constant)}}}'
            yield f"{constant} in {place}", text.encode(), plain
    for depth in (64, 1000, 5000, 100_000):
        for name in ("prompt", "cache", "extra"):
            yield f"{name} nested {depth}", b'{"%s": ' % name.encode() + b"[" * depth + b"]" * depth + b"}", plain
    broken = [b"", b"{", b"}", b"null", b"[]", b"123", b'"prompt"', b'{"prompt": }', b"{'prompt': 'x'}", b"{,}"]
    broken += [b'{"prompt": "%s",}' % PROMPT.encode(), b'{"prompt": "a" "b"}', b"\x00" * 8]
    for body in broken:
        yield f"broken {body[:20]!r}", body, plain
    for k in range(24):
        text = bytearray(json.dumps({"prompt": PROMPT + " " * k, "seed": k}).encode())
        text[rng.randrange(12, 12 + len(PROMPT))] = rng.choice((0xFF, 0xC3, 0x80, 0xED))
        yield f"bad utf-8 #{k}", bytes(text), plain
    for k in range(60):
        text = bytearray(json.dumps({"prompt": PROMPT, "seed": 1, "steps": 2}).encode())
        for _ in range(rng.randint(1, 4)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        yield from _refused_by_schema(f"flipped #{k}", bytes(text))
    yield "1 MB prompt", json.dumps({"prompt": "a" * 1_000_000}).encode(), plain


def _refused_by_schema(what: str, body: dict[str, Any] | bytes) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """The case, unless the API's schema takes the body (a generated body that may be a valid request)."""
    text = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        VideoRequest.model_validate_json(text)
    except ValueError:
        yield what, text, {"content-type": "application/json"}


def _random_value(rng: random.Random, depth: int) -> Any:
    """A random JSON value: a number, string, boolean, null, or (while `depth` lasts) a list or object."""
    kind = rng.randrange(8 if depth > 0 else 6)
    if kind == 0:
        return rng.randint(-(2**70), 2**70)
    if kind == 1:
        return rng.uniform(-1e6, 1e6)
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(30)))
    if kind in (3, 4):
        return rng.choice((True, False, None))
    if kind == 5:
        return rng.choice((0, 1, -1, 0.0, 1e-300, 1e300, 2**63, ""))
    if kind == 6:
        return [_random_value(rng, depth - 1) for _ in range(rng.randrange(4))]
    return {f"k{rng.randrange(9)}": _random_value(rng, depth - 1) for _ in range(rng.randrange(4))}


def _typed_bodies() -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """A valid body under content types the API does not read as JSON, and non-bodies under JSON."""
    body = json.dumps({"prompt": PROMPT, "seed": 1, "steps": 2}).encode()
    for kind in (
        "text/plain",
        "application/xml",
        "application/octet-stream",
        "image/png",
        "text/html; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "application/json; charset=latin-1",
        "nonsense",
    ):
        for payload in (b"\xff\xfe" + body, b"prompt=" + PROMPT.encode(), b"--xyz\r\ngarbage\r\n--xyz--\r\n"):
            if kind == "application/x-www-form-urlencoded" and payload.startswith(b"prompt="):
                continue  # a valid form: the API reads forms as it reads the openai SDK's
            yield f"{kind} {payload[:10]!r}", payload, {"content-type": kind}


def _check_error(reply: requests.Response, what: str) -> None:
    assert 400 <= reply.status_code < 500, (what, reply.status_code, reply.text[:300])
    assert reply.headers["content-type"].startswith("application/json"), (what, reply.headers)
    assert len(reply.content) < MOST_ERROR_BYTES, (what, len(reply.content))
    body = reply.json()
    assert isinstance(body, dict) and ("error" in body or "detail" in body), (what, body)


def test_bad_bodies_are_4xx_with_a_json_error_and_never_queued(server, calibrated_bundle):
    start = time.monotonic()
    before = submitted(server)
    limit = default_max_body(read_manifest(calibrated_bundle)[0].shapes.text)
    cases = list(_json_bodies(random.Random(24))) + list(_typed_bodies())
    assert len(cases) >= 300
    statuses: dict[int, int] = {}
    with requests.Session() as session:
        for what, body, headers in cases:
            reply = session.post(f"{server}/v1/videos", data=body, headers=headers, timeout=60)
            _check_error(reply, what)
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            assert time.monotonic() - start < BOUND_S, f"{len(statuses)} kinds of answer so far, past {BOUND_S} s"
        over = json.dumps({"prompt": PROMPT, "extra": "a" * limit}).encode()
        reply = session.post(f"{server}/v1/videos", data=over, headers={"content-type": "application/json"}, timeout=60)
        _check_error(reply, "over the limit")
        assert reply.status_code == 413 and str(limit) in reply.text
        streamed = session.post(f"{server}/v1/videos", data=(over[i : i + 65536] for i in range(0, len(over), 65536)))
        _check_error(streamed, "over the limit, chunked")
        assert streamed.status_code == 413
    assert {415, 422} <= set(statuses), statuses  # unreadable types 415; the rest, malformed JSON too, 422
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200
    assert submitted(server) == before


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    """A Content-Length of 10 GB with no byte of body sent: 413 at once."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("POST", "/v1/videos")
        connection.putheader("content-type", "application/json")
        connection.putheader("content-length", str(10**10))
        connection.endheaders()
        start = time.monotonic()
        reply = connection.getresponse()
        assert reply.status == 413 and time.monotonic() - start < 10
        assert b"limit" in reply.read()
    finally:
        connection.close()


def test_nan_is_422_naming_its_field(server):
    reply = requests.post(
        f"{server}/v1/videos",
        data=b'{"prompt": "%s", "guidance": NaN}' % PROMPT.encode(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 422 and "guidance" in reply.text and "finite" in reply.text, reply.text


def test_a_long_input_is_quoted_by_a_short_prefix(server):
    reply = requests.post(f"{server}/v1/videos", json={"prompt": "a" * 1_000_000}, timeout=60)
    assert reply.status_code == 422 and "prompt" in reply.text and len(reply.content) < 1000, reply.text[:300]
