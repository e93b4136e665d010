"""The main job on the bundled default: build tiny-wan, calibrate it, and generate the same
prompts with and without SenCache, printing NFE, PSNR against the uncached video, and the speed-up
as the median of uncached/cached pairs from interleaved runs, with its spread (`sencache.benchmarks.timing`)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from sencache.benchmarks.metrics import psnr
from sencache.benchmarks.timing import PairedTiming, below_floor, floor_speedup, run_chain
from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.console.output import note, say
from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import NoCache
from sencache.runtime.errors import BadInput
from sencache.runtime.files import BUNDLE, RUN, check_output, staged_folder
from sencache.runtime.limits import MAX_THREADS
from sencache.runtime.model import Model
from sencache.runtime.outputs import write_run
from sencache.runtime.request import GenerationParams, Result

DEMO_PROMPTS = [
    ("one large white circle static on black", 11),
    ("one small red square moving right slow on black", 12),
    ("two large green circles moving down fast on gradient", 13),
    ("three small yellow squares moving left fast on texture", 14),
]
DEMO_REPEATS = 2
"""Timed SenCache runs, each between two uncached runs (U C U C U: 4 pairs); the first uncached and
the first SenCache run are the ones written to the output folder."""
MAX_REPEATS = 10


def _bundle(folder: Path, overwrite: bool) -> Bundle:
    """The demo's tiny-wan bundle: the one an earlier demo built there, else a new build (which
    replaces a bundle that no longer loads only with `overwrite`)."""
    try:
        return Bundle.load(folder)
    except BadInput as unloadable:
        try:
            check_output(folder, BUNDLE, overwrite)
        except BadInput as refused:
            raise BadInput(f"{refused} ({unloadable})", param=refused.param) from None
        note(f"building the tiny-wan engine bundle into {folder} (once; later demos reuse it)")
        build(BuildOptions(model="tiny-wan", out=folder, max_batch=len(DEMO_PROMPTS)))
        return Bundle.load(folder)


def speedup_verdict(timing: PairedTiming, ceiling: float) -> tuple[str, list[str]]:
    """The speed-up as printed and the warnings under it. `ceiling` is the most skipping steps can
    gain (steps/NFE, a reused step costing nothing); a median above it is disturbed timing."""
    warnings = [] if timing.warning is None else [timing.warning]
    if below_floor(timing.median, ceiling):
        warnings.insert(
            0, f"faster than skipping steps can make it ({ceiling:.2f}x): other work slowed the uncached runs"
        )
        return f"disturbed timing, not a result (median {timing.median:.2f}x)", warnings
    return timing.describe(), warnings


def run_demo(out: Path, threads: int = 1, repeats: int = DEMO_REPEATS, overwrite: bool = False) -> None:
    """Build (or reuse) and calibrate tiny-wan in `out`, then write its uncached and SenCache runs
    there (earlier runs are replaced only with `overwrite`), and print quality and the paired speed-up."""
    if not 1 <= threads <= MAX_THREADS:
        raise BadInput(f"--threads must be in [1, {MAX_THREADS}], got {threads}")
    if not 1 <= repeats <= MAX_REPEATS:
        raise BadInput(f"--repeats must be in [1, {MAX_REPEATS}], got {repeats}")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    for name in ("none", "sencache"):
        check_output(out / name, RUN, overwrite)
    torch.set_num_threads(threads)
    note(
        f"sencache demo: tiny-wan, {len(DEMO_PROMPTS)} prompts uncached and with SenCache, {2 * repeats + 1} timed "
        f"runs on {threads} thread(s); outputs in {out}"
    )
    engine = Model.open(_bundle(out / "tiny-wan", overwrite).path, threads=threads)
    bundle = engine.bundle
    if not bundle.sensitivity_path.exists() or not bundle.baselines_path.exists():
        note("calibrating the sensitivity table on the model's own trajectories (once)")
        calibration = calibrate(engine, CalibrationPlan())
        bundle.write_tables(calibration.sensitivity, calibration.baselines)
        note(f"calibrated {bundle.sensitivity_path}")
    defaults = bundle.manifest.defaults
    prompts, seeds = [p for p, _ in DEMO_PROMPTS], [s for _, s in DEMO_PROMPTS]
    request = GenerationParams(prompts, seeds, defaults.steps, defaults.guidance)
    batch = len(prompts)
    note("warm-up")
    engine.generate(GenerationParams(prompts, seeds, 2, defaults.guidance), NoCache(batch))

    runs: dict[str, tuple[Result, np.ndarray]] = {}
    count = iter(range(1, 2 * repeats + 2))

    def timed(name: str) -> float:
        """One run; the first of each kind is decoded and written to `out/name`. Its denoising seconds."""
        note(f"run {next(count)}/{2 * repeats + 1}: {name} ({request.steps} steps, {batch} prompts)")
        policy = engine.policy(name, request.steps, batch, {})
        if name in runs:
            return engine.generate(request, policy, progress=True).timing["denoise_s"]
        with staged_folder(out / name, RUN) as folder:
            started = time.perf_counter()
            result = engine.generate(request, policy, progress=True)
            frames = engine.decode(result.latents)
            write_run(folder, engine, request, policy, result, frames, time.perf_counter() - started)
        runs[name] = (result, frames)
        return result.timing["denoise_s"]

    (timing,) = run_chain(lambda: timed("none"), [lambda _: timed("sencache")], repeats)

    base_frames, (cached, cached_frames) = runs["none"][1], runs["sencache"]
    say(f"\n{'prompt':56s} {'NFE':>6s} {'PSNR dB':>8s}  decisions (R run, . reuse)")
    for i, prompt in enumerate(prompts):
        pattern = "".join("R" if d == "run" else "." for d in cached.decisions[i])
        quality = psnr(cached_frames[i], base_frames[i])
        say(f"{prompt:56s} {cached.nfe[i]:2d}/{request.steps:<3d} {quality:8.2f}  {pattern}")
    t_base, t_cached = statistics.median(timing.uncached_s), statistics.median(timing.cached_s)
    ideal = request.steps * batch / sum(cached.nfe)
    speedup, warnings = speedup_verdict(timing, floor_speedup(request.steps, sum(cached.nfe) / batch, 0.0))
    say(
        f"\ndenoise (medians): uncached {t_base:.2f} s ({t_base / request.steps * 1000:.0f} ms/step), "
        f"SenCache {t_cached:.2f} s -> speed-up {speedup}, steps/NFE {ideal:.2f}x; "
        f"decisions {cached.timing['decision_s'] * 1000:.2f} ms in all"
    )
    for warning in warnings:
        say(f"warning: {warning}")
    say(f"videos and stats: {out / 'none'} and {out / 'sencache'}")
