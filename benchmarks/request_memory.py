"""The memory estimate that guards each request against the measured peak of `sencache generate`.

    python -m sencache.benchmarks.request_memory --engine BUNDLE --steps 4 --calibrate-samples 2

Calibrates the bundle briefly when it has no sensitivity table (`sencache calibrate` at the bundle's
resolution), then runs `sencache generate` with SenCache through the step engine under
`/usr/bin/time -v` and compares its peak RSS with runtime/memory.py's `estimated_peak` (the process,
the opened stages, the request's loop tensors and its rows' activations). Adds a row to
`benchmarks/results/real_size/memory/` and the table `memory.md` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sencache.runtime.bundle import Bundle
from sencache.runtime.files import write_atomic
from sencache.runtime.manifest import SENSITIVITY
from sencache.runtime.memory import PROCESS_BYTES, estimated_peak, loaded_bytes, needed_bytes

RESULTS = Path("benchmarks/results/real_size/memory")
PROMPT = "a red fox running through fresh snow at dawn"


def timed(command: list[str]) -> tuple[float, int, str]:
    """Run `command` under `/usr/bin/time -v`: wall seconds, peak RSS in bytes and its output."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{output}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    assert rss is not None, "/usr/bin/time -v reports the peak RSS"
    return wall, int(rss.group(1)) * 1024, done.stdout + done.stderr


def measure(engine: Path, steps: int, samples: int, threads: int) -> dict[str, Any]:
    """Calibrate `engine` if it has no table, then generate one video with SenCache and compare."""
    cli = [sys.executable, "-m", "sencache.cli"]
    row: dict[str, Any] = {"load_average_1m": {"start": os.getloadavg()[0]}}
    bundle = Bundle.load(engine)
    if SENSITIVITY not in bundle.manifest.files:
        calibrate = ["calibrate", "--engine", str(engine), "--samples", str(samples), "--steps", str(steps)]
        wall, peak, _ = timed([*cli, *calibrate])
        row["calibrate"] = {"samples": samples, "steps": steps, "wall_s": wall, "peak_rss_bytes": peak}
        bundle = Bundle.load(engine)
    manifest = bundle.manifest
    branches = 2 if manifest.defaults.guidance > 1.0 else 1
    with tempfile.TemporaryDirectory() as scratch:
        wall, peak, log = timed(
            [
                *cli,
                "generate",
                "--engine",
                str(engine),
                "--prompt",
                PROMPT,
                "--steps",
                str(steps),
                "--cache",
                "sencache",
                "--threads",
                str(threads),
                "--out",
                str(Path(scratch) / "run"),
            ]
        )
    estimate = estimated_peak(manifest, 1, branches)
    s = manifest.shapes
    return row | {
        "model": manifest.model,
        "precision": manifest.precision,
        "layers": manifest.config.get("num_layers"),
        "size": f"{s.frames}x{s.height}x{s.width}",
        "rows": branches,
        "steps": steps,
        "generate_wall_s": wall,
        "measured_peak_bytes": peak,
        "estimated_peak_bytes": estimate,
        "estimate_parts": {
            "process": int(PROCESS_BYTES),
            "loaded": loaded_bytes(manifest),
            "request_and_pass": needed_bytes(manifest, 1, branches),
        },
        "estimate_vs_measured": estimate / peak,
        "generate_log": [line for line in log.splitlines() if "NFE" in line or line.startswith("denoise")],
    }


def write_table(folder: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    lines = [
        "# The request memory estimate against the measured peak",
        "",
        "`sencache generate` of one prompt with SenCache through the step engine, ONNX Runtime CPU, on dummy "
        "bundles at their reduced resolution after a brief calibration at that resolution; peak RSS from "
        "`/usr/bin/time -v`; the estimate is runtime/memory.py's `estimated_peak` (process + opened stages + "
        "the request's loop tensors and its rows' activations).",
        "",
        "| model | precision | blocks | size | rows | steps | stages loaded GB (est.) | estimated peak GB | "
        "measured peak GB | estimate / measured | load avg |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['layers']} | {r['size']} | {r['rows']} | {r['steps']} | "
            f"{r['estimate_parts']['loaded'] / 1e9:.2f} | {r['estimated_peak_bytes'] / 1e9:.2f} | "
            f"{r['measured_peak_bytes'] / 1e9:.2f} | {r['estimate_vs_measured']:.2f} | "
            f"{r['load_average_1m']['start']:.1f}-{r['load_average_1m']['end']:.1f} |"
        )
    write_atomic(folder.parent / "memory.md", ("\n".join(lines) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sencache.benchmarks.request_memory", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--engine", type=Path, required=True, help="a dummy bundle (calibrated here if it is not)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the calibration and of the run")
    p.add_argument("--calibrate-samples", type=int, default=2, help="trajectories of the brief calibration")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the run")
    p.add_argument("--name", help="the row's file name (default: model-precision-layers)")
    p.add_argument("--out", type=Path, default=RESULTS, help="the results folder")
    args = p.parse_args(argv)
    row = measure(args.engine, args.steps, args.calibrate_samples, args.threads)
    row["load_average_1m"]["end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{row['model']}-{row['precision']}-{row['layers']}blocks"
    write_atomic(args.out / f"{name}.json", json.dumps(row, indent=1).encode())
    write_table(args.out)
    print((args.out.parent / "memory.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
