"""Measure SenCache's NFE budgets (issue 12) on held-out prompts: requested against achieved NFE
for the threshold mode at the calibration's step count and others, the hard mode's exactness, and
the quality (PSNR against the uncached video) of both modes at the same mean NFE.

    python -m sencache.benchmarks.budget --engine bundles/tiny-wan --out benchmarks/results/budget/tiny-wan

Writes budget.json, budget.md and requested_vs_achieved.png into `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.benchmarks.bench import BenchPlan, Runner, evaluation_set
from sencache.benchmarks.matched import PSNR_CAP
from sencache.benchmarks.metrics import psnr
from sencache.runtime.cache.knobs import SPEEDS
from sencache.runtime.errors import BadInput
from sencache.runtime.files import write_atomic
from sencache.runtime.model import Model


def _row(steps: int, mode: str, requested: int, measured: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    nfe = [int(n) for n in measured["nfe"]]
    psnrs = [min(psnr(a, b), PSNR_CAP) for a, b in zip(measured["frames"], reference["frames"], strict=True)]
    return {
        "steps": steps,
        "mode": mode,
        "requested_nfe": requested,
        "nfe": nfe,
        "mean_nfe": float(np.mean(nfe)),
        "error": float(np.mean(nfe)) - requested,
        "relative_error": (float(np.mean(nfe)) - requested) / requested,
        "exact": all(n == requested for n in nfe),
        "mean_psnr": float(np.mean(psnrs)),
    }


def measure(
    engine: Model, prompts: list[str], seeds: list[int], step_counts: list[int], speeds: list[str]
) -> dict[str, Any]:
    """Every budget of the named speeds at every step count, in both modes, against the uncached
    run of the same prompts and seeds; at the calibration's step count, the hard mode also at the
    threshold mode's achieved mean NFE (rounded), so the two compare at the same NFE."""
    torch.set_num_threads(1)
    defaults = engine.bundle.manifest.defaults
    calibrated = int(engine.bundle.sensitivity().meta.get("steps", engine.bundle.manifest.defaults.steps))
    rows: list[dict[str, Any]] = []
    for steps in step_counts:
        runner = Runner(
            engine,
            BenchPlan(
                ("sencache",),
                tuple(prompts),
                tuple(seeds),
                steps,
                defaults.guidance,
                False,
                guidance_2=defaults.guidance_2,
            ),
        )
        reference = runner.run("none", {})
        for speed in speeds:
            target = round(SPEEDS[speed] * steps)
            try:
                threshold = _row(steps, "threshold", target, runner.run("sencache", {"nfe": target}), reference)
            except BadInput as e:
                rows.append({"steps": steps, "mode": "threshold", "requested_nfe": target, "refused": str(e)})
                threshold = None
            else:
                rows.append({**threshold, "speed": speed})
            hard = _row(steps, "hard", target, runner.run("sencache", {"nfe": target, "budget": "hard"}), reference)
            rows.append({**hard, "speed": speed})
            matched = None if threshold is None else round(threshold["mean_nfe"])
            if steps == calibrated and matched is not None and matched != target:
                knobs = {"nfe": matched, "budget": "hard"}
                rows.append({**_row(steps, "hard", matched, runner.run("sencache", knobs), reference), "speed": speed})
            print(json.dumps(rows[-1]), flush=True)
    return {
        "model": engine.preset.name,
        "calibration_steps": calibrated,
        "curve_steps": list(engine.bundle.sensitivity().budget_curves().steps),
        "prompts": prompts,
        "seeds": seeds,
        "calibration_prompts": engine.bundle.sensitivity().meta.get("prompts"),
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['model']}: NFE budgets on {len(report['prompts'])} held-out prompts",
        "",
        f"Calibrated at {report['calibration_steps']} steps; curves recorded at {report['curve_steps']} steps. "
        "PSNR against the uncached video of the same prompt and seed.",
        "",
        "| steps | mode | speed | requested NFE | mean NFE | min..max | error | PSNR dB |",
        "| ---: | --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in report["rows"]:
        if "refused" in r:
            lines.append(f"| {r['steps']} | {r['mode']} | | {r['requested_nfe']} | refused: {r['refused']} | | | |")
            continue
        lines.append(
            f"| {r['steps']} | {r['mode']} | {r['speed']} | {r['requested_nfe']} | {r['mean_nfe']:.2f} | "
            f"{min(r['nfe'])}..{max(r['nfe'])} | {r['error']:+.2f} ({r['relative_error'] * 100:+.1f}%) | "
            f"{r['mean_psnr']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    rows = [r for r in report["rows"] if "refused" not in r]
    for (steps, mode), marker in zip(
        sorted({(r["steps"], r["mode"]) for r in rows}), ["o", "s", "^", "v", "D", "x", "P", "*"], strict=False
    ):
        chosen = [r for r in rows if r["steps"] == steps and r["mode"] == mode]
        ax.scatter(
            [r["requested_nfe"] for r in chosen],
            [r["mean_nfe"] for r in chosen],
            marker=marker,
            label=f"{mode}, {steps}",
        )
    top = max(r["steps"] for r in rows)
    ax.plot([0, top], [0, top], color="grey", lw=0.8)
    ax.set_xlabel("requested NFE")
    ax.set_ylabel("achieved mean NFE")
    ax.set_title(f"{report['model']}: NFE budgets, {len(report['prompts'])} held-out prompts")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--engine", type=Path, required=True)
    args.add_argument("--out", type=Path, required=True)
    args.add_argument("--samples", type=int, default=8)
    args.add_argument("--steps", type=int, action="append", help="step counts (default: calibration's, 2/3 and 3/2)")
    args.add_argument("--speed", action="append", choices=tuple(SPEEDS), help="budgets (default: every named speed)")
    parsed = args.parse_args(argv)
    engine = Model.open(parsed.engine, threads=1)
    bundle = engine.bundle
    prompts, seeds = evaluation_set(parsed.samples, None, None)
    calibrated = int(bundle.sensitivity().meta.get("steps", bundle.manifest.defaults.steps))
    step_counts = parsed.steps or [calibrated, round(calibrated * 2 / 3), round(calibrated * 3 / 2)]
    report = measure(engine, prompts, seeds, step_counts, parsed.speed or list(SPEEDS))
    parsed.out.mkdir(parents=True, exist_ok=True)
    write_atomic(parsed.out / "budget.json", json.dumps(report, indent=1).encode())
    write_atomic(parsed.out / "budget.md", markdown(report).encode())
    plot(report, parsed.out / "requested_vs_achieved.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
