"""How the FP8 build's quantization step grows with the blocks it quantizes, at a real preset's width.

    python -m sencache.benchmarks.fp8_memory --bundle B1 --bundle B2 --out benchmarks/results/real_size/fp8_memory.json

Each B is an fp32 ONNX Runtime bundle of one real preset with dummy weights and its own block count
(`build_engine.py --model wan2.1-t2v-1.3b --load-format dummy --layers 1 --frames 5 --height 64
--width 64 --max-batch 1`; the head is the same whatever the blocks). The blocks' calibration inputs
are captured once, on the first bundle, as the FP8 build captures them (one uncached trajectory,
every other step, both CFG rows); then `engine_builder/fp8.py`'s `quantize_graph` (NVIDIA Model
Optimizer's ONNX FP8 quantizer) runs on each bundle's blocks graph in a fresh process, whose peak RSS
and wall time are recorded. The line through the points, extrapolated to the preset's whole block
count, says whether the one-graph FP8 build fits the machine. A small resolution keeps the
activations negligible: what grows is what the quantizer holds per byte of graph.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sencache.benchmarks.real_size import FP8_MEMORY, write_report
from sencache.runtime.files import write_atomic


def capture(bundle: Path, out: Path) -> None:
    """The blocks' calibration inputs of one uncached trajectory of `bundle`, saved to `out` (.npz)."""
    from sencache.data.prompts import calibration_prompts
    from sencache.engine_builder.fp8 import CALIBRATION_SEED, blocks_inputs
    from sencache.runtime.model import Model

    engine = Model.open(bundle, threads=2)
    prompts = calibration_prompts(False, engine.preset.name, 1, CALIBRATION_SEED)
    np.savez(out, **blocks_inputs(engine, prompts, CALIBRATION_SEED))


def measure(bundle: Path, calibration: Path) -> dict[str, Any]:
    """Quantize `bundle`'s blocks graph in this process; its peak RSS and time (run in a fresh one)."""
    import resource

    from sencache.engine_builder.fp8 import quantize_graph

    data = np.load(calibration)
    inputs = {name: data[name] for name in data.files}
    with tempfile.TemporaryDirectory(dir=bundle.parent) as tmp:
        started = time.perf_counter()
        quantize_graph(bundle / "blocks.onnx", Path(tmp) / "blocks.fp8.onnx", inputs)
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "calibration_rows": int(len(inputs["hidden"])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sencache.benchmarks.fp8_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, action="append", required=True, help="an fp32 dummy bundle (repeat)")
    p.add_argument("--out", type=Path, required=True, help="the JSON written")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calibration", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:  # the child: one quantization, its figures as JSON on the last line
        print(json.dumps(measure(args.bundle[0], args.calibration)))
        return 0
    from sencache.runtime.bundle import Bundle
    from sencache.runtime.families import resolve

    manifests = [Bundle.load(b).manifest for b in args.bundle]
    if len({m.model for m in manifests}) != 1 or any(m.precision != "fp32" for m in manifests):
        p.error("--bundle: fp32 bundles of one model")
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calibration.npz"
        capture(args.bundle[0], calibration)
        for bundle, manifest in zip(args.bundle, manifests, strict=True):
            command = [sys.executable, "-m", "sencache.benchmarks.fp8_memory", "--measure", "--bundle", str(bundle)]
            done = subprocess.run(
                [*command, "--calibration", str(calibration), "--out", "-"], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise SystemExit(f"quantization of {bundle} failed:\n{done.stderr[-3000:]}")
            graph = sum(f.stat().st_size for f in bundle.glob("blocks.onnx*"))
            row = {"blocks": manifest.config["num_layers"], "graph_gb": graph / 1e9}
            rows.append(row | json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    model = manifests[0].model
    whole = resolve(model)[1].config["num_layers"]
    report: dict[str, Any] = {
        "command": " ".join(["python -m sencache.benchmarks.fp8_memory", *(argv or sys.argv[1:])]),
        "model": model,
        "resolution": f"{manifests[0].shapes.frames}x{manifests[0].shapes.height}x{manifests[0].shapes.width}",
        "points": rows,
        "load_average_1m": {"start": load, "end": os.getloadavg()[0]},
    }
    if len({r["blocks"] for r in rows}) > 1:
        slope, intercept = np.polyfit([r["blocks"] for r in rows], [r["peak_rss_gb"] for r in rows], 1)
        per_block_graph = (rows[-1]["graph_gb"] - rows[0]["graph_gb"]) / (rows[-1]["blocks"] - rows[0]["blocks"])
        report["fit"] = {
            "gb_per_block": float(slope),
            "gb_at_zero_blocks": float(intercept),
            "rss_per_graph_byte": float(slope / per_block_graph),
            "whole_model_blocks": whole,
            "whole_model_peak_gb": float(intercept + slope * whole),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(report, indent=1).encode())
    if args.out.name == FP8_MEMORY:  # beside the real-size rows: their report includes it
        write_report(args.out.parent)
    print(json.dumps(report.get("fit", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
