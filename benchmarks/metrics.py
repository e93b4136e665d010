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


SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _gaussian_filter(image: np.ndarray) -> np.ndarray:
    """Separable 11x11 Gaussian (sigma 1.5) over the last two axes, 'valid' region only."""
    half = SSIM_WINDOW // 2
    x = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    kernel /= kernel.sum()
    out = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), -1, image)
    return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="valid"), -2, out)


def ssim(video: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, computed per
    frame and per channel on [T, H, W, C] videos, averaged over the valid window positions, then
    over channels and frames."""
    if video.shape != reference.shape:
        raise ValueError(f"shapes differ: {video.shape} vs {reference.shape}")
    a = np.moveaxis(video.astype(np.float64), -1, 1)  # [T, C, H, W]
    b = np.moveaxis(reference.astype(np.float64), -1, 1)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a**2
    var_b = _gaussian_filter(b * b) - mu_b**2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean(axis=(-1, -2)).mean())
