"""The main job on the bundled default: build tiny-wan, calibrate it, and generate the same
prompts with and without SenCache, printing NFE, speed-up and PSNR against the uncached video."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sencache.benchmarks.metrics import psnr
from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.backends.base import MAX_THREADS, open_backend
from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import NoCache
from sencache.runtime.errors import BadInput
from sencache.runtime.files import BUNDLE, RUN, check_output, staged_folder
from sencache.runtime.model import Model
from sencache.runtime.outputs import write_run
from sencache.runtime.request import Request

DEMO_PROMPTS = [
    ("one large white circle static on black", 11),
    ("one small red square moving right slow on black", 12),
    ("two large green circles moving down fast on gradient", 13),
    ("three small yellow squares moving left fast on texture", 14),
]


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
        build(BuildOptions(model="tiny-wan", out=folder, max_batch=len(DEMO_PROMPTS)))
        return Bundle.load(folder)


def run_demo(out: Path, threads: int = 1, overwrite: bool = False) -> None:
    """Build (or reuse) and calibrate tiny-wan in `out`, then write and compare its uncached and
    SenCache runs there; earlier runs are replaced only with `overwrite`."""
    if not 1 <= threads <= MAX_THREADS:
        raise BadInput(f"--threads must be in [1, {MAX_THREADS}], got {threads}")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    for name in ("none", "sencache"):
        check_output(out / name, RUN, overwrite)
    torch.set_num_threads(threads)
    bundle = _bundle(out / "tiny-wan", overwrite)
    engine = Model(bundle, open_backend(bundle, threads=threads))
    if not bundle.sensitivity_path.exists() or not bundle.baselines_path.exists():
        calibration = calibrate(engine, CalibrationPlan())
        bundle.write_tables(calibration.sensitivity, calibration.baselines)
        print(f"calibrated {bundle.sensitivity_path}")
    defaults = bundle.manifest.defaults
    prompts, seeds = [p for p, _ in DEMO_PROMPTS], [s for _, s in DEMO_PROMPTS]
    request = Request(prompts, seeds, defaults.steps, defaults.guidance)
    batch = len(prompts)
    engine.generate(Request(prompts, seeds, 2, defaults.guidance), NoCache(batch))  # warm-up

    runs = {}
    for name in ("none", "sencache"):
        with staged_folder(out / name, RUN) as folder:
            started = time.perf_counter()
            policy = engine.policy(name, request.steps, batch, {})
            result = engine.generate(request, policy)
            frames = engine.decode(result.latents)
            write_run(folder, engine, request, policy, result, frames, time.perf_counter() - started)
        runs[name] = (result, frames)

    base, cached = runs["none"], runs["sencache"]
    print(f"\n{'prompt':56s} {'NFE':>6s} {'PSNR dB':>8s}  decisions (R run, . reuse)")
    for i, prompt in enumerate(prompts):
        pattern = "".join("R" if d == "run" else "." for d in cached[0].decisions[i])
        print(
            f"{prompt:56s} {cached[0].nfe[i]:2d}/{request.steps:<3d} {psnr(cached[1][i], base[1][i]):8.2f}  {pattern}"
        )
    t_base, t_cached = base[0].timing["denoise_s"], cached[0].timing["denoise_s"]
    ideal = request.steps * batch / sum(cached[0].nfe)
    print(
        f"\ndenoise: uncached {t_base:.2f} s ({t_base / request.steps * 1000:.0f} ms/step), "
        f"SenCache {t_cached:.2f} s -> speed-up {t_base / t_cached:.2f}x (steps/NFE {ideal:.2f}x); "
        f"decisions {cached[0].timing['decision_s'] * 1000:.2f} ms in all"
    )
    print(f"videos and stats: {out / 'none'} and {out / 'sencache'}")
