"""How much a per-sample plan could gain with hindsight of each sample's own reuse costs.

sencache-plan plans over the calibration's mean costs, cost[a, i] = E_b[c_b(a, i)] x G_i, where
c_b(a, i) is the mean squared change of sample b's guided output from step a to step i along its
uncached trajectory and G_i the gain from an output error at step i to the final latent, pooled over
the calibration's samples (`sencache.calibration.calibrate.reuse_costs`). On one draw, this measures
at each budget K (every sample exactly K runs) the PSNR against the uncached video of:

- sencache-plan: the rule as it runs (re-planning each sample from its drift where the bundle's
  costs allow);
- shared schedule: the calibration's one schedule for every sample;
- draw's mean: one schedule over this draw's own mean costs (in-sample: what a shared schedule
  could reach if the calibration had been this draw);
- own changes: each sample planned over its own c_b and the draw's pooled G;
- own changes and gains: each sample planned over its own c_b and its own G_b,i (its final latent's
  mean squared change when step i alone is reused, over c_b(i - 1, i)): the cost of reusing any one
  step, known exactly.

The last three know what no rule knows while it runs: they say where a per-sample rule's headroom
lies. They are measured on the draws already looked at only, so the fresh draws stay unseen.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.benchmarks.matched import BOOTSTRAP, PSNR_CAP
from sencache.benchmarks.metrics import psnr
from sencache.benchmarks.online import DEV_DRAW, LOOKED_AT_DRAWS, Draw
from sencache.calibration.calibrate import output_changes, reuse_effects
from sencache.runtime.cache import NoCache
from sencache.runtime.cache.base import StepDecision
from sencache.runtime.cache.plan import SenCachePlanPolicy, plan_schedule
from sencache.runtime.files import write_atomic
from sencache.runtime.model import Model
from sencache.runtime.prediction import predict
from sencache.runtime.preparation import sample_generators
from sencache.runtime.request import GenerationParams

RULE = "sencache-plan"
HINDSIGHT = ("shared schedule", "draw's mean", "own changes", "own changes and gains")
"""The hindsight plans, in the order they know more of each sample."""


@dataclass(frozen=True)
class Hindsight:
    """What one draw's uncached runs say of each sample's reuse costs."""

    changes: np.ndarray
    """[samples, a, i]: c_b(a, i), the mean squared change of the guided output from step a to i."""
    moved: np.ndarray
    """[samples, steps]: the final latent's mean squared change when step i alone is reused (0 at
    step 0, which always runs)."""
    frames: list[np.ndarray]
    """The uncached videos."""


class Schedules:
    """Each sample runs the steps of its own schedule: runs[b, step]."""

    name = "schedules"
    needs_drift = False
    deterministic_drift = False
    needs_modulation = False
    may_reuse = True

    def __init__(self, runs: np.ndarray, forced: np.ndarray) -> None:
        self.runs = np.asarray(runs, dtype=bool)
        self.forced = np.asarray(forced, dtype=bool)

    def settings(self) -> dict[str, Any]:
        return {"method": self.name}

    def warnings(self) -> list[str]:
        return []

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation_change: np.ndarray | None = None
    ) -> StepDecision:
        batch = len(self.runs)
        return StepDecision(self.runs[:, step].copy(), np.full(batch, np.nan), math.nan, bool(self.forced[step]))


def chunks_of(engine: Model, draw: Draw, samples: int) -> list[tuple[list[str], list[int]]]:
    """The draw's first `samples` prompts and seeds, in batches the bundle takes."""
    prompts, seeds = draw.prompts(samples), draw.seeds(samples)
    batch = engine.bundle.shapes.max_batch
    return [(prompts[i : i + batch], seeds[i : i + batch]) for i in range(0, samples, batch)]


def measure(engine: Model, chunks: list[tuple[list[str], list[int]]], steps: int) -> Hindsight:
    """Each sample's output changes along its uncached run, and its final latent's change when each
    step alone is reused (forked from that run, as calibration measures the gains)."""
    guidance = engine.bundle.manifest.defaults.guidance
    changes, finals, frames = [], [], []
    for prompts, seeds in chunks:
        run = engine.generate(GenerationParams(prompts, seeds, steps, guidance), NoCache(len(prompts)), record=True)
        assert run.trajectory is not None, "record=True keeps the trajectory"
        conditions = engine.conditions(None, sample_generators(seeds))
        text = engine.encode(prompts)
        uncond = engine.encode([""] * len(prompts)) if guidance > 1.0 else None
        guided = [
            predict(engine, x, np.full(len(x), t, np.float32), text, uncond, guidance, conditions).guided
            for x, t in zip(run.trajectory, run.timesteps, strict=True)
        ]
        changes.append(output_changes(np.stack([g.reshape(len(g), -1) for g in guided])))
        finals.append(np.asarray(run.latents))
        frames += list(engine.decode(run.latents))
    moved = reuse_effects(engine, chunks, finals, steps, guidance, "engine", [(0, 0, steps)], show_progress=True).moved
    return Hindsight(np.concatenate(changes), np.concatenate(moved), frames)


def hindsight_plans(
    seen: Hindsight, shared: np.ndarray, forced: np.ndarray, max_reuse: int, runs: int
) -> dict[str, np.ndarray]:
    """HINDSIGHT's schedules of `runs` runs, [samples, steps] each (`shared`: the calibration's)."""
    samples, steps = seen.moved.shape
    one_step = np.zeros((samples, steps))
    one_step[:, 1:] = seen.changes[:, np.arange(steps - 1), np.arange(1, steps)]
    pooled = np.divide(seen.moved.sum(axis=0), one_step.sum(axis=0), out=np.zeros(steps), where=one_step.sum(0) > 0)
    own = np.divide(seen.moved, one_step, out=np.zeros_like(one_step), where=one_step > 0)

    def plan(cost: np.ndarray) -> np.ndarray:
        schedule = plan_schedule(np.triu(cost, k=1), runs, forced, max_reuse)
        assert schedule is not None, "the shared schedule exists under the same forced steps and max_reuse"
        return schedule

    mean = plan(seen.changes.mean(axis=0) * pooled[None])
    return {
        "shared schedule": np.tile(shared, (samples, 1)),
        "draw's mean": np.tile(mean, (samples, 1)),
        "own changes": np.stack([plan(c * pooled[None]) for c in seen.changes]),
        "own changes and gains": np.stack([plan(c * g[None]) for c, g in zip(seen.changes, own, strict=True)]),
    }


def _scores(engine: Model, frames: list[np.ndarray], reference: list[np.ndarray]) -> list[float]:
    return [min(psnr(a, b), PSNR_CAP) for a, b in zip(frames, reference, strict=True)]


def run_budget(
    engine: Model, chunks: list[tuple[list[str], list[int]]], seen: Hindsight, steps: int, runs: int
) -> dict[str, Any]:
    """sencache-plan and each hindsight plan at `runs` runs: per-sample NFE and PSNR, and each minus
    sencache-plan with its paired bootstrap interval."""
    guidance = engine.bundle.manifest.defaults.guidance
    rows: dict[str, dict[str, list[float]]] = {}
    frames, nfe, shared = [], [], None
    for prompts, seeds in chunks:
        policy = engine.policy(RULE, steps, len(prompts), {"nfe": runs})
        assert isinstance(policy, SenCachePlanPolicy), "a one-expert bundle's sencache-plan"
        shared, forced, max_reuse = policy.schedule, policy.forced, policy.max_reuse
        result = engine.generate(GenerationParams(prompts, seeds, steps, guidance), policy)
        frames += list(engine.decode(result.latents))
        nfe += result.nfe
    rows[RULE] = {"nfe": nfe, "psnr": _scores(engine, frames, seen.frames)}
    assert shared is not None, "the draw has samples"
    for name, schedules in hindsight_plans(seen, shared, forced, max_reuse, runs).items():
        frames, nfe, start = [], [], 0
        for prompts, seeds in chunks:
            own = Schedules(schedules[start : start + len(prompts)], forced)
            result = engine.generate(GenerationParams(prompts, seeds, steps, guidance), own)
            frames += list(engine.decode(result.latents))
            nfe += result.nfe
            start += len(prompts)
        rows[name] = {"nfe": nfe, "psnr": _scores(engine, frames, seen.frames)}
    base = np.array(rows[RULE]["psnr"])
    draws = np.random.default_rng(0).integers(0, len(base), size=(BOOTSTRAP, len(base)))
    out: dict[str, Any] = {"nfe": runs, "rules": {}}
    for name, row in rows.items():
        diff = np.array(row["psnr"]) - base
        low, high = np.percentile(diff[draws].mean(axis=1), [2.5, 97.5])
        out["rules"][name] = {
            **row,
            "mean_nfe": float(np.mean(row["nfe"])),
            "mean_psnr": float(np.mean(row["psnr"])),
            "minus_rule_db": float(diff.mean()),
            "ci95": [float(low), float(high)],
        }
        print(f"  K={runs} {name}: PSNR {np.mean(row['psnr']):.2f} dB, {diff.mean():+.2f} [{low:+.2f}, {high:+.2f}]")
    return out


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as markdown: PSNR of each plan, and its difference from sencache-plan."""
    names = [RULE, *HINDSIGHT]
    lines = [
        f"# Per-sample headroom of sencache-plan: {report['engine']}, {report['draw']} ({report['samples']} samples, "
        f"{report['steps']} steps)",
        "",
        "PSNR dB against the uncached video; each plan minus sencache-plan, 95% paired bootstrap interval. "
        "Every sample runs exactly K steps under every plan.",
        "",
        "| K | " + " | ".join(names) + " |",
        "| ---: |" + " --- |" * len(names),
    ]
    for budget in report["budgets"]:
        cells = []
        for name in names:
            row = budget["rules"][name]
            cell = f"{row['mean_psnr']:.2f}"
            if name != RULE:
                cell += f" ({row['minus_rule_db']:+.2f} [{row['ci95'][0]:+.2f}, {row['ci95'][1]:+.2f}])"
            cells.append(cell)
        lines.append(f"| {budget['nfe']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, required=True, help="a calibrated bundle of one expert")
    parser.add_argument("--out", type=Path, required=True)
    known = {d.name: d for d in (DEV_DRAW, *LOOKED_AT_DRAWS)}
    parser.add_argument("--draw", choices=sorted(known), required=True, help="a draw already looked at")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nfe", type=int, nargs="+", required=True, help="the budgets K, runs per sample")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.samples < 2:
        parser.error("--samples: a bootstrap needs at least 2")
    torch.set_num_threads(args.threads)
    engine = Model.open(args.engine, threads=args.threads)
    if engine.bundle.manifest.experts != 1:
        parser.error("--engine: the headroom is measured on bundles of one expert")
    chunks = chunks_of(engine, known[args.draw], args.samples)
    seen = measure(engine, chunks, args.steps)
    report = {
        "engine": engine.bundle.manifest.model,
        "draw": args.draw,
        "samples": args.samples,
        "steps": args.steps,
        "budgets": [run_budget(engine, chunks, seen, args.steps, k) for k in args.nfe],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "report.json", json.dumps(report, indent=1).encode())
    write_atomic(args.out / "report.md", "\n".join(report_lines(report)).encode())
    print(f"wrote {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
