"""ONNX Runtime backend: one InferenceSession per stage; CUDA EP when present, else the CPU EP."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from sencache.runtime.backends.base import STAGES, StageBackend
from sencache.runtime.bundle import Bundle
from sencache.runtime.errors import BadInput


class OnnxRuntimeBackend(StageBackend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: int = 0) -> None:
        available = ort.get_available_providers()
        self.providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.outputs: dict[str, list[str]] = {}
        for stage in STAGES:
            spec = bundle.manifest["stages"][stage]
            try:
                self.sessions[stage] = ort.InferenceSession(str(bundle.file(spec["file"])), options, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types for bad models
                raise BadInput(f"bundle {bundle.path}: ONNX Runtime cannot load {spec['file']}: {e}") from None
            self.outputs[stage] = [o.name for o in self.sessions[stage].get_outputs()]

    def run(self, stage: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.sessions[stage].run(self.outputs[stage], inputs)
        return dict(zip(self.outputs[stage], outputs))

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "providers": ",".join(self.providers), "onnxruntime": ort.__version__}
