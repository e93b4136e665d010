"""Compile the validated stage ONNX files into TensorRT engines.

One code path drives both `tensorrt` (datacenter GPUs; builds for the GPU it runs on) and
`tensorrt_rtx` (builds on a machine without a GPU once a target compute capability is named).
The networks are strongly typed: precision comes from the ONNX tensor types. Each stage gets one
optimisation profile over the batch rows (1 .. max rows, CFG rows included); the other dimensions
are fixed per bundle. Full TensorRT keeps a timing cache beside the bundle; TensorRT-RTX has none
(its timing cache calls are no-ops).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sencache.engine_builder.memory import peak_rss
from sencache.engine_builder.onnx_export import BuildFailed
from sencache.runtime.backends.registry import BACKENDS
from sencache.runtime.errors import BadInput
from sencache.runtime.files import write_atomic

MODULES = {name: b.engine_module for name, b in BACKENDS.items() if b.engine_module is not None}
"""The TensorRT module of each registered backend that compiles engines."""
INSTALL = {name: b.install for name, b in BACKENDS.items() if b.install is not None}


def load_tensorrt(backend: str):
    """The TensorRT module of `backend`; a BadInput with the install command if it is missing."""
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError:
        raise BadInput(
            f"backend {backend} needs {MODULES[backend]}, which is not installed: {INSTALL[backend]}", param="backend"
        ) from None


def check_target(backend: str, compute_capability: str | None) -> None:
    """Fail early (before any export) on a target this TensorRT cannot build for."""
    trt = load_tensorrt(backend)
    if backend == "tensorrt-rtx":
        known = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
        if compute_capability is None:
            raise BadInput(
                f"compute_capability is needed for backend tensorrt-rtx (one of {', '.join(known)})",
                param="compute_capability",
            )
        if compute_capability.upper() not in known:
            raise BadInput(
                f"compute_capability {compute_capability}: TensorRT-RTX {trt.__version__} builds for "
                f"{', '.join(known)}",
                param="compute_capability",
            )
    elif compute_capability is not None:
        raise BadInput(
            "compute_capability applies to tensorrt-rtx; full TensorRT builds for the GPU it runs on",
            param="compute_capability",
        )


def build_engines(
    folder: Path,
    graphs: list[str],
    max_rows: int,
    backend: str,
    compute_capability: str | None,
    timing_cache: Path | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Build `<graph>.engine` from `<graph>.onnx` in `folder` (a stage, or a streamed build's group
    of blocks); returns the manifest's TensorRT record."""
    trt = load_tensorrt(backend)
    logger = trt.Logger(trt.Logger.ERROR)
    record: dict[str, Any] = {
        "module": MODULES[backend],
        "version": trt.__version__,
        "compute_capability": compute_capability.upper() if compute_capability else "build GPU",
        "networks": "strongly typed",
        "profiles": {},
        "timing_cache": None,
    }
    cache = None
    for stage in graphs:
        started = time.perf_counter()
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(folder / f"{stage}.onnx")):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildFailed(f"{MODULES[backend]} cannot parse {stage}.onnx: {errors}")
        config = builder.create_builder_config()
        if backend == "tensorrt-rtx":
            config.num_compute_capabilities = 1
            config.set_compute_capability(getattr(trt.ComputeCapability, compute_capability.upper()), 0)
        elif timing_cache is not None:
            cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
            config.set_timing_cache(cache, False)
        profile = builder.create_optimization_profile()
        shapes = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = list(tensor.shape)
            if dims[0] == -1:
                low, opt, high = [1, *dims[1:]], [max(1, max_rows // 2), *dims[1:]], [max_rows, *dims[1:]]
                profile.set_shape(tensor.name, low, opt, high)
                shapes[tensor.name] = {"min": low, "opt": opt, "max": high}
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise BuildFailed(f"{MODULES[backend]} could not build the {stage} engine")
        with open(folder / f"{stage}.engine", "wb") as f:
            f.write(memoryview(engine))  # not bytes(engine): a real-size engine is GBs, held once
        record["profiles"][stage] = shapes
        log(
            f"  {stage}: {MODULES[backend]} engine, {engine.nbytes / 1e6:.1f} MB, "
            f"{time.perf_counter() - started:.1f} s ({peak_rss()})"
        )
        del engine, network, parser, builder  # the next stage's build starts with this one's memory freed
    if cache is not None and timing_cache is not None:
        write_atomic(timing_cache, bytes(cache.serialize()))
        record["timing_cache"] = timing_cache.name
    return record
