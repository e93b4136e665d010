"""The precisions a bundle is built in: dtype, validation tolerance, how stages are validated,
and the post-build step (fp8 quantizes the blocks)."""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sencache.engine_builder.onnx_export import TOLERANCE_REL_L2, StageSpec, compare, validate_stage, widen_bf16
from sencache.runtime.backends.onnxruntime_backend import OnnxSessions
from sencache.runtime.backends.registry import BACKENDS
from sencache.runtime.chain import module_runner, run_chain
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import stage_name
from sencache.runtime.families.parts import example_inputs
from sencache.runtime.manifest import STAGES, Manifest

if TYPE_CHECKING:
    from sencache.engine_builder.builder import BuildPlan, LoadedModel

Log = Callable[[str], None]


@dataclass(frozen=True)
class Precision:
    """fp32: stages exported as they are and validated against PyTorch to `tolerance`."""

    name: str
    dtype: torch.dtype
    """What the stages are exported in (fp8 exports fp32 and then quantizes the blocks)."""
    tolerance: float = TOLERANCE_REL_L2
    """Largest relative L2 error of an exported stage against PyTorch at the same precision."""

    def check(self, backend: str) -> None:
        """BadInput when this precision cannot be built for `backend`."""

    def lower(self, transformer: nn.Module) -> nn.Module:
        """The transformer in this precision (fp32: itself)."""
        return transformer

    def validate(
        self, model: LoadedModel, name: str, spec: StageSpec, fresh: dict[str, torch.Tensor], path: Path
    ) -> dict[str, float | str]:
        """The exported stage at `path` against PyTorch on `fresh` inputs."""
        return validate_stage(model.stages[name], spec, fresh, path, self.tolerance)

    def chain_error(self, model: LoadedModel, folder: Path) -> dict[str, float | str] | None:
        """head -> blocks -> tail in this precision against fp32 PyTorch (None: not measured)."""
        return None

    def post_step(self, plan: BuildPlan, manifest: Manifest, folder: Path, log: Log) -> Manifest:
        """What follows the export, before engines are built (fp8: quantize the blocks)."""
        return manifest

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Half(Precision):
    """fp16: the model cast as diffusers casts it; the chained ONNX stages checked against fp32."""

    tolerance: float = 5e-3

    def lower(self, transformer: nn.Module) -> nn.Module:
        return lower_precision(copy.deepcopy(transformer), self.dtype)

    def chain_error(self, model: LoadedModel, folder: Path) -> dict[str, float | str] | None:
        """The exported stages chained in ONNX Runtime against the fp32 PyTorch model."""
        sessions = OnnxSessions(providers=["CPUExecutionProvider"])
        for stage in STAGES:
            sessions.open(stage, str(folder / f"{stage_name(stage, model.expert)}.onnx"))
        inputs, expected = _reference(model)
        got = run_chain(sessions.run, model.adapter.layout, inputs).noise
        return compare(got.numpy().astype(np.float32), expected)


@dataclass(frozen=True)
class BFloat16(Half):
    """bf16, which ONNX Runtime cannot run on the CPU: graphs checked widened to fp32, the chain in
    PyTorch's bf16 kernels."""

    def check(self, backend: str) -> None:
        if backend not in BACKENDS or "bf16" not in BACKENDS[backend].precisions:
            raise BadInput(
                f"precision bf16 with backend {backend}: ONNX Runtime's CPU provider has no bf16 "
                f"kernels; build bf16 for backend tensorrt or tensorrt-rtx",
                param="precision",
            )

    def validate(
        self, model: LoadedModel, name: str, spec: StageSpec, fresh: dict[str, torch.Tensor], path: Path
    ) -> dict[str, float | str]:
        # Checked widened to fp32 against the same bf16 weights in fp32 PyTorch. Not exact: the
        # exporter writes constants it computes (SDPA's split scale head_dim^-1/4) in bf16.
        if model.widened is None:
            model.widened = model.adapter.split(copy.deepcopy(model.transformer).float(), model.preset, model.shapes)
        with tempfile.TemporaryDirectory() as scratch:
            wide = Path(scratch) / path.name
            widen_bf16(path, wide)
            return {
                **validate_stage(
                    model.widened[name], spec, {k: v.float() for k, v in fresh.items()}, wide, self.tolerance
                ),
                "checked": "graph widened to fp32 vs PyTorch fp32 with the same bf16 weights",
            }

    def chain_error(self, model: LoadedModel, folder: Path) -> dict[str, float | str] | None:
        inputs, expected = _reference(model)
        with torch.no_grad():
            got = run_chain(
                module_runner(model.stages, model.adapter.layout),
                model.adapter.layout,
                {k: v if k == "timestep" else v.bfloat16() for k, v in inputs.items()},
            ).noise
        return {
            **compare(got.float().numpy(), expected),
            "estimated_by": "PyTorch's CPU bf16 kernels (fp32 accumulation); TensorRT's bf16 kernels run only on a GPU",
        }


@dataclass(frozen=True)
class FP8(Precision):
    """FP8 (E4M3) blocks: exported and validated in fp32, then the blocks quantized and checked."""

    def check(self, backend: str) -> None:
        from sencache.engine_builder.fp8 import require_modelopt

        if backend == "torch":
            raise BadInput(
                "precision fp8 builds an FP8 Q/DQ ONNX graph: use backend onnxruntime, tensorrt or tensorrt-rtx",
                param="precision",
            )
        require_modelopt()

    def post_step(self, plan: BuildPlan, manifest: Manifest, folder: Path, log: Log) -> Manifest:
        from sencache.engine_builder.fp8 import quantize_blocks

        quantization = quantize_blocks(
            folder, manifest, plan.options.fp8_samples, log, prompts=plan.options.fp8_prompts
        )
        return manifest.replace(
            quantization=quantization,
            validation={**manifest.validation, "blocks_fp8_vs_fp32": quantization["blocks_vs_fp32"]},
        )


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", torch.float32),
    "fp16": Half("fp16", torch.float16),
    "bf16": BFloat16("bf16", torch.bfloat16),
    "fp8": FP8("fp8", torch.float32),
}


def precision(name: str) -> Precision:
    """The precision called `name`; BadInput naming the choices otherwise."""
    if name not in PRECISIONS:
        raise BadInput(f"unknown precision {name!r} (choose from {', '.join(PRECISIONS)})")
    return PRECISIONS[name]


def _reference(model: LoadedModel) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Chain inputs and the fp32 PyTorch model's noise on them."""
    inputs = example_inputs(model.adapter, model.preset, model.shapes, 2, seed=2)
    with torch.no_grad():
        expected = run_chain(module_runner(model.reference, model.adapter.layout), model.adapter.layout, inputs).noise
    return inputs, expected.numpy()


def lower_precision(transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to `dtype`, keeping in fp32 the modules diffusers keeps there (rope, time embedder,
    modulation tables, norms), as `from_pretrained(torch_dtype=...)` does."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its advice to keep some modules in fp32 is what the loop below does
    try:
        transformer.to(dtype)
    finally:
        logger.setLevel(level)
    keep = getattr(transformer, "_keep_in_fp32_modules", None) or []
    with torch.no_grad():
        for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
            if any(k in name.split(".") for k in keep):
                tensor.data = tensor.data.float()
    return transformer
