"""One build target per backend: what it writes per stage, how it is validated, what follows.

ONNX Runtime exports each stage to ONNX and validates it against PyTorch; TensorRT and
TensorRT-RTX do the same and then compile the validated ONNX into engines; PyTorch saves the
transformer, which its backend splits on load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from sencache.console.output import progress, third_party_output
from sencache.engine_builder.onnx_export import export_stage
from sencache.engine_builder.streaming import group_file
from sencache.engine_builder.tensorrt_build import build_engines, check_target
from sencache.runtime.backends.registry import BACKENDS as REGISTERED
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import stage_name, weights_folder
from sencache.runtime.manifest import STAGES, Manifest, TensorRTRecord, max_rows

if TYPE_CHECKING:
    from sencache.engine_builder.builder import BuildOptions, BuildPlan, LoadedModel

Log = Callable[[str], None]
BACKENDS = ("auto", *REGISTERED)


@dataclass(frozen=True)
class OnnxTarget:
    """ONNX Runtime: the stages as ONNX, each validated on fresh inputs against PyTorch."""

    name: str = "onnxruntime"
    exports_onnx: bool = True
    weights: str | None = None
    """The folder of saved PyTorch weights the bundle carries (torch bundles)."""
    extension: str = "onnx"
    """What a stage's file ends in."""

    def check(self, options: BuildOptions) -> None:
        """BadInput for options this target does not take."""
        if options.compute_capability is not None:
            raise BadInput("compute_capability applies to backend tensorrt-rtx", param="compute_capability")

    def stage_file(self, stage: str, expert: int = 0) -> str:
        return f"{stage_name(stage, expert)}.{self.extension}"

    def group_file(self, index: int) -> str:
        """The file of a streamed build's group `index` of blocks."""
        return group_file(index, self.extension)

    def write_stages(self, model: LoadedModel, folder: Path, log: Log) -> dict[str, dict[str, float | str]]:
        """Export the stages; validate each on fresh inputs against PyTorch at the same precision."""
        rows = max_rows(model.shapes.max_batch)
        example = model.stage_inputs(batch=2, seed=0)
        fresh = model.stage_inputs(batch=min(3, rows), seed=1)
        validation = {}
        for name in progress(STAGES, desc="export + validate", unit="stage"):
            path = folder / f"{stage_name(name, model.expert)}.onnx"
            with third_party_output("the ONNX exporter"):
                export_stage(model.stages[name], model.specs[name], example, path, rows)
            key = stage_name(name, model.expert)
            validation[key] = model.precision.validate(model, name, model.specs[name], fresh, path)
            with tqdm.external_write_mode():
                log(f"  {key}: max abs {validation[key]['max_abs']:.2e}, relative L2 {validation[key]['rel_l2']:.2e}")
        return validation

    def post_build(self, plan: BuildPlan, manifest: Manifest, folder: Path, log: Log) -> Manifest:
        """What follows the validated stages (TensorRT: the engines)."""
        return manifest


@dataclass(frozen=True)
class TensorRTTarget(OnnxTarget):
    """TensorRT or TensorRT-RTX: the validated ONNX stages compiled into engines."""

    extension: str = "engine"

    def check(self, options: BuildOptions) -> None:
        check_target(self.name, options.compute_capability)

    def post_build(self, plan: BuildPlan, manifest: Manifest, folder: Path, log: Log) -> Manifest:
        out = Path(plan.options.out)
        cache = out.with_name(f".{out.name}.sencache-timing.cache")
        engines = build_engines(
            folder,
            [Path(file).stem for stage in manifest.stages.values() for file in stage.files],
            manifest.shapes.max_rows,
            self.name,
            plan.options.compute_capability,
            cache,
            log,
        )
        return manifest.replace(
            tensorrt=TensorRTRecord.parse(
                {
                    **engines,
                    "engine_validation": "not run at build time: engines run only on "
                    "a GPU; the ONNX they were built from is validated above",
                }
            )
        )


@dataclass(frozen=True)
class TorchTarget(OnnxTarget):
    """PyTorch: the transformer saved as it is; its backend splits it on load (nothing to validate)."""

    name: str = "torch"
    exports_onnx: bool = False
    weights: str | None = "transformer"

    def stage_file(self, stage: str, expert: int = 0) -> str:
        return weights_folder(expert)

    def write_stages(self, model: LoadedModel, folder: Path, log: Log) -> dict[str, dict[str, float | str]]:
        model.transformer.save_pretrained(folder / weights_folder(model.expert), safe_serialization=True)
        return {}


_KINDS: dict[str, type[OnnxTarget]] = {"onnx": OnnxTarget, "torch": TorchTarget, "engine": TensorRTTarget}
TARGETS = {name: _KINDS[backend.stages](name) for name, backend in REGISTERED.items()}
"""The target of each registered backend, by what its build writes per stage."""


def target(name: str) -> OnnxTarget:
    """The build target of backend `name`; `auto` is the best one this build can produce here."""
    if name not in BACKENDS:
        raise BadInput(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return TARGETS["onnxruntime" if name == "auto" else name]
