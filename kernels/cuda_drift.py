"""The drift kernel on a GPU, driven from Python through the CUDA driver API (cuda.bindings).

`DeviceDrift` loads the NVRTC-built cubin for the device's architecture, owns the scratch and
output buffers and a pinned host buffer, and per step enqueues on the caller's stream: the partial
sums, the fixed-order finish, an async copy of the per-sample sums to pinned memory and one event.
`result()` waits on that event alone, never on the stream or the device, so the host decides
while the GPU keeps working on whatever was queued before.

Unproven on hardware in this repository's CI (no GPU there): the CPU machines check that NVRTC
compiles the kernel for sm_80/90/100 and that the NumPy model of its blocking is exact; the tests
marked `gpu` and `sencache gpu-acceptance` exercise this module when a GPU is present.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from sencache.kernels.host_reference import blocks_per_sample
from sencache.kernels.nvrtc_build import THREADS, compile_drift_kernel

DTYPES = {"fp32": ("drift_partial_f32", 4), "fp16": ("drift_partial_f16", 2), "bf16": ("drift_partial_bf16", 2)}


class CudaUnavailable(Exception):
    """No NVIDIA driver or GPU here, or a CUDA call failed."""


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        raise CudaUnavailable("cuda-bindings is not installed: pip install 'sencache[cuda]'") from None
    return driver


def _ok(result, what: str):
    """Unpack a cuda.bindings result tuple, raising on any error code."""
    driver = _driver()
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != driver.CUresult.CUDA_SUCCESS:
        raise CudaUnavailable(f"{what} failed: {error.name if hasattr(error, 'name') else error}")
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class Device:
    ordinal: int
    name: str
    arch: str
    context: object


def open_device(ordinal: int = 0) -> Device:
    """The primary context of GPU `ordinal` (the one PyTorch and TensorRT also use), made current."""
    driver = _driver()
    try:
        result = driver.cuInit(0)
    except Exception as e:  # the bindings raise their own error when libcuda itself is missing
        raise CudaUnavailable(f"no NVIDIA driver here: {e}") from None
    _ok(result, "cuInit")
    device = _ok(driver.cuDeviceGet(ordinal), "cuDeviceGet")
    attr = driver.CUdevice_attribute
    major = _ok(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "attribute")
    minor = _ok(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "attribute")
    name = _ok(driver.cuDeviceGetName(64, device), "cuDeviceGetName")
    context = _ok(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
    _ok(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    return Device(ordinal, bytes(name).split(b"\0")[0].decode(), f"sm_{major}{minor}", context)


class DeviceDrift:
    """Per-sample sum of (x - anchor)^2 for up to `max_samples` samples of `per_sample` elements."""

    def __init__(self, device: Device, max_samples: int, per_sample: int, dtype: str = "fp32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        driver = _driver()
        self.device, self.max_samples, self.per_sample, self.dtype = device, max_samples, per_sample, dtype
        entry, itemsize = DTYPES[dtype]
        self.blocks = blocks_per_sample(per_sample, itemsize)
        kernel = compile_drift_kernel(device.arch)
        self._module = _ok(driver.cuModuleLoadData(kernel.cubin.read_bytes()), "cuModuleLoadData")
        self._partial = _ok(driver.cuModuleGetFunction(self._module, entry.encode()), "cuModuleGetFunction")
        self._finish = _ok(driver.cuModuleGetFunction(self._module, b"drift_finish"), "cuModuleGetFunction")
        self._partials = _ok(driver.cuMemAlloc(4 * max_samples * self.blocks), "cuMemAlloc")
        self._out = _ok(driver.cuMemAlloc(4 * max_samples), "cuMemAlloc")
        self._host_ptr = _ok(driver.cuMemAllocHost(4 * max_samples), "cuMemAllocHost")
        self._host = np.ctypeslib.as_array((ctypes.c_float * max_samples).from_address(int(self._host_ptr)))
        self._event = _ok(driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        self._pending = 0

    def enqueue(self, x: int, anchor: int, samples: int, stream: int = 0) -> None:
        """Queue the reduction of `samples` samples at device addresses `x` and `anchor` on `stream`."""
        if not 0 < samples <= self.max_samples:
            raise ValueError(f"samples must be in 1..{self.max_samples}, got {samples}")
        driver = _driver()
        stream = driver.CUstream(stream)
        pointer = ctypes.c_void_p
        partial_args = (
            (x, anchor, int(self._partials), self.per_sample),
            (pointer, pointer, pointer, ctypes.c_longlong),
        )
        _ok(
            driver.cuLaunchKernel(self._partial, self.blocks, samples, 1, THREADS, 1, 1, 0, stream, partial_args, 0),
            "launch partial",
        )
        finish_args = (
            (int(self._partials), int(self._out), self.blocks, samples),
            (pointer, pointer, ctypes.c_int, ctypes.c_int),
        )
        _ok(driver.cuLaunchKernel(self._finish, samples, 1, 1, 32, 1, 1, 0, stream, finish_args, 0), "launch finish")
        _ok(driver.cuMemcpyDtoHAsync(self._host_ptr, self._out, 4 * samples, stream), "cuMemcpyDtoHAsync")
        _ok(driver.cuEventRecord(self._event, stream), "cuEventRecord")
        self._pending = samples

    def result(self) -> np.ndarray:
        """The per-sample sums of the last `enqueue`, after waiting on its event only."""
        _ok(_driver().cuEventSynchronize(self._event), "cuEventSynchronize")
        return self._host[: self._pending].copy()

    def close(self) -> None:
        driver = _driver()
        driver.cuEventDestroy(self._event)
        driver.cuMemFreeHost(self._host_ptr)
        driver.cuMemFree(self._out)
        driver.cuMemFree(self._partials)
        driver.cuModuleUnload(self._module)


def upload(host: np.ndarray) -> int:
    """A new device buffer holding a copy of `host`; returns its address (free with cuMemFree)."""
    driver = _driver()
    pointer = _ok(driver.cuMemAlloc(host.nbytes), "cuMemAlloc")
    _ok(driver.cuMemcpyHtoD(pointer, host.ctypes.data, host.nbytes), "cuMemcpyHtoD")
    return int(pointer)
