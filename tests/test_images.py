"""A request's image through every Python-side front door: read and checked before any work (one
line naming the field), refused by a text-to-video bundle and required by an image-to-video one;
the command line's --image and the Python API's `image` give the pipeline's own result."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_cli import CHEAP, HEAVY

from sencache.benchmarks.reference_pipelines import reference_image, run_reference
from sencache.cli import main
from sencache.runtime.errors import BadInput
from sencache.runtime.images import MAX_SIDE, as_image, check_image, read_image
from sencache.runtime.request import GenerationParams


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    picture = Image.fromarray(array)
    (picture.convert(mode) if mode else picture).save(out, format="PNG")
    return out.getvalue()


PIXELS = reference_image()


def test_an_rgb_file_is_read_as_its_pixels(tmp_path):
    path = tmp_path / "frame.png"
    path.write_bytes(_png(PIXELS))
    np.testing.assert_array_equal(read_image(path), PIXELS)
    np.testing.assert_array_equal(read_image(path.read_bytes()), PIXELS)
    np.testing.assert_array_equal(as_image(Image.open(path).convert("RGB")), PIXELS)
    np.testing.assert_array_equal(as_image(str(path)), PIXELS)


@pytest.mark.parametrize(
    "source,needle",
    [
        (b"not an image at all", "not a readable image"),
        (_png(PIXELS, "RGBA"), "mode RGBA, not RGB"),
        (_png(PIXELS, "L"), "mode L, not RGB"),
        (_png(np.zeros((8, 40, 3), np.uint8)), "40x8 pixels; each side must be in"),
        (_png(np.zeros((16, MAX_SIDE + 1, 3), np.uint8)), f"{MAX_SIDE + 1}x16 pixels"),
    ],
)
def test_bad_image_bytes_are_refused_naming_the_field(source, needle):
    with pytest.raises(BadInput, match=needle) as caught:
        read_image(source)
    assert caught.value.param == "image" and str(caught.value).startswith("image")
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize(
    "value,needle",
    [
        (PIXELS.astype(np.float32), "must be uint8 RGB pixels, got float32"),
        (PIXELS[..., :2], "must be [height, width, 3] RGB pixels, got shape [40, 56, 2]"),
        (PIXELS[0], "must be [height, width, 3]"),
        ([[1, 2, 3]], "must be RGB pixels (uint8 [height, width, 3]), got list"),
    ],
)
def test_bad_pixel_arrays_are_refused(value, needle):
    with pytest.raises(BadInput, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_image(value)
    with pytest.raises(BadInput):
        GenerationParams(["a"], [0], 5, 1.0, image=value)


def test_a_missing_file_is_refused():
    with pytest.raises(BadInput, match="image /nonexistent/x.png: no such file"):
        read_image("/nonexistent/x.png")


def test_command_line_refusals_come_before_model_code(ort_bundle, tmp_path):
    """A missing or unreadable --image, and an image for a text-to-video bundle, stop generate
    before torch is imported, in one line naming --image."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    good = tmp_path / "good.png"
    good.write_bytes(_png(PIXELS))
    cases = [
        (["--image", str(tmp_path / "none.png")], "--image"),
        (["--image", str(bad)], "--image"),
        (["--image", str(good)], "--image: tiny-wan is a text-to-video model and takes none"),
    ]
    argvs = [
        ["generate", "--engine", str(ort_bundle), "--prompt", "one small red circle static on black"]
        + extra
        + ["--out", str(tmp_path / "out")]
        for extra, _ in cases
    ]

    done = subprocess.run(
        [sys.executable, "-c", CHEAP, json.dumps(argvs), json.dumps(HEAVY)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for (_, needle), line in zip(cases, done.stdout.splitlines(), strict=True):
        code, err, heavy = json.loads(line)
        assert code == 2 and needle in err and len(err.splitlines()) == 1 and heavy == [], err
    assert not (tmp_path / "out").exists()


def test_generate_with_image_is_the_pipeline_and_the_api(wan_i2v, tmp_path, capsys):
    """`sencache generate --image` writes the frames of WanImageToVideoPipeline(prompt, image); the
    Python API with the same image (as pixels) gives the same frames; no image is refused."""
    from sencache.runtime.api import Engine

    case = wan_i2v
    bundle = case.folder.parent / "torch"
    picture = tmp_path / "first.png"
    picture.write_bytes(_png(PIXELS))
    prompt = "a red circle moving left"
    code = main(
        ["generate", "--engine", str(bundle), "--prompt", prompt, "--seed", "3", "--steps", "4", "--guidance", "5"]
        + ["--cache", "none", "--image", str(picture), "--out", str(tmp_path / "run"), "--threads", "1"]
    )
    assert code == 0, capsys.readouterr().err
    theirs = run_reference(case, [3], 4, 5.0, "np", prompts=[prompt], image=PIXELS)[0]
    with Engine.from_bundle(bundle, threads=1) as engine:
        video = engine.generate(prompt, seed=3, steps=4, guidance=5.0, cache="none", image=PIXELS)
        np.testing.assert_allclose(video.frames, theirs, atol=1e-5, rtol=0)
        with pytest.raises(BadInput, match="^image is missing: wan2.1-i2v-14b-480p is an image-to-video model"):
            engine.submit(prompt, image=None)
        with pytest.raises(BadInput, match="image is 8x8 pixels"):
            engine.submit(prompt, image=np.zeros((8, 8, 3), np.uint8))
    written = np.load(tmp_path / "run" / "sample_0.npy")
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["image"]["shape"] == [40, 56, 3]
    np.testing.assert_allclose(written, theirs, atol=1e-5, rtol=0)
