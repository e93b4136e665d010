"""How far the authors' calibration procedure lands from the engine's on a tiny bundle.

    python -m sencache.benchmarks.reference_calibration --engine bundles/tiny-wan \
        --out benchmarks/results/reference_calibration/tiny-wan.json

Measures the sensitivity table four ways with the same seed, sample count and step count: the
engine's procedure on the guided output and on the cond branch (both from a fresh solver state),
and the authors' procedure (noised training clips, cond branch) with their per-sample solver state
and with a fresh one. Each table is read at the engine table's timesteps (linear interpolation),
and its ratio to the engine's table is summarised (median, min, max), so the figures say how much
an eps tuned on one table means on another. Nothing is written into the bundle.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.runtime.files import write_atomic
from sencache.runtime.model import Model
from sencache.runtime.sensitivity import SensitivityTable

VARIANTS: dict[str, dict[str, str]] = {
    "engine": {"procedure": "engine", "branch": "guided", "solver_state": "fresh"},
    "engine, cond": {"procedure": "engine", "branch": "cond", "solver_state": "fresh"},
    "reference": {"procedure": "reference", "branch": "cond", "solver_state": "per-sample"},
    "reference, fresh state": {"procedure": "reference", "branch": "cond", "solver_state": "fresh"},
}
"""The plans compared, by label; the first is what the others are divided by."""


def _at(table: SensitivityTable, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jx, Jt of `table` interpolated at `timesteps`."""
    values = np.array([table.lookup(float(t))[:2] for t in timesteps])
    return values[:, 0], values[:, 1]


def _summary(ratio: np.ndarray) -> dict[str, float]:
    return {"median": float(np.median(ratio)), "min": float(ratio.min()), "max": float(ratio.max())}


def measure(engine: Model, samples: int, steps: int | None, seed: int, log=print) -> dict[str, Any]:
    """Each variant's table at the engine table's timesteps and its ratios to the engine's."""
    tables: dict[str, SensitivityTable] = {}
    for label, fields in VARIANTS.items():
        started = time.perf_counter()
        plan = CalibrationPlan(samples=samples, steps=steps, seed=seed, **fields)
        tables[label] = calibrate(engine, plan, show_progress=False).sensitivity
        log(f"{label}: {time.perf_counter() - started:.1f} s")
    base = tables[next(iter(VARIANTS))]
    grid = base.timesteps
    report: dict[str, Any] = {
        "model": engine.preset.name,
        "backend": engine.backend.name,
        "samples": samples,
        "steps": steps or engine.bundle.manifest.defaults.steps,
        "seed": seed,
        "timesteps": grid.tolist(),
        "variants": {},
    }
    for label, table in tables.items():
        jx, jt = _at(table, grid)
        report["variants"][label] = {
            **VARIANTS[label],
            "tabulated_timesteps": len(table.timesteps),
            "jx": jx.tolist(),
            "jt": jt.tolist(),
            "jx_ratio_to_engine": _summary(jx / base.jx),
            "jt_ratio_to_engine": _summary(jt / base.jt),
            "seconds": table.meta["seconds"],
        }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, required=True, help="a tiny bundle")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, help="default: the bundle's")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True, help="the report (.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = measure(Model.open(args.engine, threads=1), args.samples, args.steps, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(report, indent=1).encode())
    for label, row in report["variants"].items():
        jx, jt = row["jx_ratio_to_engine"], row["jt_ratio_to_engine"]
        print(
            f"{label:24s} Jx/engine median {jx['median']:.3f} [{jx['min']:.3f}, {jx['max']:.3f}]  "
            f"Jt/engine median {jt['median']:.3f} [{jt['min']:.3f}, {jt['max']:.3f}]  {row['seconds']:.0f} s"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
