"""The interface every backend gives the denoising loop: run one stage on named tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

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


STREAM_OUT = "_out"
"""What the blocks stage appends to a stream's name for its output (StageLayout.stage_io)."""


def part_name(stage: str, index: int) -> str:
    """The name of graph or engine `index` of `stage` (the first is the stage itself)."""
    return stage if index == 0 else f"{stage}.{index}"


def run_parts(
    run: Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    parts: Sequence[str],
    inputs: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Run a stage's `parts` in turn (a streamed build's groups of blocks): each part's stream
    outputs are the next one's stream inputs, the other inputs are the stage's own."""
    outputs = run(parts[0], inputs)
    for part in parts[1:]:
        streams = {name.removesuffix(STREAM_OUT): value for name, value in outputs.items()}
        outputs = run(part, {**inputs, **streams})
    return outputs


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
