"""What each process of a spawned test group runs: a scripted run of the step engine (requests
submitted and cancelled at given passes) on rank 0, the same run's passes on the other ranks, and
the same script on one process for reference. Rank 0 scripts the engine pass by pass, so the
passes, and the rows they share, are the same in the group and alone."""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.runtime.errors import Cancelled, Failed
from sencache.runtime.model import Model
from sencache.runtime.parallel.boundary import Follower
from sencache.runtime.parallel.config import ParallelConfig
from sencache.runtime.parallel.group import RankGroup
from sencache.runtime.parallel.sequence import shard_sequence
from sencache.runtime.request import GenerationParams
from sencache.runtime.scheduler import StepLevel
from sencache.runtime.stepping import StepEngine
from sencache.serving.options import free_port

PROMPTS = ("one small red circle static on black", "two large blue squares moving right slow on black")


@dataclass(frozen=True)
class Submit:
    at: int
    """The pass before which it is submitted."""
    seed: int
    steps: int
    guidance: float
    cache: str
    knobs: dict[str, Any] = field(default_factory=dict)
    samples: int = 1


@dataclass(frozen=True)
class Cancel:
    at: int
    index: int
    """The request (its place in the script's submissions) to cancel."""


Script = list[Submit | Cancel]


@dataclass
class Outcome:
    state: str
    decisions: list[list[str]] | None = None
    latents: np.ndarray | None = None
    error: str = ""


def _params(model: Model, s: Submit) -> GenerationParams:
    return GenerationParams.resolve(
        model.bundle.manifest.defaults,
        [PROMPTS[(s.seed + i) % len(PROMPTS)] for i in range(s.samples)],
        [s.seed + 1000 * i for i in range(s.samples)],
        steps=s.steps,
        guidance=s.guidance,
        cache=s.cache,
        knobs=s.knobs,
    )


def drive(model: Model, script: Script, ranks: RankGroup | None = None) -> dict[str, Any]:
    """Run `script` on the step engine (rank 0's when `ranks` is given): each request's outcome,
    the passes taken, the most requests one pass held, and the group's collective counts."""
    engine = StepEngine(model, StepLevel(), ranks)
    submissions = [e for e in script if isinstance(e, Submit)]
    ids: dict[int, int] = {}
    last = max(e.at for e in script)
    passes = most = 0
    while passes <= last or engine.busy:
        for event in script:
            if event.at != passes:
                continue
            if isinstance(event, Submit):
                ids[submissions.index(event)] = engine.submit(_params(model, event))
            elif event.index in ids:
                engine.cancel(ids[event.index])
        most = max(most, int(engine.stats()["active_requests"]) + int(engine.stats()["queue_depth"]))
        engine.step()
        passes += 1
    engine.stop()
    outcomes = {}
    for index, job_id in ids.items():
        try:
            result = engine.result(job_id)
            outcomes[index] = Outcome("done", result.decisions, result.latents)
        except Cancelled:
            outcomes[index] = Outcome("cancelled")
        except Failed as e:
            outcomes[index] = Outcome("failed", error=str(e))
    return {
        "outcomes": outcomes,
        "ids": ids,
        "passes": passes,
        "most": most,
        "calls": dict(ranks.calls) if ranks else {},
        "steps": engine.stats()["steps_total"],
        "broken": str(engine.broken) if engine.broken else "",
    }


def alone(bundle: Path, script: Script) -> dict[str, Any]:
    """`script` on one process."""
    torch.set_num_threads(1)
    return drive(Model.open(bundle, threads=1), script)


def _rank(rank: int, parallel: str, bundle: str, port: int, script: Script, out: Any, die_after: int | None) -> None:
    torch.set_num_threads(1)
    group = RankGroup.join(ParallelConfig.parse(parallel), rank, f"tcp://127.0.0.1:{port}", timeout_s=30)
    model = Model.open(bundle, threads=1)
    shard_sequence(model, group)
    if rank == 0:
        started = time.perf_counter()
        result = drive(model, script, group)
        result["seconds"] = time.perf_counter() - started
        out.put((rank, result))
        group.close()
        return
    done: dict[int, tuple[list[list[str]], np.ndarray]] = {}
    follower = Follower(model, group, on_done=lambda j: done.__setitem__(j.id, (j.decisions, j.x.cpu().numpy())))
    if die_after is not None:
        for _ in range(die_after):
            follower.follow(group.agree(None)[0])
        os._exit(1)  # a rank that dies mid-run, without a word to the others
    follower.run()
    out.put((rank, {"done": done, "calls": dict(group.calls)}))
    group.close()


def group_run(
    parallel: str, bundle: Path, script: Script, timeout_s: float = 240, die: tuple[int, int] | None = None
) -> dict[int, dict[str, Any]]:
    """`script` on a group of spawned processes (gloo on 127.0.0.1), each rank's report by rank;
    `die` = (rank, passes): that rank dies after following that many boundaries (it reports
    nothing). Every process is stopped within `timeout_s`."""
    world = ParallelConfig.parse(parallel).world
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_rank,
            args=(r, parallel, str(bundle), port, script, out, die[1] if die and die[0] == r else None),
            daemon=True,
        )
        for r in range(world)
    ]
    for p in processes:
        p.start()
    reports: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(reports) < world - (1 if die else 0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {parallel} group did not finish within {timeout_s} s")
            try:
                rank, report = out.get(timeout=1.0)
            except queue.Empty:
                crashed = [
                    r for r, p in enumerate(processes) if p.exitcode and r not in reports and (not die or r != die[0])
                ]
                if crashed:
                    raise RuntimeError(  # noqa: B904 (no queue message: a rank's exit is the cause)
                        f"rank {crashed[0]} of the {parallel} group exited with {processes[crashed[0]].exitcode}"
                    )
                continue
            reports[rank] = report
    finally:
        for p in processes:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
    return reports
