"""ONNX Runtime backend: one InferenceSession per stage; CUDA EP when present, else the CPU EP.

The loop's tensors live on the host (ONNX Runtime copies to and from its CUDA EP itself); they
cross into and out of the sessions as NumPy views without copies. Inputs are cast to the dtype
each stage was exported with (fp16 bundles take fp16 latents)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from sencache.runtime.backends.base import STAGES, StageBackend
from sencache.runtime.bundle import Bundle
from sencache.runtime.errors import BadInput

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxRuntimeBackend(StageBackend):
    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, bundle: Bundle, threads: int = 0) -> None:
        available = ort.get_available_providers()
        self.providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.outputs: dict[str, list[str]] = {}
        self.input_types: dict[str, dict[str, type]] = {}
        for stage in STAGES:
            spec = bundle.manifest["stages"][stage]
            try:
                session = ort.InferenceSession(bundle.read(spec["file"]), options, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types for bad models
                raise BadInput(f"bundle {bundle.path}: ONNX Runtime cannot load {spec['file']}: "
                               f"{str(e).splitlines()[0][:200]}") from None
            _check_graph(bundle, stage, session)
            self.sessions[stage] = session
            self.outputs[stage] = [o.name for o in session.get_outputs()]
            self.input_types[stage] = {i.name: _NUMPY[i.type] for i in session.get_inputs()}

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        types = self.input_types[stage]
        feeds = {name: np.ascontiguousarray(value.numpy(), dtype=types[name]) for name, value in inputs.items()}
        outputs = self.sessions[stage].run(self.outputs[stage], feeds)
        return {name: torch.from_numpy(value) for name, value in zip(self.outputs[stage], outputs)}

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "device": "cpu", "providers": ",".join(self.providers),
                "onnxruntime": ort.__version__}


def _check_graph(bundle: Bundle, stage: str, session: ort.InferenceSession) -> None:
    """The graph is the stage the manifest says: its input and output names, its input types,
    and the per-sample shapes of the head's latent and text inputs (the rest follow from them)."""
    spec = bundle.manifest["stages"][stage]
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != spec["inputs"] or [o.name for o in outputs] != spec["outputs"]:
        raise BadInput(f"bundle {bundle.path}: {spec['file']} takes {[i.name for i in inputs]} -> "
                       f"{[o.name for o in outputs]}, not the {stage} stage's {spec['inputs']} -> {spec['outputs']}")
    for i in inputs:
        if i.type not in _NUMPY:
            raise BadInput(f"bundle {bundle.path}: {spec['file']} input {i.name} is {i.type}, not a float tensor")
    if stage == "head":
        shapes = bundle.manifest["shapes"]
        for i in inputs:
            expected = {"latent": shapes["latent"], "text": shapes["text"]}.get(i.name)
            if expected is not None and list(i.shape[1:]) != list(expected):
                raise BadInput(f"bundle {bundle.path}: {spec['file']} takes {i.name} of shape {i.shape[1:]} per "
                               f"sample; the manifest says {expected}")
