"""NumPy reference of the CUDA drift kernel with the same blocking (kernels/drift_kernel.cu).

Each element is assigned to the block the kernel would give it (16-byte vectors dealt out by a
grid stride, the remainder element by element), each block's partial is summed, and the partials
are added in order in float32, as the finishing kernel does. bf16 data is passed as uint16 bits.
"""

from __future__ import annotations

import math

import numpy as np

from sencache.kernels.nvrtc_build import THREADS

MAX_BLOCKS_PER_SAMPLE = 1024
VECTORS_PER_THREAD = 2


def blocks_per_sample(per_sample: int, itemsize: int) -> int:
    """Blocks each sample gets: enough for ~2 vectors per thread, at most 1024; sizes alone decide."""
    vectors = per_sample // (16 // itemsize)
    return max(1, min(MAX_BLOCKS_PER_SAMPLE, math.ceil(vectors / (THREADS * VECTORS_PER_THREAD))))


def to_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 / fp16 arrays, or bf16 given as uint16 bit patterns, as float32."""
    if dtype == "bf16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def drift_reference(x: np.ndarray, anchor: np.ndarray, dtype: str) -> np.ndarray:
    """Per-sample sum of squared differences [B] (float32), blocked like the kernel."""
    samples = x.shape[0]
    flat_x, flat_a = x.reshape(samples, -1), anchor.reshape(samples, -1)
    per_sample = flat_x.shape[1]
    itemsize = 4 if dtype == "fp32" else 2
    per_vec = 16 // itemsize
    blocks = blocks_per_sample(per_sample, itemsize)
    stride = blocks * THREADS
    out = np.empty(samples, np.float32)
    index = np.arange(per_sample)
    for s in range(samples):
        aligned = (s * per_sample * itemsize) % 16 == 0
        vectors = per_sample // per_vec if aligned else 0
        split = vectors * per_vec
        thread = np.where(index < split, (index // per_vec) % stride, (index - split) % stride)
        diff = to_float32(flat_x[s], dtype) - to_float32(flat_a[s], dtype)
        partials = np.bincount(thread // THREADS, weights=(diff * diff).astype(np.float64), minlength=blocks)
        total = np.float32(0.0)
        for p in partials.astype(np.float32):
            total = np.float32(total + p)
        out[s] = total
    return out
