"""The GPU check's 2-rank run (benchmarks/gpu_check.sh, issue 22): one engine over two ranks
launched by torchrun, NCCL between the GPUs, against the same requests on one rank.

    torchrun --standalone --nproc-per-node 2 -m sencache.benchmarks.parallel_check \
        --engine DIR --parallel sp=2 --device cuda --out parallel_nccl.json

Rank 0 generates the requests on the group (the others follow its passes), times each decision
all-reduce inside its pass, then, alone, generates them again on a one-rank engine of the same
bundle. Every request's per-step decisions must be equal (exit status 1 otherwise); the largest
latent difference is recorded, not judged (GPU kernels sum in another order once sequences are
split). The run's figures are added under their parallel config to the JSON at --out. With
--device cpu the same runs on gloo (how it is tried without GPUs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.benchmarks.parallel_ranks import TimedGroup, drive, requests, shares
from sencache.runtime.files import write_atomic
from sencache.runtime.model import Model
from sencache.runtime.parallel.boundary import Follower
from sencache.runtime.parallel.config import ParallelConfig
from sencache.runtime.parallel.sequence import shard_sequence
from sencache.runtime.request import Result
from sencache.runtime.scheduler import admission
from sencache.runtime.stepping import StepEngine


def _results(stepper: StepEngine, ids: list[int]) -> list[Result]:
    return [stepper.result(i) for i in ids]


def compare(group: list[Result], alone: list[Result]) -> dict[str, Any]:
    """Per-step decisions and latents of the group's run against the lone rank's."""
    pairs = [
        (a, b)
        for g, s in zip(group, alone, strict=True)
        for sample_g, sample_s in zip(g.decisions, s.decisions, strict=True)
        for a, b in zip(sample_g, sample_s, strict=True)
    ]
    mismatches, steps = sum(a != b for a, b in pairs), len(pairs)
    latent = max(float(np.abs(g.latents - s.latents).max()) for g, s in zip(group, alone, strict=True))
    return {"decision_mismatches": int(mismatches), "decisions": steps, "latent_max_abs_diff": latent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, required=True, help="a calibrated torch bundle")
    parser.add_argument("--parallel", required=True, help="sp=2 or cfg=2")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--samples", type=int, default=2, help="one-sample requests sharing each pass")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = ParallelConfig.parse(args.parallel)
    group = TimedGroup.join(config, device=args.device)
    device = str(group.device)
    model = Model.open(args.engine, "torch", device)
    shard_sequence(model, group)
    if not group.is_driver:
        Follower(model, group).run()
        group.agree(group.reduce_s)
        group.close()
        return 0
    stepper = StepEngine(model, admission("step"), group)
    batch = requests(model, args.samples, args.steps, {})
    ids, passes = drive(stepper, batch, group)
    parallel = _results(stepper, ids)
    stepper.stop()
    reduce_s = group.agree(group.reduce_s)
    group.close()
    alone = StepEngine(Model.open(args.engine, "torch", device), admission("step"))
    lone_ids, _ = drive(alone, batch, None)
    figures = compare(parallel, _results(alone, lone_ids))
    figures.update(
        {
            "device": torch.cuda.get_device_name(group.device) if group.device.type == "cuda" else "cpu",
            "backend": "nccl (tensors), gloo (decision, boundary)" if group.device.type == "cuda" else "gloo",
            "samples": args.samples,
            "steps": args.steps,
            **shares(passes, reduce_s),
        }
    )
    document = json.loads(args.out.read_text()) if args.out.exists() else {}
    document[str(config)] = figures
    write_atomic(args.out, (json.dumps(document, indent=1) + "\n").encode())
    print(
        f"parallel {config} on 2 x {figures['device']} ({figures['backend']}): "
        f"{figures['decision_mismatches']} of {figures['decisions']} step decisions differ from one rank; latents "
        f"max |diff| {figures['latent_max_abs_diff']:.2e}; decision all-reduce median "
        f"{figures['reduce_us_median']:.0f} us ({100 * figures['share_median']:.2f}% of a pass; on rank 0, "
        f"waiting for the other rank included, {100 * figures['share_rank0_median']:.2f}%)"
    )
    return 1 if figures["decision_mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
