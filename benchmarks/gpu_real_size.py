"""The GPU check's real-size run: a torch bundle (Wan 2.1 1.3B with dummy weights) timed on the device.

    python -m sencache.benchmarks.gpu_real_size --engine BUNDLE --device cuda --out real_size.json

BUNDLE is built on the same machine, so nothing large travels to it (benchmarks/gpu_check.sh:
`sencache build --model wan2.1-t2v-1.3b --load-format dummy --backend torch --precision bf16
--frames 33 --height 480 --width 832 --max-batch 4`). In order, each part written to the JSON as
soon as it is measured, and each started only while `--budget-s` leaves time for it (a part not
started says so), so a run cut short still reports what it measured:
- load: the bundle opened on the device (weights read, moved there);
- calibration: a brief one (one sample, `--steps` steps) at the bundle's resolution, so SenCache
  has a table; with dummy weights the table, the NFE and any quality figure mean nothing, the
  timings do not depend on the weights;
- runs: one prompt with guidance (2 rows per step), uncached and with SenCache, after a warm-up
  run: seconds per step, NFE, the decision's cost per step as the loop times it (the drift
  measurement, its read-back and the rule), the drift read-backs per step (on a GPU each is the
  drift kernel's one event wait) and, on CUDA, the syncs PyTorch saw;
- drift kernel: bandwidth (latent and anchor bytes read per second) on this latent for the samples
  of one request, CUDA-event timed over `--launches` launches (on the host: the float64 NumPy
  reduction the host loop uses, timed alike);
- rows: pass time through the step engine against rows per pass (1, 2, 4, 8 by default): that many
  uncached one-row requests (guidance 1) share each pass; the median of `--passes` passes after a
  warm-up pass, the device synchronized after each. Its slope is what step-level batching gains.
With `--rehearsal` (the CPU rehearsal of the check, at a tiny size and few blocks) the JSON says
so, and its figures say nothing of a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.benchmarks.syncs import counting_syncs
from sencache.data.prompts import calibration_prompts
from sencache.runtime.cache import NoCache
from sencache.runtime.files import write_atomic
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams
from sencache.runtime.stepping import StepEngine

ROWS = (1, 2, 4, 8)
RESERVE_S = {"calibration": 60.0, "runs": 40.0, "drift_kernel": 5.0, "rows": 30.0}
"""Seconds a part is expected to need at Wan 1.3B's size on an H200 (a rough upper figure): a part
starts only while the budget has this much left."""


class Report:
    """The JSON document, written whole after each part (atomically), so a cut run keeps its figures."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self.path, self.document = path, head

    def add(self, key: str, value: Any) -> None:
        self.document[key] = value
        write_atomic(self.path, json.dumps(self.document, indent=1).encode())


def prompt(engine: Model) -> str:
    """The prompt of every timed request: the model's first calibration prompt."""
    return calibration_prompts(engine.preset.tiny, engine.preset.name, 1, 0)[0]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing only; the loop itself never does)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counted_readbacks(engine: Model) -> Callable[[], int]:
    """Count the drift read-backs of the engine's one-rank drift meter (one event wait each on a
    GPU); returns the counter's reader."""
    meter = engine.drift_meter(engine.numel)
    read = meter.result
    calls = [0]

    def result() -> np.ndarray:
        calls[0] += 1
        return read()

    meter.result = result  # type: ignore[method-assign]
    return lambda: calls[0]


def torch_syncs(device: torch.device, work: Callable[[], Any]) -> tuple[Any, int | None]:
    """`work()` and, on CUDA, the synchronizing calls PyTorch saw during it (None on the host)."""
    if device.type != "cuda":
        return work(), None
    return counting_syncs(work)


def timed_run(engine: Model, method: str, steps: int, readbacks: Callable[[], int]) -> dict[str, Any]:
    """One guided request of `steps` steps under `method`: s/step, NFE, decision cost, read-backs."""
    request = GenerationParams([prompt(engine)], [7], steps, engine.bundle.manifest.defaults.guidance)
    before = readbacks()
    result, syncs = torch_syncs(
        engine.backend.device, lambda: engine.generate(request, engine.policy(method, steps, 1, {}))
    )
    return {
        "steps": steps,
        "rows_per_step": 2 if request.cfg else 1,
        "per_step_s": result.timing["denoise_s"] / steps,
        "nfe": result.nfe[0],
        "decision_us_per_step": result.timing["decision_s"] / steps * 1e6,
        "drift_readbacks_per_step": (readbacks() - before) / steps,
        "torch_syncs": syncs,
    }


def drift_kernel(engine: Model, samples: int, launches: int) -> dict[str, Any]:
    """The drift measurement on this latent for `samples` samples: time per launch and bandwidth."""
    device = engine.backend.device
    shape = (samples, *engine.latent_shape)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, generator=generator, device=device)
    anchor = torch.randn(shape, generator=generator, device=device)
    meter = engine.drift_meter(engine.numel)
    with engine.stream():
        meter.start(x, anchor)
        meter.result()
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(launches):
                meter.start(x, anchor)
            stop.record()
            meter.result()
            stop.synchronize()
            seconds = start.elapsed_time(stop) / 1e3 / launches
        else:
            tick = time.perf_counter()
            for _ in range(launches):
                meter.start(x, anchor)
                meter.result()
            seconds = (time.perf_counter() - tick) / launches
    read = 2 * x.numel() * x.element_size()
    return {
        "latent_per_sample": list(engine.latent_shape),
        "samples": samples,
        "dtype": "fp32",
        "launches": launches,
        "per_launch_us": seconds * 1e6,
        "bandwidth_GBps": read / seconds / 1e9,
        "measured_by": "CUDA events around the launches"
        if device.type == "cuda"
        else "host clock, the float64 NumPy reduction",
    }


def pass_times(engine: Model, rows: tuple[int, ...], passes: int) -> dict[str, Any]:
    """Median pass time through the step engine with `r` one-row uncached requests per pass."""
    device, curve = engine.backend.device, {}
    for count in rows:
        stepper = StepEngine(engine)
        for i in range(count):
            stepper.submit(GenerationParams([prompt(engine)], [100 + i], passes + 1, 1.0), NoCache(1))
        times = []
        while stepper.busy:
            tick = time.perf_counter()
            stepper.step()
            sync(device)
            times.append(time.perf_counter() - tick)
        timed = times[1 : passes + 1]  # the first pass warms up; the last call only retires
        median = float(np.median(timed))
        curve[str(count)] = {"pass_s": median, "per_row_s": median / count, "passes": len(timed)}
    single = curve[str(rows[0])]["per_row_s"]
    for figures in curve.values():
        figures["per_row_vs_first"] = figures["per_row_s"] / single
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sencache.benchmarks.gpu_real_size", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--engine", type=Path, required=True, help="a torch bundle (dummy weights are fine)")
    p.add_argument("--device", default="cuda", help="cuda | cpu (the rehearsal)")
    p.add_argument("--steps", type=int, default=20, help="steps of the calibration and of each timed run")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows per pass of the cost curve")
    p.add_argument("--passes", type=int, default=3, help="timed passes per row count")
    p.add_argument("--launches", type=int, default=50, help="drift kernel launches timed")
    p.add_argument("--budget-s", type=float, default=200.0, help="start no part past this many seconds")
    p.add_argument("--rehearsal", action="store_true", help="label the figures a CPU rehearsal at a tiny size")
    p.add_argument("--out", type=Path, required=True, help="the JSON written")
    args = p.parse_args(argv)
    started = time.perf_counter()
    rows = tuple(int(r) for r in args.rows.split(","))
    tick = time.perf_counter()
    engine = Model.open(args.engine, device=args.device)
    sync(engine.backend.device)
    manifest = engine.bundle.manifest
    shapes = manifest.shapes
    if max(rows) > shapes.max_rows:
        p.error(f"--rows: the bundle takes at most {shapes.max_rows} rows per pass")
    report = Report(
        args.out,
        {
            "rehearsal": args.rehearsal,
            "source": "CPU rehearsal at a tiny size: these figures say nothing of a GPU"
            if args.rehearsal
            else f"measured on {_device_name(engine.backend.device)}",
            "model": manifest.model,
            "dummy": manifest.dummy_seed is not None,
            "weights": f"dummy, seed {manifest.dummy_seed}" if manifest.dummy_seed is not None else "the bundle's",
            "blocks": manifest.config.get("num_layers"),
            "precision": manifest.precision,
            "resolution": f"{shapes.frames}x{shapes.height}x{shapes.width}",
            "latent_per_sample": list(shapes.latent),
            "backend": engine.backend.describe(),
            "load_s": time.perf_counter() - tick,
        },
    )
    print(f"opened {args.engine} in {report.document['load_s']:.1f} s: {report.document['backend']}", flush=True)
    readbacks = counted_readbacks(engine)

    def part(name: str, work: Callable[[], Any]) -> None:
        left = args.budget_s - (time.perf_counter() - started)
        if left < RESERVE_S[name] * (0.05 if args.rehearsal else 1.0):
            report.add(name, {"not_run": f"{left:.0f} s of the {args.budget_s:.0f} s budget left"})
            print(f"{name}: not run ({left:.0f} s left)", flush=True)
            return
        tick = time.perf_counter()
        report.add(name, {**work(), "part_s": time.perf_counter() - tick})
        print(f"{name}: {json.dumps(report.document[name])}", flush=True)

    part("calibration", lambda: _calibrate(engine, args.steps))
    part("runs", lambda: _runs(engine, args.steps, readbacks, "calibrate_s" in report.document["calibration"]))
    part("drift_kernel", lambda: drift_kernel(engine, shapes.max_batch, args.launches))
    part("rows", lambda: {"curve": pass_times(engine, rows, args.passes)})
    report.add("total_s", time.perf_counter() - started)
    print(f"real-size run of {manifest.model} written to {args.out} in {report.document['total_s']:.0f} s")
    return 0


def _calibrate(engine: Model, steps: int) -> dict[str, Any]:
    from sencache.calibration.calibrate import CalibrationPlan, calibrate

    tick = time.perf_counter()
    table = calibrate(engine, CalibrationPlan(samples=1, steps=steps, budget_steps=(2,)), show_progress=False)
    engine.bundle.write_tables(table.sensitivity)
    return {"samples": 1, "steps": steps, "calibrate_s": time.perf_counter() - tick}


def _runs(engine: Model, steps: int, readbacks: Callable[[], int], calibrated: bool) -> dict[str, Any]:
    engine.generate(GenerationParams([prompt(engine)], [1], 2, engine.bundle.manifest.defaults.guidance), NoCache(1))
    figures = {"uncached": timed_run(engine, "none", steps, readbacks)}
    if calibrated:
        figures["sencache"] = timed_run(engine, "sencache", steps, readbacks)
        figures["speedup"] = figures["uncached"]["per_step_s"] / figures["sencache"]["per_step_s"]
    return figures


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"the host's CPU (torch {torch.__version__})"


if __name__ == "__main__":
    sys.exit(main())
