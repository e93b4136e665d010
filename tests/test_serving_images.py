"""The HTTP API's image (image-to-video): base64 or a data: URL in a JSON body, a file part of a
multipart body (named image, or input_reference as OpenAI's SDK sends it), read by the server's
own body parser and schema into the video service of a tiny random Wan 2.1 I2V engine; the served
frames equal `Engine.generate` with the same image; bad images are refused naming `image` and
never queued. (Ray's transport of the same body is what tests/test_serving.py covers.)"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pydantic")  # the server's extra

from sencache.benchmarks.reference_pipelines import reference_image  # noqa: E402
from sencache.runtime.api import Engine  # noqa: E402
from sencache.runtime.errors import BadInput  # noqa: E402
from sencache.serving.form import parse_body  # noqa: E402
from sencache.serving.schema import VideoRequest  # noqa: E402
from sencache.serving.service import VideoService  # noqa: E402

PIXELS = reference_image()
PROMPT = "a red circle moving left"


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts += [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="f.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for k, data in files.items()
    ]
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


@pytest.fixture(scope="module")
def service(wan_i2v):
    with Engine.from_bundle(wan_i2v.folder.parent / "torch", threads=1) as engine:
        manifest = engine.model.bundle.manifest
        yield VideoService(engine, model=manifest.model, defaults=manifest.defaults), engine


def _frames(service: VideoService, body: dict) -> np.ndarray:
    job = service.submit(VideoRequest(**body))
    end = time.monotonic() + 120
    while service.status(job.id).status not in ("completed", "failed"):
        assert time.monotonic() < end
        time.sleep(0.05)
    assert service.status(job.id).status == "completed"
    return np.load(io.BytesIO(service.content(job.id, "frames")))


def test_json_and_multipart_images_give_the_engines_video(service):
    svc, engine = service
    common = {"prompt": PROMPT, "seed": 3, "steps": 3, "cache": {"preset": "reference"}}
    expected = engine.generate(PROMPT, seed=3, steps=3, cache="none", image=PIXELS).frames
    encoded = base64.b64encode(_png(PIXELS)).decode()
    bodies = [
        parse_body("application/json", json.dumps({**common, "image": encoded}).encode()),
        {**common, "image": "data:image/png;base64," + encoded},
    ]
    for name in ("image", "input_reference"):
        kind, data = _multipart(
            {"prompt": PROMPT, "seed": "3", "steps": "3", "cache[preset]": "reference"}, {name: _png(PIXELS)}
        )
        bodies.append(parse_body(kind, data))
    for body in bodies:
        np.testing.assert_allclose(_frames(svc, body), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "image,needle",
    [
        ("@@not base64@@", "image is not base64"),
        ("data:image/png,plain", "image: a data: URL must be base64"),
        (base64.b64encode(b"GIF89a broken").decode(), "image: not a readable image"),
        (base64.b64encode(_png(np.zeros((8, 8, 3), np.uint8))).decode(), "image is 8x8 pixels"),
        (None, "image is missing: wan2.1-i2v-14b-480p is an image-to-video model"),
    ],
)
def test_bad_images_are_refused_naming_the_field_and_never_queued(service, image, needle):
    svc, _ = service
    before = len(svc.jobs())
    with pytest.raises(BadInput, match=needle.replace("(", r"\(")) as caught:
        svc.submit(VideoRequest(prompt=PROMPT, image=image))
    assert caught.value.param == "image"
    assert len(svc.jobs()) == before


def test_a_file_part_other_than_the_image_is_refused():
    kind, data = _multipart({"prompt": PROMPT}, {"prompt_embeds": b"\x00\x01"})
    with pytest.raises(BadInput, match="prompt_embeds is a file; the one file this server takes is the image"):
        parse_body(kind, data)
