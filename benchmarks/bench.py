"""`sencache bench`: sweep each cache method's knob on one bundle and compare at matched NFE.

Every run uses the same engine, prompts, seeds and steps; only the decision rule differs. Quality
is measured against the uncached video of the same prompt and seed (PSNR, SSIM; LPIPS is
reported as unavailable: its backbone weights cannot be fetched here). Speed is measured in the
same process with one CPU thread after a warm-up, on the first batch of samples: the median ratio
of uncached/cached pairs from one chain of interleaved runs, with its spread (`sencache.benchmarks.timing`), decision
overhead per step, and the loop's distance from its floor NFE x t(run step) + (steps - NFE) x
t(reuse step). A speed-up above the floor's is flagged as disturbed timing, not reported as a result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sencache.benchmarks.diffusers_peers import PEERS, DiffusersPeers
from sencache.benchmarks.flops import stage_flops
from sencache.benchmarks.matched import PSNR_CAP, compare_at_matched_nfe
from sencache.benchmarks.metrics import psnr, ssim
from sencache.benchmarks.report import write_markdown, write_plot
from sencache.benchmarks.timing import MAX_SPREAD, PairedTiming, below_floor, floor_speedup, run_chain
from sencache.console.output import progress, third_party_output
from sencache.data.clips import first_frame
from sencache.data.grammar import grammar_prompts
from sencache.runtime.cache import NoCache
from sencache.runtime.cache.knobs import SPEEDS
from sencache.runtime.errors import BadInput
from sencache.runtime.files import check_replaceable, staged_folder, write_atomic
from sencache.runtime.images import read_image
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams, Result
from sencache.runtime.tiny_grammar import tokenize

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
    "sencache-reference": [{"eps_main": e} for e in (0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5)],
    "sencache-online": [{"eps_main": e} for e in (0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5)],
    "fixed": [{"interval": k} for k in (2, 3, 4, 5)],
    "fixed-warmup": [{"interval": k, "warmup": -1} for k in (2, 3, 4, 5, 6)],
    "teacache": [{"threshold": t} for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)],
    "magcache": [{"threshold": t} for t in (0.02, 0.05, 0.1, 0.2, 0.4)],
    "diffusers-magcache": [{"threshold": t} for t in (0.02, 0.05, 0.1, 0.2, 0.4)],
    "diffusers-fbc": [{"threshold": t} for t in (0.02, 0.05, 0.1, 0.2)],
    "budget-threshold": [{"speed": s} for s in SPEEDS],
    "budget-hard": [{"speed": s, "budget": "hard"} for s in SPEEDS],
    "sencache-plan": [{"speed": s} for s in SPEEDS],
}
QUICK_SWEEPS: dict[str, list[dict[str, Any]]] = {
    "sencache": [{"eps_main": e} for e in (0.3, 0.6)],
    "sencache-max": [{"eps_main": e} for e in (0.3, 0.6)],
    "sencache-online": [{"eps_main": e} for e in (0.3, 0.6)],
    "fixed": [{"interval": k} for k in (2, 3)],
    "fixed-warmup": [{"interval": k, "warmup": -1} for k in (2, 4)],
    "teacache": [{"threshold": t} for t in (0.1, 0.3)],
    "magcache": [{"threshold": t} for t in (0.05, 0.2)],
    "diffusers-magcache": [{"threshold": t} for t in (0.05, 0.2)],
    "diffusers-fbc": [{"threshold": t} for t in (0.05, 0.2)],
    "budget-threshold": [{"speed": s} for s in ("high", "fast")],
    "budget-hard": [{"speed": s, "budget": "hard"} for s in ("high", "fast")],
    "sencache-plan": [{"speed": s} for s in ("high", "fast")],
}
QUICK_METHODS = ("sencache", "fixed-warmup", "teacache", "magcache")
"""What --quick runs unless --methods says otherwise: SenCache and one of each kind of baseline."""
QUICK_SAMPLES = 4
REPEATS = 2
"""Timed cached runs per setting, each between two uncached runs (so 2 x REPEATS pairs)."""
QUICK_REPEATS = 1
MAX_REPEATS = 10
BUDGETS = {"budget-threshold": "sencache", "budget-hard": "sencache", "sencache-plan": "sencache-plan"}
"""Sweeps under an NFE budget (the named speeds) instead of thresholds, by the runtime rule each
runs (SenCache's budget, or sencache-plan): the report gives the NFE each asked for next to the
NFE it got."""


@dataclass(frozen=True)
class BenchPlan:
    methods: tuple[str, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    quick: bool
    repeats: int = REPEATS
    """Timed cached runs per setting on the first batch of samples, each between two uncached runs."""
    max_spread: float = MAX_SPREAD
    images: tuple[np.ndarray, ...] = ()
    """Image-to-video: each sample's image (RGB uint8 [H, W, 3]), in the order of the prompts; empty: none."""
    image_source: str | None = None
    """Where the images come from, for the report (`evaluation_images`)."""
    guidance_2: float | None = None
    """A two-expert model's guidance for its second expert (the bundle's `defaults.guidance_2`, as
    `generate` takes it); None: `guidance` for both, as WanPipeline without `guidance_scale_2`."""

    def __post_init__(self) -> None:
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise BadInput(f"repeats must be in [1, {MAX_REPEATS}], got {self.repeats}", param="repeats")
        if self.images and len(self.images) != len(self.prompts):
            raise BadInput(f"{len(self.prompts)} prompts but {len(self.images)} images: they pair up one to one")


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


def evaluation_images(
    engine: Model, prompts: list[str], paths: list[Path] | None
) -> tuple[tuple[np.ndarray, ...], str | None]:
    """Each sample's image and where the images come from (empty and None for text-to-video): the
    files given (one for every sample, or one per prompt), or for a tiny model the first frame of a
    clip of each prompt drawn with seed EVAL_PROMPT_SEED + its index (clips no model was trained on)."""
    if not engine.adapter.takes_image:
        if paths:
            raise BadInput(f"--images: {engine.preset.name} is a text-to-video model and takes none")
        return (), None
    if paths:
        if len(paths) not in (1, len(prompts)):
            raise BadInput(f"--images: {len(paths)} images for {len(prompts)} prompts (give one, or one per prompt)")
        images = [read_image(path, "--images") for path in paths]
        return tuple(images[i % len(images)] for i in range(len(prompts))), "files: " + ", ".join(map(str, paths))
    if not engine.preset.tiny:
        raise BadInput(f"--images is missing: {engine.preset.name} is an image-to-video model")
    images = tuple(first_frame(prompt, EVAL_PROMPT_SEED + i) for i, prompt in enumerate(prompts))
    return images, f"the first frame of a clip of each prompt (data/clips.py, seed {EVAL_PROMPT_SEED} + its index)"


def _knobs(method: str, knobs: dict[str, Any], steps: int, engine: Model) -> tuple[str, dict[str, Any]]:
    """The runtime method and its knobs: fixed-warmup is fixed with 20% of the steps always run;
    sencache-reference is sencache under the authors' conventions, its sweep's eps (and the
    bundle's eps_start) rescaled from the family's fixed score constant to sqrt(numel) of this
    bundle's latent, so its points sit at the same nominal eps as the engine's; the budget sweeps
    are SenCache or sencache-plan with an NFE budget."""
    if method in BUDGETS:
        return BUDGETS[method], dict(knobs)
    if method == "fixed-warmup":
        return "fixed", {**knobs, "warmup": round(0.2 * steps)}
    if method == "sencache-reference":
        constant = engine.adapter.sencache_reference.score_constant or math.sqrt(engine.numel)
        scale = math.sqrt(engine.numel) / constant
        eps_start = float(engine.bundle.manifest.defaults.knobs("sencache")["eps_start"])
        rescaled = {"eps_start": eps_start * scale, "eps_main": knobs["eps_main"] * scale}
        return "sencache", {"conventions": "reference", **rescaled}
    return method, dict(knobs)


class Runner:
    """Runs one method setting over the evaluation set in batches, timing the denoising loop."""

    def __init__(self, engine: Model, plan: BenchPlan) -> None:
        self.engine, self.plan = engine, plan
        self.batch = engine.bundle.shapes.max_batch
        self.chunks: list[tuple[list[str], list[int], np.ndarray | None]] = []
        """Consecutive samples of one image (a request carries one), at most a batch each."""
        images = plan.images or (None,) * len(plan.prompts)
        for prompt, seed, image in zip(plan.prompts, plan.seeds, images, strict=True):
            last = self.chunks[-1] if self.chunks else None
            if last is not None and last[2] is image and len(last[0]) < self.batch:
                last[0].append(prompt)
                last[1].append(seed)
            else:
                self.chunks.append(([prompt], [seed], image))

    def request(self, chunk: int, steps: int) -> GenerationParams:
        """The request of chunk `chunk` (its prompts, seeds and image) at `steps` steps."""
        prompts, seeds, image = self.chunks[chunk]
        return GenerationParams(prompts, seeds, steps, self.plan.guidance, image=image, guidance_2=self.plan.guidance_2)

    def generate(self, chunk: int, method: str, knobs: dict[str, float]) -> Result:
        """One run of chunk `chunk` with a runtime method."""
        policy = self.engine.policy(method, self.plan.steps, len(self.chunks[chunk][0]), knobs)
        return self.engine.generate(self.request(chunk, self.plan.steps), policy)

    def collect(self, results: list[Result]) -> dict[str, Any]:
        """Latents, frames, NFE and seconds of one setting's runs over all chunks, in order."""
        latents = [latent for result in results for latent in result.latents]
        return {
            "latents": np.stack(latents),
            "frames": [frame for result in results for frame in self.engine.decode(result.latents)],
            "nfe": [n for result in results for n in result.nfe],
            "denoise_s": sum(result.timing["denoise_s"] for result in results),
            "decision_s": sum(result.timing["decision_s"] for result in results),
        }

    def run(self, method: str, knobs: dict[str, float]) -> dict[str, Any]:
        """One setting over the evaluation set."""
        return self.collect([self.generate(i, method, knobs) for i in range(len(self.chunks))])

    def reuse_step_s(self, reuses: int = 10) -> float:
        """Seconds of one step in which every sample reuses (head, cached residual, tail), over all
        chunks: a run of 2 + `reuses` steps that reuses all but the forced first and last step,
        minus a run of those 2 steps alone, divided by `reuses`."""
        engine = self.engine
        batch, steps = len(self.chunks[0][0]), 2 + reuses

        def reusing() -> None:
            policy = engine.policy("fixed", steps, batch, {"interval": steps})
            engine.generate(self.request(0, steps), policy)

        def running() -> None:
            engine.generate(self.request(0, 2), NoCache(batch))

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


VARIANTS = ("sencache-online", "budget-hard", "sencache-plan")
"""Rules compared, like SenCache, with every other method at matched NFE, inside 40-70% of the steps."""


def variant_comparisons(runs: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Each of VARIANTS that ran, minus every other method, in PSNR dB at matched NFE between 40% and
    70% of the steps (the band where a cache has real choices), with bootstrap intervals."""
    present = {r["method"] for r in runs}
    band = (0.4 * steps, 0.7 * steps)
    return {m: compare_at_matched_nfe(runs, steps, reference=m, nfe_range=band) for m in VARIANTS if m in present}


def setting_label(knobs: dict[str, Any]) -> str:
    """The knobs of one setting as a short label (numbers in %g)."""
    return " ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in knobs.items())


DISTURBED = (
    "below floor: disturbed timing (faster than the loop's own steps allow: this run's pairs or the floor's "
    "own timing were disturbed); not a result"
)
UNPAIRED = "one run against diffusers' uncached pipeline timed before the sweep: not paired, may be disturbed"


def _requested_nfe(
    engine: Model, settings: list[tuple[str, tuple[str, dict[str, Any]]]], steps: int, batch: int
) -> tuple[dict[tuple[str, str], float], list[dict[str, Any]]]:
    """The NFE each budget sweep's setting asks for, by (method, knobs label), and the settings
    whose budget the rule cannot meet at these steps (said in the report, not run)."""
    requested, skipped = {}, []
    for method, (runtime_method, knobs) in settings:
        if method not in BUDGETS:
            continue
        try:
            budget = engine.policy(runtime_method, steps, batch, knobs).settings().get("budget") or {}
        except BadInput as e:
            skipped.append({"method": method, "knobs": knobs, "reason": str(e)})
            continue
        nfe = budget.get("nfe", budget.get("requested_nfe"))
        if nfe is not None:
            requested[(method, setting_label(knobs))] = float(nfe)
    return requested, skipped


def _timed_run(
    method: str,
    knobs: dict[str, float],
    measured: dict[str, Any],
    timing: PairedTiming,
    timed_samples: int,
    steps: int,
    reuse_share: float,
) -> dict[str, Any]:
    """A runtime method's speed figures: the paired median, its range, and the floor check on the
    timed samples (a median above the floor's speed-up is withheld as disturbed timing)."""
    timed_nfe = measured["nfe"][:timed_samples]
    ceiling = floor_speedup(steps, float(np.mean(timed_nfe)), reuse_share)
    disturbed = below_floor(timing.median, ceiling)
    uncached_s = float(np.median(timing.uncached_s))
    return {
        "method": method,
        "knobs": knobs,
        "denoise_s": measured["denoise_s"],
        "decision_s": measured["decision_s"],
        "uncached_s": uncached_s,
        "cached_s": float(np.median(timing.cached_s)),
        "speedup": None if disturbed else timing.median,
        "speedup_range": [timing.low, timing.high],
        "below_floor": disturbed,
        "timing_warning": DISTURBED if disturbed else timing.warning,
        "timing": {**timing.as_dict(), "samples": timed_samples},
        "timed_ideal_speedup": steps * timed_samples / float(np.sum(timed_nfe)),
        "floor_speedup": ceiling,
        "floor_s": uncached_s / ceiling,
        "vs_floor": ceiling / timing.median - 1,
    }


def _peer_run(method: str, knobs: dict[str, float], measured: dict[str, Any], base_s: float) -> dict[str, Any]:
    """A diffusers peer's speed figures: one run against diffusers' own uncached run, unpaired."""
    return {
        "method": method,
        "knobs": knobs,
        "denoise_s": measured["denoise_s"],
        "decision_s": None,
        "uncached_s": base_s,
        "cached_s": measured["denoise_s"],
        "speedup": base_s / measured["denoise_s"],
        "speedup_range": None,
        "below_floor": False,
        "timing_warning": UNPAIRED,
        "timing": None,
        "timed_ideal_speedup": None,
        "floor_speedup": None,
        "floor_s": None,
        "vs_floor": None,
        "decision_per_step_s": None,
    }


def _quality(
    run: dict[str, Any], measured: dict[str, Any], reference: dict[str, Any], steps: int, samples: int
) -> None:
    """Add NFE, PSNR and SSIM against the uncached video of each sample to `run`."""
    nfe = measured["nfe"]
    psnrs = [min(psnr(a, b), PSNR_CAP) for a, b in zip(measured["frames"], reference["frames"], strict=True)]
    ssims = [ssim(a, b) for a, b in zip(measured["frames"], reference["frames"], strict=True)]
    run.update(
        {
            "nfe": nfe,
            "psnr": psnrs,
            "ssim": ssims,
            "lpips": None,
            "mean_nfe": float(np.mean(nfe)),
            "mean_psnr": float(np.mean(psnrs)),
            "mean_ssim": float(np.mean(ssims)),
            "ideal_speedup": steps * samples / float(np.sum(nfe)),
        }
    )


DUMMY_QUALITY = (
    "MEANINGLESS: a dummy build (random weights, no VAE, blank frames); only the timings, NFE and "
    "decision costs of this report are figures"
)


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
    peers = [m for m in plan.methods if m in PEERS]
    if plan.images and peers:
        raise BadInput(
            f"{peers[0]}: the diffusers peers run text-to-video only; leave them out for {engine.preset.name}"
        )
    engine.bundle.sensitivity()
    if {"teacache", "magcache"} & set(plan.methods):
        engine.bundle.baselines()
    if set(BUDGETS) & set(plan.methods):
        engine.bundle.sensitivity().budget_curves()
    with staged_folder(out, KIND) as folder:
        report = _measure(engine, plan, show_progress)
        # compact: the reports are committed, and the tree travels to the GPU machine within 64 MiB
        write_atomic(folder / REPORT, json.dumps(report, separators=(",", ":")).encode())
        write_markdown(report, folder / "report.md")
        write_plot(report, folder / "quality_vs_nfe.png")
    return report


def _measure(engine: Model, plan: BenchPlan, show_progress: bool) -> dict[str, Any]:
    """The sweep and its report document."""
    sweeps = QUICK_SWEEPS if plan.quick else SWEEPS
    runner = Runner(engine, plan)
    load_before = os.getloadavg()[0]
    steps, samples = plan.steps, len(plan.prompts)
    timed_samples = len(runner.chunks[0][0])
    settings = [(m, _knobs(m, knobs, steps, engine)) for m in plan.methods if m not in PEERS for knobs in sweeps[m]]
    requested, skipped = _requested_nfe(engine, settings, steps, len(runner.chunks[0][0]))
    settings = [s for s in settings if not any(s[0] == x["method"] and s[1][1] == x["knobs"] for x in skipped)]
    peer_settings = [(m, knobs) for m in plan.methods if m in PEERS for knobs in sweeps[m]]
    chain = 1 + 2 * plan.repeats * len(settings) if settings else 0
    total = 2 + chain + len(settings) + (1 + len(peer_settings) if peer_settings else 0)
    bar = progress(total=total, desc="bench", unit="run", disable=not show_progress)
    bar.set_postfix_str("warm-up, uncached reference")
    engine.generate(runner.request(0, 2), NoCache(timed_samples))  # warm-up
    reference = runner.run("none", {})
    bar.update(1)
    bar.set_postfix_str("cost of a step that reuses")
    t_reuse = runner.reuse_step_s()
    # a reused step's share of a full one; clamped, as both are timed on a shared machine (0: steps/NFE)
    reuse_share = min(max(t_reuse / (reference["denoise_s"] / steps), 0.0), 1.0)
    bar.update(1)
    first: dict[int, Result] = {}

    def timed(label: str, chunk_run: Callable[[], Result], keep: int | None = None) -> Callable[..., float]:
        """A run of the chain: shows its label, keeps the first repeat's result of setting `keep`."""

        def run(repeat: int = 0) -> float:
            bar.set_postfix_str(label)
            result = chunk_run()
            if keep is not None and repeat == 0:
                first[keep] = result
            bar.update(1)
            return result.timing["denoise_s"]

        return run

    timings = (
        run_chain(
            timed("uncached", lambda: runner.generate(0, "none", {})),
            [
                timed(f"{method} {setting_label(k)}", lambda m=m, k=k: runner.generate(0, m, k), keep=i)
                for i, (method, (m, k)) in enumerate(settings)
            ],
            plan.repeats,
            plan.max_spread,
        )
        if settings
        else []
    )
    timed_runs = {}
    for i, ((method, (runtime_method, runtime_knobs)), timing) in enumerate(zip(settings, timings, strict=True)):
        bar.set_postfix_str(f"{method} {setting_label(runtime_knobs)}: quality on all samples")
        rest = [runner.generate(c, runtime_method, runtime_knobs) for c in range(1, len(runner.chunks))]
        measured = runner.collect([first[i], *rest])
        run = _timed_run(method, runtime_knobs, measured, timing, timed_samples, steps, reuse_share)
        run["decision_per_step_s"] = measured["decision_s"] / (steps * len(runner.chunks))
        run["requested_nfe"] = requested.get((method, setting_label(runtime_knobs)))
        _quality(run, measured, reference, steps, samples)
        timed_runs[i] = run
        bar.update(1)
    peers, peer_reference, parity = None, None, None
    if peer_settings:
        bar.set_postfix_str("diffusers' uncached pipeline")
        with third_party_output("diffusers"):
            peers = DiffusersPeers(engine)
            meta = engine.bundle.sensitivity().meta
            calibration = (list(meta.get("prompts", plan.prompts))[:4], list(meta.get("seeds", plan.seeds))[:4])
            peer_reference = peers.run(
                "diffusers-none", {}, list(plan.prompts), list(plan.seeds), steps, plan.guidance, calibration
            )
        parity = float(np.max(np.abs(peer_reference["latents"] - reference["latents"])))
        bar.update(1)
    peer_runs = []
    for method, knobs in peer_settings:
        bar.set_postfix_str(f"{method} {setting_label(knobs)}")
        with third_party_output("diffusers"):
            measured = peers.run(method, knobs, list(plan.prompts), list(plan.seeds), steps, plan.guidance, calibration)
        measured["frames"] = list(engine.decode(measured["latents"]))
        peer_runs.append(_peer_run(method, dict(knobs), measured, peer_reference["denoise_s"]))
        _quality(peer_runs[-1], measured, reference, steps, samples)
        bar.update(1)
    # in the order of the methods asked for, each method's settings in sweep order
    ordered = [timed_runs[i] for i in range(len(settings))] + peer_runs
    runs = [r for method in plan.methods for r in ordered if r["method"] == method]
    bar.close()
    comparison = compare_at_matched_nfe(runs, steps)
    variants = variant_comparisons(runs, steps)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "backend": engine.backend.describe(),
            "cpus": os.cpu_count(),
            "load_average_1m": {"start": load_before, "end": os.getloadavg()[0]},
        },
        "model": engine.preset.name,
        "steps": steps,
        "guidance": plan.guidance,
        **({} if plan.guidance_2 is None else {"guidance_2": plan.guidance_2}),
        "prompts": list(plan.prompts),
        "seeds": list(plan.seeds),
        "images": None
        if not plan.images
        else {"source": plan.image_source, "sha256": [hashlib.sha256(i.tobytes()).hexdigest() for i in plan.images]},
        "calibration_prompts": engine.bundle.sensitivity().meta.get("prompts"),
        "quality_meaningless": DUMMY_QUALITY if engine.bundle.manifest.dummy else None,
        "metrics": {
            "psnr": f"per video over all frames and channels, data range 1, capped at {PSNR_CAP:g} dB",
            "ssim": "Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03, per frame and channel, averaged",
            "lpips": "unavailable: no LPIPS backbone weights on this machine",
        },
        "reference": {
            "denoise_s": reference["denoise_s"],
            "run_step_s": reference["denoise_s"] / steps,
            "reuse_step_s": t_reuse,
            "head_tail_share": reuse_share,
        },
        "timing": {
            "repeats": plan.repeats,
            "pairs": 2 * plan.repeats,
            "samples": timed_samples,
            "max_spread": plan.max_spread,
            "method": "one chain U C1 U C2 ... U on the first batch of samples, repeated; each cached run pairs "
            "with the uncached runs on either side; speed-up = median ratio; one above the floor's is withheld",
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
        "variant_comparisons": variants,
    }
    return report
