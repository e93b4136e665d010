"""Per-sample drift of the latent from its anchor, on the host (the CPU backends' kernel)."""

from __future__ import annotations

import numpy as np


def drift_sumsq(latent: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """Sum over each sample of (latent - anchor)^2, accumulated in float64: shape [B]."""
    if latent.shape != anchor.shape:
        raise ValueError(f"latent {latent.shape} and anchor {anchor.shape} differ in shape")
    diff = (latent.astype(np.float64, copy=False) - anchor).reshape(latent.shape[0], -1)
    return np.einsum("ij,ij->i", diff, diff)
