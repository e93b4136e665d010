"""FP8 (E4M3) post-training quantization of the blocks stage with NVIDIA Model Optimizer.

Only the blocks carry the cost, so only they are quantized: the head (patch, timestep and text
embeddings) and the tail (final norm and output projection) stay in full precision, as ModelOpt's
diffusion examples keep embeddings and the output projection. Calibration inputs are the blocks'
real inputs on the model's own uncached trajectories, run by the runtime's loop on the fp32 ONNX
stages of the bundle being built (its manifest is written once, after this step). The prompts are
the caller's or the model's default calibration prompts (`sencache.data.prompts`).
The quantized graph (Q/DQ around the matmuls) is checked in ONNX Runtime against the fp32 graph on
inputs from other seeds (and, for default prompts, other prompts) before any engine is built; the
error goes in the manifest. A streamed build's groups of blocks are quantized one at a time (the
quantizer's memory grows with the graph: benchmarks/results/real_size/fp8_memory.json), each
calibrated on the fp32 outputs of the groups before it; the error is the chained fp8 groups' against
the chained fp32 ones, with each group's alone beside it.

Uses `modelopt.onnx.quantization` from the plain `nvidia-modelopt` package plus the ONNX tools it
imports (`pip install 'sencache[fp8]'`), not modelopt's `[onnx]` extra, which pins
onnxruntime-gpu and cupy.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.data.prompts import calibration_prompts
from sencache.engine_builder.memory import peak_rss, release_heap, resident_bytes
from sencache.engine_builder.onnx_export import BuildFailed, compare
from sencache.engine_builder.streaming import group_file
from sencache.runtime.backends.base import STREAM_OUT
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
    """Replace `folder`'s fp32 blocks graphs (one, or a streamed build's groups) by their FP8 Q/DQ
    versions, calibrated on `samples` trajectories and checked on half as many others with other
    seeds; `prompts` are taken in turn (None: the model's default calibration prompts); returns the
    quantization record. `manifest` is the bundle's as it will be written (before its file listing).
    Groups are quantized one at a time, each calibrated on the fp32 outputs of the groups before it."""
    version = require_modelopt()
    graphs = tuple(group_file(i) for i in range(len(manifest.stages["blocks"].files)))
    bundle = Bundle.being_built(folder, manifest)
    files = {s: graphs if s == "blocks" else (f"{s}.onnx",) for s in STAGES}
    engine = Model(bundle, OnnxRuntimeBackend(bundle, threads, files=files, arena=False))  # its memory goes back
    log(f"  capturing blocks inputs on {samples} uncached trajectories")
    started = time.perf_counter()
    tiny, model, layout = engine.preset.tiny, engine.preset.name, engine.layout
    calibration = blocks_inputs(
        engine, calibration_prompts(tiny, model, samples, CALIBRATION_SEED, prompts), CALIBRATION_SEED
    )
    check = blocks_inputs(
        engine, calibration_prompts(tiny, model, max(1, samples // 2), CHECK_SEED, prompts), CHECK_SEED, every=5
    )
    del engine  # its fp32 sessions of every group are freed and given back before the quantizer runs
    release_heap()
    rows = int(len(calibration[layout.streams[0]]))
    log(f"  captured {rows} calibration rows in {time.perf_counter() - started:.1f} s ({peak_rss()})")
    check = {name: value[:1] if name in layout.shared else value for name, value in check.items()}
    out = layout.streams[0] + STREAM_OUT
    groups, reference, quantized = [], check, check
    with tempfile.TemporaryDirectory(prefix="fp8-", dir=folder.parent) as tmp:
        for index, graph in enumerate(graphs):
            started = time.perf_counter()
            target = Path(tmp) / f"{Path(graph).stem}.fp8.onnx"
            held = resident_bytes()
            quantizer_peak = _quantize_apart(folder / graph, target, calibration)
            fp32, fp8 = _session(folder / graph), _session(target)
            expected = _run(fp32, reference, layout.shared)
            error = compare(_run(fp8, reference, layout.shared)[out], expected[out])
            groups.append(
                {
                    "graph": graph,
                    **error,
                    "quantizer_peak_rss_gb": quantizer_peak / 1e9,
                    "build_rss_beside_gb": held / 1e9,
                }
            )
            if index + 1 < len(graphs):  # the next group's inputs: the fp32 and fp8 outputs of this one
                calibration = _next(calibration, _run(fp32, calibration, layout.shared))
            quantized, reference = _next(quantized, _run(fp8, quantized, layout.shared)), _next(reference, expected)
            del fp32, fp8
            release_heap()
            _place(target, folder / graph)
            groups[-1]["seconds"] = time.perf_counter() - started
            log(
                f"  {graph}: quantized with ModelOpt in {groups[-1]['seconds']:.1f} s (its process: peak RSS "
                f"{quantizer_peak / 1e9:.1f} GB, the build's beside it {held / 1e9:.1f} GB), alone vs fp32 relative "
                f"L2 {error['rel_l2']:.3f} ({peak_rss()})"
            )
    stream = layout.streams[0]
    got, ref = quantized[stream], reference[stream]
    error = {
        **compare(got, ref),
        "rel_l2_of_residual": float(np.linalg.norm(got - ref) / np.linalg.norm(ref - check[stream])),
        "rows": int(len(ref)),
    }
    log(f"  blocks fp8 vs fp32 in ONNX Runtime: relative L2 {error['rel_l2']:.3f} on {error['rows']} rows")
    if not error["rel_l2"] <= TOLERANCE_REL_L2:
        raise BuildFailed(
            f"FP8 blocks differ from fp32 by relative L2 {error['rel_l2']:.3f}; the limit is {TOLERANCE_REL_L2}"
        )
    if len(graphs) > 1:
        error["groups"] = groups
    return {
        "tool": f"nvidia-modelopt {version} (modelopt.onnx.quantization, mode fp8, calibration on CPU)",
        "format": "FP8 E4M3 Q/DQ on the blocks stage; head and tail stay fp32",
        "calibration": {
            "samples": samples,
            "seed": CALIBRATION_SEED,
            "rows": rows,
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


def _quantize_apart(source: Path, target: Path, calibration: dict[str, np.ndarray]) -> int:
    """`quantize_graph` in a process of its own, so that what the quantizer holds goes back to the
    system when it ends (in one process its memory grows with each graph); returns its peak RSS."""
    data = target.with_suffix(".calibration.npz")
    np.savez(data, **calibration)
    done = subprocess.run(
        [sys.executable, "-m", "sencache.engine_builder.fp8", str(source), str(target), str(data)],
        capture_output=True,
        text=True,
    )
    data.unlink()
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise BuildFailed(lines[-1] if lines else f"the FP8 quantizer's process exited with {done.returncode}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def main(argv: list[str] | None = None) -> int:
    """The quantizer's process: SOURCE TARGET CALIBRATION.npz; prints its peak RSS as JSON."""
    source, target, data = sys.argv[1:] if argv is None else argv
    with np.load(data) as loaded:
        calibration = {name: loaded[name] for name in loaded.files}
    try:
        quantize_graph(Path(source), Path(target), calibration)
    except BuildFailed as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def _session(path: Path) -> Any:
    """A one-thread CPU ONNX Runtime session of the graph at `path`, without ONNX Runtime's memory
    arena: what its runs allocate goes back to the system when it closes (with the arena, about
    1.3 GB of a 1-block graph's 50-row run stayed resident, beside the next group's quantizer)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: Any, inputs: dict[str, np.ndarray], shared: Sequence[str]) -> dict[str, np.ndarray]:
    """A blocks graph's stream outputs on `inputs` (the `shared` tables: their first row), by name."""
    names = [o.name for o in session.get_outputs()]
    feeds = {i.name: inputs[i.name][:1] if i.name in shared else inputs[i.name] for i in session.get_inputs()}
    values = session.run(names, feeds)
    return dict(zip(names, values, strict=True))


def _next(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The next group's inputs: `inputs` with the streams replaced by this group's outputs."""
    return {**inputs, **{name.removesuffix(STREAM_OUT): value for name, value in outputs.items()}}


def _place(quantized: Path, destination: Path) -> None:
    """Move the quantized graph over the fp32 one, its weights inline (under ONNX's 2 GB limit, as a
    group is) or beside it as `<destination>.data`."""
    import onnx

    graph = onnx.load(str(quantized), load_external_data=False)
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer):
        shutil.move(quantized, destination)
        return
    onnx.save(
        onnx.load(str(quantized)), str(destination), save_as_external_data=True, location=f"{destination.name}.data"
    )


if __name__ == "__main__":
    sys.exit(main())
