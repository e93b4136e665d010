"""Write generated frames as a video a person can watch (MP4, H.264 through imageio-ffmpeg), or
its first frame as a PNG thumbnail."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np

MP4_FPS = 8
"""The frame rate of the MP4s (a clip of T frames lasts T / 8 seconds)."""


def _pixels(frames: np.ndarray, scale: int) -> np.ndarray:
    """Frames [T, H, W, 3] in [0, 1] as uint8, enlarged `scale` times with nearest neighbours."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    pixels = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    return pixels


def thumbnail_png(frames: np.ndarray, scale: int = 8) -> bytes:
    """The first of frames [T, H, W, 3] in [0, 1] as a PNG, enlarged `scale` times like the MP4."""
    return bytes(iio.imwrite("<bytes>", _pixels(frames[:1], scale)[0], extension=".png"))


def write_mp4(frames: np.ndarray, path: Path, fps: int = MP4_FPS, scale: int = 8) -> None:
    """Frames [T, H, W, 3] in [0, 1] to an MP4, enlarged `scale` times with nearest neighbours."""
    imageio.mimwrite(
        str(path),
        list(_pixels(frames, scale)),
        fps=fps,
        codec="libx264",
        quality=9,
        macro_block_size=1,
        pixelformat="yuv420p",
        output_params=["-loglevel", "error"],
    )
