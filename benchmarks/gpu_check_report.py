"""The figures of the GPU check (`benchmarks/gpu_check.sh`), read from what its steps wrote.

python -m sencache.benchmarks.gpu_check_report loop CACHED REFERENCE --out loop.json
    compares two `sencache generate` folders of the same prompts and seeds (SenCache against
    `--cache none`): per sample NFE and PSNR against the reference frames (capped at 100 dB,
    as in every report here); denoising time, speed-up and decision time per step.
python -m sencache.benchmarks.gpu_check_report figures gpu.json
    prints the headline figures of `sencache gpu-acceptance --out gpu.json` against their
    targets (README "GPU check"): drift kernel >= 80% of the HBM peak, decision <= 50 us per
    step, and the host syncs of the loop.
python -m sencache.benchmarks.gpu_check_report real-size real_size.json
    prints the figures of `python -m sencache.benchmarks.gpu_real_size` (the Wan 1.3B-size run),
    each with where it came from: the GPU it was measured on, or the CPU rehearsal at a tiny size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sencache.benchmarks.matched import PSNR_CAP
from sencache.benchmarks.metrics import psnr

BANDWIDTH_TARGET = 0.8
DECISION_TARGET_US = 50.0


def compare_runs(cached: Path, reference: Path) -> dict[str, Any]:
    """SenCache run `cached` against the uncached run `reference` of the same request."""
    a, b = (json.loads((folder / "stats.json").read_text()) for folder in (cached, reference))
    request = [(s["prompt"], s["seed"]) for s in a["samples"]]
    if request != [(s["prompt"], s["seed"]) for s in b["samples"]] or a["steps"] != b["steps"]:
        raise ValueError(f"{cached} and {reference} are not runs of the same prompts, seeds and steps")
    samples = []
    for ours, theirs in zip(a["samples"], b["samples"], strict=True):
        frames = np.load(cached / ours["frames"])
        samples.append(
            {
                "prompt": ours["prompt"],
                "seed": ours["seed"],
                "nfe": ours["nfe"],
                "reference_nfe": theirs["nfe"],
                "psnr_db": min(psnr(frames, np.load(reference / theirs["frames"])), PSNR_CAP),
            }
        )
    return {
        "model": a["model"],
        "backend": a["backend_detail"],
        "steps": a["steps"],
        "cache": a["cache"],
        "samples": samples,
        "mean_nfe": float(np.mean([s["nfe"] for s in samples])),
        "mean_psnr_db": float(np.mean([s["psnr_db"] for s in samples])),
        "denoise_s": a["timing"]["denoise_s"],
        "reference_denoise_s": b["timing"]["denoise_s"],
        "speedup": b["timing"]["denoise_s"] / a["timing"]["denoise_s"],
        "decision_us_per_step": a["timing"]["decision_s"] / a["steps"] * 1e6,
    }


def loop_lines(loop: dict[str, Any]) -> list[str]:
    return [
        f"{loop['model']} on {loop['backend']}: SenCache {loop['mean_nfe']:.1f}/{loop['steps']} NFE, "
        f"PSNR {loop['mean_psnr_db']:.2f} dB against --cache none, denoise {loop['denoise_s']:.3f} s vs "
        f"{loop['reference_denoise_s']:.3f} s ({loop['speedup']:.2f}x), decisions "
        f"{loop['decision_us_per_step']:.1f} us/step (one process each, cold)"
    ]


def figure_lines(gpu: dict[str, Any]) -> list[str]:
    """One line per figure of gpu.json, with its target where it has one."""
    kernel, decision, loop = gpu["kernel"], gpu["decision"], gpu["loop"]
    lines = [
        f"device {gpu['device']} ({gpu['arch']}), driver {gpu['driver']}, HBM peak "
        f"{kernel['peak_GBps'] or float('nan'):.0f} GB/s"
    ]
    for dtype, r in kernel["dtypes"].items():
        fraction = r["fraction_of_peak"]
        verdict = (
            "no peak known"
            if fraction is None
            else (f"{fraction:.0%} of peak, {'meets' if fraction >= BANDWIDTH_TARGET else 'MISSES'} >= 80%")
        )
        lines.append(
            f"drift kernel {dtype}: {r['bandwidth_GBps']:.0f} GB/s, {verdict}; {r['kernel_us']:.1f} us; "
            f"parity with the blocking model {'ok' if r['matches_blocking_model'] else 'FAILED'}, "
            f"max rel vs float64 {r['max_rel_vs_float64']:.1e}"
        )
    median = decision["median_us"]
    lines.append(
        f"decision: median {median:.1f} us, p90 {decision['p90_us']:.1f} us per step, "
        f"{'meets' if median <= DECISION_TARGET_US else 'MISSES'} <= 50 us; "
        f"{decision['host_syncs_per_step']} event wait per step"
    )
    if "skipped" in loop:
        lines.append(f"loop: skipped ({loop['skipped']})")
    else:
        lines.append(
            f"loop on {loop['backend']}: SenCache {loop['sencache']['nfe']:.1f} NFE, speed-up "
            f"{loop['speedup']:.2f}x, torch syncs per run {loop['none']['torch_syncs']} uncached / "
            f"{loop['sencache']['torch_syncs']} cached (UniPC syncs by itself); tiny-ltx flow Euler "
            f"syncs at 6 / 20 steps: {' / '.join(str(v) for v in loop['flow_euler_syncs'].values())} "
            f"({'equal: the loop adds none per step' if len(set(loop['flow_euler_syncs'].values())) == 1 else 'DIFFER'})"  # noqa: E501
        )
    return lines


def real_size_lines(run: dict[str, Any]) -> list[str]:
    """One line per part of a gpu_real_size document, each saying where its figures came from."""
    where = "REHEARSAL on the CPU at a tiny size, not GPU figures" if run["rehearsal"] else run["source"]
    lines = [
        f"real size [{where}]: {run['model']} ({run['weights']}, {run['blocks']} blocks) {run['precision']} "
        f"at {run['resolution']} (latent {'x'.join(map(str, run['latent_per_sample']))}), "
        f"loaded in {run['load_s']:.1f} s"
        + ("; random weights: the timings hold, the NFE says nothing of a trained model's" if run["dummy"] else "")
    ]
    for name in ("calibration", "runs", "drift_kernel", "rows"):
        part = run.get(name)
        if part is None:
            lines.append(f"  {name}: missing (the run stopped before it)")
        elif "not_run" in part:
            lines.append(f"  {name}: not run ({part['not_run']})")
        else:
            lines += [f"  {line}" for line in _PARTS[name](part)]
    return lines


def _calibration(part: dict[str, Any]) -> list[str]:
    return [f"calibration: {part['samples']} sample x {part['steps']} steps in {part['calibrate_s']:.1f} s"]


def _runs(part: dict[str, Any]) -> list[str]:
    lines = []
    for method in ("uncached", "sencache"):
        if method not in part:
            lines.append(f"{method}: not run (no calibration table)")
            continue
        r = part[method]
        syncs = "" if r["torch_syncs"] is None else f", {r['torch_syncs']} syncs PyTorch saw"
        lines.append(
            f"{method}: {r['per_step_s']:.3f} s/step ({r['rows_per_step']} rows), NFE {r['nfe']}/{r['steps']}, "
            f"decision {r['decision_us_per_step']:.1f} us/step, {r['drift_readbacks_per_step']:.2f} drift "
            f"read-backs (event waits) per step{syncs}"
        )
    if "speedup" in part:
        lines.append(f"SenCache speed-up {part['speedup']:.2f}x")
    return lines


def _drift_kernel(part: dict[str, Any]) -> list[str]:
    return [
        f"drift: {part['bandwidth_GBps']:.0f} GB/s, {part['per_launch_us']:.1f} us per launch on "
        f"{part['samples']} x {'x'.join(map(str, part['latent_per_sample']))} {part['dtype']} ({part['measured_by']})"
    ]


def _rows(part: dict[str, Any]) -> list[str]:
    curve = part["curve"]
    points = ", ".join(
        f"{rows}: {c['pass_s']:.3f} s ({c['per_row_vs_first']:.2f}x per row)" for rows, c in curve.items()
    )
    return [f"pass time against rows through the step engine: {points}"]


_PARTS = {"calibration": _calibration, "runs": _runs, "drift_kernel": _drift_kernel, "rows": _rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check_report", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    loop = sub.add_parser("loop", help="compare a SenCache run with the uncached run of the same request")
    loop.add_argument("cached", type=Path)
    loop.add_argument("reference", type=Path)
    loop.add_argument("--out", type=Path, help="also write the comparison as JSON here")
    figures = sub.add_parser("figures", help="the headline figures of gpu-acceptance's JSON")
    figures.add_argument("gpu_json", type=Path)
    real = sub.add_parser("real-size", help="the figures of the real-size run's JSON")
    real.add_argument("real_size_json", type=Path)
    args = p.parse_args(argv)
    if args.command == "loop":
        result = compare_runs(args.cached, args.reference)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        print("\n".join(loop_lines(result)))
    elif args.command == "real-size":
        print("\n".join(real_size_lines(json.loads(args.real_size_json.read_text()))))
    else:
        print("\n".join(figure_lines(json.loads(args.gpu_json.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
