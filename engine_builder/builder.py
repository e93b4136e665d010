"""Build an engine bundle: load the model, split it, export and validate each stage, write it.

The bundle is assembled in a temporary folder beside `--out` and moved into place only when every
stage exported and matched PyTorch, so an interrupted or failed build never leaves a half bundle.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sencache.engine_builder.fp8 import quantize_blocks, require_modelopt
from sencache.engine_builder.onnx_export import (
    TOLERANCE_REL_L2,
    StageSpec,
    compare,
    export_stage,
    validate_stage,
    widen_bf16,
)
from sencache.engine_builder.prompts import check_prompts
from sencache.engine_builder.tensorrt_build import build_engines, check_target
from sencache.runtime.bundle import BASELINES, KIND, write_manifest
from sencache.runtime.cache.baselines import BaselineTables
from sencache.runtime.errors import BadInput
from sencache.runtime.families import FamilyAdapter, ModelPreset, Shapes, StageLayout, resolve
from sencache.runtime.families.base import run_split
from sencache.runtime.files import check_replaceable, staged_folder, write_atomic
from sencache.runtime.manifest import MAX_BATCH, MAX_FRAMES, MAX_PIXELS, STAGES
from sencache.runtime.tiny_text import TinyTextEncoder

TINY_MODELS = Path(__file__).resolve().parent / "tiny_models"
BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt", "tensorrt-rtx")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
TENSORRT = ("tensorrt", "tensorrt-rtx")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": None}


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
    fp8_samples: int = 4
    """Uncached trajectories that calibrate the FP8 quantizer."""
    fp8_prompts: tuple[str, ...] | None = None
    """Their prompts, taken in turn (None: the model's default calibration prompts)."""


def stage_specs(layout: StageLayout) -> dict[str, StageSpec]:
    """Names of each stage's inputs and outputs, as exported and as the runtime feeds them."""
    return {stage: StageSpec(stage, inputs, outputs, layout.shared if stage == "blocks" else ())
            for stage, (inputs, outputs) in layout.stage_io.items()}


def resolve_backend(name: str) -> str:
    """The backend a build targets; `auto` is the best one this build can produce here."""
    if name not in BACKENDS:
        raise BadInput(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return "onnxruntime" if name == "auto" else name


def _weights_folder(preset: ModelPreset, weights: Path | None) -> Path | None:
    if weights is not None:
        if not Path(weights).is_dir():
            raise BadInput(f"weights {weights}: no such folder", param="weights")
        return Path(weights)
    if preset.tiny and preset.trained:
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
    check_replaceable(options.out, KIND)
    adapter, preset = resolve(options.model)
    backend = resolve_backend(options.backend)
    if backend in TENSORRT:
        check_target(backend, options.compute_capability)
    elif options.compute_capability is not None:
        raise BadInput("compute_capability applies to backend tensorrt-rtx", param="compute_capability")
    if options.precision not in PRECISIONS:
        raise BadInput(f"unknown precision {options.precision!r} (choose from {', '.join(PRECISIONS)})")
    if options.precision == "fp8":
        if backend == "torch":
            raise BadInput("precision fp8 builds an FP8 Q/DQ ONNX graph: use backend onnxruntime, tensorrt or "
                           "tensorrt-rtx", param="precision")
        require_modelopt()
        if options.fp8_prompts is not None:
            check_prompts(options.fp8_prompts, preset.tiny, preset.name)
    if options.precision == "bf16" and backend not in TENSORRT:
        raise BadInput(f"precision bf16 with backend {backend}: ONNX Runtime's CPU provider has no bf16 kernels; "
                       f"build bf16 for backend tensorrt or tensorrt-rtx", param="precision")
    shapes = Shapes(preset.frames if options.frames is None else options.frames,
                    preset.height if options.height is None else options.height,
                    preset.width if options.width is None else options.width, options.max_batch)
    for name, value, high in (("frames", shapes.frames, MAX_FRAMES), ("height", shapes.height, MAX_PIXELS),
                              ("width", shapes.width, MAX_PIXELS), ("max_batch", shapes.max_batch, MAX_BATCH),
                              ("fp8_samples", options.fp8_samples, 64)):
        if not 1 <= value <= high:
            raise BadInput(f"{name} must be in [1, {high}], got {value}", param=name)
    if preset.tiny and (shapes.frames, shapes.height, shapes.width) != (preset.frames, preset.height, preset.width):
        raise BadInput(f"{preset.name} was trained on {preset.frames}x{preset.height}x{preset.width} clips; "
                       f"other sizes are not supported")
    adapter.latent_shape(preset, shapes)  # sizes the family cannot take are refused here, before any work
    weights = _weights_folder(preset, options.weights)
    started = time.perf_counter()
    with staged_folder(options.out, KIND) as folder:
        _build_into(folder, options, adapter, preset, backend, shapes, weights, log)
    log(f"bundle written to {options.out} in {time.perf_counter() - started:.1f} s")
    return Path(options.out)


def _build_into(folder: Path, options: BuildOptions, adapter: FamilyAdapter, preset: ModelPreset, backend: str,
                shapes: Shapes, weights: Path | None, log: Callable[[str], None]) -> None:
    """Export, validate and write the bundle into the (partial) `folder`."""
    log(f"loading {preset.name} ({preset.description})")
    torch.manual_seed(0)  # an untrained tiny model's random weights are the same on every build
    transformer = adapter.build_transformer(preset, weights)
    config = _jsonable(dict(transformer.config))
    built = dict(preset.config, **config)
    preset = dataclasses.replace(preset, config=built)
    latent_shape = adapter.latent_shape(preset, shapes)  # of the weights' own config
    dtype = DTYPES[options.precision] or torch.float32  # fp8: exported in fp32, then the blocks are quantized
    reference = adapter.split(transformer, preset, shapes)
    lowered = transformer if dtype == torch.float32 else lower_precision(copy.deepcopy(transformer), dtype)
    stages = adapter.split(lowered, preset, shapes)
    specs = stage_specs(adapter.layout)
    max_rows = shapes.max_batch * 2  # a cond and an uncond row per sample

    validation = _write_stages(adapter, preset, shapes, stages, specs, backend, lowered, folder, max_rows, dtype, log)
    if dtype != torch.float32 and backend != "torch":
        validation["chain_vs_fp32"] = (_torch_bf16_error(adapter, preset, shapes, reference, stages)
                                       if dtype == torch.bfloat16 else
                                       _chain_error(adapter, preset, shapes, reference, folder))
        log(f"  head -> blocks -> tail in {options.precision} vs fp32 PyTorch: "
            f"relative L2 {validation['chain_vs_fp32']['rel_l2']:.2e}")
    text_encoder = _copy_text_encoder(adapter, preset, weights, folder)
    stream_shapes = _stream_shapes(adapter, preset, shapes)
    manifest = {
        "model": preset.name,
        "family": adapter.family,
        "tiny": preset.tiny,
        "trained": preset.trained,
        "config": built,
        "shapes": {"frames": shapes.frames, "height": shapes.height, "width": shapes.width,
                   "max_batch": shapes.max_batch, "max_rows": max_rows, "latent": list(latent_shape),
                   "text": list(adapter.text_shape(preset)), "streams": [list(s) for s in stream_shapes],
                   "dynamic": ["batch"]},
        "precision": options.precision,
        "backend": backend,
        "stages": {name: {"file": _stage_file(name, backend), "inputs": list(spec.inputs),
                          "outputs": list(spec.outputs)} for name, spec in specs.items()},
        "layout": {"streams": list(adapter.layout.streams), "block_context": list(adapter.layout.block_context),
                   "tail_context": list(adapter.layout.tail_context), "shared": list(adapter.layout.shared),
                   "tail_streams": list(adapter.layout.tail_stream_names)},
        "scheduler": _scheduler_config(adapter, preset, weights),
        "defaults": {"steps": preset.steps, "guidance": preset.guidance, **preset.cache_defaults},
        "text_encoder": text_encoder,
        "validation": validation,
        "tools": _tools(),
        "weights_source": str(weights) if weights else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if backend == "torch":
        manifest["weights"] = "transformer"
    if options.precision == "fp8":
        write_manifest(folder, {**manifest, "backend": "onnxruntime", "precision": "fp32",
                                "stages": {name: {**spec, "file": f"{name}.onnx"}
                                           for name, spec in manifest["stages"].items()}})
        manifest["quantization"] = quantize_blocks(folder, options.fp8_samples, log, prompts=options.fp8_prompts)
        validation["blocks_fp8_vs_fp32"] = manifest["quantization"]["blocks_vs_fp32"]
    engines = None
    if backend in TENSORRT:
        cache = Path(options.out).with_name(f".{Path(options.out).name}.sencache-timing.cache")
        engines = build_engines(folder, list(specs), max_rows, backend, options.compute_capability, cache, log)
    if engines is not None:
        manifest["tensorrt"] = {**engines, "engine_validation": "not run at build time: engines run only on a GPU; "
                                "the ONNX they were built from is validated above"}
    if preset.published_baselines is not None:
        coefficients, ratios = preset.published_baselines
        source = ("published constants (TeaCache @7c10efc4, MagCache @df81cb18; MagCache has none for this model)"
                  if ratios is None else "published constants (TeaCache @7c10efc4, MagCache @df81cb18)")
        tables = BaselineTables(coefficients, ratios, {"model": preset.name, "source": source})
        write_atomic(folder / BASELINES, tables.to_bytes())
    write_manifest(folder, manifest)
    itemsize = 4 if dtype in (None, torch.float32) else 2
    cache_bytes = itemsize * (max_rows * sum(int(np.prod(s)) for s in stream_shapes)
                              + shapes.max_batch * int(np.prod(latent_shape)))
    log(f"cache memory at max batch {shapes.max_batch}: {cache_bytes / 2**20:.1f} MiB {str(dtype).split('.')[-1]} "
        f"(residuals of {max_rows} rows and {shapes.max_batch} anchors)")


def _scheduler_config(adapter: FamilyAdapter, preset: ModelPreset, weights: Path | None) -> dict[str, Any]:
    """The scheduler a real weights folder ships (what its pipeline would load), else the preset's."""
    path = None if weights is None or preset.tiny else weights / "scheduler" / "scheduler_config.json"
    if path is None or not path.is_file():
        return adapter.scheduler_config(preset)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"weights {weights}: unreadable {path.name}: {e}", param="weights") from None
    import diffusers

    if not hasattr(diffusers, str(config.get("_class_name"))):
        raise BadInput(f"weights {weights}: scheduler {config.get('_class_name')!r} is not a diffusers scheduler",
                       param="weights")
    return {k: v for k, v in config.items() if k == "_class_name" or not k.startswith("_")}


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


def lower_precision(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
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


def _write_stages(adapter: FamilyAdapter, preset: ModelPreset, shapes: Shapes, stages: dict[str, torch.nn.Module],
                  specs: dict[str, StageSpec], backend: str, transformer: torch.nn.Module, folder: Path,
                  max_rows: int, dtype: torch.dtype, log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Export (ONNX) or save (torch) the stages; validate ONNX stages on fresh inputs against
    PyTorch at the same precision (bf16 cannot run in ONNX Runtime on the CPU: not validated)."""
    if backend == "torch":
        transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        return {}
    example = _stage_inputs(adapter, preset, shapes, stages, batch=2, seed=0, dtype=dtype)
    fresh = _stage_inputs(adapter, preset, shapes, stages, batch=min(3, max_rows), seed=1, dtype=dtype)
    tolerance = TOLERANCE_REL_L2 if dtype == torch.float32 else 5e-3
    if dtype == torch.bfloat16:
        # Checked widened to fp32 against the same bf16 weights in fp32 PyTorch. Not exact: the
        # exporter writes constants it computes (SDPA's split scale head_dim^-1/4) in bf16.
        checked = adapter.split(copy.deepcopy(transformer).float(), preset, shapes)
        fresh = {k: v.float() for k, v in fresh.items()}
    else:
        checked = stages
    validation = {}
    for name in tqdm(("head", "blocks", "tail"), desc="export + validate", unit="stage"):
        path = folder / f"{name}.onnx"
        export_stage(stages[name], specs[name], example, path, max_rows)
        if dtype == torch.bfloat16:
            with tempfile.TemporaryDirectory() as scratch:
                wide = Path(scratch) / path.name
                widen_bf16(path, wide)
                validation[name] = {**validate_stage(checked[name], specs[name], fresh, wide, tolerance),
                                    "checked": "graph widened to fp32 vs PyTorch fp32 with the same bf16 weights"}
        else:
            validation[name] = validate_stage(checked[name], specs[name], fresh, path, tolerance)
        log(f"  {name}: max abs {validation[name]['max_abs']:.2e}, relative L2 {validation[name]['rel_l2']:.2e}")
    return validation


def _chain_error(adapter: FamilyAdapter, preset: ModelPreset, shapes: Shapes, reference: dict[str, torch.nn.Module],
                 folder: Path) -> dict[str, float]:
    """The exported stages chained in ONNX Runtime against the fp32 PyTorch model."""
    import onnxruntime as ort

    inputs = adapter.example_inputs(preset, shapes, 2, seed=2)
    layout = adapter.layout
    with torch.no_grad():
        expected = run_split(reference, layout, inputs).numpy()
    sessions = {s: ort.InferenceSession(str(folder / f"{s}.onnx"), providers=["CPUExecutionProvider"]) for s in STAGES}
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = dict(zip(layout.head_outputs, sessions["head"].run(None, _typed(sessions["head"], feeds))))
    out = sessions["blocks"].run(None, _typed(sessions["blocks"], {k: got[k] for k in layout.blocks_inputs}))
    streams = dict(zip(layout.streams, out))
    tail = {**{k: streams[k] for k in layout.tail_stream_names}, **{k: got[k] for k in layout.tail_context}}
    noise = sessions["tail"].run(None, _typed(sessions["tail"], tail))[0]
    return compare(noise.astype(np.float32), expected)


def _torch_bf16_error(adapter: FamilyAdapter, preset: ModelPreset, shapes: Shapes, reference: dict[str, torch.nn.Module],
                      low: dict[str, torch.nn.Module]) -> dict[str, float | str]:
    """bf16, which ONNX Runtime cannot run on the CPU: the bf16 PyTorch stages against fp32."""
    inputs = adapter.example_inputs(preset, shapes, 2, seed=2)
    with torch.no_grad():
        expected = run_split(reference, adapter.layout, inputs).numpy()
        got = run_split(low, adapter.layout, {k: v if k == "timestep" else v.bfloat16() for k, v in inputs.items()})
    return {**compare(got.float().numpy(), expected),
            "estimated_by": "PyTorch's CPU bf16 kernels (fp32 accumulation); TensorRT's bf16 kernels run only on a GPU"}


def _typed(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    kinds = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    return {i.name: feeds[i.name].astype(kinds[i.type]) for i in session.get_inputs()}


def _stage_inputs(adapter: FamilyAdapter, preset: ModelPreset, shapes: Shapes, stages: dict[str, torch.nn.Module],
                  batch: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inputs for every stage: random head inputs (latent and text in `dtype`, timestep fp32)
    and the head's real outputs."""
    inputs = adapter.example_inputs(preset, shapes, batch, seed)
    inputs = {k: v if k == "timestep" else v.to(dtype) for k, v in inputs.items()}
    with torch.no_grad():
        outputs = stages["head"](**inputs)
    inputs.update(zip(adapter.layout.head_outputs, outputs))
    return inputs


def _copy_text_encoder(adapter: FamilyAdapter, preset: ModelPreset, weights: Path | None, folder: Path) -> dict[str, Any]:
    if preset.tiny:
        spec = {"kind": "tiny", "file": "text_encoder.safetensors", "dim": adapter.tiny_text_dim(preset)}
        if preset.trained:
            shutil.copyfile(weights / "text_encoder.safetensors", folder / spec["file"])
            return spec
        torch.manual_seed(0)
        encoder = TinyTextEncoder(dim=spec["dim"])
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / spec["file"]))
        return {**spec, "untrained": True}
    return {"kind": "diffusers", "source": str(weights) if weights else None,
            "note": "tokenizer, text encoder and VAE load from the weights folder through diffusers' pipeline"}
