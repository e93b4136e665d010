"""sencache-online against SenCache and the best fixed schedule, on held-out prompts and seeds.

    python -m sencache.benchmarks.online --engine bundles/tiny-wan --out benchmarks/results/online/tiny-wan

1. Tune: the online knobs (online_rate x online_bound) are chosen on a draw of grammar prompts and
   seeds that is neither the evaluation set nor the calibration set: the setting whose PSNR
   envelope beats SenCache's by most, averaged over matched NFE in the band below.
2. Evaluate on bench's evaluation set (prompts drawn with EVAL_PROMPT_SEED, seeds 0..n-1): the
   uncached reference, SenCache's eps sweep, the fixed schedules (warm-up W, then every k-th
   step, over several W and k: the best of them at each NFE is the envelope) and the online
   rule's eps sweep; PSNR differences at matched NFE inside 40%..70% of the steps with bootstrap
   intervals over samples (`matched.compare_at_matched_nfe`), and NFE per sample grouped by the
   prompt's background and object count.

Writes report.json and report.md into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.benchmarks.bench import EVAL_PROMPT_SEED, BenchPlan, Runner
from sencache.benchmarks.matched import PSNR_CAP, compare_at_matched_nfe
from sencache.benchmarks.metrics import psnr
from sencache.benchmarks.report import comparison_lines
from sencache.data.grammar import BACKGROUNDS, COUNTS, grammar_prompts
from sencache.runtime.files import write_atomic
from sencache.runtime.model import Model

TUNE_PROMPT_SEED = 7
"""Tuning prompts are drawn with this seed (evaluation: EVAL_PROMPT_SEED; calibration: 1000)."""
TUNE_SEED_OFFSET = 100
"""Tuning samples use seeds 100, 101, ... (evaluation: 0, 1, ...)."""
BAND = (0.4, 0.7)
"""The NFE band of the target, as fractions of the steps."""
EPS = (0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0)
"""Default eps_main sweep of both SenCache rules (the same grid for both)."""
FIXED = tuple((w, k) for w in (3, 6) for k in (2, 3, 4))
"""Fixed schedules: all of the first W steps, then every k-th."""


def difficulty(prompt: str) -> tuple[str, str]:
    """A grammar prompt's background and object count ("three small red squares ... on texture")."""
    words = prompt.split()
    if words[0] not in COUNTS or words[-1] not in BACKGROUNDS:
        raise ValueError(f"not a grammar prompt: {prompt!r}")
    return words[-1], words[0]


class Sweeper:
    """Runs settings of cache rules over one prompt set and scores them against its uncached run."""

    def __init__(
        self, engine: Model, prompts: list[str], seeds: list[int], steps: int, eps: tuple[float, ...] = EPS
    ) -> None:
        plan = BenchPlan((), tuple(prompts), tuple(seeds), steps, engine.bundle.manifest.defaults.guidance, False)
        self.runner, self.steps, self.eps = Runner(engine, plan), steps, eps
        self.reference = self.runner.run("none", {})["frames"]

    def run(self, label: str, method: str, knobs: dict[str, Any]) -> dict[str, Any]:
        measured = self.runner.run(method, knobs)
        scores = [min(psnr(a, b), PSNR_CAP) for a, b in zip(measured["frames"], self.reference, strict=True)]
        return {
            "method": label,
            "knobs": knobs,
            "nfe": [int(n) for n in measured["nfe"]],
            "psnr": scores,
            "mean_nfe": float(np.mean(measured["nfe"])),
            "mean_psnr": float(np.mean(scores)),
        }

    def sencache(self, method: str, knobs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return [self.run(method, method, {**(knobs or {}), "eps_main": e}) for e in self.eps]

    def fixed(self) -> list[dict[str, Any]]:
        return [self.run("fixed-warmup", "fixed", {"interval": k, "warmup": w}) for w, k in FIXED]


def band_mean(comparison: dict[str, Any], baseline: str) -> float:
    """The mean PSNR difference over the matched-NFE points of `baseline` (NaN if none)."""
    points = comparison.get("baselines", {}).get(baseline, {}).get("points", [])
    return float(np.mean([p["psnr_diff_db"] for p in points])) if points else float("nan")


def compare(runs: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """sencache-online minus each other method at matched NFE inside BAND."""
    return compare_at_matched_nfe(
        runs, steps, reference="sencache-online", nfe_range=(BAND[0] * steps, BAND[1] * steps)
    )


def tune(
    engine: Model, steps: int, samples: int, eps: tuple[float, ...], grid: list[tuple[float, float]]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The online knobs of `grid` ((online_rate, online_bound) pairs) that beat SenCache by most
    on the tuning draw, and every setting's score; a grid of one setting is taken untried."""
    if len(grid) == 1:
        return {"online_rate": grid[0][0], "online_bound": grid[0][1]}, []
    prompts = grammar_prompts(samples, TUNE_PROMPT_SEED)
    sweeper = Sweeper(engine, prompts, [TUNE_SEED_OFFSET + i for i in range(samples)], steps, eps)
    baseline = sweeper.sencache("sencache")
    tried = []
    for rate, bound in grid:
        knobs = {"online_rate": rate, "online_bound": bound}
        runs = sweeper.sencache("sencache-online", knobs)
        gain = band_mean(compare(baseline + runs, steps), "sencache")
        tried.append({"knobs": knobs, "mean_gain_vs_sencache_db": gain})
        print(f"tune {knobs}: {gain:+.3f} dB vs sencache on the tuning draw", flush=True)
    scored = [t for t in tried if np.isfinite(t["mean_gain_vs_sencache_db"])]
    best = max(scored, key=lambda t: t["mean_gain_vs_sencache_db"]) if scored else tried[0]
    return dict(best["knobs"]), tried


def nfe_by_group(prompts: list[str], run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean NFE and PSNR of a run's samples by background and by object count."""
    groups: dict[str, dict[str, list[int]]] = {"background": {}, "count": {}}
    for i, prompt in enumerate(prompts):
        background, count = difficulty(prompt)
        groups["background"].setdefault(background, []).append(i)
        groups["count"].setdefault(count, []).append(i)
    return {
        f"{kind}={value}": {
            "samples": len(idx),
            "mean_nfe": float(np.mean([run["nfe"][i] for i in idx])),
            "mean_psnr": float(np.mean([run["psnr"][i] for i in idx])),
        }
        for kind, members in groups.items()
        for value, idx in sorted(members.items())
    }


def nearest(runs: list[dict[str, Any]], method: str, nfe: float) -> dict[str, Any]:
    return min((r for r in runs if r["method"] == method), key=lambda r: abs(r["mean_nfe"] - nfe))


def measure(
    engine: Model,
    steps: int,
    samples: int,
    tune_samples: int,
    eps: tuple[float, ...] = EPS,
    grid: list[tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Tune (over `grid`), then evaluate on the held-out set; the report document."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    knobs, tried = tune(engine, steps, tune_samples, eps, grid or [(0.5, 4.0)])
    prompts = grammar_prompts(samples, EVAL_PROMPT_SEED)
    seeds = list(range(samples))
    sweeper = Sweeper(engine, prompts, seeds, steps, eps)
    runs = sweeper.sencache("sencache") + sweeper.fixed() + sweeper.sencache("sencache-online", knobs)
    comparison = compare(runs, steps)
    middle = 0.5 * (BAND[0] + BAND[1]) * steps
    spread = {m: nfe_by_group(prompts, nearest(runs, m, middle)) for m in ("sencache-online", "sencache")}
    return {
        "model": engine.preset.name,
        "steps": steps,
        "guidance": engine.bundle.manifest.defaults.guidance,
        "band_nfe": [BAND[0] * steps, BAND[1] * steps],
        "evaluation": {"prompts": prompts, "seeds": seeds, "prompt_seed": EVAL_PROMPT_SEED},
        "tuning": {
            "prompts": grammar_prompts(tune_samples, TUNE_PROMPT_SEED),
            "seeds": [TUNE_SEED_OFFSET + i for i in range(tune_samples)],
            "tried": tried,
            "chosen": knobs,
        },
        "calibration_prompts": engine.bundle.sensitivity().meta.get("prompts"),
        "runs": runs,
        "comparison": comparison,
        "nfe_by_group": {m: {"run_mean_nfe": nearest(runs, m, middle)["mean_nfe"], **g} for m, g in spread.items()},
        "seconds": time.perf_counter() - started,
    }


def markdown(report: dict[str, Any]) -> str:
    steps, (lo, hi) = report["steps"], report["band_nfe"]
    lines = [
        f"# {report['model']}: sencache-online, {len(report['evaluation']['prompts'])} held-out prompts, {steps} steps",
        "",
        f"Online knobs: {report['tuning']['chosen']} "
        + (
            "(set, not tuned)."
            if not report["tuning"]["tried"]
            else "(chosen on the tuning draw; tried: "
            + "; ".join(f"{t['knobs']} {t['mean_gain_vs_sencache_db']:+.2f} dB" for t in report["tuning"]["tried"])
            + ")."
        ),
        "",
        "| method | knobs | NFE | PSNR dB |",
        "| --- | --- | ---: | ---: |",
    ]
    for r in report["runs"]:
        knobs = ", ".join(f"{k}={v:g}" for k, v in r["knobs"].items())
        lines.append(f"| {r['method']} | {knobs} | {r['mean_nfe']:.2f} | {r['mean_psnr']:.2f} |")
    lines += comparison_lines(
        f"sencache-online (NFE in [{lo:g}, {hi:g}], best envelope of each method)", report["comparison"]
    )
    lines += ["", "NFE and PSNR by prompt group (the run of each rule nearest the band's middle):", ""]
    lines += ["| group | samples | " + " | ".join(f"{m} NFE | {m} PSNR" for m in report["nfe_by_group"]) + " |"]
    lines += ["| --- | ---: |" + " ---: | ---: |" * len(report["nfe_by_group"])]
    methods = list(report["nfe_by_group"])
    groups = [g for g in report["nfe_by_group"][methods[0]] if g != "run_mean_nfe"]
    means = " | ".join(f"{report['nfe_by_group'][m]['run_mean_nfe']:.2f} |" for m in methods)
    lines.append(f"| (run mean NFE) | | {means}")
    for g in groups:
        cells = " | ".join(
            f"{report['nfe_by_group'][m][g]['mean_nfe']:.2f} | {report['nfe_by_group'][m][g]['mean_psnr']:.2f}"
            for m in methods
        )
        lines.append(f"| {g} | {report['nfe_by_group'][methods[0]][g]['samples']} | {cells} |")
    lines += ["", f"Measured in {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=16, help="held-out evaluation samples")
    parser.add_argument("--tune-samples", type=int, default=8, help="samples of the tuning draw")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eps", type=float, nargs="+", default=list(EPS), help="eps_main sweep of both rules")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5], help="online_rate values to tune over")
    parser.add_argument("--bounds", type=float, nargs="+", default=[4.0], help="online_bound values to tune over")
    args = parser.parse_args()
    engine = Model.open(args.engine, threads=1)
    grid = [(rate, bound) for rate in args.rates for bound in args.bounds]
    report = measure(engine, args.steps, args.samples, args.tune_samples, tuple(args.eps), grid)
    write_atomic(args.out / "report.json", json.dumps(report, indent=1).encode())
    text = markdown(report)
    write_atomic(args.out / "report.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
