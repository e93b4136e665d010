"""Write generated frames as a video a person can watch (MP4, H.264 through imageio-ffmpeg)."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np


def write_mp4(frames: np.ndarray, path: Path, fps: int = 8, scale: int = 8) -> None:
    """Frames [T, H, W, 3] in [0, 1] to an MP4, enlarged `scale` times with nearest neighbours."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    pixels = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    imageio.mimwrite(
        str(path),
        list(pixels),
        fps=fps,
        codec="libx264",
        quality=9,
        macro_block_size=1,
        pixelformat="yuv420p",
        output_params=["-loglevel", "error"],
    )
