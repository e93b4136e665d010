"""What running one engine over several ranks costs in communication (issue 22):

    python -m sencache.benchmarks.parallel [--engines DIR] [--out benchmarks/results/parallel]

1. Bytes per pass by kind (attention all-to-all, token gather, branch exchange, decision
   all-reduce, boundary), measured on 2 and 4 gloo ranks on 127.0.0.1 (spawned processes) running
   tiny-wan and tiny-cogvideox torch bundles: every collective a rank issues is read from
   torch.profiler's record of the gloo collectives (its input's shape and type), the token gather
   and branch exchange are told apart from attention's all-gather by the rank group's own
   counters, and each kind is checked against its formula (benchmarks/parallel_traffic.py).
2. The decision all-reduce's time as a share of a pass on 2 ranks (one thread each): the real
   `RankGroup.reduce` timed inside real SenCache passes, rounds of one and two requests interleaved.
3. A projection from the formulas, NVLink's published bandwidth and an assumed MFU of the
   communication share of a pass of Wan 2.1 14B at 720p on 8 GPUs: a projection, not a measurement.

Without --engines, the tiny bundles are built and briefly calibrated in a temporary folder (the
equivalent of `build_engine.py --backend torch` and `sencache calibrate --samples 2 --steps 8`).
Writes report.json and report.md into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

from sencache.benchmarks.flops import stage_flops
from sencache.benchmarks.parallel_ranks import TimedGroup, drive, requests, shares
from sencache.benchmarks.parallel_traffic import (
    H100_BF16,
    NVLINK4,
    Widths,
    attention_bytes,
    branch_bytes,
    decision_bytes,
    projection,
    token_bytes,
    widths,
)
from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.console.output import progress
from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.bundle import Bundle
from sencache.runtime.files import write_atomic
from sencache.runtime.model import Model
from sencache.runtime.parallel.boundary import Follower
from sencache.runtime.parallel.config import ParallelConfig
from sencache.runtime.parallel.sequence import shard_sequence
from sencache.runtime.scheduler import admission
from sencache.runtime.stepping import StepEngine

MODELS = ("tiny-wan", "tiny-cogvideox")
TRAFFIC = ("sp=2", "cfg=2", "sp=2,cfg=2", "sp=4")
TIMING = ("sp=2", "cfg=2")
ELEMENT = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "unsigned char": 1, "long int": 8, "int": 4}
"""Bytes per element of the types torch.profiler names in a collective's record."""
FLOOR = 200
"""Back-to-back decision all-reduces after the timed passes: the collective without a pass around it."""
PROJECTION_MODEL = "wan2.1-t2v-14b"
SCALED = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "cogvideox-5b")
PROJECTED = ("sp=8", "sp=4,cfg=2")


@dataclass(frozen=True)
class Task:
    """One spawned group's work."""

    mode: str
    """"traffic" (bytes by kind, every row running) or "timing" (the decision collective's share)."""
    model: str
    bundle: str
    parallel: str
    port: int
    folder: str
    steps: int
    samples: tuple[int, ...]
    """Requests (one sample each) per generation; timing alternates them round by round."""
    rounds: int = 1


def _collectives(prof: Any, folder: Path) -> list[dict[str, Any]]:
    """Each gloo collective of the profile: its kind, element type and payload bytes."""
    trace = folder / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    trace.unlink()
    out = []
    for event in events:
        name = event.get("name", "")
        if name.startswith("gloo:"):
            args = event["args"]
            dims, kind = args["Input Dims"][0], args["Input type"][0]
            out.append({"collective": name[5:], "type": kind, "bytes": int(np.prod(dims)) * ELEMENT[kind]})
    return out


def _traffic(model: Model, group: TimedGroup, task: Task, folder: Path) -> dict[str, Any]:
    """Bytes by kind over one generation in which every row runs every pass (max_reuse 0)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        if group.is_driver:
            stepper = StepEngine(model, admission("step"), group)
            drive(stepper, requests(model, task.samples[0], task.steps, {"max_reuse": 0}), group)
            stepper.stop()
        else:
            Follower(model, group).run()
    measured: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for c in _collectives(prof, folder):
        if c["collective"] == "all_reduce":
            kind = "decision"
        elif c["collective"] == "all_to_all":
            kind = "attention"
        elif c["type"] in ("float", "c10::Half", "c10::BFloat16"):
            kind = "gather"  # the token gather, the branch exchange, or attention's text all-gather
        else:
            kind = "boundary"  # all_gather_object: the pickled message's size, then its bytes
        measured[kind] += c["bytes"]
        calls[kind] += 1
    gather = measured.pop("gather", 0)
    gathers = calls.pop("gather", 0)
    measured["attention"] += gather - group.bytes["tokens"] - group.bytes["branches"]
    calls["attention_text"] = gathers - group.calls["tokens"] - group.calls["branches"]
    measured["tokens"], measured["branches"] = group.bytes["tokens"], group.bytes["branches"]
    return {
        "measured": dict(measured),
        "profiler_calls": dict(calls),
        "group_calls": dict(group.calls),
        "group_bytes": dict(group.bytes),
    }


def _timing(model: Model, group: TimedGroup, task: Task) -> dict[str, Any]:
    """Per pass that reduced: its time and its decision all-reduce's, rounds of each request
    count interleaved (the order turns every round)."""
    if not group.is_driver:
        Follower(model, group).run()
        return {"reduce_s": group.reduce_s, "floor_s": _floor(group)}
    stepper = StepEngine(model, admission("step"), group)
    passes: dict[int, list[dict[str, float]]] = {n: [] for n in task.samples}
    for r in range(task.rounds):
        order = task.samples if r % 2 == 0 else task.samples[::-1]
        for samples in order:
            passes[samples] += drive(stepper, requests(model, samples, task.steps, {}), group)[1]
    stepper.stop()
    return {"passes": {str(k): v for k, v in passes.items()}, "reduce_s": group.reduce_s, "floor_s": _floor(group)}


def _floor(group: TimedGroup) -> list[float]:
    """FLOOR decision all-reduces of two samples' drift, back to back on every rank."""
    start = len(group.reduce_s)
    for _ in range(FLOOR):
        group.reduce(np.zeros(2))
    return group.reduce_s[start:]


def _rank(rank: int, task: Task) -> None:
    """One spawned rank: join the group, open the bundle on this rank's rows and tokens, work."""
    torch.set_num_threads(1)
    config = ParallelConfig.parse(task.parallel)
    group = TimedGroup.join(config, rank, init_method=f"tcp://127.0.0.1:{task.port}")
    folder = Path(task.folder) / str(rank)
    folder.mkdir(parents=True)
    try:
        model = Model.open(task.bundle, "torch", "cpu", threads=1)
        shard_sequence(model, group)
        result = _traffic(model, group, task, folder) if task.mode == "traffic" else _timing(model, group, task)
    finally:
        group.close()
    write_atomic(folder / "result.json", json.dumps(result).encode())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(task: Task) -> list[dict[str, Any]]:
    """Run `task` on its group's ranks, each a spawned process; every rank's result, in rank order."""
    world = ParallelConfig.parse(task.parallel).world
    mp.spawn(_rank, args=(task,), nprocs=world, join=True)
    return [json.loads((Path(task.folder) / str(r) / "result.json").read_text()) for r in range(world)]


def expected_traffic(w: Widths, parallel: str, samples: int, steps: int, element: int = 4) -> dict[str, int]:
    """The formulas' bytes for one rank over a generation of `samples` guided one-sample requests
    whose every row runs every pass (SenCache's drift from the second step on: one value each)."""
    config = ParallelConfig.parse(parallel)
    rows = 2 * samples // config.cfg
    return {
        "attention": steps * sum(attention_bytes(w, rows, config.sp, element).values()),
        "tokens": steps * token_bytes(w, rows, config.sp, element),
        "branches": steps * branch_bytes(w, rows, config.cfg),
        "decision": (steps - 1) * decision_bytes(samples),
    }


def measure_traffic(model: str, bundle: Path, parallel: str, samples: int, steps: int, work: Path) -> dict[str, Any]:
    """Bytes per pass by kind on rank 0 of a run on gloo ranks, each against its formula."""
    folder = Path(tempfile.mkdtemp(dir=work))
    ranks = spawn(Task("traffic", model, str(bundle), parallel, _free_port(), str(folder), steps, (samples,)))
    mine = ranks[0]
    passes = max(mine["group_calls"].get("tokens", 0), mine["group_calls"].get("branches", 0))
    if passes != steps:
        raise RuntimeError(f"{model} {parallel}: {passes} passes for {samples} requests of {steps} steps")
    formula = expected_traffic(widths(model), parallel, samples, steps)
    return {
        "model": model,
        "parallel": parallel,
        "samples": samples,
        "steps": steps,
        "per_pass": {k: v / steps for k, v in mine["measured"].items()},
        "formula_per_pass": {k: v / steps for k, v in formula.items()},
        "matches": {k: mine["measured"].get(k, 0) == v for k, v in formula.items()},
        "boundaries": mine["group_calls"].get("boundary", 0),
        "ranks_agree": all(r["measured"] == mine["measured"] for r in ranks),
        "rank0": mine,
    }


def measure_timing(model: str, bundle: Path, parallel: str, steps: int, rounds: int, work: Path) -> dict[str, Any]:
    """The decision all-reduce's share of each pass, by request count."""
    folder = Path(tempfile.mkdtemp(dir=work))
    ranks = spawn(Task("timing", model, str(bundle), parallel, _free_port(), str(folder), steps, (1, 2), rounds))
    reduce_s = [r["reduce_s"] for r in ranks]
    by_samples = {samples: shares(passes, reduce_s) for samples, passes in ranks[0]["passes"].items()}
    floor = np.min([r["floor_s"] for r in ranks], axis=0) * 1e6
    return {
        "model": model,
        "parallel": parallel,
        "steps": steps,
        "rounds": rounds,
        "by_samples": by_samples,
        "floor_us_median": float(np.median(floor)),
        "floor_us_q25": float(np.percentile(floor, 25)),
        "floor_us_q75": float(np.percentile(floor, 75)),
    }


def scaling() -> list[dict[str, Any]]:
    """Attention and token-gather bytes per pass on one rank, by the formulas, for real models at
    their preset sizes: one guided sample (both rows on every rank), bf16, each sp that divides
    the model's heads and tokens."""
    rows = []
    for model in SCALED:
        w = widths(model)
        for sp in (2, 4, 8):
            if w.heads % sp == 0 and w.tokens % sp == 0:
                attention = sum(attention_bytes(w, 2, sp, 2).values())
                rows.append(
                    {**asdict(w), "sp": sp, "attention_bytes": attention, "token_bytes": token_bytes(w, 2, sp, 2)}
                )
    return rows


def project() -> dict[str, Any]:
    """The communication share of a pass of Wan 2.1 14B at 720p (one guided sample, bf16) on 8 GPUs."""
    w = widths(PROJECTION_MODEL)
    flops = stage_flops(PROJECTION_MODEL)
    rows = []
    for parallel in PROJECTED:
        config = ParallelConfig.parse(parallel)
        rows.append({"parallel": parallel, **projection(w, config.sp, config.cfg, 1, 2, flops, NVLINK4, H100_BF16)})
    return {
        "model": PROJECTION_MODEL,
        "widths": asdict(w),
        "flops_per_row": flops,
        "element_bytes": 2,
        "link": asdict(NVLINK4),
        "accelerator": asdict(H100_BF16),
        "rows": rows,
    }


def tiny_bundle(model: str, out: Path) -> Path:
    """A torch bundle of `model` built into `out` and briefly calibrated (2 samples, 8 steps)."""
    path = build(BuildOptions(model=model, out=out, backend="torch"), log=lambda _: None)
    bundle = Bundle.load(path)
    calibration = calibrate(Model.open(bundle, threads=1), CalibrationPlan(samples=2, steps=8), show_progress=False)
    bundle.write_tables(calibration.sensitivity, calibration.baselines)
    return path


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    m = report["machine"]
    lines = [
        "# Parallelism: bytes per pass and the decision collective's cost (issue 22)",
        "",
        f"Measured on {m['cpu']} with {m['cores']} CPU cores, no GPU, torch {m['torch']}, gloo on 127.0.0.1, "
        "one thread per rank; tiny torch bundles (fp32). `python -m sencache.benchmarks.parallel`.",
        "",
        "## Bytes per pass on one rank (measured, rank 0)",
        "",
        "Every row runs every pass (SenCache with max_reuse 0), 2 one-sample guided requests (4 rows). "
        "Payload = the collective's input on this rank, read from torch.profiler's record of each gloo "
        "collective; the token gather and branch exchange are the rank group's counts, the rest of the "
        "float all-gathers is attention's (CogVideoX's text). `=` marks a kind equal to its formula "
        "(benchmarks/parallel_traffic.py), byte for byte.",
        "",
        "| model | parallel | attention KiB | tokens KiB | branches KiB | decision B | boundary B / pass | formulas |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in report["traffic"]:
        p, ok = t["per_pass"], t["matches"]
        lines.append(
            f"| {t['model']} | {t['parallel']} | {p.get('attention', 0) / 1024:,.1f} "
            f"| {p.get('tokens', 0) / 1024:,.1f} "
            f"| {p.get('branches', 0) / 1024:,.1f} | {p.get('decision', 0):.1f} | {p.get('boundary', 0):.0f} "
            f"| {'all =' if all(ok.values()) else 'DIFFER: ' + ', '.join(k for k, v in ok.items() if not v)} |"
        )
    lines += [
        "",
        "Decision bytes are per pass over the generation: 8 bytes per sample from the second step (the first "
        "has no drift), so (steps - 1) / steps x 16 B here. The boundary is rank 0's pickled message "
        "(all_gather_object: its size, then its bytes padded to the largest); it carries new requests' "
        "parameters once, then their ids.",
        "",
        "## The formulas (payload per rank per pass)",
        "",
        "rows: the rank's rows (2 x samples / cfg); S video tokens, T joint text tokens, H heads x D, L blocks, "
        "W tail width, e bytes per activation element.",
        "",
        "- attention: L x rows x (4 x S/sp x H x D + T x H/sp x D) x e (rows that reuse send nothing)",
        "- tokens: rows x S/sp x W x e",
        "- branches: rows x latent x 4 (the tail's float32 output)",
        "- decision: 8 x values (one per sample for SenCache; TeaCache 2, sencache-online 1 more)",
        "",
        "## The decision all-reduce's share of a pass, 2 ranks (measured)",
        "",
        "SenCache with the bundle's calibrated knobs (passes that reuse included), the real `RankGroup.reduce` "
        "timed inside each pass that issues it on both ranks; rounds of 1 and 2 requests interleaved (the order "
        "turns each round). The collective's cost is the time of the rank that arrives last (the smaller of the "
        "two); the first to arrive also waits for the other (rank 0's column: skew between the ranks, which "
        "the next collective of the pass would otherwise absorb). Pass time: rank 0's `StepEngine.step`. "
        "Target <= 1%.",
        "",
        "| model | parallel | requests | passes | pass ms (median) | reduce us median (q25-q75) "
        "| share median | share q25-q75 | share max | rank 0 share median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in report["timing"]:
        for samples, s in t["by_samples"].items():
            lines.append(
                f"| {t['model']} | {t['parallel']} | {samples} | {s['passes']} | {s['pass_ms_median']:.1f} "
                f"| {s['reduce_us_median']:.0f} ({s['reduce_us_q25']:.0f}-{s['reduce_us_q75']:.0f}) "
                f"| {100 * s['share_median']:.2f}% | {100 * s['share_q25']:.2f}-{100 * s['share_q75']:.2f}% "
                f"| {100 * s['share_max']:.2f}% | {100 * s['share_rank0_median']:.2f}% |"
            )
    lines += [
        "",
        f"The same all-reduce back to back, {FLOOR} times after the passes (no pass around it; the smaller of "
        "the two ranks' times): "
        + "; ".join(
            f"{t['model']} {t['parallel']} {t['floor_us_median']:.0f} us "
            f"({t['floor_us_q25']:.0f}-{t['floor_us_q75']:.0f})"
            for t in report["timing"]
        )
        + f". Load average of the machine (1 min) at the start and end: {m['load_start']:.1f}, {m['load_end']:.1f} "
        "(the 2 cores are shared with other work): a rank that waits in a collective is woken by the scheduler.",
    ]
    lines += [
        "",
        "## Scaled by the formulas: bytes per pass on one rank for real models (bf16, one guided sample)",
        "",
        "| model | video tokens S | text in attention T | H x D | blocks | sp | attention GiB | token gather MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["scaling"]:
        lines.append(
            f"| {r['model']} | {r['tokens']:,} | {r['text_tokens']} | {r['heads']} x {r['head_dim']} | {r['blocks']} "
            f"| {r['sp']} | {r['attention_bytes'] / 2**30:.2f} | {r['token_bytes'] / 2**20:,.1f} |"
        )
    p = report["projection"]
    w = p["widths"]
    lines += [
        "",
        f"## PROJECTION (not a measurement): {p['model']} at 720p on 8 GPUs",
        "",
        f"{w['tokens']:,} video tokens, {w['heads']} heads x {w['head_dim']}, {w['blocks']} blocks; one guided "
        f"sample (2 rows) per pass, every row running, activations bf16 ({p['element_bytes']} B). Link: "
        f"{p['link']['name']}, {p['link']['bytes_per_s'] / 1e9:.0f} GB/s one way ({p['link']['source']}). "
        f"Compute: FLOPs per row from benchmarks/flops.py (head {p['flops_per_row']['head'] / 1e12:,.2f} T, "
        f"blocks {p['flops_per_row']['blocks'] / 1e12:,.0f} T, tail {p['flops_per_row']['tail'] / 1e12:,.2f} T) "
        f"at {p['accelerator']['peak_flops'] / 1e12:.0f} TFLOPS x MFU {p['accelerator']['mfu']} "
        f"({p['accelerator']['source']}). Wire bytes = payload x (n-1)/n for all-to-all, x (n-1) for "
        "all-gather; collectives assumed not to overlap compute and to reach the link's peak.",
        "",
        "| parallel | sent per GPU: attention GiB | tokens GiB | branches MiB | decision B | comm ms | compute ms "
        "| comm share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in p["rows"]:
        lines.append(
            f"| {r['parallel']} | {r['attention_bytes'] / 2**30:.2f} | {r['tokens_bytes'] / 2**30:.2f} "
            f"| {r['branches_bytes'] / 2**20:.1f} | {r['decision_bytes']:.0f} | {1e3 * r['comm_s']:.1f} "
            f"| {1e3 * r['compute_s']:.0f} | {100 * r['comm_share']:.1f}% |"
        )
    lines += [
        "",
        "The decision all-reduce goes over the host's gloo group, not NVLink: its cost on GPUs is a host "
        "round trip (the 2-rank CPU figure above; benchmarks/gpu_check.sh records it under NCCL's device "
        "traffic), not bandwidth. Unproven here: NCCL's achieved all-to-all bandwidth, overlap, and the "
        "real model's compute time.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, help="a folder holding tiny-wan and tiny-cogvideox torch bundles")
    parser.add_argument("--steps", type=int, default=8, help="steps of each traffic generation")
    parser.add_argument("--timing-steps", type=int, default=16, help="steps of each timed generation")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (1 and 2 requests each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parallel"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sencache-parallel-") as scratch:
        work = Path(scratch)
        bundles = {m: args.engines / m if args.engines else tiny_bundle(m, work / m) for m in MODELS}
        runs = [("traffic", m, p) for m in MODELS for p in TRAFFIC] + [("timing", m, p) for m in MODELS for p in TIMING]
        traffic, timing = [], []
        for mode, model, parallel in progress(runs, desc="parallel", unit="group"):
            if mode == "traffic":
                traffic.append(measure_traffic(model, bundles[model], parallel, 2, args.steps, work))
            else:
                timing.append(measure_timing(model, bundles[model], parallel, args.timing_steps, args.rounds, work))
    report = {
        "tool": "sencache.benchmarks.parallel",
        "machine": {
            "cpu": platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
        },
        "traffic": traffic,
        "timing": timing,
        "scaling": scaling(),
        "projection": project(),
    }
    text = markdown(report)
    write_atomic(args.out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    write_atomic(args.out / "report.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
