"""The `sencache` command: build, calibrate, generate, demo.

Exit status: 0 on success, 2 on bad input (one line on stderr, no partial output), 1 on an
internal failure. An error about one parameter names it as this command's flag (`--eps-main`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import time
from pathlib import Path

from sencache.console.command import OURS, VERBOSE_HELP, CommandParser, Terminated, run
from sencache.engine_builder.build_engine import HELP as BUILD_HELP
from sencache.engine_builder.build_engine import add_build_arguments, failure, run_build
from sencache.runtime.cache import KNOBS, METHODS, Knob
from sencache.runtime.cache.knobs import BUDGET_TARGETS
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import table_name
from sencache.runtime.files import RUN, check_output
from sencache.runtime.images import check_image_fits, read_image
from sencache.runtime.limits import MAX_STEPS, check_threads
from sencache.runtime.manifest import BASELINES, DUMMY_NOTICE, SENSITIVITY, Manifest, read_manifest
from sencache.runtime.parallel.config import ParallelConfig
from sencache.runtime.request import SAMPLINGS, GenerationParams
from sencache.runtime.tiny_grammar import PromptSpec, grammar_help, tokenize


def _calibrate(args: argparse.Namespace) -> None:
    if args.import_npz and args.from_bundle:
        raise BadInput("give --import-npz or --from-bundle, not both")
    if (args.import_npz or args.from_bundle) and (args.prompts or args.prompt):
        raise BadInput(
            "--prompts and --prompt choose what calibration measures on; --import-npz and --from-bundle measure nothing"
        )
    manifest, _ = read_manifest(args.engine)
    image = None if args.image is None else read_image(args.image)
    if not (args.import_npz or args.from_bundle):
        check_image_fits(manifest.family, manifest.model, image is not None)
    if args.from_bundle is not None:
        read_manifest(args.from_bundle)
    if SENSITIVITY in manifest.files and not args.overwrite:
        raise BadInput(
            f"overwrite not given: {args.engine} already has a sensitivity table; give it to replace the bundle's "
            f"tables, or calibrate a copy",
            param="overwrite",
        )
    from sencache.runtime.bundle import Bundle
    from sencache.runtime.model import Model
    from sencache.runtime.sensitivity import SensitivityTable

    bundle = Bundle.load(args.engine)
    if args.from_bundle:
        table = bundle.adopt_tables(Bundle.load(args.from_bundle))
        print(f"took the {len(table.timesteps)}-timestep table of {args.from_bundle} into {bundle.sensitivity_path}")
        return
    if args.import_npz:
        table = SensitivityTable.from_npz(args.import_npz, meta={"model": bundle.manifest.model})
        bundle.write_tables(table)
        print(f"imported {len(table.timesteps)} timesteps from {args.import_npz} into {bundle.sensitivity_path}")
        return
    from sencache.calibration.calibrate import CalibrationPlan, calibrate

    plan = CalibrationPlan(
        samples=args.samples,
        curve_samples=args.curve_samples,
        steps=args.steps,
        seed=args.seed,
        branch=args.branch,
        procedure=args.procedure,
        solver_state=args.solver_state,
        sampling=args.sampling,
    )
    prompts = _calibration_prompts(args)
    engine = Model.open(bundle, threads=args.threads)
    result = calibrate(engine, plan, prompts, allow_tiny_vocabulary=args.allow_tiny_vocabulary, image=image)
    for expert, tables in enumerate(result.experts):
        table = tables.sensitivity
        bundle.write_tables(table, tables.baselines, expert)
        which = f" (expert {expert + 1})" if len(result.experts) > 1 else ""
        print(
            f"wrote {bundle.path / table_name(SENSITIVITY, expert)}{which}: {len(table.timesteps)} timesteps, "
            f"{table.meta['samples']} samples, "
            f"Jx {table.jx.min():.3g}..{table.jx.max():.3g}, Jt {table.jt.min():.3g}..{table.jt.max():.3g}"
        )
        if tables.baselines is not None:
            print(
                f"wrote {bundle.path / table_name(BASELINES, expert)}{which}: TeaCache polynomial, "
                f"MagCache ratios for {len(tables.baselines.magcache_ratios)} steps"
            )


def _calibration_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts of --prompts FILE then each --prompt; None when neither is given (the model's default)."""
    from sencache.data.prompts import read_prompts

    if args.prompts is None and args.prompt is None:
        return None
    return (read_prompts(args.prompts) if args.prompts is not None else []) + (args.prompt or [])


def _separate(out: Path, engine: Path) -> None:
    """Refuse an output folder that would replace the bundle (or a folder holding it)."""
    out, engine = out.resolve(), engine.resolve()
    if out == engine or out in engine.parents:
        raise BadInput(f"--out {out} would replace the engine bundle {engine}; choose another folder")


def _dummy_notice(manifest: Manifest) -> None:
    """Say once, on stderr, that a dummy build's weights are random."""
    if manifest.dummy:
        print(f"note: {manifest.model}: {DUMMY_NOTICE}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:
    _separate(args.out, args.engine)
    manifest, _ = read_manifest(args.engine)
    check_output(args.out, RUN, args.overwrite)
    request = GenerationParams.resolve(
        manifest.defaults,
        args.prompt or [],
        args.seed or [0],
        steps=args.steps,
        guidance=args.guidance,
        guidance_2=args.guidance_2,
        cache=args.cache,
        knobs={name: getattr(args, name) for name in KNOBS},
        dynamic_cfg=args.dynamic_cfg,
        sampling=args.sampling,
        image=None if args.image is None else read_image(args.image),
    )
    check_image_fits(manifest.family, manifest.model, request.image is not None)
    check_threads(args.threads)
    ParallelConfig.parse(args.parallel)  # its syntax, before any model code is imported
    if manifest.text_encoder.kind == "tiny":
        for prompt in request.prompts:
            tokenize(prompt)  # the vocabulary and grammar, before any model code is imported
    from sencache.runtime.api import Engine
    from sencache.runtime.files import check_free_space, staged_folder
    from sencache.runtime.outputs import run_bytes, write_run

    started = time.perf_counter()
    with Engine.from_bundle(
        args.engine, args.backend or "auto", args.device, args.threads, parallel=args.parallel
    ) as engine:
        if not engine.is_driver:
            return  # this rank runs rank 0's passes until rank 0 closes the engine; rank 0 writes the run
        model = engine.model
        _dummy_notice(manifest)
        if not model.bundle.manifest.trained:
            print(
                f"warning: {model.bundle.manifest.model} is UNTRAINED (random weights): its videos are noise; "
                f"it exists for export and parity checks",
                file=sys.stderr,
            )
        model.encode(request.prompts)
        policy = model.policy(request.cache, request.steps, len(request.prompts), request.knobs)
        check_free_space(args.out.parent, run_bytes(model.bundle, len(request.prompts)), f"writing {args.out}")
        with staged_folder(args.out, RUN) as folder:  # claimed (locked, writable) before the work
            result = engine.denoise(request, policy, progress=True)
            engine.close()  # lets the other ranks go: decoding and writing are rank 0's alone
            frames = model.decode(result.latents)
            document = write_run(folder, model, request, policy, result, frames, time.perf_counter() - started)
    for sample in document["samples"]:
        print(
            f"{sample['nfe']:3d}/{request.steps} NFE  {sample['prompt']!r} seed {sample['seed']} "
            f"-> {args.out / sample['video']}"
        )
    timing = document["timing"]
    print(
        f"denoise {timing['denoise_s']:.2f} s ({timing['per_step_s'] * 1000:.1f} ms/step), "
        f"decisions {timing['decision_s'] * 1000:.2f} ms, total {timing['total_s']:.2f} s"
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _bench(args: argparse.Namespace) -> None:
    _separate(args.out, args.engine)
    manifest, _ = read_manifest(args.engine)
    steps = manifest.defaults.steps if args.steps is None else args.steps
    if not 1 <= steps <= MAX_STEPS:
        raise BadInput(f"--steps must be in [1, {MAX_STEPS}], got {steps}")
    from sencache.benchmarks.bench import (
        KIND,
        QUICK_METHODS,
        QUICK_REPEATS,
        QUICK_SAMPLES,
        REPEATS,
        SWEEPS,
        BenchPlan,
        evaluation_images,
        evaluation_set,
        run_bench,
    )
    from sencache.benchmarks.diffusers_peers import PEERS
    from sencache.runtime.bundle import Bundle
    from sencache.runtime.model import Model

    check_output(args.out, KIND, args.overwrite)
    bundle = Bundle.load(args.engine)
    _dummy_notice(manifest)
    defaults = bundle.manifest.defaults
    prompts, seeds = evaluation_set(QUICK_SAMPLES if args.quick else args.samples, args.prompts, args.seeds)
    default = [
        m for m in (QUICK_METHODS if args.quick else SWEEPS) if bundle.manifest.family == "wan" or m not in PEERS
    ]
    engine = Model.open(bundle, threads=1)
    images, image_source = evaluation_images(engine, prompts, args.images)
    plan = BenchPlan(
        methods=tuple(args.methods or default),
        prompts=tuple(prompts),
        seeds=tuple(seeds),
        steps=steps,
        guidance=defaults.guidance,
        guidance_2=defaults.guidance_2,
        quick=args.quick,
        repeats=(QUICK_REPEATS if args.quick else REPEATS) if args.repeats is None else args.repeats,
        images=images,
        image_source=image_source,
    )
    report = run_bench(engine, plan, args.out)
    print((args.out / "report.md").read_text())
    print(f"report: {args.out / 'report.json'}, plot: {args.out / 'quality_vs_nfe.png'} ({len(report['runs'])} runs)")


def _kernels(args: argparse.Namespace) -> None:
    from sencache.kernels.nvrtc_build import KernelBuildError, compile_drift_kernel

    if not args.compile:
        raise BadInput("say what to do: sencache kernels --compile --arch sm_90")
    for arch in args.arch:
        try:
            kernel = compile_drift_kernel(arch, use_cache=not args.no_cache)
        except KernelBuildError as e:
            raise BadInput(str(e)) from None
        print(f"{arch}: cubin {kernel.cubin}{' (cached)' if kernel.cached else ''}")
        for entry in sorted(kernel.registers):
            print(f"  {entry:20s} {kernel.registers[entry]:3d} registers, {kernel.spills[entry]} bytes spilled")


def _doctor(args: argparse.Namespace) -> None:
    from sencache.doctor import print_report

    print_report()


def _gpu_acceptance(args: argparse.Namespace) -> None:
    from sencache.kernels.cuda_drift import CudaUnavailable

    try:
        from sencache.gpu_acceptance import run

        run(args.out)
    except CudaUnavailable as e:
        raise BadInput(f"needs a CUDA GPU: {e}") from None


def _demo(args: argparse.Namespace) -> None:
    from sencache.demo import run_demo

    run_demo(args.out, threads=args.threads, repeats=args.repeats, overwrite=args.overwrite)


def _serve(args: argparse.Namespace) -> None:
    from sencache.serving.options import ServeOptions

    options = ServeOptions(
        engine=args.engine,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        max_queue=args.max_queue,
        batching=args.batching,
        threads=args.threads,
        backend=args.backend,
        device=args.device,
        max_body_mb=args.max_body_mb,
        gpus_per_replica=args.gpus_per_replica,
        parallel=args.parallel,
    )
    options.check()  # before Ray and torch are imported: a bad bundle path or a port in use is refused at once
    _dummy_notice(read_manifest(args.engine)[0])
    from sencache.serving.app import serve_forever

    ended = serve_forever(options)
    raise Terminated() if ended == signal.SIGTERM else KeyboardInterrupt()


_GENERATE_EPILOG = "\n\n".join(
    (
        textwrap.fill(
            "--prompt and --seed repeat and pair up in order: the first prompt with the first seed, the second "
            "with the second, and so on (one prompt without --seed takes seed 0); all of them run as one batch.",
            79,
        ),
        textwrap.fill("Tiny models (tiny-wan, tiny-cogvideox, tiny-ltx) take only the prompts of their grammar:", 79)
        + "\n"
        + textwrap.indent(grammar_help(), "  ")
        + f"\nfor example: {PromptSpec('two', 'small', 'red', 'circle', 'left', 'fast', 'texture').prompt!r}",
    )
)
"""What `generate --help` ends with: how prompts and seeds pair up, and the tiny prompt grammar."""


def _knob_default(knob: Knob) -> str:
    """What an unset knob means, unless its help says it."""
    if "(default" in knob.help:
        return ""
    if knob.name in BUDGET_TARGETS:
        return " (default: none, the thresholds decide)"
    return " (default: the bundle's setting, else the rule's own)"


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="sencache", description="Sensitivity-aware caching for video diffusion transformers")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help=BUILD_HELP)
    add_build_arguments(b)
    b.set_defaults(func=run_build)

    c = sub.add_parser("calibrate", help="measure the sensitivity table of a bundle")
    c.add_argument(
        "--engine", type=Path, required=True, help="the bundle to calibrate (its tables are written into it)"
    )
    c.add_argument(
        "--samples", type=int, help="trajectories, the prompts taken in turn (default: one per prompt given, else 8)"
    )
    c.add_argument(
        "--curve-samples",
        type=int,
        help="samples sencache-online's NFE curve is measured on, the calibration's first (default: --samples)",
    )
    c.add_argument(
        "--prompts",
        type=Path,
        help="calibration prompts, one per line (default: the model's own: the "
        "tiny grammar for tiny bundles, built-in video prompts for real models)",
    )
    c.add_argument("--prompt", action="append", help="a calibration prompt (repeatable; after those of --prompts)")
    c.add_argument(
        "--image", type=Path, help="image-to-video models: the first frame every calibration trajectory starts from"
    )
    c.add_argument(
        "--allow-tiny-vocabulary",
        action="store_true",
        help="calibrate a real model on prompts that are all in the tiny models' vocabulary",
    )
    c.add_argument("--steps", type=int, help="denoising steps of each trajectory (default: the bundle's)")
    c.add_argument(
        "--seed", type=int, default=1000, help="first seed of the trajectories (and of a tiny bundle's drawn prompts)"
    )
    c.add_argument(
        "--branch",
        choices=("guided", "cond"),
        help="measure Jx, Jt on the guided output or on the conditional branch alone, as the authors' "
        "calibration does (default: guided; cond under --procedure reference)",
    )
    c.add_argument(
        "--procedure",
        choices=("engine", "reference"),
        default="engine",
        help="engine (default): the model's own uncached trajectories; reference: the authors' procedure, "
        "training clips noised to each timestep (tiny models; sensitivity table only)",
    )
    c.add_argument(
        "--solver-state",
        choices=("fresh", "per-sample"),
        help="the solver state x' steps from: a fresh one at every step, or the authors' one per sample "
        "stepped through its timesteps in order (default: fresh; per-sample under --procedure reference)",
    )
    c.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default="engine",
        help="the schedule of the calibrated timesteps: the bundle's (engine) or the authors' preset "
        "(reference; Wan: flow shift 5.0)",
    )
    c.add_argument("--import-npz", type=Path, help="import the authors' .npz table instead of measuring")
    c.add_argument(
        "--from-bundle",
        type=Path,
        help="take the tables of another build of the same model (an fp8 bundle: its fp32 build's)",
    )
    c.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (0: all); one as in the demo: tiny-wan's calibration took 2.5x the CPU time on all cores",
    )
    c.add_argument(
        "--overwrite", action="store_true", help="replace the tables of a bundle that has a sensitivity table already"
    )
    c.set_defaults(func=_calibrate)

    g = sub.add_parser(
        "generate",
        help="generate videos from prompts",
        description="Generate videos from prompts with an engine bundle; one video per --prompt.",
        epilog=_GENERATE_EPILOG,
    )
    g.add_argument("--engine", type=Path, required=True, help="the engine bundle to run (made by `sencache build`)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable; pairs with the --seed in the same place)")
    g.add_argument(
        "--seed", type=int, action="append", help="a seed (repeatable; pairs with the --prompt in the same place)"
    )
    g.add_argument(
        "--image",
        type=Path,
        help="image-to-video models: the first frame (PNG, JPEG, ...; RGB), resized to the video as the "
        "model's pipeline does; the same for every prompt",
    )
    g.add_argument("--steps", type=int, help="denoising steps (default: the bundle's)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the bundle's)")
    g.add_argument(
        "--guidance-2",
        type=float,
        help="two-expert models (Wan 2.2 A14B): the low-noise expert's guidance scale "
        "(default: the bundle's, or --guidance when given)",
    )
    g.add_argument(
        "--dynamic-cfg", action="store_true", help="CogVideoX only: the pipeline's use_dynamic_cfg guidance schedule"
    )
    g.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default="engine",
        help="the bundle's scheduler (engine, default) or the SenCache authors' sampling preset "
        "(reference; Wan only: flow shift 5.0 for T2V)",
    )
    g.add_argument("--cache", choices=tuple(METHODS), default="sencache", help="the cache rule (none: every step runs)")
    for knob in KNOBS.values():
        g.add_argument(
            "--" + knob.name.replace("_", "-"),
            type=knob.type,
            choices=knob.choices or None,
            help=knob.help.replace("%", "%%") + _knob_default(knob),
        )
    g.add_argument("--backend", help="run on this backend (must match the bundle; default: the bundle's)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: all)")
    g.add_argument("--device", default="cpu", help="torch bundles: where the stages and the loop run (cpu, cuda)")
    g.add_argument(
        "--parallel",
        help="split every pass over sp x cfg ranks, e.g. sp=2,cfg=2 (sp>1: torch bundles); start one process "
        "per rank with torchrun --nproc-per-node <sp*cfg> -m sencache.cli generate ...; rank 0 writes the run",
    )
    g.add_argument("--out", type=Path, required=True, help="the run folder to write (videos, frames, stats.json)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out" + OURS)
    g.set_defaults(func=_generate)

    r = sub.add_parser("bench", help="sweep SenCache and the baselines; quality against NFE and speed")
    r.add_argument("--engine", type=Path, required=True, help="the calibrated bundle to measure")
    r.add_argument(
        "--out", type=Path, required=True, help="the report folder to write (report.md, report.json, the plot)"
    )
    r.add_argument(
        "--methods",
        nargs="+",
        help="sencache sencache-max sencache-reference sencache-online budget-threshold budget-hard sencache-plan "
        "fixed fixed-warmup teacache magcache diffusers-magcache diffusers-fbc (default: all)",
    )
    r.add_argument("--prompts", type=Path, help="evaluation prompts, one per line (default: drawn from the grammar)")
    r.add_argument("--seeds", type=int, nargs="+", help="one seed per prompt (default: 0, 1, ...)")
    r.add_argument(
        "--images",
        type=Path,
        nargs="+",
        help="image-to-video models: one image for every sample, or one per prompt (default for a tiny model: "
        "the first frame of a clip of each prompt)",
    )
    r.add_argument("--samples", type=int, default=16, help="evaluation prompts drawn when --prompts is not given")
    r.add_argument("--steps", type=int, help="denoising steps (default: the bundle's)")
    r.add_argument(
        "--quick",
        action="store_true",
        help="4 samples, 1 repeat, sencache and one baseline of each kind, 2 settings each (diffusers peers "
        "only with --methods)",
    )
    r.add_argument(
        "--repeats",
        type=int,
        help="timed cached runs per setting, each between two uncached runs; the speed-up is the median of "
        "the 2 x repeats ratios (default 2; --quick: 1)",
    )
    r.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out" + OURS)
    r.set_defaults(func=_bench)

    k = sub.add_parser("kernels", help="compile the CUDA drift kernel with NVRTC (no GPU needed)")
    k.add_argument("--compile", action="store_true", help="compile the kernel for each --arch")
    k.add_argument("--arch", nargs="+", default=["sm_90"], help="sm_80 sm_90 sm_100 ...")
    k.add_argument("--no-cache", action="store_true", help="recompile even if a cached cubin exists")
    k.set_defaults(func=_kernels)

    sub.add_parser("doctor", help="what this machine has: GPU, CUDA, TensorRT, ONNX Runtime, NVRTC").set_defaults(
        func=_doctor
    )

    a = sub.add_parser(
        "gpu-acceptance",
        help="on a CUDA GPU: drift kernel parity, bandwidth, decision latency, cached vs uncached loop; JSON",
    )
    a.add_argument("--out", type=Path, help="also write the JSON here")
    a.set_defaults(func=_gpu_acceptance)

    s = sub.add_parser("serve", help="serve an engine over HTTP (OpenAI-style video API on Ray Serve)")
    s.add_argument("--engine", type=Path, required=True, help="the engine bundle to serve")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--replicas", type=int, default=1, help="engine replicas (each one engine; jobs stay on theirs)")
    s.add_argument("--max-queue", type=int, default=64, help="jobs waiting for rows per replica; more get 429")
    s.add_argument(
        "--batching",
        choices=("step", "static"),
        default="step",
        help="step: jobs join at any step boundary; static: a batch runs to completion before the next",
    )
    s.add_argument("--threads", type=int, default=1, help="CPU threads per replica (0: all)")
    s.add_argument("--backend", default="auto", help="run on this backend (must match the bundle)")
    s.add_argument("--device", default="cpu", help="torch bundles: cpu or cuda (one GPU per rank)")
    s.add_argument(
        "--gpus-per-replica",
        type=int,
        default=1,
        help="ranks of each replica's engine, one GPU each (on the CPU: --threads CPUs each), in one Ray "
        "placement group per replica; more than 1 needs --parallel",
    )
    s.add_argument(
        "--parallel",
        help="how each replica's engine splits over its --gpus-per-replica ranks, e.g. sp=2,cfg=2 (sp>1: torch "
        "bundles); sp x cfg must equal --gpus-per-replica",
    )
    s.add_argument(
        "--max-body-mb",
        type=float,
        help="largest request body in MB (10^6 bytes); larger ones get 413 before they are read (default: two "
        "of the bundle's text embeddings at 32 bytes a number, plus 1 MB)",
    )
    s.set_defaults(func=_serve)

    d = sub.add_parser("demo", help="build, calibrate and compare SenCache with the uncached run on tiny-wan")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder of the demo's bundle and two runs")
    d.add_argument("--threads", type=int, default=1, help="CPU threads for the timed runs")
    d.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed SenCache runs, each between two uncached runs; the speed-up is the median of the 2 x "
        "repeats ratios",
    )
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the runs of an earlier demo in --out (its bundle and tables are reused)" + OURS,
    )
    d.set_defaults(func=_demo)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        command.set_defaults(flag=command.flag)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status is `sencache.console.command.run`'s."""
    args = parser().parse_args(argv)
    return run(f"sencache {args.command}", args, failure)


if __name__ == "__main__":
    sys.exit(main())
