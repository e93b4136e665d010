"""Measure the sensitivity table Jx(t), Jt(t) of a bundle (SPEC section 4).

Default source: the model's own uncached trajectories from a few prompts and seeds, so no data
set is needed. The prompts are the caller's or the model's default (`sencache.engine_builder.prompts`:
the tiny grammar for a tiny bundle, ordinary video prompts for a real model). For each step k of
each trajectory, with f the guided denoiser output exactly as inference computes it (same
backend, same text encoding, same timestep dtype):

    x'  = one solver step from x_k with f(x_k, t_k), from a fresh scheduler state
    Jx  = ||f(x', t_k) - f(x_k, t_k)|| / ||x' - x_k||
    Jt  = ||f(x_k, t_{k+1}) - f(x_k, t_k)|| / |t_{k+1} - t_k|

Norms are per sample; the table keeps the mean over samples, the spread and the count. With
`branch="cond"`, f is the conditional branch's output alone (also for the solver step), as the
authors' calibration measures it (vita-epfl/SenCache, `Wan2.1/sensitivity_calculation.py`: the
model is called with the prompt's context only); the trajectories stay the guided ones.

The same trajectories calibrate the baselines the way their authors do: TeaCache's polynomial
maps the relative L1 change of the modulated input between steps to that of the model output
(degree 4 least squares), and MagCache's ratios are the token-mean of ||r_k|| / ||r_{k-1}|| of
the blocks' residual r, per step.

They also give the NFE-budget curves (`sencache.runtime.cache.budget.record_curves`): the SenCache
rule, the code inference runs, replayed on them over a grid of eps at the calibration's steps, and
on further uncached trajectories of the same prompts and seeds at half and twice the steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from sencache.engine_builder.prompts import calibration_prompts
from sencache.runtime.cache import NoCache
from sencache.runtime.cache.base import relative_l1
from sencache.runtime.cache.baselines import BaselineTables
from sencache.runtime.cache.budget import record_curves
from sencache.runtime.cache.sencache import SenCachePolicy
from sencache.runtime.errors import BadInput
from sencache.runtime.manifest import MAX_STEPS
from sencache.runtime.model import Model, Prediction
from sencache.runtime.request import Request
from sencache.runtime.sensitivity import SensitivityTable

DEFAULT_SAMPLES = 8
BRANCHES = ("guided", "cond")


def _check_samples(samples: int) -> None:
    if not 1 <= samples <= 1024:
        raise BadInput(f"samples must be in [1, 1024] (default: one per prompt given), got {samples}", param="samples")


@dataclass(frozen=True)
class CalibrationPlan:
    samples: int | None = None
    """Trajectories (the prompts are taken in turn); None: one per given prompt, or DEFAULT_SAMPLES."""
    steps: int | None = None
    guidance: float | None = None
    seed: int = 1000
    batch: int = 4
    branch: str = "guided"
    """The output Jx, Jt measure: "guided" (what inference steps with) or "cond" (the authors')."""
    budget_steps: tuple[int, ...] | None = None
    """Further step counts whose uncached trajectories the NFE-budget curves are also recorded at;
    None: half and twice the calibration's steps."""

    def __post_init__(self) -> None:
        if self.branch not in BRANCHES:
            raise BadInput(f"branch must be one of {', '.join(BRANCHES)}, got {self.branch!r}", param="branch")
        if self.samples is not None:
            _check_samples(self.samples)
        if self.steps is not None and not 2 <= self.steps <= MAX_STEPS:
            raise BadInput(f"steps must be in [2, {MAX_STEPS}] for calibration, got {self.steps}", param="steps")
        if self.budget_steps is not None and not all(2 <= n <= MAX_STEPS for n in self.budget_steps):
            raise BadInput(
                f"budget_steps must each be in [2, {MAX_STEPS}], got {self.budget_steps}", param="budget_steps"
            )
        if not 0 <= self.seed < 2**63 - 2048:
            raise BadInput(f"seed must be in [0, 2^63 - 2048), got {self.seed}", param="seed")


def _norms(a: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a.reshape(len(a), -1).astype(np.float64), axis=1)


@dataclass
class Calibration:
    sensitivity: SensitivityTable
    baselines: BaselineTables


def calibrate(
    engine: Model,
    plan: CalibrationPlan,
    prompts: Sequence[str] | None = None,
    allow_tiny_vocabulary: bool = False,
    show_progress: bool = True,
) -> Calibration:
    """Measure Jx and Jt, and the baselines' tables, on `engine`'s own trajectories from `prompts`
    (None: the model's default); a real model refuses tiny-vocabulary prompts unless allowed."""
    manifest = engine.bundle.manifest
    steps = plan.steps or manifest.defaults.steps
    guidance = manifest.defaults.guidance if plan.guidance is None else plan.guidance
    samples = plan.samples or (DEFAULT_SAMPLES if prompts is None else max(1, len(prompts)))
    _check_samples(samples)
    chosen = calibration_prompts(
        engine.preset.tiny, engine.preset.name, samples, plan.seed, prompts, allow_tiny_vocabulary
    )
    seeds = [plan.seed + i for i in range(samples)]
    batch = max(1, min(plan.batch, engine.bundle.shapes.max_batch // 2))
    jx_all, jt_all, timesteps, paths = [], [], None, []
    tea_x, tea_y, mag = [], [], []
    started = time.perf_counter()
    chunks = [(chosen[i : i + batch], seeds[i : i + batch]) for i in range(0, samples, batch)]
    bar = tqdm(total=len(chunks) * (2 * steps - 1), desc="calibrate", unit="call", disable=not show_progress)
    for chunk_prompts, chunk_seeds in chunks:
        request = Request(chunk_prompts, chunk_seeds, steps, guidance)
        run = engine.generate(request, NoCache(len(chunk_prompts)), record=True)
        bar.update(steps)
        timesteps = run.timesteps
        paths.append(np.stack(run.trajectory))
        text = engine.encode(chunk_prompts)
        uncond = engine.encode([""] * len(chunk_prompts)) if guidance > 1.0 else None
        jx_rows, jt_rows, mag_rows, previous = [], [], [], None
        for k in range(steps):
            x_k = run.trajectory[k]
            n = len(x_k)
            t_k = timesteps[k]
            now = engine.predict(x_k, np.full(n, t_k, np.float32), text, uncond, guidance)
            f_k = _branch(now, plan.branch)
            if previous is not None:
                tea_x.append(relative_l1(now.modulation, previous.modulation))
                tea_y.append(relative_l1(now.cond, previous.cond))
                mag_rows.append((now.residual_norms / previous.residual_norms).mean(axis=1))
            previous = now
            if k == steps - 1:
                break
            t_next = timesteps[k + 1]
            x_prime = _solver_step(engine, steps, k, f_k, x_k, [s + k for s in chunk_seeds])
            both = _branch(
                engine.predict(
                    np.concatenate([x_prime, x_k]),
                    np.array([t_k] * n + [t_next] * n, np.float32),
                    np.concatenate([text, text]),
                    None if uncond is None else np.concatenate([uncond, uncond]),
                    guidance,
                ),
                plan.branch,
            )
            f_prime, f_next = both[:n], both[n:]
            dx = _norms(x_prime - x_k)
            if np.any(dx == 0):
                raise BadInput(f"calibration: the solver step at t={t_k} did not move the latent")
            jx_rows.append(_norms(f_prime - f_k) / dx)
            jt_rows.append(_norms(f_next - f_k) / abs(t_next - t_k))
            bar.update(1)
        jx_all.append(np.stack(jx_rows))
        jt_all.append(np.stack(jt_rows))
        mag.append(np.stack(mag_rows))
    bar.close()
    jx = np.concatenate(jx_all, axis=1)
    jt = np.concatenate(jt_all, axis=1)
    if not (np.all(np.isfinite(jx)) and np.all(np.isfinite(jt))):
        raise BadInput("calibration produced NaN or infinite sensitivities: the model output is not finite")
    meta = {
        "model": engine.preset.name,
        "family": engine.adapter.family,
        "backend": engine.backend.name,
        "scheduler": manifest.scheduler,
        "steps": steps,
        "guidance": guidance,
        "branch": plan.branch,
        "samples": samples,
        "seeds": seeds,
        "prompts": chosen,
        "source": "own uncached trajectories",
        "seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    sensitivity = SensitivityTable(
        np.asarray(timesteps[:-1]),
        jx.mean(axis=1),
        jt.mean(axis=1),
        counts=np.full(steps - 1, samples, float),
        jx_std=jx.std(axis=1),
        jt_std=jt.std(axis=1),
        meta=meta,
    )
    trajectories = {steps: (np.concatenate(paths, axis=1), np.asarray(timesteps))}
    for n in sorted(set(plan.budget_steps or (max(2, round(steps / 2)), min(MAX_STEPS, 2 * steps))) - {steps}):
        trajectories[n] = _trajectories(engine, chunks, n, guidance)
    sensitivity.budget = record_curves(
        trajectories,
        lambda settings, n, b: SenCachePolicy(settings, sensitivity, n, b, engine.numel),
        manifest.defaults.cache["sencache"],
    )
    meta["budget_steps"] = list(sensitivity.budget.steps)
    x, y = np.concatenate(tea_x), np.concatenate(tea_y)
    coefficients = np.polyfit(x, y, 4)
    ratios = np.concatenate([[1.0], np.concatenate(mag, axis=1).mean(axis=1)])
    baselines = BaselineTables(
        teacache_coefficients=tuple(float(c) for c in coefficients),
        magcache_ratios=tuple(float(r) for r in ratios),
        meta={
            **meta,
            "teacache_input": engine.adapter.modulation,
            "teacache_points": int(len(x)),
            "teacache_fit_rmse": float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2))),
            "magcache_branch": "cond",
        },
    )
    return Calibration(sensitivity, baselines)


def _trajectories(
    engine: Model, chunks: list[tuple[list[str], list[int]]], steps: int, guidance: float
) -> tuple[np.ndarray, np.ndarray]:
    """Uncached trajectories [steps, samples, ...] of `chunks` at `steps` steps, and their timesteps."""
    paths, timesteps = [], None
    for chunk_prompts, chunk_seeds in chunks:
        run = engine.generate(
            Request(chunk_prompts, chunk_seeds, steps, guidance), NoCache(len(chunk_prompts)), record=True
        )
        paths.append(np.stack(run.trajectory))
        timesteps = run.timesteps
    return np.concatenate(paths, axis=1), np.asarray(timesteps)


def _branch(prediction: Prediction, branch: str) -> np.ndarray:
    """The output of `prediction` that calibration measures: the guided one or the cond branch's."""
    return prediction.guided if branch == "guided" else prediction.cond


def _solver_step(engine: Model, steps: int, k: int, f_k: np.ndarray, x_k: np.ndarray, seeds: list[int]) -> np.ndarray:
    """One step of the bundle's scheduler from a fresh state at index k (solver noise, where the
    scheduler adds any, from `seeds`)."""
    sampler = engine.sampler(steps)
    sampler.start_at(k)
    generators = engine.generators(seeds)
    return sampler.step(k, torch.from_numpy(f_k), torch.from_numpy(x_k.copy()), generators).numpy()
