"""ONNX Runtime backend: one InferenceSession per stage; CUDA EP when present, else the CPU EP.

The loop's tensors live on the host (ONNX Runtime copies to and from its CUDA EP itself); they
cross into and out of the sessions as NumPy views without copies. Inputs are cast to the dtype
each stage was exported with (fp16 bundles take fp16 latents)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from sencache.runtime.backends.base import StageBackend, part_name, run_parts
from sencache.runtime.bundle import Bundle
from sencache.runtime.errors import BadInput

ONNX_TYPES: dict[str, type] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
"""The ONNX input types a stage may take, as NumPy dtypes."""


class OnnxSessions:
    """ONNX Runtime sessions of the stages, run as `run(stage, feeds)` on host tensors."""

    def __init__(self, threads: int = 0, providers: list[str] | None = None, arena: bool = True) -> None:
        """`threads`: 0 for all cores; `providers`: CUDA EP when present, else the CPU EP; `arena`:
        ONNX Runtime's CPU memory arena (off: what the runs allocated goes back to the system when
        the sessions close, for short-lived sessions whose memory the next step needs)."""
        available = ort.get_available_providers()
        self.providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = threads
        self.options.inter_op_num_threads = 1
        self.options.log_severity_level = 3
        self.options.enable_cpu_mem_arena = arena
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.outputs: dict[str, list[str]] = {}
        self.input_types: dict[str, dict[str, type | None]] = {}
        """Each stage input's NumPy dtype; None (not in ONNX_TYPES): fed in its own dtype."""

    def open(self, stage: str, graph: bytes | str) -> ort.InferenceSession:
        """Open `stage` from its ONNX model (bytes, or a file path)."""
        session = ort.InferenceSession(graph, self.options, providers=self.providers)
        self.sessions[stage] = session
        self.outputs[stage] = [o.name for o in session.get_outputs()]
        self.input_types[stage] = {i.name: ONNX_TYPES.get(i.type) for i in session.get_inputs()}
        return session

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        types = self.input_types[stage]
        feeds: dict[str, np.ndarray] = {
            name: np.ascontiguousarray(inputs[name].numpy(), dtype=dtype) for name, dtype in types.items()
        }
        outputs = self.sessions[stage].run(self.outputs[stage], feeds)
        return {name: torch.from_numpy(value) for name, value in zip(self.outputs[stage], outputs, strict=True)}


class OnnxRuntimeBackend(StageBackend):
    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(
        self, bundle: Bundle, threads: int = 0, files: dict[str, tuple[str, ...]] | None = None, arena: bool = True
    ) -> None:
        """`files`: the ONNX files of each stage when not the manifest's (the builder runs the fp32
        exports of a bundle whose stages become TensorRT engines). A stage of several graphs (a
        streamed build's groups of blocks) runs them in turn. `arena`: as `OnnxSessions`."""
        graphs = {stage: spec.files for stage, spec in bundle.manifest.stages.items()} if files is None else files
        self.onnx = OnnxSessions(threads, arena=arena)
        self.providers = self.onnx.providers
        self.parts = {stage: [part_name(stage, i) for i in range(len(names))] for stage, names in graphs.items()}
        for stage, names in graphs.items():
            for part, file in zip(self.parts[stage], names, strict=True):
                try:
                    session = self.onnx.open(part, str(bundle.checked_file(file)))
                except BadInput:
                    raise
                except Exception as e:  # onnxruntime raises its own exception types for bad models
                    raise BadInput(
                        f"bundle {bundle.path}: ONNX Runtime cannot load {file}: {str(e).splitlines()[0][:200]}"
                    ) from None
                _check_graph(bundle, stage, file, session)

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return run_parts(self.onnx.run, self.parts[stage], inputs)

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "device": "cpu",
            "providers": ",".join(self.providers),
            "onnxruntime": ort.__version__,
        }


def _check_graph(bundle: Bundle, stage: str, file: str, session: ort.InferenceSession) -> None:
    """The graph is the stage the manifest says: its input and output names, its input types,
    and the per-sample shapes of the head's latent and text inputs (the rest follow from them)."""
    spec = bundle.manifest.stages[stage]
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if tuple(i.name for i in inputs) != spec.inputs or tuple(o.name for o in outputs) != spec.outputs:
        raise BadInput(
            f"bundle {bundle.path}: {file} takes {[i.name for i in inputs]} -> "
            f"{[o.name for o in outputs]}, not the {stage} stage's {list(spec.inputs)} -> "
            f"{list(spec.outputs)}"
        )
    for i in inputs:
        if i.type not in ONNX_TYPES:
            raise BadInput(f"bundle {bundle.path}: {file} input {i.name} is {i.type}, not a float tensor")
    if "latent" in spec.inputs:  # a head stage (of any expert)
        shapes = bundle.manifest.shapes
        for i in inputs:
            expected = {"latent": shapes.latent, "text": shapes.text}.get(i.name)
            if expected is not None and list(i.shape[1:]) != list(expected):
                raise BadInput(
                    f"bundle {bundle.path}: {file} takes {i.name} of shape {i.shape[1:]} per "
                    f"sample; the manifest says {list(expected)}"
                )
