"""TensorRT backend: the bundle's stage engines on the GPU (TensorRT or TensorRT-RTX runtime).

Engines are deserialized once and checked against this machine (TensorRT version, and for
TensorRT-RTX the compute capability they were built for). Each stage's outputs get one device
buffer, allocated once at the bundle's largest shape (max rows for batched tensors) and bound
once; a call binds the inputs where the loop already holds them (PyTorch CUDA tensors, cast only
when the engine takes another dtype), sets their shapes and enqueues the engine with
`execute_async_v3` on PyTorch's current stream. Nothing is copied to the host and nothing waits:
the loop's only host wait per step is the drift read-back. Outputs are views of the stage's
buffers, valid until that stage runs again. A stage of several engines (a streamed build's groups
of blocks) runs them in turn, each group's stream outputs fed to the next as its stream inputs.

Unproven on hardware in this repository's CI (no GPU there): the tests marked `gpu` and
`sencache gpu-acceptance` run it when a GPU and TensorRT are present.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch

from sencache.runtime.backends.base import StageBackend, part_name, run_parts
from sencache.runtime.bundle import Bundle
from sencache.runtime.errors import BadInput


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise BadInput(f"a stage engine has an I/O tensor of type {dtype}, which this backend does not exchange")
    return table[dtype]


class TensorRTBackend(StageBackend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle) -> None:
        record = bundle.manifest.tensorrt
        assert record is not None, "Manifest.parse sets the tensorrt record of a TensorRT bundle"
        self.trt = _tensorrt(bundle, record.module, record.version)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.gpu = torch.cuda.get_device_name(self.device)
        major, minor = torch.cuda.get_device_capability(self.device)
        here = f"SM{major}{minor}"
        if record.module == "tensorrt_rtx" and record.compute_capability != here:
            raise BadInput(
                f"bundle {bundle.path} was built for {record.compute_capability}; this GPU ({self.gpu}) is {here}: "
                f"rebuild it for compute capability {here}"
            )
        self.name = "tensorrt-rtx" if record.module == "tensorrt_rtx" else "tensorrt"
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.ERROR))
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        self.input_types: dict[str, dict[str, torch.dtype]] = {}
        self.output_buffers: dict[str, dict[str, torch.Tensor]] = {}
        self.parts: dict[str, list[str]] = {}
        for stage, spec in bundle.manifest.stages.items():
            self.parts[stage] = [part_name(stage, i) for i in range(len(spec.files))]
            for part, file in zip(self.parts[stage], spec.files, strict=True):
                self._load(bundle, stage, part, file)

    def _load(self, bundle: Bundle, stage: str, part: str, file: str) -> None:
        """Deserialize `part` of `stage` (engine `file`), check its tensors against the manifest, make
        its execution context and allocate its outputs for the bundle's most rows (bound once, reused
        by `run`)."""
        trt, record, spec = self.trt, bundle.manifest.tensorrt, bundle.manifest.stages[stage]
        assert record is not None, "a TensorRT bundle has its tensorrt record"
        engine = self.runtime.deserialize_cuda_engine(bundle.read(file))
        if engine is None:
            raise BadInput(
                f"bundle {bundle.path}: {record.module} cannot load {file} on {self.gpu} "
                f"(built for {record.compute_capability} with {record.version})"
            )
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if names != {*spec.inputs, *spec.outputs}:
            raise BadInput(
                f"bundle {bundle.path}: {file} has tensors {sorted(names)}, not the {stage} "
                f"stage's {list(spec.inputs + spec.outputs)}"
            )
        context = engine.create_execution_context()
        self.engines[part], self.contexts[part] = engine, context
        self.input_types[part], self.output_buffers[part] = {}, {}
        max_rows = bundle.manifest.shapes.max_rows
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_types[part][name] = dtype
                continue
            shape = [max_rows if d < 0 else d for d in engine.get_tensor_shape(name)]
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            context.set_tensor_address(name, buffer.data_ptr())
            self.output_buffers[part][name] = buffer

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return run_parts(self._run, self.parts[stage], inputs)

    def _run(self, part: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Enqueue one engine on `inputs`; its outputs are views of its own buffers."""
        context = self.contexts[part]
        bound = []
        for name, dtype in self.input_types[part].items():
            value = inputs[name].to(self.device, dtype).contiguous()
            bound.append(value)  # released in stream order by PyTorch's allocator once the engine has read it
            context.set_input_shape(name, tuple(value.shape))
            context.set_tensor_address(name, value.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT could not enqueue the {part} engine")
        results = {}
        for name, buffer in self.output_buffers[part].items():
            shape = tuple(context.get_tensor_shape(name))
            results[name] = buffer.view(-1)[: math.prod(shape)].view(shape)
        return results

    def describe(self) -> dict[str, str]:
        major, minor = torch.cuda.get_device_capability(self.device)
        return {
            "backend": self.name,
            "module": self.trt.__name__,
            "version": self.trt.__version__,
            "device": self.gpu,
            "arch": f"sm_{major}{minor}",
        }


def _tensorrt(bundle: Bundle, module: str, version: str) -> Any:
    """The TensorRT module a bundle's engines were built with, at that version, on a machine with a
    GPU; BadInput saying what to install or rebuild otherwise."""
    try:
        trt = importlib.import_module(module)
    except ImportError:
        raise BadInput(
            f"bundle {bundle.path} holds {module} engines; install {module} "
            f"({'pip install tensorrt-rtx-cu13' if module == 'tensorrt_rtx' else 'from NVIDIA'})"
        ) from None
    if trt.__version__ != version:
        raise BadInput(
            f"bundle {bundle.path} was built with {module} {version}; this machine has "
            f"{trt.__version__}: rebuild the bundle here"
        )
    if not torch.cuda.is_available():
        raise BadInput(
            f"bundle {bundle.path} holds TensorRT engines, which need an NVIDIA GPU and a CUDA build of "
            f"torch (this one, {torch.__version__}, sees no GPU)"
        )
    return trt
