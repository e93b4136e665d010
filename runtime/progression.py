"""What a request does with its outcome of a pass, and its result once it took its last step:
guidance, anchors, the per-step trace and the family
sampler's solver step (diffusers' arithmetic with the schedule's scalars computed on the host and
solver noise drawn from each sample's own generator, so it adds no host wait on a GPU)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from sencache.runtime.cache import StepDecision
from sencache.runtime.chain import guide
from sencache.runtime.pass_runner import upload
from sencache.runtime.request import RequestState, Result


def advance(job: RequestState, noise: torch.Tensor, decision: StepDecision) -> int:
    """Take `job`'s solver step from its pass's tail output `noise` under `decision`; returns the
    samples that ran. The caller counts the step (`job.step`, `job.nfe`) under its lock."""
    i = job.step
    guided = guide(noise, job.batch, job.request.cfg, job.scales[i])
    if decision.run.all():
        job.anchor.copy_(job.x)
        job.injected = None
    elif decision.run.any():
        ran = upload(np.flatnonzero(decision.run).astype(np.int64), job.x.device)
        job.anchor.index_copy_(0, ran, job.x.index_select(0, ran))
        if job.injected is not None:
            job.injected.index_fill_(0, ran, 0.0)
    _trace(job, decision)
    assert job.sampler is not None, "a running request holds its sampler"
    job.x = job.sampler.step(i, guided, job.x, job.generators)
    if job.policy.deterministic_drift:
        job.injected = carry_noise(job.injected, job.sampler.injected())
    return int(decision.run.sum())


def carry_noise(accumulated: torch.Tensor | None, injected: tuple[float, torch.Tensor] | None) -> torch.Tensor | None:
    """The noise injected since each sample's anchor after a step that injected `injected` (its
    factor on the step's input, the noise it added): factor * accumulated + added. None (no noise
    since any anchor) stays None through a deterministic step."""
    if injected is None:
        return accumulated
    factor, added = injected
    return added if accumulated is None else factor * accumulated + added


def _trace(job: RequestState, decision: StepDecision) -> None:
    """Each sample's verdict of the step and what decided it."""
    t = job.timesteps[job.step]
    eps = None if math.isnan(decision.threshold) else decision.threshold
    for b in range(job.batch):
        verdict = "run" if decision.run[b] else "reuse"
        job.decisions[b].append(verdict)
        score = decision.score[b]
        job.trace[b].append(
            {
                "step": job.step,
                "t": t,
                "score": None if math.isnan(score) else float(score),
                "eps": eps,
                "forced": decision.forced,
                "decision": verdict,
            }
        )


def finish(job: RequestState) -> Result:
    """The result of a request that took its last step."""
    return Result(
        latents=job.x.detach().cpu().numpy(),
        timesteps=job.timesteps,
        decisions=job.decisions,
        trace=job.trace,
        timing={
            "denoise_s": time.perf_counter() - job.admitted,
            "decision_s": job.decision_s,
            "queue_s": job.admitted - job.submitted,
        },
        warnings=job.policy.warnings(),
        trajectory=job.trajectory,
    )
