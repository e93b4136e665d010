"""Real-size builds with dummy weights: what a real preset costs to build, load and run here.

    nice -n 15 python -m sencache.benchmarks.real_size --model wan2.1-t2v-1.3b --precision fp16

Per preset and precision (one build at a time; each run adds its row): the build's wall time and
peak RSS (`/usr/bin/time -v` around `build_engine.py --load-format dummy`), the bundle's bytes and
each ONNX graph's (with its external data), the validation error per stage and of the chain, the
time to verify the bundle's checksums against one plain read of its bytes, the load time (checks
and ONNX Runtime sessions) and seconds per uncached step, all at the reduced resolution the bundle
is built for (the weights are full size whatever the resolution; validating at the model's own
resolution would take hours on these CPUs). Writes `benchmarks/results/real_size/<model>-<precision>.json`
and the table of every row there in `report.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sencache.benchmarks.verify_speed import evict, read_once, section
from sencache.runtime.bundle import Bundle
from sencache.runtime.files import write_atomic
from sencache.runtime.manifest import Manifest
from sencache.runtime.memory import estimated_peak
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams

RESULTS = Path("benchmarks/results/real_size")
FP8_MEMORY = "fp8_memory.json"
BUILD_LIMIT_GB = 20.0
"""The peak RSS a real-size build may reach on this 24 GB machine (issue 23)."""
"""The FP8 quantizer's memory against its blocks (benchmarks/fp8_memory.py), not a row."""
BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "engine_builder" / "build_engine.py"
REDUCED = "9x128x128"
"""The resolution (frames x height x width) real-size bundles here are built, validated and run at
by default (Wan: 3x16x16 latent, 192 tokens; the text stays at its real length)."""
STEPS = 3
VERIFY = "verify"
"""The verification figures at size (benchmarks/verify_speed.py), a section of the report."""
NOT_RUN = "not_run.md"
"""The presets not run, with the measured figures that predict them (written by hand, kept in the report)."""
LOAD_SHARE = 0.8
"""The share of the available memory a run's estimated peak (runtime/memory.py) may take to be run here."""


def build(
    model: str,
    precision: str,
    size: str,
    out: Path,
    layers: int | None,
    group_blocks: int | None,
    backend: str = "onnxruntime",
    compute_capability: str | None = None,
    fp8_samples: int | None = None,
) -> dict[str, Any]:
    """Run the dummy build in a child process under `/usr/bin/time -v`; its wall time, peak RSS and log."""
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        str(BUILD_SCRIPT),
        "--model",
        model,
        "--load-format",
        "dummy",
        "--precision",
        precision,
        "--backend",
        backend,
        *(() if compute_capability is None else ("--compute-capability", compute_capability)),
        *(() if fp8_samples is None else ("--fp8-samples", str(fp8_samples))),
        "--max-batch",
        "1",
        *(f"--{k}={v}" for k, v in zip(("frames", "height", "width"), size.split("x"), strict=True)),
        *(() if layers is None else ("--layers", str(layers))),
        *(() if group_blocks is None else ("--group-blocks", str(group_blocks))),
        "--out",
        str(out),
        "--overwrite",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"build failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    assert rss is not None, "/usr/bin/time -v reports the peak RSS"
    log = [line for line in done.stdout.splitlines() if line.strip()]
    return {
        "build_command": " ".join(command[2:]),
        "build_s": wall,
        "build_peak_rss_gb": int(rss.group(1)) * 1024 / 1e9,
        "build_log": log,
    }


def build_figures(log: str) -> dict[str, Any]:
    """Wall time, peak RSS and log of a build run by hand under `/usr/bin/time -v` (its output)."""
    command = re.search(r"Command being timed: \"(.*)\"", log)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", log)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    if command is None or wall is None or rss is None:
        raise SystemExit("--build-log: not the output of /usr/bin/time -v (no command, wall time or peak RSS)")
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.group(1).split(":"))))
    lines = [line for line in log.splitlines() if line.strip() and not line.startswith("\t")]
    return {
        "build_command": command.group(1),
        "build_s": seconds,
        "build_peak_rss_gb": int(rss.group(1)) * 1024 / 1e9,
        "build_log": [line for line in lines if "\r" not in line and "%|" not in line][-30:],
    }


def timed_verify(bundle: Bundle) -> float:
    started = time.perf_counter()
    bundle.verify_files()
    return time.perf_counter() - started


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo: what this machine can still give a process."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def measure_bundle(path: Path, threads: int, steps: int) -> dict[str, Any]:
    """Sizes, validation, verification against one read, load time and s/step of the built bundle
    (load and run only where its graphs fit in memory: ONNX Runtime holds them all)."""
    bundle = Bundle.load(path)
    files = bundle.manifest.files
    paths = [path / name for name in files]
    onnx, engines = {}, {}
    for stage, spec in bundle.manifest.stages.items():
        graphs = {_onnx_name(f) for f in spec.files}
        onnx[stage] = sum(e.bytes for n, e in files.items() if n in graphs or n[: -len(".data")] in graphs)
        engines[stage] = sum(files[f].bytes for f in spec.files if f.endswith(".engine"))
    figures: dict[str, Any] = {
        "backend": bundle.manifest.backend,
        "bundle_bytes": sum(e.bytes for e in files.values()),
        "onnx_bytes": onnx,
        "graphs": {stage: len(spec.files) for stage, spec in bundle.manifest.stages.items()},
        "validation": bundle.manifest.validation,
        **({} if bundle.manifest.quantization is None else {"quantization": bundle.manifest.quantization}),
        **({} if bundle.manifest.sizing is None else {"sizing": bundle.manifest.sizing}),
        "config": {k: bundle.manifest.config.get(k) for k in ("num_layers", "num_attention_heads")},
        "latent": list(bundle.manifest.shapes.latent),
    }
    evict(paths)
    cold_read_s = read_once(paths)
    evict(paths)
    cold_verify_s = timed_verify(bundle)
    read_s = read_once(paths)
    verify_s = timed_verify(bundle)
    figures |= {
        "read_once_s": read_s,
        "verify_s": verify_s,
        "verify_vs_read": verify_s / read_s,
        "cold_read_once_s": cold_read_s,
        "cold_verify_s": cold_verify_s,
        "cold_verify_vs_read": cold_verify_s / cold_read_s,
    }
    if bundle.manifest.tensorrt is not None:
        figures["engine_bytes"] = engines
        figures["tensorrt"] = {
            "module": bundle.manifest.tensorrt.module,
            "version": bundle.manifest.tensorrt.version,
            "compute_capability": bundle.manifest.tensorrt.compute_capability,
        }
        figures["not_run"] = f"{bundle.manifest.backend} engines run only on a GPU (none here)"
        return figures
    free, needed = available_bytes(), estimated_peak(bundle.manifest, 1, 2)
    if needed > LOAD_SHARE * free:
        figures["not_run"] = (
            f"a run would peak at about {needed / 1e9:.0f} GB (ONNX Runtime holds its "
            f"{figures['bundle_bytes'] / 1e9:.1f} GB of {bundle.manifest.precision} graphs), over {LOAD_SHARE:.0%} "
            f"of the {free / 1e9:.1f} GB available"
        )
        return figures
    started = time.perf_counter()
    engine = Model.open(path, threads=threads)
    load_s = time.perf_counter() - started
    request = GenerationParams(["a red fox running through snow"], [0], steps, engine.bundle.manifest.defaults.guidance)
    result = engine.generate(request, engine.policy("none", steps, 1, {}))
    return figures | {
        "load_s": load_s,
        "steps": steps,
        "per_step_s": result.timing["denoise_s"] / steps,
        "rows_per_step": 2,
    }


def write_report(folder: Path) -> None:
    """report.md: one row per measured preset and precision."""
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != FP8_MEMORY]
    lines = [
        "# Real-size builds with dummy weights",
        "",
        "Every bundle at the reduced resolution of its row, frames x height x width (the weights at full "
        "size), ONNX Runtime CPU, max batch 1 unless a note says otherwise (TensorRT-RTX rows: engines compiled "
        "here for the GPU named, from the bundle's validated ONNX graphs, not run: no GPU here). Peak RSS of the "
        "build from `/usr/bin/time -v`; verification is the bundle's streamed check of every file, as the bundle "
        "was built (these bundles list SHA-256: of each 64 MiB chunk on every core where the manifest lists chunks, "
        "else the whole file's; bundles built now list BLAKE3, measured in the section below), against one plain "
        "read of the same bytes, from disk (the files' pages evicted first) and from the page cache; "
        "load is the checks plus the ONNX Runtime sessions; s/step is uncached, cond + uncond rows.",
        "",
        "| model | backend | precision | size | blocks (graphs) | build s | peak RSS GB | bundle GB | "
        "blocks ONNX GB | engines GB | worst stage rel L2 | chain rel L2 | verify / read, disk | "
        "verify / read, cached | load s | s/step |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        v = r["validation"]
        stages = max(v[s]["rel_l2"] for s in ("head", "blocks", "tail"))
        chain = v.get("chain_vs_fp32", {}).get("rel_l2")
        lines.append(
            f"| {r['model']} | {_backend(r)} | {r['precision']} | {r['reduced']} | "
            f"{r['config']['num_layers']} ({r['graphs']['blocks']}) | {_built(r)} | "
            f"{r['bundle_bytes'] / 1e9:.2f} | {r['onnx_bytes']['blocks'] / 1e9:.2f} | {_engines(r)} | "
            f"{stages:.1e} | {'n/a' if chain is None else f'{chain:.1e}'} | {r['cold_verify_vs_read']:.2f} "
            f"({r['cold_verify_s']:.1f} / {r['cold_read_once_s']:.1f} s) | {r['verify_vs_read']:.2f} "
            f"({r['verify_s']:.1f} / {r['read_once_s']:.1f} s) | {_run(r)} |"
        )
    lines += [""] + [f"- {_name(r)}: not loaded or run: {r['not_run']}." for r in rows if "not_run" in r]
    lines += [
        f"- {r['model']} {r['precision']}, build figures: {r['build_measured_by']}."
        for r in rows
        if "build_measured_by" in r
    ]
    lines += [f"- {_name(r)}: {_fp8(r)}." for r in rows if "blocks_fp8_vs_fp32" in r["validation"]]
    if (folder / FP8_MEMORY).is_file():
        lines += ["", _fp8_memory(json.loads((folder / FP8_MEMORY).read_text()))]
    lines += [
        f"- {r['model']} {r['precision']}: built by `{_command(r['build_command'])}`, which chose "
        f"{', '.join(r['sizing']['automatic'])} itself ({_choice(r['sizing'])})."
        for r in rows
        if "build_command" in r and r.get("sizing", {}).get("automatic")
    ]
    lines += [f"- {r['model']} {r['precision']}: {r['note']}." for r in rows if "note" in r]
    verified = [json.loads(p.read_text()) for p in sorted((folder / VERIFY).glob("*.json"))]
    if verified:
        lines += ["", *section(verified)]
    not_run = folder / NOT_RUN
    if not_run.is_file():
        lines += ["", not_run.read_text().strip()]
    if rows:
        lines += ["", f"Machine: {rows[-1]['machine']}, shared: the 1-minute load average of each run is in its JSON."]
    write_atomic(folder / "report.md", ("\n".join(lines) + "\n").encode())


def _described(manifest: Manifest) -> dict[str, Any]:
    """The row's description of a bundle built before (its build figures were not measured here)."""
    s, groups = manifest.shapes, manifest.validation.get("blocks_groups")
    return {
        "model": manifest.model,
        "precision": manifest.precision,
        "reduced": f"{s.frames}x{s.height}x{s.width}",
        "group_blocks": None if not groups else groups[0]["blocks"][1] - groups[0]["blocks"][0],
        "build": "not measured by this run (--bundle)",
        **({"sizing": manifest.sizing} if manifest.sizing else {}),
    }


def _onnx_name(file: str) -> str:
    """The ONNX graph a stage file was built from (an engine's graph stays in the bundle beside it)."""
    return file[: -len(".engine")] + ".onnx" if file.endswith(".engine") else file


def _backend(row: dict[str, Any]) -> str:
    """The backend of a row (rows written before engines were measured are ONNX Runtime's)."""
    if "tensorrt" not in row:
        return row.get("backend", "onnxruntime")
    return f"{row['backend']} {row['tensorrt']['version']} ({row['tensorrt']['compute_capability']})"


def _engines(row: dict[str, Any]) -> str:
    return "n/a" if "engine_bytes" not in row else f"{sum(row['engine_bytes'].values()) / 1e9:.2f}"


def _name(row: dict[str, Any]) -> str:
    return f"{row['model']} {row.get('backend', 'onnxruntime')} {row['precision']}"


def _fp8(row: dict[str, Any]) -> str:
    error, calibration = row["validation"]["blocks_fp8_vs_fp32"], row["quantization"]["calibration"]
    return (
        f"the FP8 (E4M3 Q/DQ, {row['quantization']['tool']}) blocks against the fp32 blocks in ONNX Runtime: "
        f"relative L2 {error['rel_l2']:.3f} ({error['rel_l2_of_residual']:.3f} of the blocks' residual) on "
        f"{error['rows']} held-out rows, calibrated on {calibration['rows']} rows of {calibration['samples']} "
        f"uncached trajectories{_fp8_groups(error)}; the stage errors of the row are the fp32 graphs' before "
        "quantization"
    )


def _fp8_groups(error: dict[str, Any]) -> str:
    """How the groups of a streamed FP8 build compare, each quantized alone."""
    if "groups" not in error:
        return ""
    worst = max(error["groups"], key=lambda g: g["rel_l2"])
    return (
        f", the {len(error['groups'])} groups quantized one at a time and chained (each alone against its fp32 "
        f"graph: at worst relative L2 {worst['rel_l2']:.3f}, {worst['graph']})"
    )


def _fp8_memory(memory: dict[str, Any]) -> str:
    """The paragraph on the FP8 quantizer's memory at the whole model's size."""
    points = "; ".join(
        f"{p['blocks']} block{'s' if p['blocks'] > 1 else ''} ({p['graph_gb']:.2f} GB of fp32 graph): "
        f"{p['peak_rss_gb']:.2f} GB in {p['seconds']:.0f} s"
        for p in memory["points"]
    )
    command = memory.get("command", "python -m sencache.benchmarks.fp8_memory")
    text = (
        f"FP8 quantization memory ({memory['model']}, `{command}`): the peak RSS "
        f"of ModelOpt's ONNX FP8 quantizer (engine_builder/fp8.py `quantize_graph`) on the fp32 blocks graph, "
        f"{memory['resolution']}, one process per graph: {points}."
    )
    if "bundles" in memory:
        text += f" Bundles: `{memory['bundles']}`."
    if "fit" not in memory:
        return text + " One point only: no line through it."
    fit = memory["fit"]
    text += (
        f" It grows by {fit['gb_per_block']:.2f} GB per block ({fit['rss_per_graph_byte']:.0f} bytes per byte of "
        f"graph) from {fit['gb_at_zero_blocks']:.2f} GB, so the whole {fit['whole_model_blocks']}-block graph would "
        f"need about {fit['whole_model_peak_gb']:.0f} GB"
    )
    if fit["whole_model_peak_gb"] <= BUILD_LIMIT_GB:
        return text + f", within the {BUILD_LIMIT_GB:.0f} GB limit."
    return text + (
        f": the one-graph FP8 build of the whole model does not fit the {BUILD_LIMIT_GB:.0f} GB limit of this "
        "machine. An FP8 build therefore quantizes the blocks in groups, each calibrated on the fp32 outputs of "
        "the groups before it, the group chosen from this line (engine_builder/sizing.py), and TensorRT builds "
        "one engine per group, run in turn."
    )


def _command(command: str) -> str:
    """A build command as the README spells it: `python engine_builder/build_engine.py ...`."""
    words = command.split()
    script = next((i for i, w in enumerate(words) if w.endswith("build_engine.py")), None)
    return command if script is None else " ".join(["python", "engine_builder/build_engine.py", *words[script + 1 :]])


def _choice(sizing: dict[str, Any]) -> str:
    groups = "one graph" if sizing["group_blocks"] is None else f"groups of {sizing['group_blocks']} blocks"
    return (
        f"{sizing['parameters'] / 1e9:.2f} B parameters, {sizing['available_bytes'] / 2**30:.1f} GiB available: "
        f"{sizing['precision']}, {groups}, estimated peak {sizing['estimated_peak_bytes'] / 1e9:.1f} GB, "
        f"{'x'.join(map(str, sizing['resolution']))}"
    )


def _built(row: dict[str, Any]) -> str:
    if "build_s" not in row:
        return "n/a | n/a"
    return f"{row['build_s']:.0f} | {row['build_peak_rss_gb']:.1f}"


def _run(row: dict[str, Any]) -> str:
    return "not run | not run" if "not_run" in row else f"{row['load_s']:.1f} | {row['per_step_s']:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sencache.benchmarks.real_size", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a real preset (wan2.1-t2v-1.3b, cogvideox-2b, ...)")
    p.add_argument(
        "--bundle",
        type=Path,
        help="measure this dummy bundle, built before, instead of building one (no build figures)",
    )
    p.add_argument(
        "--build-log",
        type=Path,
        help="with --bundle: the output of `/usr/bin/time -v` around the build command that made it (its "
        "wall time, peak RSS and command go into the row)",
    )
    p.add_argument("--steps", type=int, default=STEPS, help=f"uncached steps timed (default {STEPS})")
    p.add_argument("--precision", default="fp16", help="fp32|fp16|fp8 (fp8: with --backend tensorrt-rtx)")
    p.add_argument("--size", default=REDUCED, help=f"frames x height x width to build at (default {REDUCED})")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime|tensorrt-rtx (engines built, not run)")
    p.add_argument("--compute-capability", help="with --backend tensorrt-rtx: the target, e.g. SM89")
    p.add_argument("--fp8-samples", type=int, help="with --precision fp8: calibration trajectories")
    p.add_argument("--layers", type=int, help="build this many blocks (default: all)")
    p.add_argument("--group-blocks", type=int, help="stream the build, this many blocks per graph")
    p.add_argument("--threads", type=int, default=2, help="threads of the measured runs (torch and ONNX Runtime)")
    p.add_argument("--work", type=Path, help="where the bundle is built (default: a temporary folder, removed)")
    p.add_argument("--out", type=Path, default=RESULTS, help="the results folder")
    args = p.parse_args(argv)
    if (args.model is None) == (args.bundle is None):
        p.error("give --model (build and measure) or --bundle (measure)")
    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    if args.bundle is not None:
        row = _described(Bundle.load(args.bundle).manifest)
        if args.build_log is not None:
            row |= build_figures(args.build_log.read_text(errors="replace"))
            del row["build"]
        row |= measure_bundle(args.bundle, args.threads, args.steps)
    else:
        with tempfile.TemporaryDirectory(dir=args.work) as scratch:
            bundle = Path(scratch) / "bundle"
            row = {
                "model": args.model,
                "precision": args.precision,
                "reduced": args.size,
                "group_blocks": args.group_blocks,
            }
            row |= build(
                args.model,
                args.precision,
                args.size,
                bundle,
                args.layers,
                args.group_blocks,
                args.backend,
                args.compute_capability,
                args.fp8_samples,
            )
            row |= measure_bundle(bundle, args.threads, args.steps)
            if row["group_blocks"] is None and "sizing" in row:
                row["group_blocks"] = row["sizing"]["group_blocks"]
    row["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    row["load_average_1m"] = {"start": load_before, "end": os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    name = row["model"] + ("" if args.layers is None else f"-{args.layers}blocks") + f"-{row['precision']}"
    name += "" if row["backend"] == "onnxruntime" else f"-{row['backend']}"
    name += "" if row["group_blocks"] is None else f"-groups-of-{row['group_blocks']}"
    name += "-auto" if row.get("sizing", {}).get("automatic") else ""
    write_atomic(args.out / f"{name}.json", json.dumps(row, indent=1).encode())
    write_report(args.out)
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
