"""The interface every backend gives the denoising loop: run one stage on named tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from sencache.runtime.backends.registry import BACKENDS
from sencache.runtime.bundle import Bundle
from sencache.runtime.errors import BadInput
from sencache.runtime.limits import check_threads


class StageBackend(ABC):
    """Runs the head, blocks and tail stages of one bundle on one device.

    Inputs and outputs are name -> tensor on `device`, with the names of the bundle's stage
    layout; the loop keeps its latents, cache and anchors there too, so nothing crosses to the
    host between stages. The blocks stage accepts any batch from 1 to the bundle's max rows
    (sub-batches of the samples that run). On a GPU, work is queued on the current CUDA stream
    and `run` returns without waiting for it. An output stays valid until the same stage runs
    again (a backend may hand out views of buffers it reuses).
    """

    name: str
    device: torch.device

    @abstractmethod
    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run `stage` on `inputs`; returns its outputs by name."""

    def describe(self) -> dict[str, str]:
        """What runs where, for stats and logs."""
        return {"backend": self.name, "device": str(self.device)}


def open_backend(bundle: Bundle, name: str | None = None, threads: int = 0, device: str = "cpu") -> StageBackend:
    """The backend that runs `bundle`: its own unless `name` asks for another it supports.
    `device` places the PyTorch backend's modules (e.g. "cuda"); TensorRT bundles always run on
    the GPU and ONNX Runtime bundles on the host."""
    check_threads(threads)
    name = name or bundle.manifest.backend
    if name != bundle.manifest.backend:
        raise BadInput(
            f"backend {name}: bundle {bundle.path} was built for {bundle.manifest.backend}; build another for {name}",
            param="backend",
        )
    backend = BACKENDS[name]
    if device != "cpu" and not backend.takes_device:
        raise BadInput(
            f"device {device} applies to torch bundles; a {name} bundle picks its own device", param="device"
        )
    return backend.open(bundle, threads, device)
