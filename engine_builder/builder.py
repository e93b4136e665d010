"""Build an engine bundle: load the model, split it, export and validate each stage, write it.

The bundle is assembled in a temporary folder beside `--out` and moved into place only when every
stage exported and matched PyTorch, so an interrupted or failed build never leaves a half bundle.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from sencache.engine_builder.onnx_export import StageSpec, export_stage, validate_stage
from sencache.engine_builder.tensorrt_build import build_engines, check_target
from sencache.runtime.baselines import BaselineTables
from sencache.runtime.bundle import BASELINES, write_manifest
from sencache.runtime.errors import BadInput
from sencache.runtime.families import FamilyAdapter, ModelPreset, Shapes, StageLayout, resolve
from sencache.runtime.families.base import HEAD_INPUTS, NOISE
from sencache.runtime.files import staged_folder

TINY_MODELS = Path(__file__).resolve().parent / "tiny_models"
BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt", "tensorrt-rtx")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
TENSORRT = ("tensorrt", "tensorrt-rtx")


@dataclass(frozen=True)
class BuildOptions:
    model: str
    out: Path
    weights: Path | None = None
    backend: str = "auto"
    precision: str = "fp32"
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    max_batch: int = 4
    compute_capability: str | None = None


def stage_specs(layout: StageLayout) -> dict[str, StageSpec]:
    """Names of each stage's inputs and outputs, as exported and as the runtime feeds them."""
    return {
        "head": StageSpec("head", HEAD_INPUTS, layout.head_outputs),
        "blocks": StageSpec("blocks", layout.blocks_inputs, tuple(s + "_out" for s in layout.streams), layout.shared),
        "tail": StageSpec("tail", layout.tail_inputs, (NOISE,)),
    }


def resolve_backend(name: str) -> str:
    """The backend a build targets; `auto` is the best one this build can produce here."""
    if name not in BACKENDS:
        raise BadInput(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return "onnxruntime" if name == "auto" else name


def _weights_folder(preset: ModelPreset, weights: Path | None) -> Path | None:
    if weights is not None:
        if not Path(weights).is_dir():
            raise BadInput(f"--weights {weights}: no such folder")
        return Path(weights)
    if preset.tiny:
        folder = TINY_MODELS / preset.name
        if not (folder / "transformer").is_dir():
            raise BadInput(f"{preset.name}: the bundled weights are missing from {folder}; train them with "
                           f"`python -m sencache.engine_builder.tiny.train --model {preset.name}`")
        return folder
    return None


def _tools() -> dict[str, str]:
    tools = {"python": platform.python_version()}
    for dist in ("sencache", "torch", "diffusers", "onnx", "onnxscript", "onnxruntime", "numpy"):
        try:
            tools[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            tools[dist] = "absent"
    return tools


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def build(options: BuildOptions, log: Callable[[str], None] = print) -> Path:
    """Build the bundle described by `options` into `options.out`; returns its path."""
    adapter, preset = resolve(options.model)
    backend = resolve_backend(options.backend)
    if backend in TENSORRT:
        check_target(backend, options.compute_capability)
    elif options.compute_capability is not None:
        raise BadInput("--compute-capability applies to --backend tensorrt-rtx")
    if options.precision not in PRECISIONS:
        raise BadInput(f"unknown precision {options.precision!r} (choose from {', '.join(PRECISIONS)})")
    if options.precision != "fp32":
        raise BadInput(f"--precision {options.precision}: only fp32 bundles are built by this version")
    shapes = Shapes(options.frames or preset.frames, options.height or preset.height, options.width or preset.width,
                    options.max_batch)
    if min(shapes.frames, shapes.height, shapes.width, shapes.max_batch) <= 0:
        raise BadInput("--frames, --height, --width and --max-batch must be positive")
    if preset.tiny and (shapes.frames, shapes.height, shapes.width) != (preset.frames, preset.height, preset.width):
        raise BadInput(f"{preset.name} was trained on {preset.frames}x{preset.height}x{preset.width} clips; "
                       f"other sizes are not supported")
    latent_shape = adapter.latent_shape(preset, shapes)
    weights = _weights_folder(preset, options.weights)
    started = time.perf_counter()
    log(f"loading {preset.name} ({preset.description})")
    transformer = adapter.build_transformer(preset, weights)
    config = _jsonable(dict(transformer.config))
    built = dict(preset.config, **config)
    preset = dataclasses.replace(preset, config=built)
    stages = adapter.split(transformer, preset, shapes)
    specs = stage_specs(adapter.layout)
    max_rows = shapes.max_batch * 2  # a cond and an uncond row per sample

    with staged_folder(options.out) as folder:
        validation = _write_stages(adapter, preset, shapes, stages, specs, backend, transformer, folder, max_rows, log)
        engines = None
        if backend in TENSORRT:
            cache = Path(options.out).with_name(f"{Path(options.out).name}.timing.cache")
            engines = build_engines(folder, list(specs), max_rows, backend, options.compute_capability, cache, log)
        text_encoder = _copy_text_encoder(preset, weights, folder)
        manifest = {
            "model": preset.name,
            "family": adapter.family,
            "tiny": preset.tiny,
            "config": built,
            "shapes": {"frames": shapes.frames, "height": shapes.height, "width": shapes.width,
                       "max_batch": shapes.max_batch, "max_rows": max_rows, "latent": list(latent_shape),
                       "text": list(adapter.text_shape(preset)), "dynamic": ["batch"]},
            "precision": options.precision,
            "backend": backend,
            "stages": {name: {"file": _stage_file(name, backend), "inputs": list(spec.inputs),
                              "outputs": list(spec.outputs)} for name, spec in specs.items()},
            "layout": {"streams": list(adapter.layout.streams), "block_context": list(adapter.layout.block_context),
                       "tail_context": list(adapter.layout.tail_context), "shared": list(adapter.layout.shared)},
            "scheduler": adapter.scheduler_config(preset),
            "defaults": {"steps": preset.steps, "guidance": preset.guidance, **preset.cache_defaults},
            "text_encoder": text_encoder,
            "validation": validation,
            "tools": _tools(),
            "weights_source": str(weights) if weights else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if backend == "torch":
            manifest["weights"] = "transformer"
        if engines is not None:
            manifest["tensorrt"] = {**engines, "engine_validation": "not run at build time: engines run only on a GPU; "
                                    "the ONNX they were built from is validated above"}
        if preset.published_baselines is not None:
            coefficients, ratios = preset.published_baselines
            BaselineTables(coefficients, ratios, {"model": preset.name, "source": "published constants (TeaCache "
                           "@7c10efc4, MagCache @df81cb18)"}).save(folder / BASELINES)
        write_manifest(folder, manifest)
    cache_bytes = 4 * (max_rows * sum(int(np.prod(s)) for s in _stream_shapes(adapter, preset, shapes))
                       + shapes.max_batch * int(np.prod(latent_shape)))
    log(f"cache memory at max batch {shapes.max_batch}: {cache_bytes / 2**20:.1f} MiB fp32 "
        f"(residuals of {max_rows} rows and {shapes.max_batch} anchors)")
    log(f"bundle written to {options.out} in {time.perf_counter() - started:.1f} s")
    return Path(options.out)


def _stage_file(stage: str, backend: str) -> str:
    if backend == "torch":
        return "transformer"
    return f"{stage}.engine" if backend in TENSORRT else f"{stage}.onnx"


def _stream_shapes(adapter: FamilyAdapter, preset: ModelPreset, shapes: Shapes) -> list[tuple[int, ...]]:
    """Per-row shapes of the cached streams, from the head on the meta device (no memory)."""
    with torch.device("meta"):
        transformer = adapter.build_transformer(preset, None, device="meta")
        stages = adapter.split(transformer, preset, shapes)
        outputs = dict(zip(adapter.layout.head_outputs, stages["head"](**adapter.example_inputs(preset, shapes, 1))))
    return [tuple(outputs[s].shape[1:]) for s in adapter.layout.streams]


def _write_stages(adapter: FamilyAdapter, preset: ModelPreset, shapes: Shapes, stages: dict[str, torch.nn.Module],
                  specs: dict[str, StageSpec], backend: str, transformer: torch.nn.Module, folder: Path,
                  max_rows: int, log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Export (ONNX) or save (torch) the stages; validate ONNX stages on fresh inputs."""
    if backend == "torch":
        transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        return {}
    example = _stage_inputs(adapter, preset, shapes, stages, batch=2, seed=0)
    fresh = _stage_inputs(adapter, preset, shapes, stages, batch=min(3, max_rows), seed=1)
    validation = {}
    for name in tqdm(("head", "blocks", "tail"), desc="export + validate", unit="stage"):
        path = folder / f"{name}.onnx"
        export_stage(stages[name], specs[name], example, path, max_rows)
        validation[name] = validate_stage(stages[name], specs[name], fresh, path)
        log(f"  {name}: max abs {validation[name]['max_abs']:.2e}, relative L2 {validation[name]['rel_l2']:.2e}")
    return validation


def _stage_inputs(adapter: FamilyAdapter, preset: ModelPreset, shapes: Shapes, stages: dict[str, torch.nn.Module],
                  batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs for every stage: random head inputs and the head's real outputs."""
    inputs = adapter.example_inputs(preset, shapes, batch, seed)
    with torch.no_grad():
        outputs = stages["head"](**inputs)
    inputs.update(zip(adapter.layout.head_outputs, outputs))
    return inputs


def _copy_text_encoder(preset: ModelPreset, weights: Path | None, folder: Path) -> dict[str, Any]:
    if preset.tiny:
        shutil.copyfile(weights / "text_encoder.safetensors", folder / "text_encoder.safetensors")
        return {"kind": "tiny", "file": "text_encoder.safetensors", "dim": preset.config["text_dim"]}
    return {"kind": "umt5", "note": "text encoding of real models is not part of this bundle format yet"}
