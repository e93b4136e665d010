"""TensorRT backend: the bundle's stage engines on the GPU (TensorRT or TensorRT-RTX runtime).

Engines are deserialized once and checked against this machine (TensorRT version, and for
TensorRT-RTX the compute capability they were built for). Every stage tensor gets one device
buffer, allocated once at the bundle's largest shape (max rows for batched tensors), and its
address is bound once; a call sets the input shapes, copies the inputs in, enqueues the engine
with `execute_async_v3` on the backend's stream and copies the outputs back, all on that stream,
then waits on one event. The denoising loop works on host arrays, so each stage's outputs return
to the host; keeping the cache on the device between stages is not done yet.

Unproven on hardware in this repository's CI (no GPU there): the tests marked `gpu` run it when a
GPU and TensorRT are present.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from sencache.kernels.cuda_drift import CudaUnavailable, _driver, _ok, open_device
from sencache.runtime.backends.base import STAGES, StageBackend
from sencache.runtime.bundle import Bundle
from sencache.runtime.errors import BadInput


def _numpy_dtype(trt, dtype) -> np.dtype:
    table = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT32: np.int32,
             trt.DataType.INT64: np.int64, trt.DataType.BOOL: np.bool_}
    if dtype not in table:
        raise BadInput(f"a stage engine has an I/O tensor of type {dtype}, which this backend does not exchange")
    return np.dtype(table[dtype])


class TensorRTBackend(StageBackend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle) -> None:
        record = bundle.manifest["tensorrt"]
        module = record["module"]
        try:
            trt = importlib.import_module(module)
        except ImportError:
            raise BadInput(f"bundle {bundle.path} holds {module} engines; install {module} "
                           f"({'pip install tensorrt-rtx-cu13' if module == 'tensorrt_rtx' else 'from NVIDIA'})") from None
        if trt.__version__ != record["version"]:
            raise BadInput(f"bundle {bundle.path} was built with {module} {record['version']}; this machine has "
                           f"{trt.__version__}: rebuild the bundle here")
        try:
            self.device = open_device()
        except CudaUnavailable as e:
            raise BadInput(f"bundle {bundle.path} holds TensorRT engines, which need an NVIDIA GPU: {e}") from None
        target = record["compute_capability"]
        here = "SM" + self.device.arch.removeprefix("sm_")
        if module == "tensorrt_rtx" and target != here:
            raise BadInput(f"bundle {bundle.path} was built for {target}; this GPU ({self.device.name}) is {here}: "
                           f"rebuild with --compute-capability {here}")
        self.trt = trt
        self.name = "tensorrt-rtx" if module == "tensorrt_rtx" else "tensorrt"
        driver = _driver()
        self.stream = _ok(driver.cuStreamCreate(0), "cuStreamCreate")
        self.done = _ok(driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(logger)
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        self.buffers: dict[str, dict[str, tuple[int, np.dtype]]] = {}
        self.outputs: dict[str, list[str]] = {}
        max_rows = bundle.shapes.max_batch * 2
        for stage in STAGES:
            data = bundle.file(bundle.manifest["stages"][stage]["file"]).read_bytes()
            engine = self.runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise BadInput(f"bundle {bundle.path}: {module} cannot load {stage}.engine on {self.device.name} "
                               f"(built for {target} with {record['version']})")
            context = engine.create_execution_context()
            self.engines[stage], self.contexts[stage] = engine, context
            self.buffers[stage], self.outputs[stage] = {}, []
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                shape = [max_rows if d < 0 else d for d in engine.get_tensor_shape(name)]
                dtype = _numpy_dtype(trt, engine.get_tensor_dtype(name))
                pointer = _ok(driver.cuMemAlloc(max(1, int(np.prod(shape)) * dtype.itemsize)), "cuMemAlloc")
                context.set_tensor_address(name, int(pointer))
                self.buffers[stage][name] = (int(pointer), dtype)
                if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                    self.outputs[stage].append(name)

    def run(self, stage: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        driver = _driver()
        context = self.contexts[stage]
        staged = []
        for name, value in inputs.items():
            pointer, dtype = self.buffers[stage][name]
            host = np.ascontiguousarray(value, dtype=dtype)
            staged.append(host)  # alive until the copies below have run
            context.set_input_shape(name, host.shape)
            _ok(driver.cuMemcpyHtoDAsync(pointer, host.ctypes.data, host.nbytes, self.stream), "cuMemcpyHtoDAsync")
        if not context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"TensorRT could not enqueue the {stage} engine")
        results = {}
        for name in self.outputs[stage]:
            pointer, dtype = self.buffers[stage][name]
            out = np.empty(tuple(context.get_tensor_shape(name)), dtype)
            _ok(driver.cuMemcpyDtoHAsync(out.ctypes.data, pointer, out.nbytes, self.stream), "cuMemcpyDtoHAsync")
            results[name] = out
        _ok(driver.cuEventRecord(self.done, self.stream), "cuEventRecord")
        _ok(driver.cuEventSynchronize(self.done), "cuEventSynchronize")
        return results

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "module": self.trt.__name__, "version": self.trt.__version__,
                "device": self.device.name, "arch": self.device.arch}
