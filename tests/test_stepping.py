"""The step engine: a request's decisions and latents are the same whether it runs alone, in a
static batch, or joins a running batch while others finish or are cancelled (SPEC section 3), on
tiny-wan (UniPC), tiny-cogvideox (DPM, which draws noise per sample) and tiny-ltx (flow Euler),
with SenCache and every baseline, with and without guidance, mixed step counts and scales."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import engine_for
from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import NoCache, StepDecision
from sencache.runtime.cache.baselines import BaselineTables
from sencache.runtime.errors import BadInput
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams, Result
from sencache.runtime.sensitivity import SensitivityTable
from sencache.runtime.stepping import StepEngine

TOLERANCE = 1e-5
PROMPTS = [
    "one large white circle static on black",
    "three small yellow squares moving left fast on texture",
    "two large green circles moving down fast on gradient",
    "one small red square moving right slow on black",
]

# Knobs that make each rule mix runs and reuses on the test tables below (scores near thresholds,
# so a drift that depended on the batch would change decisions).
KNOBS = {
    "wan": {"sencache": {"eps_start": 0.05, "eps_main": 0.3, "max_reuse": 2}, "teacache": {"threshold": 0.3}},
    "cogvideox": {"sencache": {"eps_start": 0.5, "eps_main": 1.5, "max_reuse": 2}, "teacache": {"threshold": 1.0}},
    "ltx": {"sencache": {"eps_start": 0.05, "eps_main": 0.3, "max_reuse": 2}, "teacache": {"threshold": 0.1}},
}
COMMON = {"magcache": {"threshold": 0.1, "max_reuse": 2, "retention": 0.2}, "fixed": {"interval": 3}, "none": {}}


def with_tables(source: Path, out: Path) -> Path:
    """A copy of a bundle with a flat sensitivity table over its whole timestep range and simple
    baseline tables (TeaCache: the change itself; MagCache: ratios falling from 1 to 0.85)."""
    shutil.copytree(source, out)
    bundle = Bundle.load(out)
    t = np.asarray(engine_for(out).sampler(50).timesteps, np.float64)[::-1].copy()
    bundle.write_tables(
        SensitivityTable(t, np.full(len(t), 1.0), np.full(len(t), 1e-3), meta={"source": "test"}),
        BaselineTables((1.0, 0.0), tuple(np.linspace(1.0, 0.85, 10)), {"source": "test"}),
    )
    return out


@pytest.fixture(scope="module", params=["wan", "cogvideox", "ltx"])
def family(request, ort_bundle, cogvideox_bundle, ltx_bundle, tmp_path_factory) -> tuple[str, Model]:
    source = {"wan": ort_bundle, "cogvideox": cogvideox_bundle, "ltx": ltx_bundle}[request.param]
    return request.param, engine_for(with_tables(source, tmp_path_factory.mktemp("stepping") / request.param))


@dataclass(frozen=True)
class Spec:
    """One request of a test: what it asks and under which rule."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    method: str

    def request(self) -> GenerationParams:
        return GenerationParams(list(self.prompts), list(self.seeds), self.steps, self.guidance)

    def submit(self, engine: StepEngine, family: str) -> int:
        knobs = {**COMMON, **KNOBS[family]}[self.method]
        return engine.submit(self.request(), engine.model.policy(self.method, self.steps, len(self.prompts), knobs))


def solo(model: Model, spec: Spec, family: str) -> Result:
    """The request run alone (Model.generate: a step engine holding nothing else)."""
    knobs = {**COMMON, **KNOBS[family]}[spec.method]
    return model.generate(spec.request(), model.policy(spec.method, spec.steps, len(spec.prompts), knobs))


def assert_same(result: Result, alone: Result) -> float:
    """Same decisions, latents within TOLERANCE; returns the largest latent difference."""
    assert result.decisions == alone.decisions
    assert result.timesteps == alone.timesteps
    difference = float(np.abs(result.latents - alone.latents).max())
    assert difference <= TOLERANCE
    return difference


MIXED = [
    Spec((PROMPTS[0],), (11,), 6, 4.0, "sencache"),
    Spec((PROMPTS[1],), (12,), 5, 1.0, "teacache"),
    Spec((PROMPTS[2],), (13,), 7, 6.0, "magcache"),
    Spec((PROMPTS[3],), (14,), 4, 1.0, "fixed"),
]


def test_a_static_batch_of_mixed_requests_equals_each_alone(family):
    name, model = family
    engine = StepEngine(model)
    ids = [spec.submit(engine, name) for spec in MIXED]
    passes = 0
    while engine.busy:
        engine.step()
        passes += 1
    assert passes == max(spec.steps for spec in MIXED)
    worst = max(assert_same(engine.result(i), solo(model, spec, name)) for i, spec in zip(ids, MIXED, strict=True))
    decisions = [d for i in ids for d in engine.result(i).decisions]
    assert any("reuse" in d for d in decisions) and all("run" in d for d in decisions)
    print(f"{name}: static batch, max |latent - solo| = {worst:.1e}")


def test_requests_joining_a_running_batch_equal_each_alone(family):
    """Requests arrive at steps 0, 2 and 3, one is cancelled at step 4 while others finish, and
    the last waits in the queue (rows full) until rows are free; a two-sample request shares the
    passes too."""
    name, model = family
    engine = StepEngine(model)
    pair = Spec((PROMPTS[0], PROMPTS[3]), (21, 22), 6, 4.0, "sencache")  # 4 rows
    cancelled = Spec((PROMPTS[1],), (23,), 8, 5.0, "none")  # 2 rows
    late = [Spec((PROMPTS[2],), (24,), 5, 1.0, "teacache"), Spec((PROMPTS[1],), (25,), 4, 3.0, "magcache")]
    first = pair.submit(engine, name)
    engine.step()
    engine.step()
    doomed = cancelled.submit(engine, name)
    engine.step()
    queued = [spec.submit(engine, name) for spec in late]
    engine.step()
    assert engine.poll(queued[0]).state == "queued"  # 6 rows of 6 taken: it waits its turn
    assert engine.poll(doomed).state == "running" and engine.poll(doomed).step == 2
    assert engine.cancel(doomed)
    ended = []
    while engine.busy:
        ended += engine.step()
    assert sorted(ended) == sorted([first, doomed, *queued])
    assert engine.poll(doomed).state == "cancelled"
    worst = assert_same(engine.result(first), solo(model, pair, name))
    for job, spec in zip(queued, late, strict=True):
        assert engine.poll(job).state == "done"
        worst = max(worst, assert_same(engine.result(job), solo(model, spec, name)))
    print(f"{name}: joined at steps 0/2/3/queued, max |latent - solo| = {worst:.1e}")


def test_admission_is_first_come_first_served(family):
    """A request that does not fit holds back the smaller ones behind it, so none starves."""
    name, model = family
    engine = StepEngine(model)
    big = Spec((PROMPTS[0], PROMPTS[1]), (1, 2), 3, 4.0, "none")  # 4 rows
    bigger = Spec((PROMPTS[0], PROMPTS[1], PROMPTS[2]), (3, 4, 5), 2, 4.0, "none")  # 6 rows
    small = Spec((PROMPTS[2],), (6,), 2, 1.0, "none")  # 1 row: would fit beside `big`
    ids = [spec.submit(engine, name) for spec in (big, bigger, small)]
    engine.step()
    assert [engine.poll(i).state for i in ids] == ["running", "queued", "queued"]
    order = []
    while engine.busy:
        order += engine.step()
    assert order == ids
    assert engine.stats()["requests_finished_total"] == 3


def test_too_many_rows_is_refused_before_queueing(family):
    name, model = family
    engine = StepEngine(model)
    spec = Spec(tuple(PROMPTS), (1, 2, 3, 4), 2, 4.0, "none")
    with pytest.raises(BadInput, match="larger max_batch"):
        spec.submit(engine, name)
    assert engine.stats()["requests_submitted_total"] == 0 and not engine.busy


class FailsAtStep:
    """A cache rule (the CachePolicy protocol) that runs every step and fails at one step."""

    name = "fails"
    needs_drift = False
    deterministic_drift = False
    needs_modulation = False
    may_reuse = False

    def __init__(self, step: int) -> None:
        self.step = step

    def settings(self) -> dict[str, str]:
        return {"method": self.name}

    def warnings(self) -> list[str]:
        return []

    def decide(
        self, step: int, t: float, drift_sumsq: np.ndarray | None = None, modulation: np.ndarray | None = None
    ) -> StepDecision:
        if step == self.step:
            raise ValueError("this rule fails here")
        return NoCache(1).decide(step, t)


def test_a_failing_request_fails_alone(family):
    name, model = family
    engine = StepEngine(model)
    spec = Spec((PROMPTS[0],), (31,), 5, 4.0, "sencache")
    good = spec.submit(engine, name)
    bad = engine.submit(GenerationParams([PROMPTS[1]], [32], 5, 4.0), FailsAtStep(2))
    while engine.busy:
        engine.step()
    assert engine.poll(bad).state == "failed"
    with pytest.raises(Exception, match="failed: this rule fails here"):
        engine.result(bad)
    assert_same(engine.result(good), solo(model, spec, name))
    assert engine.stats()["requests_failed_total"] == 1


@pytest.mark.slow
def test_randomized_arrivals_and_cancellations(cogvideox_bundle, tmp_path):
    """120 requests with random arrival steps, step counts, methods, guidance and cancellations
    on tiny-cogvideox (stochastic DPM): none lost, each done or cancelled, each done one equal to
    its solo run."""
    model = engine_for(with_tables(cogvideox_bundle, tmp_path / "cogvideox"))
    rng = np.random.default_rng(0)
    methods = ["sencache", "teacache", "magcache", "fixed", "none"]
    specs = [
        Spec(
            (PROMPTS[rng.integers(4)],),
            (int(rng.integers(1000)),),
            int(rng.integers(2, 6)),
            float(rng.choice([1.0, 3.0, 6.0])),
            methods[rng.integers(len(methods))],
        )
        for _ in range(120)
    ]
    arrival = np.sort(rng.integers(0, 150, len(specs)))
    cancel_at = {k: int(arrival[k] + rng.integers(0, 6)) for k in rng.choice(len(specs), 25, replace=False)}
    engine = StepEngine(model)
    ids: dict[int, int] = {}
    ended: list[int] = []
    boundary = 0
    while len(ids) < len(specs) or engine.busy:
        for k in np.flatnonzero(arrival == boundary):
            ids[int(k)] = specs[k].submit(engine, "cogvideox")
        for k, at in cancel_at.items():
            if at == boundary and k in ids:
                engine.cancel(ids[k])
        ended += engine.step()
        boundary += 1
    assert sorted(ended) == sorted(ids.values()) and len(ended) == len(specs)
    states = {k: engine.poll(job).state for k, job in ids.items()}
    assert set(states.values()) <= {"done", "cancelled"}
    assert all(k in cancel_at for k, state in states.items() if state == "cancelled")
    assert sum(state == "cancelled" for state in states.values()) >= 10
    worst = 0.0
    for k, state in states.items():
        if state == "done":
            worst = max(worst, assert_same(engine.result(ids[k]), solo(model, specs[k], "cogvideox")))
    stats = engine.stats()
    assert stats["requests_finished_total"] + stats["requests_cancelled_total"] == len(specs)
    assert stats["nfe_saved_total"] > 0
    print(f"cogvideox randomized: {len(specs)} requests, max |latent - solo| = {worst:.1e}")


def test_online_rule_observes_the_true_reuse_error_and_equals_alone(family):
    """sencache-online is shown, at each step a sample runs after an earlier run, the guided
    output from its cached residual minus the fresh one: checked here against the stages called
    one by one on the recorded latents. With online_rate 0 it is sencache, bit for bit; learning,
    it decides and denoises the same alone or sharing passes. Its drift leaves out the noise the
    sampler injected since each anchor: on tiny-cogvideox's DPM its scores differ from sencache's, on
    the families whose samplers inject none they are sencache's."""
    from sencache.runtime.cache.sencache import SenCacheOnlinePolicy, SenCachePolicy
    from sencache.runtime.chain import block_streams, blocks_feeds, guide, tail_feeds
    from sencache.runtime.families.base import NOISE

    name, model = family
    layout, steps = model.layout, 6
    knobs = {**KNOBS[name]["sencache"], "online_rate": 1.0, "online_bound": 1e6}
    request = GenerationParams([PROMPTS[0], PROMPTS[1]], [41, 42], steps, 4.0)
    seen: list[tuple[int, np.ndarray]] = []

    class Recording(SenCacheOnlinePolicy):  # the real rule, keeping what it was shown
        def observe(self, step: int, error_sumsq: np.ndarray) -> None:
            seen.append((step, error_sumsq.copy()))
            super().observe(step, error_sumsq)

    made = model.policy("sencache-online", steps, 2, knobs)
    policy = Recording(made.config, made.table, steps, 2, model.numel)
    alone = model.generate(request, policy, record=True)
    assert seen and not np.allclose(policy.factor, 1.0)

    job = StepEngine(model).prepare(request, NoCache(2))

    def chain(step: int) -> tuple[dict, dict]:
        x = torch.from_numpy(alone.trajectory[step])
        head = model.backend.run(
            "head",
            {
                "latent": torch.cat([x, x]),
                "timestep": torch.full((4,), job.timesteps[step], dtype=torch.float32),
                "text": job.text,
            },
        )
        return head, block_streams(layout, model.backend.run("blocks", blocks_feeds(layout, head)))

    checked = 0
    for step, error in seen:
        head, fresh = chain(step)
        for b in np.flatnonzero(np.isfinite(error)):
            anchor = max(i for i in range(step) if alone.decisions[b][i] == "run")
            head_a, out_a = chain(anchor)
            cached = {s: head[s] + (out_a[s] - head_a[s]) for s in layout.tail_stream_names}
            outputs = [model.backend.run("tail", tail_feeds(layout, st, head))[NOISE].float() for st in (cached, fresh)]
            reused, now = (guide(o, 2, True, job.scales[step]) for o in outputs)
            expected = float((reused[b].double() - now[b].double()).pow(2).sum())
            assert error[b] == pytest.approx(expected, rel=1e-3)
            checked += 1
        assert all(np.isnan(error[b]) == (alone.decisions[b][step] == "reuse") for b in range(2))
    assert checked >= 2

    class Deterministic(SenCachePolicy):  # sencache on the drift less the injected noise
        deterministic_drift = True

    still = model.policy("sencache-online", steps, 2, {**knobs, "online_rate": 0.0})
    sencache = model.policy("sencache", steps, 2, KNOBS[name]["sencache"])
    plain = model.generate(request, sencache)
    deterministic = model.generate(request, Deterministic(sencache.config, sencache.table, steps, 2, model.numel))
    frozen = model.generate(request, still)
    assert frozen.decisions == deterministic.decisions and np.array_equal(frozen.latents, deterministic.latents)
    scores = [[step["score"] for step in trace] for result in (plain, deterministic) for trace in result.trace]
    if name == "cogvideox":  # its DPM injects noise: the online rule's drift leaves it out
        assert scores[2:] != scores[:2]
    else:  # no noise injected: the plain drift
        assert scores[2:] == scores[:2] and np.array_equal(plain.latents, deterministic.latents)

    engine = StepEngine(model)
    first = engine.submit(request, model.policy("sencache-online", steps, 2, knobs))
    other = Spec((PROMPTS[2],), (43,), 4, 1.0, "sencache")
    second = other.submit(engine, name)
    engine.step()
    engine.step()  # a third request joins at step 2: passes of requests at different steps
    late = GenerationParams([PROMPTS[3], PROMPTS[0]], [44, 45], 5, 4.0)
    third = engine.submit(late, model.policy("sencache-online", 5, 2, knobs))
    while engine.busy:
        engine.step()
    assert_same(engine.result(first), alone)
    assert_same(engine.result(second), solo(model, other, name))
    assert_same(engine.result(third), model.generate(late, model.policy("sencache-online", 5, 2, knobs)))


@pytest.mark.parametrize("fixture", ["ort_bundle", "cogvideox_bundle"])
def test_a_fork_continues_as_its_rule_run_from_the_start_and_leaves_the_trunk_as_it_was(fixture, request):
    """Calibration's gain runs fork an uncached run at the step they reuse: the fork must give what a
    run under its rule from the first step gives (solver state, noise generators and cached residuals
    copied: DPM draws noise per sample), and the trunk must go on as if nothing had forked."""
    from sencache.runtime.cache.plan import SenCachePlanPolicy

    engine = engine_for(request.getfixturevalue(fixture))
    steps, at = 8, 4
    params = GenerationParams(PROMPTS[:2], [5, 6], steps, 4.0)
    first = np.arange(steps) == 0

    def plan(schedule: np.ndarray) -> SenCachePlanPolicy:
        return SenCachePlanPolicy(schedule, first, 2, {}, 1)

    reused = np.arange(steps) != at
    whole = engine.generate(params, plan(reused))
    uncached = engine.generate(params, NoCache(2))
    trunk_engine = StepEngine(engine)
    trunk = trunk_engine.prepare(params, plan(np.ones(steps, bool)))
    trunk_engine.enqueue(trunk)
    while trunk.step < at:
        trunk_engine.step()
    fork = trunk.fork(plan(reused))
    with pytest.raises(RuntimeError, match="only a running request"):
        fork.fork(plan(reused))
    side = StepEngine(engine)
    side.enqueue(fork)
    while side.busy:
        side.step()
    forked = side.result(fork.id)
    while trunk_engine.busy:
        trunk_engine.step()
    np.testing.assert_array_equal(forked.latents, whole.latents)
    assert forked.decisions == whole.decisions and forked.nfe == whole.nfe == [steps - 1] * 2
    np.testing.assert_array_equal(trunk_engine.result(trunk.id).latents, uncached.latents)
