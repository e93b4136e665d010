"""Quality of a cached video against the uncached video of the same prompt and seed."""

from __future__ import annotations

import math

import numpy as np


def psnr(video: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR in dB over the whole clip (frames in [0, data_range]); inf for identical videos."""
    if video.shape != reference.shape:
        raise ValueError(f"shapes differ: {video.shape} vs {reference.shape}")
    mse = float(np.mean((video.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
