"""What lower precision does to SenCache: NFE and quality of fp16 / fp8 bundles, uncached and
cached, against the fp32 uncached video of the same prompt and seed.

    python -m sencache.benchmarks.precision --model tiny-wan --out benchmarks/results/precision

Builds the fp32, fp16 and fp8 bundles of the model (ONNX Runtime), calibrates each on its own
trajectories, and generates the same prompts uncached and with SenCache at the bundle's default
thresholds, with its own table and (fp16, fp8) with the fp32 build's table. Quantization noise and
the cache threshold are the same order of magnitude, so each cached run is compared both with
fp32 uncached (what the user wanted) and with its own precision uncached (what the cache changes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.benchmarks.bench import PSNR_CAP, evaluation_set
from sencache.benchmarks.metrics import psnr
from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.bundle import Bundle
from sencache.runtime.files import write_atomic
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams

PRECISIONS = ("fp32", "fp16", "fp8")


def measure(model: str, root: Path, samples: int, log=print) -> dict[str, Any]:
    """Per precision: uncached, SenCache with the bundle's own table, and (fp16, fp8) SenCache with
    the fp32 build's table; NFE and PSNR against fp32 uncached and against the same bundle uncached."""
    prompts, seeds = evaluation_set(samples, None, None)
    report: dict[str, Any] = {"model": model, "samples": samples, "prompts": prompts, "seeds": seeds}
    reference = None
    for precision in PRECISIONS:
        path = build(
            BuildOptions(model=model, out=root / precision, precision=precision, max_batch=samples), log=lambda _: None
        )
        engine = Model.open(path, threads=1)
        bundle = engine.bundle
        bundle.write_tables(calibrate(engine, CalibrationPlan(), show_progress=False).sensitivity)
        defaults = bundle.manifest.defaults
        request = GenerationParams(prompts, seeds, defaults.steps, defaults.guidance)
        uncached = engine.decode(engine.generate(request, engine.policy("none", request.steps, samples, {})).latents)
        reference = uncached if reference is None else reference
        tables = {"own table": None} if precision == "fp32" else {"own table": None, "fp32 table": root / "fp32"}
        row: dict[str, Any] = {
            "psnr_uncached_vs_fp32": _mean_psnr(uncached, reference),
            "validation": bundle.manifest.validation.get("blocks_fp8_vs_fp32"),
        }
        for label, source in tables.items():
            if source is not None:
                bundle.adopt_tables(Bundle.load(source))
            result = engine.generate(request, engine.policy("sencache", request.steps, samples, {}))
            video = engine.decode(result.latents)
            row[label] = {
                "nfe": float(np.mean(result.nfe)),
                "psnr_vs_fp32": _mean_psnr(video, reference),
                "psnr_vs_own_uncached": _mean_psnr(video, uncached),
            }
        report[precision] = row
        log(f"{precision}: built, calibrated, generated")
    return report


def _mean_psnr(videos: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean([min(psnr(v, r), PSNR_CAP) for v, r in zip(videos, reference, strict=True)]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-wan")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        report = measure(args.model, Path(tmp), args.samples)
    print(
        f"{'precision':9s} {'table':10s} {'NFE':>5s} {'vs fp32':>8s} {'vs own uncached':>16s}  "
        f"(PSNR dB of SenCache, {args.samples} samples; uncached vs fp32 in brackets)"
    )
    for precision in PRECISIONS:
        row = report[precision]
        for label in ("own table", "fp32 table"):
            if label in row:
                r = row[label]
                print(
                    f"{precision:9s} {label:10s} {r['nfe']:5.1f} {r['psnr_vs_fp32']:8.2f} "
                    f"{r['psnr_vs_own_uncached']:16.2f}  [{row['psnr_uncached_vs_fp32']:.2f}]"
                )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.model}.json"
    write_atomic(path, json.dumps(report, indent=1).encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
