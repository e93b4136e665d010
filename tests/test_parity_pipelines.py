"""Our runtime against diffusers' own pipelines built from tiny random components (nobody here
wrote them): the same latents and frames for the same seeds and prompt embeddings (or prompts,
through the pipeline's text encoder), with and without guidance, batch 1 and 2; the SenCache
trace on those pipelines' timesteps; per-sample batch independence; calibration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import engine_for
from sencache.benchmarks.reference_pipelines import (
    FACTORIES,
    ReferenceCase,
    build_bundle,
    embeddings,
    run_reference,
    save_reference,
)
from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.runtime.cache import NoCache
from sencache.runtime.cache.sencache import SenCacheSettings
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import experts_of, segments
from sencache.runtime.request import GenerationParams
from sencache.runtime.sensitivity import SensitivityTable

STEPS = 5


@pytest.fixture(
    scope="module",
    params=[pytest.param(model, marks=pytest.mark.xdist_group(f"real-like-{model}")) for model in FACTORIES],
)
def real_like(request, tmp_path_factory):
    """A diffusers-format folder of a tiny random model of a real preset, and our bundle of it (each
    preset's tests on one xdist worker, which builds it once)."""
    root = tmp_path_factory.mktemp(request.param)
    case = save_reference(request.param, root / "weights")
    build_bundle(case, root / "bundle")
    return case


def bundle_of(case: ReferenceCase) -> Path:
    return case.folder.parent / "bundle"


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_uncached_latents_match_the_pipeline(real_like, batch, guidance):
    case = real_like
    engine = engine_for(bundle_of(case))
    seeds = [3, 4][:batch]
    embeds, negative = embeddings(case, batch, 9), embeddings(case, batch, 10)
    ours = engine.generate(
        GenerationParams([f"p{i}" for i in range(batch)], seeds, STEPS, guidance, embeds, negative), NoCache(batch)
    ).latents
    theirs = run_reference(case, seeds, STEPS, guidance, "latent", embeds, negative)
    # Wan's pipeline makes separate cond and uncond calls where we run both rows as one batch: the
    # CPU matmul rounding differs with the batch and guidance amplifies it; batched families match
    # to the last bits.
    tolerance = 2e-5 if case.model.startswith("wan") and guidance > 1 else 2e-6
    np.testing.assert_allclose(ours, theirs, atol=tolerance, rtol=0)


def test_prompts_are_encoded_by_the_pipelines_own_text_encoder(real_like):
    """Prompts (not embeddings): our runtime encodes them through diffusers' components loaded
    from the weights folder, and the whole run matches `pipe(prompt=...)`."""
    case = real_like
    engine = engine_for(bundle_of(case))
    prompts = ["a red circle moving left fast", "two large blue squares on black"]
    ours = engine.decode(engine.generate(GenerationParams(prompts, [3, 4], STEPS, 6.0), NoCache(2)).latents)
    theirs = run_reference(case, [3, 4], STEPS, 6.0, "np", prompts=prompts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_frames_match_the_pipeline(real_like):
    case = real_like
    engine = engine_for(bundle_of(case))
    embeds, negative = embeddings(case, 2, 9), embeddings(case, 2, 10)
    result = engine.generate(GenerationParams(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative), NoCache(2))
    ours = engine.decode(result.latents)
    theirs = run_reference(case, [3, 4], STEPS, 6.0, "np", embeds, negative)
    assert ours.shape == theirs.shape == (2, *case.size, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def write_every_expert(engine, table: SensitivityTable) -> None:
    """`table` as the sensitivity table of each of the bundle's experts."""
    for expert in range(engine.bundle.manifest.experts):
        engine.bundle.write_tables(table, expert=expert)


def test_sencache_trace_applies_the_rule_on_the_pipeline_timesteps(real_like):
    """Recompute every step of the trace from SPEC sections 1-3 with the pipeline's own timesteps;
    with two experts, each expert's steps are a run of their own (runtime/cache/segments.py)."""
    case = real_like
    engine = engine_for(bundle_of(case))
    steps, batch = 12, 2
    timesteps = np.asarray(engine.sampler(steps).timesteps, np.float64)
    table = SensitivityTable(
        timesteps[::-1].copy(),
        np.linspace(0.5, 1.5, steps),
        np.linspace(2e-3, 1e-3, steps),
        counts=np.ones(steps),
        meta={"source": "test"},
    )
    write_every_expert(engine, table)
    parts = segments(experts_of(timesteps, engine.bundle.manifest.boundary))
    assert len(parts) == engine.bundle.manifest.experts
    settings = SenCacheSettings(eps_start=0.02, eps_main=0.6, max_reuse=2)
    policy = engine.policy("sencache", steps, batch, {"eps_start": 0.02, "eps_main": 0.6, "max_reuse": 2})
    embeds, negative = embeddings(case, batch, 1), embeddings(case, batch, 2)
    result = engine.generate(GenerationParams(["a", "b"], [7, 8], steps, 6.0, embeds, negative), policy, record=True)
    assert result.timesteps == [float(t) for t in timesteps]
    numel = engine.numel
    for b in range(batch):
        anchor, reuses = None, 0
        for i, step in enumerate(result.trace[b]):
            x = result.trajectory[i][b].astype(np.float64)
            _, first, end = next(p for p in parts if p[1] <= i < p[2])
            local, n = i - first, end - first
            eps = settings.eps_start if local < round(0.2 * n) else settings.eps_main
            forced = local in (0, n - 1)
            if anchor is None or forced:
                expected = "run"
            else:
                ax, at = anchor
                jx, jt = np.interp(at, table.timesteps, table.jx), np.interp(at, table.timesteps, table.jt)
                score = (jx * np.linalg.norm(x - ax) + jt * abs(timesteps[i] - at)) / math.sqrt(numel)
                assert step["score"] == pytest.approx(score, rel=1e-5)
                assert step["eps"] == pytest.approx(eps)
                expected = "reuse" if score < eps and reuses < settings.max_reuse else "run"
            assert step["decision"] == expected, (b, i)
            if expected == "run":
                anchor, reuses = (x, timesteps[i]), 0
            else:
                reuses += 1
    assert any("reuse" in d for d in result.decisions)


def test_onnx_bundle_matches_the_pytorch_bundle(real_like):
    """The exported stages (dynamic batch) through ONNX Runtime against the same loop in PyTorch."""
    case = real_like
    onnx = build_bundle(case, case.folder.parent / "onnx", "onnxruntime")
    embeds, negative = embeddings(case, 2, 9), embeddings(case, 2, 10)
    request = GenerationParams(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative)
    ours = engine_for(onnx).generate(request, NoCache(2)).latents
    reference = engine_for(bundle_of(case)).generate(request, NoCache(2)).latents
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-4


def test_a_sample_is_the_same_alone_or_in_a_batch(real_like):
    """SPEC section 3 on each family's real stepping (DPM draws solver noise per sample)."""
    case = real_like
    engine = engine_for(bundle_of(case))
    steps = 10
    timesteps = np.asarray(engine.sampler(steps).timesteps, np.float64)
    write_every_expert(
        engine,
        SensitivityTable(timesteps[::-1].copy(), np.full(steps, 1.0), np.full(steps, 1e-3), meta={"source": "test"}),
    )
    knobs = {"eps_start": 0.02, "eps_main": 0.8, "max_reuse": 2}
    embeds, negative = embeddings(case, 2, 5), embeddings(case, 2, 6)
    both = engine.generate(
        GenerationParams(["a", "b"], [21, 22], steps, 6.0, embeds, negative), engine.policy("sencache", steps, 2, knobs)
    )
    for b in range(2):
        alone = engine.generate(
            GenerationParams(["x"], [21 + b], steps, 6.0, embeds[b : b + 1], negative[b : b + 1]),
            engine.policy("sencache", steps, 1, knobs),
        )
        assert alone.decisions[0] == both.decisions[b]
        np.testing.assert_allclose(alone.latents[0], both.latents[b], atol=1e-5, rtol=0)
    assert any("reuse" in d for d in both.decisions)


def test_calibration_runs_on_the_real_pipeline_components(real_like, tmp_path):
    """Calibration of a real-format bundle: prompts through diffusers' text encoder, the family's
    own stepping (DPM and flow-matching included), finite tables for every step."""
    case = real_like
    engine = engine_for(bundle_of(case))
    steps = 4 if engine.bundle.manifest.experts == 1 else 8
    calibration = calibrate(engine, CalibrationPlan(samples=2, steps=steps), show_progress=False)
    experts = calibration.experts
    assert len(experts) == engine.bundle.manifest.experts
    assert sum(len(e.sensitivity.timesteps) for e in experts) == steps - 1  # the last step has no t_{k+1}
    assert sum(len(e.baselines.magcache_ratios) for e in experts) == steps  # each expert's from its first step
    for e in experts:
        assert np.all(e.sensitivity.jx > 0) and np.all(e.sensitivity.jt > 0)


def test_dynamic_cfg_matches_cogvideox_pipeline(real_like):
    case = real_like
    engine = engine_for(bundle_of(case))
    embeds, negative = embeddings(case, 2, 9), embeddings(case, 2, 10)
    request = GenerationParams(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative, dynamic_cfg=True)
    if not case.model.startswith("cogvideox"):
        with pytest.raises(BadInput, match="dynamic_cfg is an option"):
            engine.generate(request, NoCache(2))
        return
    ours = engine.generate(request, NoCache(2)).latents
    theirs = run_reference(case, [3, 4], STEPS, 6.0, "latent", embeds, negative, use_dynamic_cfg=True)
    np.testing.assert_allclose(ours, theirs, atol=2e-6, rtol=0)
    plain = engine.generate(GenerationParams(["a", "b"], [3, 4], STEPS, 6.0, embeds, negative), NoCache(2)).latents
    assert np.abs(plain - ours).max() > 1e-3
