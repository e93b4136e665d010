"""The body of POST /v1/videos as a dict, from JSON or from a form as the `openai` SDK sends it.

The SDK's `videos.create` sends multipart/form-data, each field a text part and nested objects of
`extra_body` with bracketed names (`cache[knobs][eps_main]`). Text values are read as JSON where
they parse (numbers, booleans, a JSON-encoded `prompt_embeds`), the API's string fields as given.
The SDK flattens arrays (`prompt_embeds[][]`), which loses their shape: those are refused, naming
the way that works (one JSON-encoded field). The one file part taken is the image of an
image-to-video request (`image`, or `input_reference` as OpenAI's API names it), carried on as the
`image` field in base64 like a JSON body's. Parsed with the standard library (no python-multipart)."""

from __future__ import annotations

import base64
import json
import re
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl

from sencache.runtime.errors import BadInput

TEXT_FIELDS = frozenset({"prompt", "model", "size", "seconds", "image"})
"""Top-level fields whose form values are strings as given (a prompt "42" is text, not a number)."""

IMAGE_PARTS = frozenset({"image", "input_reference"})
"""The names a multipart body may give its image file part."""

_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def parse_body(content_type: str, body: bytes) -> dict[str, Any]:
    """The request body as a dict; BadInput (param "body", or the field at fault) when it cannot be read."""
    kind = content_type.split(";")[0].strip().lower()
    if kind in ("application/json", ""):
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, ValueError) as e:
            raise BadInput(f"body is not valid JSON: {e}", "body") from None
        except RecursionError:
            raise BadInput("body is nested too deeply to read", "body") from None
        if not isinstance(value, dict):
            raise BadInput(f"body must be a JSON object, got a {type(value).__name__}", "body")
        return value
    if kind == "multipart/form-data":
        return _nest(_multipart(content_type, body))
    if kind == "application/x-www-form-urlencoded":
        try:
            return _nest(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body)))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadInput(f"body is not a valid form: {e}", "body") from None
    raise BadInput(f"body of type {kind[:80]!r} is not read: send application/json or multipart/form-data", "body")


def _multipart(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """The (name, text) fields of a multipart/form-data body; a file part is refused (no input references)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    boundary = message.get_boundary()
    if boundary is not None and body.strip() == f"--{boundary}--".encode("latin-1"):
        return []  # no fields at all
    if not message.is_multipart() or message.defects:
        raise BadInput("body is not a valid multipart/form-data body", "body")
    fields = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise BadInput("body has a form part without a name", "body")
        if part.get_filename() is not None:
            if name not in IMAGE_PARTS:
                raise BadInput(f"{name[:80]} is a file; the one file this server takes is the image", name)
            fields.append(("image", base64.b64encode(part.get_payload(decode=True) or b"").decode("ascii")))
            continue
        try:
            fields.append((name, (part.get_payload(decode=True) or b"").decode("utf-8")))
        except UnicodeDecodeError:
            raise BadInput(f"{name[:80]} is not UTF-8 text", name) from None
    return fields


def _nest(fields: list[tuple[str, str]]) -> dict[str, Any]:
    """Bracketed field names (`cache[knobs][eps_main]`) as nested objects, values read as JSON where they parse."""
    body: dict[str, Any] = {}
    for key, text in fields:
        match = _KEY.match(key)
        if match is None:
            raise BadInput(f"body has a field of malformed name {key[:80]!r}", "body")
        path = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        if "" in path:
            raise BadInput(
                f"{path[0][:80]} is an array, which a form flattens: give it as one JSON-encoded field", path[0]
            )
        target = body
        for name in path[:-1]:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise BadInput(f"{key[:80]} is set twice", path[0])
        if path[-1] in target:
            raise BadInput(f"{key[:80]} is set twice", path[0])
        target[path[-1]] = text if len(path) == 1 and path[0] in TEXT_FIELDS else _value(text)
    return body


def _value(text: str) -> Any:
    """A form value as JSON where it parses (3, 0.5, true, [[...]]), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text
