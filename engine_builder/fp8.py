"""FP8 (E4M3) post-training quantization of the blocks stage with NVIDIA Model Optimizer.

Only the blocks carry the cost, so only they are quantized: the head (patch, timestep and text
embeddings) and the tail (final norm and output projection) stay in full precision, as ModelOpt's
diffusion examples keep embeddings and the output projection. Calibration inputs are the blocks'
real inputs on the model's own uncached trajectories, run by the runtime's loop on the fp32 ONNX
stages of the bundle being built (its manifest is written once, after this step). The prompts are
the caller's or the model's default calibration prompts (`sencache.data.prompts`).
The quantized graph (Q/DQ around the matmuls) is checked in ONNX Runtime against the fp32 graph on
inputs from other seeds (and, for default prompts, other prompts) before any engine is built; the
error goes in the manifest.

Uses `modelopt.onnx.quantization` from the plain `nvidia-modelopt` package plus the ONNX tools it
imports (`pip install 'sencache[fp8]'`), not modelopt's `[onnx]` extra, which pins
onnxruntime-gpu and cupy.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.data.prompts import calibration_prompts
from sencache.engine_builder.memory import peak_rss
from sencache.engine_builder.onnx_export import BuildFailed, compare
from sencache.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import NoCache
from sencache.runtime.chain import cfg_rows
from sencache.runtime.errors import BadInput
from sencache.runtime.manifest import STAGES, Manifest
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams

TOLERANCE_REL_L2 = 0.15
"""Largest relative L2 error of the fp8 blocks against fp32 before the build fails."""
CALIBRATION_SEED, CHECK_SEED = 77, 4242


def require_modelopt() -> str:
    """The installed nvidia-modelopt version, or a clear error saying how to install it."""
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError as e:
        raise BadInput(
            f"precision fp8 needs NVIDIA Model Optimizer: pip install 'sencache[fp8]' ({e})", param="precision"
        ) from None
    return importlib.metadata.version("nvidia-modelopt")


def blocks_inputs(engine: Model, prompts: list[str], seed: int, every: int = 2) -> dict[str, np.ndarray]:
    """The blocks stage's inputs (all CFG rows) at every `every`-th step of uncached runs of
    `prompts` (seeds from `seed`), stacked along the batch; shared tables repeated per row."""
    samples = len(prompts)
    defaults = engine.bundle.manifest.defaults
    steps, guidance = defaults.steps, defaults.guidance
    batch = max(1, min(samples, engine.bundle.shapes.max_batch))
    layout = engine.layout
    rows: dict[str, list[np.ndarray]] = {name: [] for name in layout.blocks_inputs}
    for start in range(0, samples, batch):
        chunk = prompts[start : start + batch]
        run = engine.generate(
            GenerationParams(chunk, [seed + start + i for i in range(len(chunk))], steps, guidance),
            NoCache(len(chunk)),
            record=True,
        )
        text = engine.encode(chunk)
        uncond = engine.encode([""] * len(chunk)) if guidance > 1.0 else None
        for k in range(0, steps, every):
            feeds = cfg_rows(
                torch.from_numpy(run.trajectory[k]),
                torch.from_numpy(text),
                None if uncond is None else torch.from_numpy(uncond),
            )
            count = len(feeds["latent"])
            feeds["timestep"] = torch.full((count,), run.timesteps[k], dtype=torch.float32)
            head = engine.backend.run("head", feeds)
            for name in layout.blocks_inputs:
                value = head[name].numpy()
                rows[name].append(np.repeat(value, count, axis=0) if name in layout.shared else value)
    return {name: np.concatenate(values).astype(np.float32) for name, values in rows.items()}


def quantize_blocks(
    folder: Path,
    manifest: Manifest,
    samples: int,
    log: Callable[[str], None],
    threads: int = 1,
    prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Replace `folder`'s fp32 blocks.onnx by its FP8 Q/DQ version, calibrated on `samples`
    trajectories and checked on half as many others with other seeds; `prompts` are taken in turn
    (None: the model's default calibration prompts); returns the quantization record.
    `manifest` is the bundle's as it will be written (before its file listing)."""
    version = require_modelopt()
    bundle = Bundle.being_built(folder, manifest)
    engine = Model(bundle, OnnxRuntimeBackend(bundle, threads, files={s: f"{s}.onnx" for s in STAGES}))
    log(f"  capturing blocks inputs on {samples} uncached trajectories")
    tiny, model = engine.preset.tiny, engine.preset.name
    calibration = blocks_inputs(
        engine, calibration_prompts(tiny, model, samples, CALIBRATION_SEED, prompts), CALIBRATION_SEED
    )
    check = blocks_inputs(
        engine, calibration_prompts(tiny, model, max(1, samples // 2), CHECK_SEED, prompts), CHECK_SEED, every=5
    )
    log(f"  captured {len(calibration[engine.layout.streams[0]])} calibration rows ({peak_rss()})")
    with tempfile.TemporaryDirectory(prefix="fp8-", dir=folder.parent) as tmp:
        target = Path(tmp) / "blocks.fp8.onnx"
        quantize_graph(folder / "blocks.onnx", target, calibration)
        log(f"  quantized the blocks with ModelOpt ({peak_rss()})")
        check = {name: value[:1] if name in engine.layout.shared else value for name, value in check.items()}
        error = _fp8_error(folder / "blocks.onnx", target, check, engine.layout.streams)
        log(
            f"  blocks fp8 vs fp32 in ONNX Runtime: relative L2 {error['rel_l2']:.3f} on {error['rows']} rows "
            f"({peak_rss()})"
        )
        if not error["rel_l2"] <= TOLERANCE_REL_L2:
            raise BuildFailed(
                f"FP8 blocks differ from fp32 by relative L2 {error['rel_l2']:.3f}; the limit is {TOLERANCE_REL_L2}"
            )
        shutil.move(target, folder / "blocks.onnx")
    return {
        "tool": f"nvidia-modelopt {version} (modelopt.onnx.quantization, mode fp8, calibration on CPU)",
        "format": "FP8 E4M3 Q/DQ on the blocks stage; head and tail stay fp32",
        "calibration": {
            "samples": samples,
            "seed": CALIBRATION_SEED,
            "rows": int(len(calibration[engine.layout.streams[0]])),
            "source": "the model's own uncached trajectories, every other step, all CFG rows",
        },
        "blocks_vs_fp32": error,
    }


def quantize_graph(source: Path, target: Path, calibration: dict[str, np.ndarray]) -> None:
    """Write the FP8 Q/DQ version of the fp32 graph `source` to `target` (beside it: a folder of
    its own), calibrated on `calibration` (the graph's inputs, rows stacked) in ONNX Runtime on the CPU."""
    from modelopt.onnx.quantization import quantize

    copy = target.parent / f"{source.stem}.source.onnx"
    shutil.copyfile(source, copy)  # modelopt rewrites its input file in place
    previous = logging.getLogger().level
    try:
        quiet = io.StringIO()  # its ONNX Runtime calibrator prints tensor counts and progress bars
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            quantize(
                onnx_path=str(copy),
                quantize_mode="fp8",
                calibration_data=calibration,
                calibration_eps=["cpu"],
                output_path=str(target),
                high_precision_dtype="fp32",
                log_level="ERROR",
            )
    except Exception as e:  # modelopt raises many types; the build reports which step failed
        raise BuildFailed(f"FP8 quantization of the blocks stage failed: {type(e).__name__}: {e}") from e
    finally:
        logging.getLogger().setLevel(previous)


def _fp8_error(fp32: Path, fp8: Path, inputs: dict[str, np.ndarray], streams: tuple[str, ...]) -> dict[str, float]:
    """The quantized blocks against the fp32 ones on held-out inputs, relative to the residual too
    (what the cache stores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    got = ort.InferenceSession(str(fp8), options, providers=["CPUExecutionProvider"]).run(None, inputs)
    ref = ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"]).run(None, inputs)
    error = compare(got[0], ref[0])
    residual = float(np.linalg.norm(got[0] - ref[0]) / np.linalg.norm(ref[0] - inputs[streams[0]]))
    return {**error, "rel_l2_of_residual": residual, "rows": int(len(ref[0]))}
