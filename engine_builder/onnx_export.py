"""Export the stages to ONNX and check them against PyTorch.

The stage is first captured by `torch.export.export(strict=False)` with a symbolic batch, then the
exported program is translated by the ONNX exporter. Non-strict capture traces diffusers' code as
plain Python; the strict capture that `torch.onnx.export(module, dynamic_shapes=...)` uses fails on
LTX-Video's `reshape(batch, n, 6, -1)` of the timestep embedding.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

OPSET = 20
TOLERANCE_REL_L2 = 1e-4


class BuildFailed(Exception):
    """A stage could not be exported or does not match PyTorch."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    batch_free: tuple[str, ...] = ()
    """Inputs without a batch dimension (shared tables)."""


def export_stage(
    module: nn.Module, spec: StageSpec, example: dict[str, torch.Tensor], path: Path, max_rows: int
) -> None:
    """Export one stage with a dynamic batch dimension (1..max_rows) on every batched input."""
    batch = torch.export.Dim("batch", min=1, max=max(max_rows, 2))
    dynamic = {name: None if name in spec.batch_free else {0: batch} for name in spec.inputs}
    kwargs = {name: example[name] for name in spec.inputs}
    for name in ("torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("torch.export._trace").setLevel(logging.CRITICAL)  # it logs unsupported-feature notes as errors
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            captured = torch.export.export(module, (), kwargs=kwargs, dynamic_shapes=dynamic, strict=False)
            program = torch.onnx.export(
                captured,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many types; the build reports which stage failed
            raise BuildFailed(f"ONNX export of the {spec.name} stage failed: {type(e).__name__}: {e}") from e
    program.save(str(path))


def compare(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Max absolute and relative L2 error of `ours` against `reference`."""
    ours64, ref64 = ours.astype(np.float64), reference.astype(np.float64)
    denom = float(np.linalg.norm(ref64)) or 1.0
    return {"max_abs": float(np.max(np.abs(ours64 - ref64))), "rel_l2": float(np.linalg.norm(ours64 - ref64) / denom)}


def validate_stage(
    module: nn.Module, spec: StageSpec, inputs: dict[str, torch.Tensor], path: Path, tolerance: float = TOLERANCE_REL_L2
) -> dict[str, float]:
    """Run the ONNX file in ONNX Runtime (CPU) and PyTorch on the same fresh inputs; worst output error."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: inputs[name].numpy() for name in spec.inputs}
    got = session.run(list(spec.outputs), feeds)
    with torch.no_grad():
        ref = module(**{name: inputs[name] for name in spec.inputs})
    ref = ref if isinstance(ref, tuple) else (ref,)
    worst = {"max_abs": 0.0, "rel_l2": 0.0}
    for name, g, r in zip(spec.outputs, got, ref, strict=True):
        if g.shape != tuple(r.shape):
            raise BuildFailed(
                f"{spec.name} stage: output {name} has shape {g.shape} in ONNX Runtime, {tuple(r.shape)} in PyTorch"
            )
        err = compare(g, r.float().numpy())
        worst = {k: max(worst[k], err[k]) for k in worst}
    if not worst["rel_l2"] <= tolerance:
        raise BuildFailed(
            f"{spec.name} stage: ONNX Runtime differs from PyTorch by relative L2 {worst['rel_l2']:.2e} "
            f"(max abs {worst['max_abs']:.2e}); the limit is {tolerance:.0e}"
        )
    return worst


def widen_bf16(source: Path, target: Path) -> None:
    """Write `source` with every bf16 type, initializer, constant and cast turned into fp32.

    bf16 values are exact in fp32, so ONNX Runtime's CPU provider (which has no bf16 kernels) can
    check what the bf16 graph computes, its structure and its weights; the rounding of its
    activations to bf16 is what this leaves out."""
    bf16, fp32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    model = onnx.load(str(source))

    def widen_tensor(tensor: onnx.TensorProto) -> None:
        if tensor.data_type != bf16:
            return
        bits = (
            np.frombuffer(tensor.raw_data, np.uint16)
            if tensor.raw_data
            else np.asarray(tensor.int32_data, np.uint32).astype(np.uint16)
        )
        values = (bits.astype(np.uint32) << 16).view(np.float32).reshape(tuple(tensor.dims))
        tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))

    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = fp32
    for tensor in graph.initializer:
        widen_tensor(tensor)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                widen_tensor(attribute.t)
            elif node.op_type == "Cast" and attribute.name == "to" and attribute.i == bf16:
                attribute.i = fp32
            elif attribute.type == onnx.AttributeProto.GRAPH:
                raise BuildFailed(f"{source.name}: subgraphs ({node.op_type}) are not widened for the bf16 check")
    onnx.save(model, str(target), save_as_external_data=True, location=target.name + ".data")
