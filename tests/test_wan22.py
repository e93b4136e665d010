"""Wan 2.2: the presets from their real configs, the two experts of T2V-A14B as per-expert stages
chosen per row by timestep (on both backends, against diffusers' WanPipeline with `transformer_2`,
`boundary_ratio` and `guidance_scale_2`; I2V-A14B's against WanImageToVideoPipeline), and cache
rules that never reuse across the switch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import image_case
from sencache.benchmarks.reference_pipelines import (
    build_bundle,
    embeddings,
    reference_image,
    run_reference,
    save_reference,
)
from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.engine_builder.builder import BuildOptions
from sencache.runtime.cache import NoCache, StepDecision
from sencache.runtime.cache.budget import budget_rule
from sencache.runtime.cache.factory import split_nfe
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import experts_of, segments
from sencache.runtime.families import resolve
from sencache.runtime.families.base import Shapes
from sencache.runtime.families.parts import build_transformer, example_inputs
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams
from sencache.runtime.stepping import StepEngine

A14B = "wan2.2-t2v-a14b"
STEPS = 5  # the tiny pipeline's shift-3 schedule: 999, 923 with the high-noise expert, 818, 667, 429 below 875


@pytest.fixture(scope="module")
def wan22(bundle_cache) -> dict[str, Path]:
    """The tiny two-expert reference pipeline's folder and our torch and ONNX Runtime bundles of it."""

    def make(out: Path) -> None:
        case = save_reference(A14B, out / "weights")
        for backend in ("torch", "onnxruntime"):
            build_bundle(case, out / backend, backend)

    root = bundle_cache.get("wan22-reference", make)
    return {"weights": root / "weights", "torch": root / "torch", "onnxruntime": root / "onnxruntime"}


def case_of(folder: Path):
    from sencache.benchmarks.reference_pipelines import ReferenceCase

    return ReferenceCase(A14B, folder, (512, 16), (9, 32, 48))


@pytest.mark.parametrize(
    "model, experts, billions, latent",
    [
        (A14B, 2, 14.29, (16, 21, 90, 160)),
        ("wan2.2-i2v-a14b", 2, 14.29, (16, 21, 90, 160)),
        ("wan2.2-ti2v-5b", 1, 5.00, (48, 31, 44, 80)),
    ],
)
def test_presets_construct_from_their_real_configs_on_meta(model, experts, billions, latent, monkeypatch):
    """The real configs on `meta`, and the build's memory guard as it decides on an idle machine of
    this kind (22 GiB available), whatever else runs beside the test."""
    monkeypatch.setattr("sencache.engine_builder.builder.available_bytes", lambda device: 22 * 2**30)
    adapter, preset = resolve(model)
    shapes = Shapes(preset.frames, preset.height, preset.width, 1)
    assert preset.experts == experts
    assert adapter.latent_shape(preset, shapes) == latent
    for expert in range(experts):
        transformer = build_transformer(adapter, preset, None, device="meta", expert=expert)
        assert sum(p.numel() for p in transformer.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
        with torch.device("meta"):
            stages = adapter.split(transformer, preset, shapes)
            head = stages["head"](**example_inputs(adapter, preset, shapes, 1))
        assert head[0].shape[1] == math.prod(latent[1:]) // 4  # 1x2x2 patches
    if experts > 1:  # each 14 B expert in one graph: over this machine, and two experts are not streamed
        with pytest.raises(BadInput, match="one expert in one graph needs about"):
            BuildOptions(model=model, out=Path("unused"), load_format="dummy").check()
    plan = BuildOptions(model=model, out=Path("unused"), load_format="dummy", layers=2).check()
    assert plan.preset.experts == experts


def test_two_experts_refuse_what_builds_one_and_a_folder_without_the_second(tmp_path):
    with pytest.raises(BadInput, match="2 experts; streamed"):
        BuildOptions(model=A14B, out=tmp_path / "b", load_format="dummy", layers=1, group_blocks=1).check()
    (tmp_path / "w" / "transformer").mkdir(parents=True)
    (tmp_path / "w" / "transformer" / "config.json").write_text("{}")
    (tmp_path / "w" / "transformer" / "model.safetensors").write_bytes(b"")
    with pytest.raises(BadInput, match="no transformer_2/"):
        BuildOptions(model=A14B, out=tmp_path / "b", weights=tmp_path / "w").check()


def test_the_bundle_carries_both_experts(wan22):
    manifest = json.loads((wan22["onnxruntime"] / "manifest.json").read_text())
    assert manifest["experts"] == {"count": 2, "boundary": 875.0}
    assert list(manifest["stages"]) == ["head", "blocks", "tail", "head_2", "blocks_2", "tail_2"]
    assert manifest["defaults"]["guidance_2"] == 3.0
    blocks = [manifest["files"][manifest["stages"][s]["file"]]["chunks"] for s in ("blocks", "blocks_2")]
    assert blocks[0] != blocks[1]
    torch_manifest = json.loads((wan22["torch"] / "manifest.json").read_text())
    assert torch_manifest["stages"]["blocks_2"]["file"] == "transformer_2"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_both_experts_match_the_pipeline(wan22, backend, batch, guidance):
    """Latents of WanPipeline with both experts and guidance_scale_2 (fp32, within 1e-5)."""
    case = case_of(wan22["weights"])
    engine = Model.open(wan22[backend], threads=1)
    seeds = [3, 4][:batch]
    embeds, negative = embeddings(case, batch, 9), embeddings(case, batch, 10)
    request = GenerationParams(
        [f"p{i}" for i in range(batch)], seeds, STEPS, guidance, embeds, negative, guidance_2=2.5
    )
    ours = engine.generate(request, NoCache(batch))
    assert experts_of(ours.timesteps, 875.0) == [0, 0, 1, 1, 1]
    theirs = run_reference(case, seeds, STEPS, guidance, "latent", embeds, negative, guidance_scale_2=2.5)
    np.testing.assert_allclose(ours.latents, theirs, atol=1e-5, rtol=0)


def test_guidance_2_defaults_as_the_pipeline_takes_it(wan22):
    engine = Model.open(wan22["torch"], threads=1)
    defaults = engine.bundle.manifest.defaults
    assert GenerationParams.resolve(defaults, ["a"], [1]).guidance_2 == 3.0  # the preset's, as both unset
    assert GenerationParams.resolve(defaults, ["a"], [1], guidance=6.0).guidance_2 == 6.0  # pipeline: scale for both
    assert GenerationParams.resolve(defaults, ["a"], [1], guidance=6.0, guidance_2=2.0).guidance_2 == 2.0


def test_guidance_2_is_refused_on_one_expert(torch_bundle):
    engine = Model.open(torch_bundle, threads=1)
    with pytest.raises(BadInput, match="guidance_2 is the second expert's"):
        engine.generate(GenerationParams(["a"], [1], 3, 4.0, guidance_2=2.0), NoCache(1))


def test_requests_on_either_side_of_the_boundary_share_a_pass(wan22):
    """A request at the low-noise expert's steps and one at the high-noise expert's run in the same
    passes (each expert on its own rows) and give what each gives alone."""
    case = case_of(wan22["weights"])
    engine = Model.open(wan22["onnxruntime"], threads=1)
    embeds, negative = embeddings(case, 2, 9), embeddings(case, 2, 10)
    requests = [
        GenerationParams([f"p{i}"], [3 + i], STEPS, 6.0, embeds[i : i + 1], negative[i : i + 1]) for i in (0, 1)
    ]
    alone = [engine.generate(r, NoCache(1)).latents for r in requests]
    calls: list[list[str]] = []
    run = engine.backend.run

    def logged(stage, feeds):
        calls[-1].append(f"{stage}:{len(feeds['latent'] if 'latent' in feeds else feeds['hidden'])}")
        return run(stage, feeds)

    engine.backend.run = logged  # type: ignore[method-assign]
    stepper = StepEngine(engine)
    first = stepper.enqueue(stepper.prepare(requests[0], NoCache(1)))
    for _ in range(2):  # the first request takes its two high-noise steps alone
        calls.append([])
        stepper.step()
    second = stepper.enqueue(stepper.prepare(requests[1], NoCache(1)))
    calls.append([])
    stepper.step()
    # that pass: each expert's head, blocks and tail on one row each (cond + uncond of one sample: 2 rows)
    assert sorted(calls[-1]) == sorted(f"{s}:2" for s in ("head", "head_2", "blocks", "blocks_2", "tail", "tail_2"))
    while stepper.busy:
        calls.append([])
        stepper.step()
    for job, expected in zip((first, second), alone, strict=True):
        np.testing.assert_allclose(stepper.result(job).latents, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def calibrated(wan22, tmp_path_factory) -> Model:
    """A copy of the torch bundle with each expert's calibrated tables."""
    import shutil

    folder = tmp_path_factory.mktemp("calibrated") / "bundle"
    shutil.copytree(wan22["torch"], folder)
    engine = Model.open(folder, threads=1)
    calibration = calibrate(engine, CalibrationPlan(samples=2, steps=8), show_progress=False)
    for expert, tables in enumerate(calibration.experts):
        engine.bundle.write_tables(tables.sensitivity, tables.baselines, expert)
        assert tables.sensitivity.meta["expert"] == expert + 1
    return Model.open(folder, threads=1)


GREEDY = {
    "sencache": {"eps_start": 1e6, "eps_main": 1e6, "max_reuse": 10},
    "sencache-online": {"eps_start": 1e6, "eps_main": 1e6, "max_reuse": 10},
    "teacache": {"threshold": 1e6},
    "magcache": {"threshold": 1e6, "max_reuse": 10, "retention": 0.0},
    "fixed": {"interval": 2, "warmup": 1},
}
"""Knobs under which each rule reuses wherever it may."""


BUDGETS = {"nfe": ("sencache", {"nfe": 6, "budget": "hard"}), "plan": ("sencache-plan", {"nfe": 6})}
"""Rules held to an NFE budget: 6 of 12 steps, shared out over the experts."""


@pytest.mark.parametrize("method", [*GREEDY, *BUDGETS])
def test_no_rule_reuses_across_the_switch(calibrated, method):
    """Under knobs that reuse wherever a rule may, the first step of the second expert runs every
    sample (forced: a fresh start of the rule there), while both experts' other steps reuse."""
    steps = 12
    cache, knobs = BUDGETS.get(method, (method, GREEDY.get(method)))
    request = GenerationParams.resolve(
        calibrated.bundle.manifest.defaults, ["a", "b"], [1, 2], steps=steps, cache=cache, knobs=knobs
    )
    result = calibrated.generate(request)
    parts = segments(experts_of(result.timesteps, calibrated.bundle.manifest.boundary))
    assert [e for e, _, _ in parts] == [0, 1]
    switch = parts[1][1]
    for b in range(2):
        step = result.trace[b][switch]
        assert step["decision"] == "run" and step["forced"], (method, b)
        for _, first, end in parts:
            assert "reuse" in result.decisions[b][first:end], (method, b, first, end)
    if method in BUDGETS:
        assert result.nfe == [6, 6]
        assert split_nfe(6, [end - first for _, first, end in parts]) == [2, 4]


def test_each_expert_records_the_reuse_costs_of_its_own_steps(calibrated):
    """Each expert's table holds sencache-plan's costs over its own calibration steps, so the
    bundle's presets run sencache-plan, and each expert plans its share of a request's runs
    (`share_plan_budget`, whose split tests/test_plan.py checks)."""
    tables = [calibrated.bundle.sensitivity(expert) for expert in range(2)]
    for table in tables:
        first, end = table.meta["expert_steps"]
        costs = table.budget_curves().costs
        assert costs is not None and costs.steps == end - first >= 2 and costs.score_sq is not None
        for matrix in (np.asarray(costs.cost), np.asarray(costs.score_sq)):
            assert np.all(matrix[np.triu_indices(costs.steps, k=1)] > 0) and np.all(np.tril(matrix) == 0)
    assert [t.meta["expert_steps"] for t in tables] == [[0, 3], [3, 8]]  # t = 875 is high-noise
    assert budget_rule(tables) == "sencache-plan"
    settings = calibrated.policy("sencache-plan", 12, 1, {"speed": "balanced"}).settings()
    shares = [expert["budget"]["nfe"] for expert in settings["experts"]]
    schedules = [expert["schedule"] for expert in settings["experts"]]
    assert [len(s) for s in schedules] == [4, 8] and [s.count("R") for s in schedules] == shares
    assert all(expert["per_sample"] == "drift" for expert in settings["experts"])  # each re-plans its share
    assert sum(shares) == round(12 * 0.6)  # the whole request's budget, shared out by the costs
    assert all(s[0] == "R" for s in schedules)
    depth = tables[0].budget_curves().max_reuse + 1
    errors = [np.asarray(t.budget_curves().costs.error_sq) for t in tables]
    assert [e.shape for e in errors] == [(3, depth), (5, depth)] and errors[0][0, 0] > 0 and errors[1][0, 0] > 0
    observing = calibrated.policy("sencache-plan", 8, 1, {"nfe": 6})  # the calibration's steps: each observes
    assert all(e["per_sample"] == "drift and observed reuse errors" for e in observing.settings()["experts"])
    result = calibrated.generate(GenerationParams(["a red circle"], [5], 8, 4.0, guidance_2=3.0), observing)
    assert result.nfe == [6] and all(rule.online.observations[0] > 0 for rule in observing.rules)


class _AlwaysReuse:
    """A rule that reuses at every step after the first: it crosses the switch."""

    name = "always-reuse"
    needs_drift = deterministic_drift = needs_modulation = False
    may_reuse = True

    def settings(self):
        return {"method": self.name}

    def warnings(self):
        return []

    def decide(self, step, t, drift_sumsq=None, modulation_change=None):
        return StepDecision(np.full(1, step == 0), np.full(1, np.nan), math.nan, step == 0)


def test_the_engine_refuses_a_reuse_across_the_switch(wan22):
    engine = Model.open(wan22["torch"], threads=1)
    with pytest.raises(RuntimeError, match="reused a residual at step 2, where the request holds none of expert 2"):
        engine.generate(GenerationParams(["a"], [1], STEPS, 6.0), _AlwaysReuse())


def test_each_expert_reads_its_own_tables(wan22, tmp_path):
    import shutil

    shutil.copytree(wan22["torch"], tmp_path / "b")
    engine = Model.open(tmp_path / "b", threads=1)
    calibration = calibrate(engine, CalibrationPlan(samples=1, steps=8, budget_steps=(8,)), show_progress=False)
    engine.bundle.write_tables(calibration.sensitivity, calibration.baselines)  # the first expert's only
    with pytest.raises(BadInput, match="no sensitivity table sensitivity_2.json"):
        engine.policy("sencache", 10, 1, {})
    with pytest.raises(BadInput, match="no baseline tables baselines_2.json"):
        engine.policy("teacache", 10, 1, {})
    assert engine.policy("fixed", 10, 1, {}).settings()["experts"][1]["steps"] == [4, 10]  # t = 875 is high-noise


@pytest.fixture(scope="module")
def tiny_two_experts(bundle_cache) -> Path:
    """The bundled tiny two-expert model (ONNX Runtime), calibrated per expert."""
    from conftest import built

    bundle = built(bundle_cache, model="tiny-wan2.2", backend="onnxruntime", max_batch=2)

    def calibrated(out: Path) -> None:
        import shutil

        shutil.copytree(bundle, out)
        engine = Model.open(out, threads=1)
        calibration = calibrate(engine, CalibrationPlan(samples=2, steps=8), show_progress=False)
        for expert, tables in enumerate(calibration.experts):
            engine.bundle.write_tables(tables.sensitivity, tables.baselines, expert)

    return bundle_cache.get("tiny-wan2.2-calibrated", calibrated, source=bundle.name)


def test_the_tiny_two_expert_model_runs_calibration_bench_and_the_step_engine(tiny_two_experts, tmp_path):
    """Calibration, the bench and the step engine end to end on the tiny two-expert model: every
    rule skips steps and stays close to the uncached video."""
    from sencache.benchmarks.bench import BenchPlan, Runner, evaluation_set, run_bench

    engine = Model.open(tiny_two_experts, threads=1)
    assert engine.bundle.manifest.experts == 2 and engine.bundle.manifest.text_encoder.kind == "tiny"
    prompts, seeds = evaluation_set(2, None, None)
    defaults = engine.bundle.manifest.defaults
    methods = ("sencache", "teacache", "magcache", "fixed")
    plan = BenchPlan(
        methods, tuple(prompts), tuple(seeds), 10, defaults.guidance, True, 1, guidance_2=defaults.guidance_2
    )
    assert Runner(engine, plan).request(0, 10).guidance_2 == defaults.guidance_2 == 3.0 != defaults.guidance
    report = run_bench(engine, plan, tmp_path / "bench", show_progress=False)
    assert (report["guidance"], report["guidance_2"]) == (defaults.guidance, 3.0)
    assert {run["method"] for run in report["runs"]} == {"sencache", "teacache", "magcache", "fixed"}
    for run in report["runs"]:
        assert all(4 <= n <= 10 for n in run["nfe"]), run  # each expert's first and last steps run
    for method in plan.methods:  # each rule skips steps somewhere and stays close to the uncached video
        assert any(max(r["nfe"]) < 10 and min(r["psnr"]) > 20 for r in report["runs"] if r["method"] == method)


def test_the_image_to_video_experts_match_the_pipeline_with_guidance_2(bundle_cache):
    """Wan 2.2 I2V-A14B (two experts on the first frame's channels, no image encoder) against
    WanImageToVideoPipeline with `transformer_2`, `boundary_ratio` and `guidance_scale_2`; the
    bundle is the image-to-video parity tests' (tests/test_parity_i2v.py runs the other cases)."""
    case = image_case(bundle_cache, "wan2.2-i2v-a14b")
    engine = Model.open(case.folder.parent / "torch", threads=1)
    manifest = engine.bundle.manifest
    assert (manifest.family, manifest.experts, manifest.boundary) == ("wan-i2v-2.2", 2, 900.0)
    assert json.loads((case.folder / "model_index.json").read_text())["image_encoder"] == [None, None]
    image = reference_image()
    embeds, negative = embeddings(case, 2, 9), embeddings(case, 2, 10)
    request = GenerationParams(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative, guidance_2=2.5, image=image)
    ours = engine.generate(request, NoCache(2))
    assert experts_of(ours.timesteps, manifest.boundary) == [0, 0, 1, 1, 1]
    theirs = run_reference(case, [3, 4], STEPS, 6.0, "latent", embeds, negative, image=image, guidance_scale_2=2.5)
    np.testing.assert_allclose(ours.latents, theirs, atol=1e-5, rtol=0)
