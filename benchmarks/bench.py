"""`sencache bench`: sweep each cache method's knob on one bundle and compare at matched NFE.

Every run uses the same engine, prompts, seeds and steps; only the decision rule differs. Quality
is measured against the uncached video of the same prompt and seed (PSNR, SSIM; LPIPS is
reported as unavailable: its backbone weights cannot be fetched here). Speed is measured in the
same process with one CPU thread after a warm-up: denoising wall time, decision overhead per step,
and the loop's distance from its floor NFE x t(run step) + (steps - NFE) x t(reuse step).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sencache.benchmarks.diffusers_peers import PEERS, DiffusersPeers
from sencache.benchmarks.flops import stage_flops
from sencache.benchmarks.matched import PSNR_CAP, compare_at_matched_nfe
from sencache.benchmarks.metrics import psnr, ssim
from sencache.benchmarks.report import write_markdown, write_plot
from sencache.engine_builder.tiny.grammar import grammar_prompts
from sencache.runtime.cache import NoCache
from sencache.runtime.cache.knobs import SPEEDS
from sencache.runtime.errors import BadInput
from sencache.runtime.files import check_replaceable, staged_folder, write_atomic
from sencache.runtime.model import Model
from sencache.runtime.request import Request
from sencache.runtime.tiny_text import tokenize

REPORT = "report.json"
KIND = "bench report"


def real_models(engine: Model) -> list[str]:
    """The real presets of the bundle's family, whose head + tail share of a step the report
    estimates by counting FLOPs on the meta device."""
    return [name for name, preset in engine.adapter.presets.items() if not preset.tiny]


EVAL_PROMPT_SEED = 2024
"""Evaluation prompts are drawn with this seed; calibration draws with its own (1000 by default)."""

SWEEPS: dict[str, list[dict[str, Any]]] = {
    "sencache": [{"eps_main": e} for e in (0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5)],
    "sencache-max": [{"eps_main": e} for e in (0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5)],
    "fixed": [{"interval": k} for k in (2, 3, 4, 5)],
    "fixed-warmup": [{"interval": k, "warmup": -1} for k in (2, 3, 4, 5, 6)],
    "teacache": [{"threshold": t} for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)],
    "magcache": [{"threshold": t} for t in (0.02, 0.05, 0.1, 0.2, 0.4)],
    "diffusers-magcache": [{"threshold": t} for t in (0.02, 0.05, 0.1, 0.2, 0.4)],
    "diffusers-fbc": [{"threshold": t} for t in (0.02, 0.05, 0.1, 0.2)],
    "budget-threshold": [{"speed": s} for s in SPEEDS],
    "budget-hard": [{"speed": s, "budget": "hard"} for s in SPEEDS],
}
QUICK_SWEEPS: dict[str, list[dict[str, Any]]] = {
    "sencache": [{"eps_main": e} for e in (0.15, 0.3, 0.6)],
    "sencache-max": [{"eps_main": e} for e in (0.15, 0.3, 0.6)],
    "fixed": [{"interval": k} for k in (2, 3)],
    "fixed-warmup": [{"interval": k, "warmup": -1} for k in (2, 4)],
    "teacache": [{"threshold": t} for t in (0.1, 0.3)],
    "magcache": [{"threshold": t} for t in (0.05, 0.2)],
    "diffusers-magcache": [{"threshold": t} for t in (0.05, 0.2)],
    "diffusers-fbc": [{"threshold": t} for t in (0.05, 0.2)],
    "budget-threshold": [{"speed": s} for s in ("high", "fast")],
    "budget-hard": [{"speed": s, "budget": "hard"} for s in ("high", "fast")],
}
BUDGETS = ("budget-threshold", "budget-hard")
"""Sweeps of SenCache under an NFE budget (the named speeds) instead of thresholds: the report
gives the NFE each asked for next to the NFE it got."""


@dataclass(frozen=True)
class BenchPlan:
    methods: tuple[str, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    quick: bool


def evaluation_set(count: int, prompts_file: Path | None, seeds: list[int] | None) -> tuple[list[str], list[int]]:
    """Prompts (a file, one per line, or drawn from the grammar) paired with seeds."""
    if prompts_file is None and not 1 <= count <= 1024:
        raise BadInput(f"--samples must be in [1, 1024], got {count}")
    if prompts_file is not None:
        try:
            prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise BadInput(f"--prompts {prompts_file}: {e.strerror}") from None
        if not prompts:
            raise BadInput(f"--prompts {prompts_file}: no prompts in the file")
    else:
        prompts = grammar_prompts(count, EVAL_PROMPT_SEED)
    for prompt in prompts:
        tokenize(prompt)
    seeds = seeds or list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise BadInput(f"{len(prompts)} prompts but {len(seeds)} seeds: they pair up one to one")
    return prompts, seeds


def _knobs(method: str, knobs: dict[str, Any], steps: int) -> tuple[str, dict[str, Any]]:
    """The runtime method and its knobs (fixed-warmup is fixed with 20% of the steps always run;
    the budget sweeps are SenCache with an NFE budget)."""
    if method in BUDGETS:
        return "sencache", dict(knobs)
    if method == "fixed-warmup":
        return "fixed", {**knobs, "warmup": round(0.2 * steps)}
    return method, dict(knobs)


class Runner:
    """Runs one method setting over the evaluation set in batches, timing the denoising loop."""

    def __init__(self, engine: Model, plan: BenchPlan) -> None:
        self.engine, self.plan = engine, plan
        self.batch = engine.bundle.shapes.max_batch
        self.chunks = [
            (list(plan.prompts[i : i + self.batch]), list(plan.seeds[i : i + self.batch]))
            for i in range(0, len(plan.prompts), self.batch)
        ]

    def run(self, method: str, knobs: dict[str, Any]) -> dict[str, Any]:
        latents, frames, nfe, denoise_s, decision_s, budget = [], [], [], 0.0, 0.0, None
        for prompts, seeds in self.chunks:
            request = Request(prompts, seeds, self.plan.steps, self.plan.guidance)
            policy = self.engine.policy(method, request.steps, len(prompts), knobs)
            result = self.engine.generate(request, policy)
            budget = policy.settings().get("budget")
            latents.extend(result.latents)
            frames.extend(self.engine.decode(result.latents))
            nfe.extend(result.nfe)
            denoise_s += result.timing["denoise_s"]
            decision_s += result.timing["decision_s"]
        return {
            "latents": np.stack(latents),
            "frames": frames,
            "nfe": nfe,
            "denoise_s": denoise_s,
            "decision_s": decision_s,
            "requested_nfe": None if budget is None else budget.get("nfe", budget.get("requested_nfe")),
        }

    def reuse_step_s(self, reuses: int = 10) -> float:
        """Seconds of one step in which every sample reuses (head, cached residual, tail), over all
        chunks: a run of 2 + `reuses` steps that reuses all but the forced first and last step,
        minus a run of those 2 steps alone, divided by `reuses`."""
        engine, (prompts, seeds) = self.engine, self.chunks[0]
        batch, steps = len(prompts), 2 + reuses

        def reusing() -> None:
            policy = engine.policy("fixed", steps, batch, {"interval": steps})
            engine.generate(Request(prompts, seeds, steps, self.plan.guidance), policy)

        def running() -> None:
            engine.generate(Request(prompts, seeds, 2, self.plan.guidance), NoCache(batch))

        reusing()
        return (self._timed(reusing) - self._timed(running)) / reuses * len(self.chunks)

    @staticmethod
    def _timed(fn, repeats: int = 3) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best


def run_bench(engine: Model, plan: BenchPlan, out: Path, show_progress: bool = True) -> dict[str, Any]:
    """Sweep, measure and write report.json, report.md and quality_vs_nfe.png into `out` (taken,
    locked and checked writable before the sweep; swapped in whole after it)."""
    torch.set_num_threads(1)
    if not engine.preset.trained:
        raise BadInput(f"{engine.preset.name} is untrained: quality figures on it would mean nothing")
    check_replaceable(out, KIND)
    unknown = [m for m in plan.methods if m not in SWEEPS]
    if unknown:
        raise BadInput(f"unknown method {unknown[0]!r} (choose from {', '.join(SWEEPS)})")
    engine.bundle.sensitivity()
    if {"teacache", "magcache"} & set(plan.methods):
        engine.bundle.baselines()
    if set(BUDGETS) & set(plan.methods):
        engine.bundle.sensitivity().budget_curves()
    with staged_folder(out, KIND) as folder:
        report = _measure(engine, plan, show_progress)
        write_atomic(folder / REPORT, json.dumps(report, indent=1).encode())
        write_markdown(report, folder / "report.md")
        write_plot(report, folder / "quality_vs_nfe.png")
    return report


def _measure(engine: Model, plan: BenchPlan, show_progress: bool) -> dict[str, Any]:
    """The sweep and its report document."""
    sweeps = QUICK_SWEEPS if plan.quick else SWEEPS
    runner = Runner(engine, plan)
    total = 1 + sum(len(sweeps[m]) for m in plan.methods)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not show_progress)
    runner.run("none", {})  # warm-up
    reference = runner.run("none", {})
    bar.update(1)
    steps, samples = plan.steps, len(plan.prompts)
    t_run = reference["denoise_s"] / steps
    t_reuse = runner.reuse_step_s()
    peers, peer_reference, parity = None, None, None
    if set(PEERS) & set(plan.methods):
        peers = DiffusersPeers(engine)
        meta = engine.bundle.sensitivity().meta
        calibration = (list(meta.get("prompts", plan.prompts))[:4], list(meta.get("seeds", plan.seeds))[:4])
        peer_reference = peers.run(
            "diffusers-none", {}, list(plan.prompts), list(plan.seeds), steps, plan.guidance, calibration
        )
        parity = float(np.max(np.abs(peer_reference["latents"] - reference["latents"])))
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for method in plan.methods:
        if method not in PEERS:
            # The cores are shared: re-time the uncached run next to each method's sweep, so each
            # speed-up compares runs measured minutes, not a quarter of an hour, apart.
            base_s = runner.run("none", {})["denoise_s"]
            t_run = base_s / steps
        for knobs in sweeps[method]:
            if method in PEERS:
                measured = peers.run(
                    method, knobs, list(plan.prompts), list(plan.seeds), steps, plan.guidance, calibration
                )
                measured["frames"] = list(engine.decode(measured["latents"]))
                runtime_knobs, decision_s, floor = dict(knobs), None, None
                base_s = peer_reference["denoise_s"]
            else:
                runtime_method, runtime_knobs = _knobs(method, knobs, steps)
                try:
                    measured = runner.run(runtime_method, runtime_knobs)
                except BadInput as e:
                    if method not in BUDGETS:
                        raise
                    # a budget the threshold rule cannot reach at these steps: said, not measured
                    skipped.append({"method": method, "knobs": runtime_knobs, "reason": str(e)})
                    bar.update(1)
                    continue
                decision_s = measured["decision_s"]
                floor = float(np.mean(measured["nfe"])) * t_run + (steps - float(np.mean(measured["nfe"]))) * t_reuse
            nfe = measured["nfe"]
            psnrs = [min(psnr(a, b), PSNR_CAP) for a, b in zip(measured["frames"], reference["frames"], strict=True)]
            ssims = [ssim(a, b) for a, b in zip(measured["frames"], reference["frames"], strict=True)]
            runs.append(
                {
                    "method": method,
                    "knobs": runtime_knobs,
                    "nfe": nfe,
                    "psnr": psnrs,
                    "ssim": ssims,
                    "lpips": None,
                    "requested_nfe": measured.get("requested_nfe"),
                    "mean_nfe": float(np.mean(nfe)),
                    "mean_psnr": float(np.mean(psnrs)),
                    "mean_ssim": float(np.mean(ssims)),
                    "denoise_s": measured["denoise_s"],
                    "decision_s": decision_s,
                    "uncached_s": base_s,
                    "speedup": base_s / measured["denoise_s"],
                    "ideal_speedup": steps * samples / float(np.sum(nfe)),
                    "decision_per_step_s": None if decision_s is None else decision_s / (steps * len(runner.chunks)),
                    "floor_s": floor,
                }
            )
            bar.update(1)
    bar.close()
    comparison = compare_at_matched_nfe(runs, steps)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "backend": engine.backend.describe(),
        },
        "model": engine.preset.name,
        "steps": steps,
        "guidance": plan.guidance,
        "prompts": list(plan.prompts),
        "seeds": list(plan.seeds),
        "calibration_prompts": engine.bundle.sensitivity().meta.get("prompts"),
        "metrics": {
            "psnr": f"per video over all frames and channels, data range 1, capped at {PSNR_CAP:g} dB",
            "ssim": "Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03, per frame and channel, averaged",
            "lpips": "unavailable: no LPIPS backbone weights on this machine",
        },
        "reference": {
            "denoise_s": reference["denoise_s"],
            "run_step_s": reference["denoise_s"] / steps,
            "reuse_step_s": t_reuse,
            "head_tail_share": t_reuse / (reference["denoise_s"] / steps),
        },
        "diffusers_reference": None
        if peer_reference is None
        else {
            "denoise_s": peer_reference["denoise_s"],
            "max_abs_latent_diff_vs_ours": parity,
            "note": "diffusers' WanPipeline on the PyTorch path, one sample per call; peers' speed-ups are "
            "against this run, their quality against our uncached video",
        },
        "flops": {name: stage_flops(name) for name in (engine.preset.name, *real_models(engine))},
        "runs": runs,
        "skipped": skipped,
        "comparison": comparison,
    }
    return report
