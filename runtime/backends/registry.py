"""The registry of backends: each is registered here once, with what it needs and how it opens.
The manifest, the build targets, the command line's help and `sencache doctor` read it. It
imports no backend (nor torch): a backend's module is imported when a bundle is opened on it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from sencache.runtime.backends.base import StageBackend
    from sencache.runtime.bundle import Bundle


@dataclass(frozen=True)
class Backend:
    """One backend: how it opens a bundle, what its bundles hold, and what it needs installed."""

    name: str
    backend_class: str
    """`module:Class` of its StageBackend, constructed with the bundle (and threads, device if it takes them)."""
    stages: Literal["onnx", "torch", "engine"]
    """What a build writes per stage: validated ONNX, the saved transformer, or engines compiled from ONNX."""
    precisions: tuple[str, ...]
    """The precisions it builds (fp8 where NVIDIA ModelOpt is installed)."""
    takes_threads: bool = True
    takes_device: bool = False
    """Whether it runs where the caller says (else it picks its own device)."""
    engine_module: str | None = None
    """The Python module of its engines (TensorRT); its manifest then holds a TensorRT record."""
    builds_on_gpu: bool = False
    """Whether building for it needs a GPU here."""
    install: str | None = None
    """How to install what it needs beyond the base install."""
    build_note: str | None = None
    """What `doctor` adds to its build line."""

    def open(self, bundle: Bundle, threads: int, device: str) -> StageBackend:
        """This backend on `bundle`."""
        module, name = self.backend_class.split(":")
        backend_class = getattr(importlib.import_module(module), name)
        options = {"threads": threads} if self.takes_threads else {}
        if self.takes_device:
            options["device"] = device  # type: ignore[assignment]
        backend: StageBackend = backend_class(bundle, **options)
        return backend


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add `backend` (once)."""
    if backend.name in BACKENDS:
        raise ValueError(f"backend {backend.name!r} is registered twice")
    BACKENDS[backend.name] = backend
    return backend


_BACKENDS = "sencache.runtime.backends"
register_backend(
    Backend("onnxruntime", f"{_BACKENDS}.onnxruntime_backend:OnnxRuntimeBackend", "onnx", ("fp32", "fp16", "fp8"))
)
register_backend(
    Backend("torch", f"{_BACKENDS}.torch_backend:TorchBackend", "torch", ("fp32", "fp16", "bf16"), takes_device=True)
)
register_backend(
    Backend(
        "tensorrt",
        f"{_BACKENDS}.tensorrt_backend:TensorRTBackend",
        "engine",
        ("fp32", "fp16", "bf16", "fp8"),
        takes_threads=False,
        engine_module="tensorrt",
        builds_on_gpu=True,
        install="pip install 'sencache[tensorrt]' (TensorRT comes from NVIDIA's package index)",
    )
)
register_backend(
    Backend(
        "tensorrt-rtx",
        f"{_BACKENDS}.tensorrt_backend:TensorRTBackend",
        "engine",
        ("fp32", "fp16", "bf16", "fp8"),
        takes_threads=False,
        engine_module="tensorrt_rtx",
        install="pip install tensorrt-rtx-cu13",
        build_note="targets SM75 SM80 SM86 SM89 SM120 SM121 (no SM90), the one a build names; no GPU needed",
    )
)
