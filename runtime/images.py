"""A request's image (image-to-video): read from a file, encoded bytes or a pixel array, and checked,
before any model work, to be an RGB picture of a size the engine takes. Every front end (command
line, Python API, server, C ABI) turns what it was given into the one form, RGB uint8 [H, W, 3];
the family adapter resizes and encodes it as its pipeline does."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from sencache.runtime.errors import BadInput

MIN_SIDE = 16
"""The smallest side an image may have (pixels)."""
MAX_SIDE = 4096
"""The largest side an image may have (pixels): 4K, far above what the models take."""
MAX_IMAGE_BYTES = 64 * 1024 * 1024
"""The largest encoded image file the engine reads."""

IMAGE_FAMILIES = frozenset({"wan-i2v", "wan-i2v-2.2", "cogvideox-i2v", "ltx-i2v"})
"""The model families that start from an image (their adapters' `takes_image`), named here without
any model code so that a front end can refuse a request from the bundle's manifest alone."""


def check_image_fits(family: str, model: str, given: bool) -> None:
    """BadInput naming `image` when a request gives an image to a text-to-video model, or none to
    an image-to-video model (`family` and `model` as a bundle's manifest names them)."""
    if family in IMAGE_FAMILIES and not given:
        raise BadInput(f"image is missing: {model} is an image-to-video model", param="image")
    if family not in IMAGE_FAMILIES and given:
        raise BadInput(f"image: {model} is a text-to-video model and takes none", param="image")


def check_image(image: object, param: str = "image") -> np.ndarray:
    """`image` as RGB uint8 [H, W, 3], contiguous; BadInput naming `param` unless it is an array of
    that kind with sides in [MIN_SIDE, MAX_SIDE]."""
    if not isinstance(image, np.ndarray):
        raise BadInput(
            f"{param} must be RGB pixels (uint8 [height, width, 3]), got {type(image).__name__}", param=param
        )
    if image.dtype != np.uint8:
        raise BadInput(f"{param} must be uint8 RGB pixels, got {image.dtype}", param=param)
    if image.ndim != 3 or image.shape[2] != 3:
        raise BadInput(f"{param} must be [height, width, 3] RGB pixels, got shape {list(image.shape)}", param=param)
    _check_size(image.shape[1], image.shape[0], param)
    return np.ascontiguousarray(image)


def read_image(source: str | Path | bytes, param: str = "image") -> np.ndarray:
    """The RGB pixels of an image file (a path) or of encoded bytes (PNG, JPEG, WebP, ...), checked
    by its header before it is decoded; BadInput naming `param` when it is missing, unreadable,
    not RGB, or of a size the engine does not take."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, bytes):
        data = source
        name = param
    else:
        path = Path(source)
        if not path.is_file():
            raise BadInput(f"{param} {path}: no such file", param=param)
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise BadInput(f"{param} {path}: larger than {MAX_IMAGE_BYTES // 2**20} MiB", param=param)
        data = path.read_bytes()
        name = f"{param} {path}"
    if len(data) > MAX_IMAGE_BYTES:
        raise BadInput(f"{param}: larger than {MAX_IMAGE_BYTES // 2**20} MiB", param=param)
    try:
        with Image.open(io.BytesIO(data)) as picture:
            _check_size(picture.width, picture.height, param)
            if picture.mode != "RGB":
                raise BadInput(
                    f"{name}: mode {picture.mode}, not RGB (convert it to 8-bit RGB without alpha)",
                    param=param,
                )
            return np.asarray(picture.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f"{name}: not a readable image ({str(e).splitlines()[0]})", param=param) from None


def as_image(value: Any, param: str = "image") -> np.ndarray | None:
    """What a Python caller passed as `image`: None, a path, encoded bytes, a PIL image or an RGB
    uint8 array, as checked RGB pixels."""
    if value is None:
        return None
    if isinstance(value, (str, Path, bytes)):
        return read_image(value, param)
    if isinstance(value, np.ndarray):
        return check_image(value, param)
    from PIL import Image

    if isinstance(value, Image.Image):
        if value.mode != "RGB":
            raise BadInput(f"{param}: a PIL image of mode {value.mode}, not RGB", param=param)
        _check_size(value.width, value.height, param)
        return np.asarray(value, dtype=np.uint8).copy()
    raise BadInput(
        f"{param} must be a path, image bytes, a PIL image or uint8 [height, width, 3] pixels, "
        f"got {type(value).__name__}",
        param=param,
    )


def _check_size(width: int, height: int, param: str) -> None:
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise BadInput(
            f"{param} is {width}x{height} pixels; each side must be in [{MIN_SIDE}, {MAX_SIDE}]", param=param
        )
