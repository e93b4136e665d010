"""Per-sample latent drift for the decision, measured where the loop's latents live.

`start` queues the measurement of sum((x - anchor)^2) per sample and `result` returns it on the
host. On the host it is computed at once in float64 (kernels.drift). On a GPU the fused kernel
runs on PyTorch's current stream, its per-sample sums go to pinned memory by an async copy and
`result` waits on that copy's event alone, so work queued after `start` (the next head) keeps the
GPU busy while the host decides.
"""

from __future__ import annotations

import numpy as np
import torch

from sencache.kernels.drift import drift_sumsq
from sencache.runtime.errors import BadInput


class HostDriftMeter:
    """Drift of host tensors, in float64."""

    def __init__(self) -> None:
        self._sums: np.ndarray | None = None

    def start(self, x: torch.Tensor, anchor: torch.Tensor) -> None:
        self._sums = drift_sumsq(x.numpy(), anchor.numpy())

    def result(self) -> np.ndarray:
        if self._sums is None:
            raise RuntimeError("HostDriftMeter.result before start")
        return self._sums


class CudaDriftMeter:
    """Drift of float32 CUDA latents by the fused kernel (kernels/drift_kernel.cu).

    Unproven on hardware in this repository's CI (no GPU there): the tests marked `gpu` and
    `sencache gpu-acceptance` run it."""

    def __init__(self, max_samples: int, per_sample: int) -> None:
        from sencache.kernels.cuda_drift import CudaUnavailable, DeviceDrift, open_device

        try:
            self._kernel = DeviceDrift(open_device(torch.cuda.current_device()), max_samples, per_sample, "fp32")
        except CudaUnavailable as e:
            raise BadInput(f"the drift kernel cannot run here: {e}") from None

    def start(self, x: torch.Tensor, anchor: torch.Tensor) -> None:
        if (
            not (x.is_contiguous() and anchor.is_contiguous())
            or x.shape != anchor.shape
            or {x.dtype, anchor.dtype} != {torch.float32}
        ):
            raise ValueError("the drift meter takes two contiguous float32 tensors of one shape (the solver's latents)")
        self._kernel.enqueue(x.data_ptr(), anchor.data_ptr(), len(x), torch.cuda.current_stream().cuda_stream)

    def result(self) -> np.ndarray:
        return self._kernel.result().astype(np.float64)


def drift_meter(device: torch.device, max_samples: int, per_sample: int) -> HostDriftMeter | CudaDriftMeter:
    """The meter for float32 latents on `device`."""
    if device.type == "cuda":
        return CudaDriftMeter(max_samples, per_sample)
    return HostDriftMeter()
