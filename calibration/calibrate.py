"""Measure the sensitivity table Jx(t), Jt(t) of a bundle (SPEC section 4).

Default source: the model's own uncached trajectories from a few prompts and seeds, so no data
set is needed. The prompts are the caller's or the model's default (`sencache.data.prompts`:
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

`procedure="reference"` runs the authors' procedure instead (vita-epfl/SenCache,
`Wan2.1/sensitivity_calculation.py`; the CogVideoX and LTX scripts do the same): clean videos of
the training distribution (here the clips the tiny models are trained on, rendered by
`data/clips.py`, with their captions as prompts) are noised to each timestep t_k of
the N-step schedule with fresh noise at every timestep, and Jx, Jt are measured there on the
conditional branch, t_{N} = 0 closing the last step. Their solver state is one per sample: reset
when the sample starts and stepped once per timestep in order, so a multistep solver's history (and
UniPC's corrector) carries outputs of the previous timestep's differently noised input into x'
(`solver_state="per-sample"`; the engine's is `"fresh"`: a new state at every step). Kept as the
engine runs rather than as their scripts do: one precision for every call (they take Jx under
bfloat16 autocast and Jt in float32), float timesteps (CogVideoX's and LTX's cast them to int),
and every sample counted (LTX's never resets its scheduler, so after the first sample every step
raises an IndexError that is swallowed). Only the sensitivity table is measured: the baselines
have no trajectory to calibrate on.

A model of two experts (Wan 2.2 A14B) gets one set of tables per expert, each from its own steps
(runtime/cache/segments.py: each expert's steps are a run of their own for the cache rules): every
evaluation at a step is made with the expert of that step, Jt's at t_{k+1} included, so the table
row of the expert's last step measures the same expert; TeaCache's pairs and MagCache's ratios
never pair a step of one expert with one of the other, each expert's MagCache ratios start at 1.0,
its budget curves replay its own steps as a run, and its reuse costs pair only its own steps (the
gains are measured once over the whole run; the first step of each expert always runs).

They also give the NFE-budget curves (`sencache.runtime.cache.budget.record_curves`): the SenCache
rule, the code inference runs, replayed on them over a grid of eps at the calibration's steps, and
on further uncached trajectories of the same prompts and seeds at half and twice the steps; and, on
models of one expert, sencache-online's curve (`record_online_curve`), measured by running that rule
at the calibration's steps (its learnt factor needs observed errors) on the calibration samples and
further ones drawn the same way where `curve_samples` asks for more than the calibration's; and
sencache-plan's reuse costs (`reuse_effects`, `record_gains`, `reuse_costs`), with the mean reuse
error a run observes after reusing from each anchor up to max_reuse steps (runs forked from the
uncached ones, stopped after the observed run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sencache.console.output import progress
from sencache.data.prompts import calibration_prompts
from sencache.runtime.cache import NoCache
from sencache.runtime.cache.base import relative_l1
from sencache.runtime.cache.baselines import BaselineTables
from sencache.runtime.cache.budget import measure_online_curve, record_curves
from sencache.runtime.cache.plan import SenCachePlanPolicy
from sencache.runtime.cache.sencache import SenCacheOnlinePolicy, SenCacheOnlineSettings, SenCachePolicy
from sencache.runtime.conventions import engine_conventions
from sencache.runtime.errors import BadInput, Failed
from sencache.runtime.experts import expert_of, experts_of, segments
from sencache.runtime.families.base import Sampler
from sencache.runtime.images import check_image_fits
from sencache.runtime.limits import MAX_STEPS
from sencache.runtime.model import Model
from sencache.runtime.prediction import Prediction, predict
from sencache.runtime.preparation import sample_generators
from sencache.runtime.progression import carry_noise
from sencache.runtime.request import SAMPLINGS, GenerationParams, RequestState
from sencache.runtime.sensitivity import OnlineCurve, ReuseCosts, SensitivityTable
from sencache.runtime.stepping import StepEngine

DEFAULT_SAMPLES = 8
BRANCHES = ("guided", "cond")
PROCEDURES = ("engine", "reference")
"""The engine's (its own uncached trajectories) and the authors' (noised training-distribution videos)."""
SOLVER_STATES = ("fresh", "per-sample")
"""Where x' starts from: a fresh solver state at every step, or the authors' one state per sample."""


def _check_samples(samples: int, param: str = "samples") -> None:
    if not 1 <= samples <= 1024:
        default = "one per prompt given" if param == "samples" else "samples"
        raise BadInput(f"{param} must be in [1, 1024] (default: {default}), got {samples}", param=param)


@dataclass(frozen=True)
class CalibrationPlan:
    samples: int | None = None
    """Trajectories (the prompts are taken in turn); None: one per given prompt, or DEFAULT_SAMPLES."""
    steps: int | None = None
    guidance: float | None = None
    seed: int = 1000
    batch: int = 4
    branch: str | None = None
    """The output Jx, Jt measure: "guided" (what inference steps with) or "cond" (the authors');
    None: the procedure's (engine: guided, reference: cond)."""
    procedure: str = "engine"
    """Where x_k comes from: "engine" (own uncached trajectories) or "reference" (the authors')."""
    solver_state: str | None = None
    """"fresh" or "per-sample" (see SolverSteps); None: the procedure's (engine: fresh, reference:
    per-sample)."""
    sampling: str = "engine"
    """The schedule of the calibrated timesteps: the bundle's or the authors' (a request's `sampling`)."""
    curve_samples: int | None = None
    """Samples sencache-online's NFE-vs-eps curve is measured on (the calibration's first, then
    further ones drawn the same way); None: the calibration's. Its mean NFE at an eps varies with
    the prompts far more than the table does: on tiny-wan the 8 calibration samples read up to 2 NFE
    above the mean over 32 other prompts, 24 up to 1.6 (benchmarks/results/online, "Fourth round");
    each sample costs 10 runs of the rule."""
    budget_steps: tuple[int, ...] | None = None
    """Further step counts whose uncached trajectories the NFE-budget curves are also recorded at;
    None: half and twice the calibration's steps."""

    def __post_init__(self) -> None:
        if self.procedure not in PROCEDURES:
            raise BadInput(
                f"procedure must be one of {', '.join(PROCEDURES)}, got {self.procedure!r}", param="procedure"
            )
        reference = self.procedure == "reference"
        if self.branch is None:
            object.__setattr__(self, "branch", "cond" if reference else "guided")
        if self.solver_state is None:
            object.__setattr__(self, "solver_state", "per-sample" if reference else "fresh")
        if self.branch not in BRANCHES:
            raise BadInput(f"branch must be one of {', '.join(BRANCHES)}, got {self.branch!r}", param="branch")
        if self.solver_state not in SOLVER_STATES:
            raise BadInput(
                f"solver_state must be one of {', '.join(SOLVER_STATES)}, got {self.solver_state!r}",
                param="solver_state",
            )
        if self.sampling not in SAMPLINGS:
            raise BadInput(f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}", param="sampling")
        if self.samples is not None:
            _check_samples(self.samples)
        if self.curve_samples is not None:
            _check_samples(self.curve_samples, "curve_samples")
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
    baselines: BaselineTables | None
    """None under the reference procedure (no trajectories to calibrate the baselines on)."""
    others: list[Calibration] = field(default_factory=list)
    """The tables of a model's further experts (the second expert's first); the fields above are
    the first expert's."""

    @property
    def experts(self) -> list[Calibration]:
        """Each expert's tables, the first expert's first."""
        return [Calibration(self.sensitivity, self.baselines), *self.others]


class SolverSteps:
    """The solver step x' of calibration at each timestep, from one of two solver states.

    "fresh" (the engine's): a new state at every step, started at that step, so x' depends only on
    (x_k, f_k). "per-sample" (the authors'): one state per sample, reset by `begin` when a sample
    (here a chunk of samples, whose rows the solvers keep apart) starts and stepped once at every
    timestep in order, so a multistep solver's history from the previous timesteps enters x'."""

    def __init__(self, make: Callable[[], Sampler], state: str) -> None:
        if state not in SOLVER_STATES:
            raise BadInput(
                f"solver_state must be one of {', '.join(SOLVER_STATES)}, got {state!r}", param="solver_state"
            )
        self.make, self.state = make, state
        self._carried: Sampler | None = None
        self._next = 0

    def begin(self) -> None:
        """Start a sample: under "per-sample" its state is a fresh one at the first timestep."""
        self._carried, self._next = None, 0
        if self.state == "per-sample":
            self._carried = self.make()
            self._carried.start_at(0)

    def step(self, k: int, f_k: np.ndarray, x_k: np.ndarray, generators: list[torch.Generator]) -> np.ndarray:
        """x' from `x_k` with the prediction `f_k` at timestep index `k`."""
        if self._carried is None:
            sampler = self.make()
            sampler.start_at(k)
        else:
            if k != self._next:
                raise ValueError(
                    f"a per-sample solver state steps its timesteps in order: expected {self._next}, got {k}"
                )
            sampler = self._carried
        self._next = k + 1
        return sampler.step(k, torch.from_numpy(f_k), torch.from_numpy(x_k.copy()), generators).numpy()


def calibrate(
    engine: Model,
    plan: CalibrationPlan,
    prompts: Sequence[str] | None = None,
    allow_tiny_vocabulary: bool = False,
    show_progress: bool = True,
    image: np.ndarray | None = None,
) -> Calibration:
    """Measure Jx and Jt by `plan.procedure`: on `engine`'s own trajectories from `prompts` (None:
    the model's default; a real model refuses tiny-vocabulary prompts unless allowed), with the
    baselines' tables; or, under "reference", on noised training clips (the table alone). An
    image-to-video model requires `image`: every trajectory starts from it."""
    check_image_fits(engine.adapter.family, engine.preset.name, image is not None)
    if plan.procedure == "reference" and image is not None:
        raise BadInput(
            "image: the reference procedure measures on rendered training clips; image-to-video models "
            "calibrate on their own trajectories (procedure engine)",
            param="image",
        )
    if plan.procedure == "reference":
        if prompts is not None:
            raise BadInput(
                "prompts: none are taken by the reference procedure: it measures on rendered training clips, "
                "whose captions are its prompts",
                param="prompts",
            )
        return Calibration(_reference(engine, plan, show_progress), None)
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
    assert plan.solver_state is not None and plan.branch is not None, "the plan resolves its defaults"
    solver = SolverSteps(lambda: engine.sampler(steps, plan.sampling), plan.solver_state)
    jx_all, jt_all, timesteps, paths = [], [], None, []
    tea_x, tea_y, tea_k, mag = [], [], [], []
    changes: list[np.ndarray] = []
    finals: list[np.ndarray] = []
    started = time.perf_counter()
    chunks = [(chosen[i : i + batch], seeds[i : i + batch]) for i in range(0, samples, batch)]
    bar = progress(total=len(chunks) * (2 * steps - 1), desc="calibrate", unit="call", disable=not show_progress)
    for chunk_prompts, chunk_seeds in chunks:
        request = GenerationParams(chunk_prompts, chunk_seeds, steps, guidance, sampling=plan.sampling, image=image)
        run = engine.generate(request, NoCache(len(chunk_prompts)), record=True, progress=show_progress)
        conditions = engine.conditions(image, sample_generators(chunk_seeds))  # the run's: same seeds, same draws
        bar.update(steps)
        timesteps = run.timesteps
        paths.append(np.stack(run.trajectory))
        text = engine.encode(chunk_prompts)
        uncond = engine.encode([""] * len(chunk_prompts)) if guidance > 1.0 else None
        jx_rows, jt_rows, mag_rows, previous, guided = [], [], [], None, []
        solver.begin()
        for k in range(steps):
            x_k = run.trajectory[k]
            t_k = timesteps[k]
            now = predict(engine, x_k, np.full(len(x_k), t_k, np.float32), text, uncond, guidance, conditions)
            guided.append(now.guided.reshape(len(x_k), -1))
            if previous is not None:
                tea_x.append(relative_l1(now.modulation, previous.modulation))
                tea_y.append(relative_l1(now.cond, previous.cond))
                tea_k.append(np.full(len(x_k), k))
                mag_rows.append((now.residual_norms / previous.residual_norms).mean(axis=1))
            previous = now
            if k == steps - 1:
                break
            x_prime = solver.step(k, _branch(now, plan.branch), x_k, sample_generators([s + k for s in chunk_seeds]))
            jx, jt = _differences(
                engine, plan.branch, now, x_k, x_prime, t_k, timesteps[k + 1], text, uncond, guidance, conditions
            )
            jx_rows.append(jx)
            jt_rows.append(jt)
            bar.update(1)
        jx_all.append(np.stack(jx_rows))
        jt_all.append(np.stack(jt_rows))
        mag.append(np.stack(mag_rows))
        changes.append(output_changes(np.stack(guided)))
        finals.append(np.asarray(run.latents))
    bar.close()
    assert timesteps is not None, "at least one chunk ran"
    meta = {
        **_meta(engine, plan, steps, guidance, samples, seeds, chosen),
        **(
            {}
            if image is None
            else {"image_sha256": hashlib.sha256(image.tobytes()).hexdigest(), "image_shape": list(image.shape)}
        ),
        "source": "own uncached trajectories",
        "seconds": round(time.perf_counter() - started, 2),
    }
    jx, jt = np.concatenate(jx_all, axis=1), np.concatenate(jt_all, axis=1)
    trajectories = {steps: (np.concatenate(paths, axis=1), np.asarray(timesteps))}
    for n in sorted(set(plan.budget_steps or (max(2, round(steps / 2)), min(MAX_STEPS, 2 * steps))) - {steps}):
        trajectories[n] = _trajectories(engine, chunks, n, guidance, plan.sampling, show_progress, image)
    tea = (np.concatenate(tea_x), np.concatenate(tea_y), np.concatenate(tea_k))
    ratios = np.concatenate(mag, axis=1).mean(axis=1)  # of steps 1 .. steps - 1
    boundary = manifest.boundary
    parts = segments(experts_of(timesteps, boundary))
    if len(parts) != manifest.experts:
        raise BadInput(
            f"steps: {steps} calibration steps give {len(parts)} of the model's {manifest.experts} experts a step; "
            f"calibrate with more steps",
            param="steps",
        )
    for expert, first, end in parts:
        if end - first < 2:
            raise BadInput(
                f"steps: expert {expert + 1} gets {end - first} of the {steps} calibration steps, under the 2 its "
                f"tables need; calibrate with more steps",
                param="steps",
            )
    depth = int(manifest.defaults.knobs("sencache")["max_reuse"]) + 1
    runs = reuse_effects(engine, chunks, finals, steps, guidance, plan.sampling, parts, image, show_progress, depth)
    gains = record_gains(np.concatenate(changes), runs.moved)
    tables = []
    for expert, first, end in parts:
        rows = slice(first, min(end, steps - 1))
        own = {**meta, "expert": expert + 1, "expert_steps": [first, end]} if boundary is not None else meta
        sensitivity = _table(np.asarray(timesteps[rows]), jx[rows], jt[rows], own)
        sensitivity.budget = record_curves(
            _segment_trajectories(trajectories, boundary, expert),
            lambda settings, n, b, table=sensitivity: SenCachePolicy(settings, table, n, b, engine.numel),
            manifest.defaults.knobs("sencache"),
        )
        if boundary is None:  # the online rule's curve is measured over whole runs of one expert
            count = plan.curve_samples or samples
            drawn = calibration_prompts(
                engine.preset.tiny, engine.preset.name, count, plan.seed, prompts, allow_tiny_vocabulary
            )
            curve_chunks = [
                (drawn[i : i + batch], [plan.seed + j for j in range(i, min(i + batch, count))])
                for i in range(0, count, batch)
            ]
            online = record_online_curve(
                engine, sensitivity, curve_chunks, steps, guidance, plan.sampling, image, show_progress
            )
            sensitivity.budget = dataclasses.replace(sensitivity.budget, online=online)
            own["online_curve_samples"] = count
        sensitivity.budget = dataclasses.replace(
            sensitivity.budget,
            costs=reuse_costs(np.concatenate(changes), gains, runs, np.asarray(timesteps), sensitivity, first, end),
        )
        own["budget_steps"] = list(sensitivity.budget.steps)
        within = (tea[2] > first) & (tea[2] < end)  # pairs (k - 1, k) of this expert's steps
        tables.append(
            Calibration(sensitivity, _baselines(engine, own, tea[0][within], tea[1][within], ratios[first : end - 1]))
        )
    return Calibration(tables[0].sensitivity, tables[0].baselines, tables[1:])


def record_online_curve(
    engine: Model,
    table: SensitivityTable,
    chunks: list[tuple[list[str], list[int]]],
    steps: int,
    guidance: float,
    sampling: str,
    image: np.ndarray | None = None,
    show_progress: bool = False,
) -> OnlineCurve:
    """sencache-online's mean-NFE-vs-eps curve (`measure_online_curve`) at `steps` steps, measured
    by running the engine with that rule and `table` on the calibration `chunks` (prompts, seeds):
    its learnt factor needs the reuse errors only a run observes."""

    def fraction_at(settings: SenCacheOnlineSettings) -> float:
        nfe = []
        for prompts, seeds in chunks:
            policy = SenCacheOnlinePolicy(settings, table, steps, len(prompts), engine.numel)
            request = GenerationParams(prompts, seeds, steps, guidance, sampling=sampling, image=image)
            nfe += engine.generate(request, policy, progress=show_progress).nfe
        return float(np.mean(nfe)) / steps

    return measure_online_curve(table.budget_curves(), steps, fraction_at)


def output_changes(guided: np.ndarray) -> np.ndarray:
    """Per sample, the mean squared change of the guided output between every two steps of a
    trajectory: [batch, a, i] from outputs [steps, batch, elements], 0 where a >= i."""
    steps, batch = guided.shape[:2]
    out = np.zeros((batch, steps, steps))
    for a in range(steps - 1):
        later = guided[a + 1 :].astype(np.float64) - guided[a].astype(np.float64)
        out[:, a, a + 1 :] = np.mean(later**2, axis=2).T
    return out


def record_gains(changes: np.ndarray, moved: list[np.ndarray]) -> np.ndarray:
    """Per step i, the gain G_i from an output error at step i to the final latent, pooled over the
    calibration samples: the mean over samples of the final latent's mean squared change when step
    i alone is reused (`moved`, per chunk [its samples, steps], from `reuse_effects`), over the
    mean of the output's mean squared change from step i - 1 to i (`changes` [samples, a, i]); 0
    where nothing moved (the first step of each expert's run)."""
    steps = changes.shape[1]
    total = np.zeros(steps)
    for chunk in moved:
        for i in range(steps):
            total[i] += float(np.sum(chunk[:, i]))
    mean = changes.mean(axis=0)
    one_step = np.array([0.0, *(mean[i - 1, i] for i in range(1, steps))])
    return np.divide(total / len(changes), one_step, out=np.zeros(steps), where=one_step > 0)


@dataclass(frozen=True)
class ReuseRuns:
    """What calibration's runs forked from its uncached trajectories measure (`reuse_effects`)."""

    moved: list[np.ndarray]
    """Per chunk [its samples, steps]: each sample's final-latent mean squared change from its
    uncached final latent when step i alone is reused (its anchor the step before); 0 at the first
    step of each expert's run, which always runs."""
    drifts: np.ndarray
    """[samples, a, i]: each sample's deterministic drift ||x_i - n_i - x_a|| along the uncached run
    (n_i the noise the sampler injected since step a, as the engine leaves it out of a rule's drift),
    0 where a >= i."""
    errors: np.ndarray
    """[samples, a, d - 1]: the reuse error a run observes (`ReuseObserver`, per element: its mean
    square) at step a + d after reusing steps a + 1 .. a + d - 1 from an anchor run at a, the
    uncached run up to a; NaN where not measured (past the expert's run, or across a forced step)."""


def reuse_effects(
    engine: Model,
    chunks: list[tuple[list[str], list[int]]],
    finals: list[np.ndarray],
    steps: int,
    guidance: float,
    sampling: str,
    parts: list[tuple[int, int, int]],
    image: np.ndarray | None = None,
    show_progress: bool = False,
    depth: int = 0,
) -> ReuseRuns:
    """`ReuseRuns` of the calibration `chunks` (prompts, seeds; `finals` their uncached final
    latents, one array per chunk) at `steps` steps, the reuse errors for d up to `depth` (0: none
    measured). Every run is forked from one uncached run per chunk (`RequestState.fork`), so it
    computes only the steps from its fork on; an error run stops at the pass after its observed run,
    which hands the error to its rule."""
    starts = {first for _, first, _ in parts}
    measured = [i for i in range(steps) if i not in starts]
    bar = progress(
        total=len(chunks) * len(measured), desc="calibrate (reuse costs)", unit="run", disable=not show_progress
    )
    first = np.arange(steps) == 0
    moved: list[np.ndarray] = []
    drifts: list[np.ndarray] = []
    errors: list[np.ndarray] = []
    for (prompts, seeds), final in zip(chunks, finals, strict=True):
        request = GenerationParams(prompts, seeds, steps, guidance, sampling=sampling, image=image)
        reference = final.reshape(len(prompts), -1).astype(np.float64)
        uncached = StepEngine(engine)  # every step run, residuals kept for the forks to reuse
        trunk = uncached.prepare(request, SenCachePlanPolicy(np.ones(steps, bool), first, len(prompts), {}, 1))
        uncached.enqueue(trunk)
        walk = DriftWalk(trunk.x, steps)
        own = np.zeros((len(prompts), steps))
        seen = np.full((len(prompts), steps, max(depth, 1)), np.nan)
        for i in measured:
            while trunk.step < i:
                uncached.step()
                assert trunk.sampler is not None, "a running request holds its sampler"
                walk.advance(trunk.x, trunk.sampler.injected())
            policy = SenCachePlanPolicy(np.arange(steps) != i, first, len(prompts), {"mode": "calibration"}, 1)
            latents = _run_alone(engine, trunk.fork(policy)).reshape(len(prompts), -1)
            own[:, i] = np.mean((latents.astype(np.float64) - reference) ** 2, axis=1)
            end = next(e for _, f, e in parts if f <= i - 1 < e)  # the anchor's expert's run
            for d in range(1, min(depth, end - i) + 1):
                seen[:, i - 1, d - 1] = _observed_error(engine, trunk, i - 1, d) / engine.numel
            bar.update(1)
        uncached.end_all("cancelled")
        moved.append(own)
        drifts.append(walk.drifts)
        errors.append(seen[:, :, :depth])
    bar.close()
    return ReuseRuns(moved, np.concatenate(drifts), np.concatenate(errors))


class _Observing(SenCachePlanPolicy):
    """A schedule's runs, keeping the reuse errors observed (`ReuseObserver`) at each step."""

    def __init__(self, schedule: np.ndarray, batch: int) -> None:
        super().__init__(schedule, np.arange(len(schedule)) == 0, batch, {"mode": "calibration"}, 1)
        self.errors: dict[int, np.ndarray] = {}

    def observe(self, step: int, error_sumsq: np.ndarray) -> None:
        self.errors[step] = np.asarray(error_sumsq, dtype=np.float64).copy()


def _observed_error(engine: Model, trunk: RequestState, anchor: int, d: int) -> np.ndarray:
    """Per sample, the squared reuse error observed at step anchor + d of a run forked from
    `trunk` (at step anchor + 1, its residuals of the anchor's run cached) that reuses steps
    anchor + 1 .. anchor + d - 1 and runs anchor + d; NaN where the step is the last (no pass
    after it hands the error over). A step forced on the way runs, and the error is NaN."""
    steps = len(trunk.scales)
    observed = anchor + d
    if observed >= steps - 1:
        return np.full(trunk.batch, np.nan)
    schedule = np.ones(steps, dtype=bool)
    schedule[anchor + 1 : observed] = False
    schedule[observed + 1] = False
    policy = _Observing(schedule, trunk.batch)
    side = StepEngine(engine)
    side.enqueue(trunk.fork(policy))
    for _ in range(d + 1):
        side.step()
    side.end_all("cancelled")
    return policy.errors.get(observed, np.full(trunk.batch, np.nan))


class DriftWalk:
    """Each sample's deterministic drift from every earlier step along one uncached run, fed the
    latents after each solver step and the noise that step injected (`Sampler.injected`)."""

    def __init__(self, x: torch.Tensor, steps: int) -> None:
        self.latents = [_rows(x)]
        self.noise: list[torch.Tensor | None] = []  # per anchor: the noise injected since it
        self.drifts = np.zeros((len(self.latents[0]), steps, steps))

    def advance(self, x: torch.Tensor, injected: tuple[float, torch.Tensor] | None) -> None:
        """The run took its next step, to latents `x`, having injected `injected`."""
        i = len(self.latents)
        if injected is not None:
            injected = (injected[0], _rows(injected[1]))
        self.noise = [carry_noise(n, injected) for n in [*self.noise, None]]
        now = _rows(x)
        for a, (anchor, noise) in enumerate(zip(self.latents, self.noise, strict=True)):
            change = now - anchor if noise is None else now - noise - anchor
            self.drifts[:, a, i] = torch.linalg.vector_norm(change, dim=1).numpy()
        self.latents.append(now)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as float64 rows, one per sample, a copy on the host."""
    return x.detach().to("cpu", torch.float64).reshape(len(x), -1).clone()


def reuse_costs(
    changes: np.ndarray,
    gains: np.ndarray,
    runs: ReuseRuns,
    timesteps: np.ndarray,
    table: SensitivityTable,
    first: int,
    end: int,
) -> ReuseCosts:
    """sencache-plan's reuse costs (`ReuseCosts`) of the run of steps first..end - 1 (one expert's,
    a run of its own) from the calibration's output `changes` [samples, a, i] along the uncached
    trajectories and the steps' `gains` (`record_gains`): cost[a, i] = mean changes x G_i; the
    mean squared SenCache score of reusing at i from a, from the trajectories' deterministic
    drifts (`runs`) at `timesteps`, with the expert's `table` (its Jx, Jt looked up at the anchor
    as the rule looks them up); and the mean observed reuse errors (`runs.errors`, where measured)."""
    mean = changes.mean(axis=0)[first:end, first:end]
    cost = np.triu(mean * gains[None, first:end], k=1)
    curves = table.budget_curves()
    nearest = engine_conventions(curves.switch_frac, curves.force_last).nearest_lookup
    t = np.asarray(timesteps[first:end], dtype=np.float64)
    jx, jt = np.array([table.lookup(float(ta), nearest=nearest)[:2] for ta in t]).T
    drifts = runs.drifts[:, first:end, first:end]
    scores = jx[None, :, None] * drifts + jt[None, :, None] * np.abs(t[None, None] - t[None, :, None])
    score_sq = np.triu(np.mean(scores**2, axis=0), k=1)
    errors = runs.errors[:, first:end]
    error_sq = None
    if errors.shape[2]:
        measured = np.isfinite(errors).all(axis=0)
        error_sq = np.where(measured, np.mean(np.where(np.isfinite(errors), errors, 0.0), axis=0), 0.0)
    return ReuseCosts(
        end - first,
        tuple(tuple(row) for row in cost.tolist()),
        tuple(tuple(row) for row in score_sq.tolist()),
        None if error_sq is None else tuple(tuple(row) for row in error_sq.tolist()),
    )


def _run_alone(engine: Model, job: RequestState) -> np.ndarray:
    """The final latents of a prepared request run to its end in a step engine of its own; the
    error it met raised as it is."""
    side = StepEngine(engine)
    side.enqueue(job)
    while side.busy:
        side.step()
    try:
        return np.asarray(side.result(job.id).latents)
    except Failed as e:
        assert e.__cause__ is not None, "StepEngine.result raises Failed from the request's error"
        raise e.__cause__ from None


def _segment_trajectories(
    trajectories: dict[int, tuple[np.ndarray, np.ndarray]], boundary: float | None, expert: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each trajectory's steps of `expert`, as a run of their own, by its step count (the first of
    equal counts; runs under 2 steps are left out); all of them with one expert."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for n in sorted(trajectories):
        path, timesteps = trajectories[n]
        for e, first, end in segments(experts_of(timesteps, boundary)):
            if e == expert and end - first >= 2 and end - first not in out:
                out[end - first] = (path[first:end], timesteps[first:end])
    if not out:
        raise BadInput(f"calibration: expert {expert + 1} has under 2 steps at every step count; use more steps")
    return out


def _baselines(engine: Model, meta: dict, x: np.ndarray, y: np.ndarray, ratios: np.ndarray) -> BaselineTables:
    """TeaCache's fit of the output change `y` on the modulated input's change `x` (degree 4, as
    its authors fit; lower where an expert's few steps give fewer than 5 points), and MagCache's
    ratios (1.0 at the first step, then `ratios`)."""
    if not len(x):
        raise BadInput("calibration: an expert has a single step, which gives TeaCache no pair; use more steps")
    coefficients = np.polyfit(x, y, min(4, len(x) - 1))
    return BaselineTables(
        teacache_coefficients=tuple(float(c) for c in coefficients),
        magcache_ratios=tuple(float(r) for r in np.concatenate([[1.0], ratios])),
        meta={
            **meta,
            "teacache_input": engine.adapter.modulation,
            "teacache_points": int(len(x)),
            "teacache_fit_rmse": float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2))),
            "magcache_branch": "cond",
        },
    )


def _reference(engine: Model, plan: CalibrationPlan, show_progress: bool) -> SensitivityTable:
    """The authors' procedure (module docstring) on the tiny models' rendered training clips."""
    from sencache.data import clips

    preset, shapes = engine.preset, engine.bundle.shapes
    if not preset.tiny:
        raise BadInput(
            f"procedure: 'reference' noises videos of the training distribution, which this engine has only for "
            f"the tiny models (rendered clips); for {preset.name}, run the authors' calibration on your videos and "
            f"import its table (--import-npz), or use the engine's procedure",
            param="procedure",
        )
    if (shapes.frames, shapes.height, shapes.width) != (clips.FRAMES, clips.HEIGHT, clips.WIDTH):
        raise BadInput(
            f"procedure: 'reference' noises the {clips.FRAMES}x{clips.HEIGHT}x{clips.WIDTH} training clips; this "
            f"bundle is built for {shapes.frames}x{shapes.height}x{shapes.width}",
            param="procedure",
        )
    manifest = engine.bundle.manifest
    steps = plan.steps or manifest.defaults.steps
    guidance = manifest.defaults.guidance if plan.guidance is None else plan.guidance
    samples = plan.samples or DEFAULT_SAMPLES
    _check_samples(samples)
    assert plan.solver_state is not None and plan.branch is not None, "the plan resolves its defaults"
    captions, frames = clips.batch(np.random.default_rng(plan.seed), samples)
    clean = engine.adapter.tiny_format.latents(frames)
    seeds = [plan.seed + i for i in range(samples)]
    schedule = engine.sampler(steps, plan.sampling)
    timesteps = [float(t) for t in schedule.timesteps]
    targets = [*timesteps[1:], 0.0]
    solver = SolverSteps(lambda: engine.sampler(steps, plan.sampling), plan.solver_state)
    batch = max(1, min(plan.batch, engine.bundle.shapes.max_batch // 2))
    cfg = plan.branch == "guided" and guidance > 1.0
    jx_all, jt_all = [], []
    started = time.perf_counter()
    bar = progress(total=samples * steps, desc="calibrate (reference)", unit="step", disable=not show_progress)
    for i in range(0, samples, batch):
        chunk_seeds = seeds[i : i + batch]
        x0 = torch.from_numpy(clean[i : i + batch])
        text = engine.encode(captions[i : i + batch])
        uncond = engine.encode([""] * len(chunk_seeds)) if cfg else None
        noise_generators = sample_generators(chunk_seeds)
        jx_rows, jt_rows = [], []
        solver.begin()
        for k, (t_k, t_next) in enumerate(zip(timesteps, targets, strict=True)):
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in noise_generators])
            x_k = schedule.noised(k, x0, noise).float().numpy()
            now = predict(engine, x_k, np.full(len(x_k), t_k, np.float32), text, uncond, guidance)
            x_prime = solver.step(k, _branch(now, plan.branch), x_k, sample_generators([s + k for s in chunk_seeds]))
            jx, jt = _differences(engine, plan.branch, now, x_k, x_prime, t_k, t_next, text, uncond, guidance)
            jx_rows.append(jx)
            jt_rows.append(jt)
            bar.update(len(chunk_seeds))
        jx_all.append(np.stack(jx_rows))
        jt_all.append(np.stack(jt_rows))
    bar.close()
    meta = {
        **_meta(engine, plan, steps, guidance if cfg else 1.0, samples, seeds, captions),
        "source": "rendered training clips noised to each timestep (fresh noise per timestep), t_N = 0",
        "seconds": round(time.perf_counter() - started, 2),
    }
    return _table(np.asarray(timesteps), np.concatenate(jx_all, axis=1), np.concatenate(jt_all, axis=1), meta)


def _differences(
    engine: Model,
    branch: str,
    now: Prediction,
    x_k: np.ndarray,
    x_prime: np.ndarray,
    t_k: float,
    t_next: float,
    text: np.ndarray,
    uncond: np.ndarray | None,
    guidance: float,
    conditions: dict[str, torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, Jx = ||f(x', t_k) - f_k|| / ||x' - x_k|| and Jt = ||f(x_k, t_next) - f_k|| / |t_next - t_k|,
    with f_k = f(x_k, t_k) from `now`; both further evaluations in one call."""
    n = len(x_k)
    both = _branch(
        predict(
            engine,
            np.concatenate([x_prime, x_k]),
            np.array([t_k] * n + [t_next] * n, np.float32),
            np.concatenate([text, text]),
            None if uncond is None else np.concatenate([uncond, uncond]),
            guidance,
            None if conditions is None else {k: torch.cat([v, v]) for k, v in conditions.items()},
            experts=np.full(2 * n, expert_of(t_k, engine.bundle.manifest.boundary)),  # t_next's too: t_k's table
        ),
        branch,
    )
    f_k = _branch(now, branch)
    dx = _norms(x_prime - x_k)
    if np.any(dx == 0):
        raise BadInput(f"calibration: the solver step at t={t_k} did not move the latent")
    return _norms(both[:n] - f_k) / dx, _norms(both[n:] - f_k) / abs(t_next - t_k)


def _meta(
    engine: Model,
    plan: CalibrationPlan,
    steps: int,
    guidance: float,
    samples: int,
    seeds: list[int],
    prompts: Sequence[str],
) -> dict:
    """What a table records of how it was measured."""
    return {
        "model": engine.preset.name,
        "family": engine.adapter.family,
        "backend": engine.backend.name,
        "scheduler": engine.scheduler_config(plan.sampling),
        "sampling": plan.sampling,
        "steps": steps,
        "guidance": guidance,
        "procedure": plan.procedure,
        "branch": plan.branch,
        "solver_state": plan.solver_state,
        "samples": samples,
        "seeds": seeds,
        "prompts": list(prompts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _table(timesteps: np.ndarray, jx: np.ndarray, jt: np.ndarray, meta: dict) -> SensitivityTable:
    """The mean over samples (axis 1) of per-sample Jx, Jt, with their spread and count."""
    if not (np.all(np.isfinite(jx)) and np.all(np.isfinite(jt))):
        raise BadInput("calibration produced NaN or infinite sensitivities: the model output is not finite")
    return SensitivityTable(
        timesteps,
        jx.mean(axis=1),
        jt.mean(axis=1),
        counts=np.full(len(timesteps), jx.shape[1], float),
        jx_std=jx.std(axis=1),
        jt_std=jt.std(axis=1),
        meta=meta,
    )


def _trajectories(
    engine: Model,
    chunks: list[tuple[list[str], list[int]]],
    steps: int,
    guidance: float,
    sampling: str,
    show_progress: bool,
    image: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Uncached trajectories [steps, samples, ...] of `chunks` at `steps` steps, and their timesteps."""
    paths, timesteps = [], None
    for chunk_prompts, chunk_seeds in chunks:
        run = engine.generate(
            GenerationParams(chunk_prompts, chunk_seeds, steps, guidance, sampling=sampling, image=image),
            NoCache(len(chunk_prompts)),
            record=True,
            progress=show_progress,
        )
        paths.append(np.stack(run.trajectory))
        timesteps = run.timesteps
    return np.concatenate(paths, axis=1), np.asarray(timesteps)


def _branch(prediction: Prediction, branch: str) -> np.ndarray:
    """The output of `prediction` that calibration measures: the guided one or the cond branch's."""
    return prediction.guided if branch == "guided" else prediction.cond
