"""What the server refuses before a request body reaches the API: bodies over the size limit (413,
from Content-Length before any byte is read, or while streaming when there is none), bodies that
are neither JSON nor a form (415), and JSON holding NaN or an infinity anywhere (422: Python's
JSON reader accepts them, and a 422 echoing one could not be written as JSON). Also how a schema
refusal is worded without echoing more than a short prefix of the input.

`BodyGuard` is a plain ASGI middleware in front of the API's FastAPI app; Ray Serve's HTTP proxy
hands a replica the body only as the app reads it, so a body refused from its Content-Length is
never sent on."""

from __future__ import annotations

import asyncio
import json
import math
import reprlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

MB = 1_000_000
BYTES_PER_NUMBER = 32
"""The most a number of an embeddings array takes in JSON: 24 characters for the longest float64
("-2.2250738585072014e-308"), its separator and some whitespace."""
HEADROOM_BYTES = 1 * MB
"""The rest of a body (a prompt of at most 10,000 characters escaped, the other fields), with room to spare."""
PREFIX_CHARS = 60
"""The most of a refused input a 422 quotes."""
ERRORS_SHOWN = 5
"""The most schema errors one 422 lists."""
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Refusal = Callable[[int, str], ASGIApp]
"""(status, reason) -> the error answer, an ASGI app (a Starlette Response)."""


def default_max_body(text_shape: Sequence[int]) -> int:
    """The body limit for a bundle whose text embeddings are [tokens, channels]: a prompt's and a
    negative prompt's embeddings at their largest JSON size, plus HEADROOM_BYTES."""
    tokens, channels = text_shape
    return 2 * tokens * channels * BYTES_PER_NUMBER + HEADROOM_BYTES


_SHORT = reprlib.Repr()
"""A bounded repr of containers: never deeper than 3 levels (a 1000-deep list is no recursion risk)."""
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 3, 8, 8
_SHORT.maxstring = _SHORT.maxother = PREFIX_CHARS


def prefix(value: Any) -> str:
    """`value`'s repr cut to PREFIX_CHARS characters (marked with '...', and a text's full length, when cut)."""
    if not isinstance(value, str):
        text = _SHORT.repr(value)
        return text if len(text) <= PREFIX_CHARS else f"{text[:PREFIX_CHARS]}..."
    text = repr(value)
    return text if len(text) <= PREFIX_CHARS else f"{text[:PREFIX_CHARS]}... ({len(text)} characters)"


def worded(errors: Sequence[dict[str, Any]]) -> str:
    """A schema refusal (pydantic's error list) in one line: each error's field, message and a short
    prefix of its input; at most ERRORS_SHOWN errors."""
    parts = []
    for error in errors[:ERRORS_SHOWN]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")) or "body"
        got = f" (got {prefix(error['input'])})" if "input" in error else ""
        parts.append(f"{where}: {_cut(str(error.get('msg', 'invalid')))}{got}")
    more = len(errors) - ERRORS_SHOWN
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def non_finite(document: Any) -> str | None:
    """The path (`guidance`, `prompt_embeds[3][7]`) of the first NaN or infinity in a parsed JSON
    document, or None when every number is finite. Iterative: a deeply nested document is no risk."""
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                return path or "body"
        elif isinstance(value, dict):
            stack.extend((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
        elif isinstance(value, list):
            if all(type(item) is float for item in value) and all(map(math.isfinite, value)):
                continue  # the common case (an embeddings row), checked without a path per number
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
    return None


class BodyGuard:
    """ASGI middleware: the size limit, the content type and finite JSON numbers (module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int], refusal: Refusal) -> None:
        """`max_bytes` gives the limit when a request comes (the server's is known only in its replica)."""
        self.app = app
        self.max_bytes = max_bytes
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        limit = self.max_bytes()
        refused = _refuse_headers(headers, limit)
        if refused is not None:
            await self.refusal(*refused)(scope, receive, send)
            return
        body = await _read(receive, limit)
        if body is None:
            await self.refusal(413, _too_large(limit))(scope, receive, send)
            return
        kind = _media_type(headers)
        if body and not kind.startswith(FORMS):
            reason = await asyncio.to_thread(_non_finite_reason, body)
            if reason is not None:
                await self.refusal(422, reason)(scope, receive, send)
                return
        await self.app(scope, _replay(body, receive), send)


def _refuse_headers(headers: dict[str, str], limit: int) -> tuple[int, str] | None:
    """(status, reason) for a request its headers already refuse: too long a Content-Length, a type that is
    neither JSON nor a form; None otherwise."""
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return (413, _too_large(limit)) if length.isdigit() else (400, "Content-Length is not a number")
    kind = _media_type(headers)
    if kind and not (kind == "application/json" or kind.endswith("+json") or kind.startswith(FORMS)):
        return 415, f"content type {prefix(kind)} is not accepted: send application/json or a form"
    return None


def _too_large(limit: int) -> str:
    return f"the request body is over the server's limit of {limit} bytes (sencache serve --max-body-mb)"


async def _read(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _media_type(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _non_finite_reason(body: bytes) -> str | None:
    """Why a JSON body is refused for a NaN or infinity, or None (also when it is not JSON at all:
    the API's own parser then says what is wrong with it)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    path = non_finite(document)
    return None if path is None else f"{path}: numbers must be finite (NaN and Infinity are not accepted)"


def _replay(body: bytes, server: Receive) -> Receive:
    """A receive that hands the app the body already read, then the server's messages (the disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return await server()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _cut(text: str) -> str:
    return text if len(text) <= 4 * PREFIX_CHARS else text[: 4 * PREFIX_CHARS] + "..."
