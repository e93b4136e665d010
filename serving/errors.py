"""The body of every error answer, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

One function builds it (`error_response`), so the routes, the validation handler and any
middleware answer alike, and OpenAI's clients show the message (the SDK raises the exception
class of the status: 404 NotFoundError, 409 ConflictError, 413, 422 UnprocessableEntityError,
429 RateLimitError, 5xx InternalServerError)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

TYPES: dict[int, str] = {429: "rate_limit_error"}
"""OpenAI's error `type` of a status other than the default: `invalid_request_error` below 500,
`server_error` from 500."""


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error answer with HTTP `status`; `param` names the request's field at fault."""
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error answer: `status` with `error_body` (and `headers`, e.g. Retry-After)."""
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)
