"""What lower precision does to SenCache: NFE and quality of fp16 / fp8 bundles, uncached and
cached, against the fp32 uncached video of the same prompt and seed.

    python -m sencache.benchmarks.precision --model tiny-wan --out benchmarks/results/precision

Builds the fp32, fp16 and fp8 bundles of the model (ONNX Runtime), calibrates each on its own
trajectories (calibration runs as inference runs, so the fp8 table sees the fp8 model), and
generates the same prompts uncached and with SenCache at the bundle's default thresholds.
Quantisation noise and the cache threshold are the same order of magnitude, so the cached fp8
run is compared both with fp32 uncached (what the user wanted) and with fp8 uncached (what the
cache alone changes).
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
from sencache.runtime.backends.base import open_backend
from sencache.runtime.bundle import Bundle
from sencache.runtime.files import write_atomic
from sencache.runtime.pipeline import Engine, Request

PRECISIONS = ("fp32", "fp16", "fp8")


def measure(model: str, root: Path, samples: int, log=print) -> dict[str, Any]:
    """Per precision: uncached and SenCache NFE, PSNR vs fp32 uncached, PSNR vs own uncached."""
    prompts, seeds = evaluation_set(samples, None, None)
    videos: dict[str, dict[str, np.ndarray]] = {}
    report: dict[str, Any] = {"model": model, "samples": samples, "prompts": prompts, "seeds": seeds}
    for precision in PRECISIONS:
        path = build(BuildOptions(model=model, out=root / precision, precision=precision, max_batch=samples),
                     log=lambda _: None)
        bundle = Bundle.load(path)
        engine = Engine(bundle, open_backend(bundle, threads=1))
        calibration = calibrate(engine, CalibrationPlan(), show_progress=False)
        bundle.write_sensitivity(calibration.sensitivity)
        defaults = bundle.manifest["defaults"]
        request = Request(prompts, seeds, defaults["steps"], defaults["guidance"])
        runs = {}
        for method in ("none", "sencache"):
            result = engine.generate(request, engine.policy(method, request.steps, samples, {}))
            runs[method] = result
            videos.setdefault(precision, {})[method] = engine.decode(result.latents)
        report[precision] = {"nfe_sencache": float(np.mean(runs["sencache"].nfe)),
                             "validation": bundle.manifest["validation"].get("blocks_fp8_vs_fp32")}
        log(f"{precision}: built, calibrated, generated (SenCache NFE {report[precision]['nfe_sencache']:.1f})")
    reference = videos["fp32"]["none"]
    for precision in PRECISIONS:
        own = videos[precision]
        report[precision].update({
            "psnr_uncached_vs_fp32": _mean_psnr(own["none"], reference),
            "psnr_sencache_vs_fp32": _mean_psnr(own["sencache"], reference),
            "psnr_sencache_vs_own_uncached": _mean_psnr(own["sencache"], own["none"]),
        })
    return report


def _mean_psnr(videos: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean([min(psnr(v, r), PSNR_CAP) for v, r in zip(videos, reference)]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-wan")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        report = measure(args.model, Path(tmp), args.samples)
    print(f"{'precision':9s} {'SenCache NFE':>12s} {'uncached vs fp32':>17s} {'SenCache vs fp32':>17s} "
          f"{'SenCache vs own uncached':>25s}  (PSNR dB, {args.samples} samples)")
    for precision in PRECISIONS:
        r = report[precision]
        print(f"{precision:9s} {r['nfe_sencache']:12.1f} {r['psnr_uncached_vs_fp32']:17.2f} "
              f"{r['psnr_sencache_vs_fp32']:17.2f} {r['psnr_sencache_vs_own_uncached']:25.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.model}.json"
    write_atomic(path, json.dumps(report, indent=1).encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
