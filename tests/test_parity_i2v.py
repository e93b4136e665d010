"""Image-to-video against diffusers' own pipelines (WanImageToVideoPipeline, Wan 2.2's with its two
experts too, ...) built from tiny random components saved as diffusers folders, image encoder
included where the pipeline has one: the same latents for the
same seeds, prompt embeddings and image, with and without guidance, batch 1 and 2, on the PyTorch
and the ONNX Runtime backends; the image reaches the model; a sample is the same alone or in a
batch under SenCache; the image is refused where it does not belong."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import engine_for, image_case
from sencache.benchmarks.reference_pipelines import (
    IMAGE_FACTORIES,
    ReferenceCase,
    embeddings,
    reference_image,
    run_reference,
)
from sencache.runtime.cache import NoCache
from sencache.runtime.errors import BadInput
from sencache.runtime.experts import experts_of
from sencache.runtime.request import GenerationParams
from sencache.runtime.sensitivity import SensitivityTable

STEPS = 5
IMAGE = reference_image()


@pytest.fixture(scope="module", params=list(IMAGE_FACTORIES))
def real_like(request, bundle_cache) -> ReferenceCase:
    """A diffusers-format folder of a tiny random image-to-video model, and our PyTorch and ONNX
    Runtime bundles of it (shared by every worker: a test that changes a bundle copies it)."""
    return image_case(bundle_cache, request.param)


def _own_copy(case: ReferenceCase, tmp_path) -> Path:
    """A copy of the case's PyTorch bundle this test may change (write tables into)."""
    shutil.copytree(case.folder.parent / "torch", tmp_path / "bundle")
    return tmp_path / "bundle"


def _request(case: ReferenceCase, batch: int, guidance: float, image=IMAGE, seed: int = 9) -> GenerationParams:
    return GenerationParams(
        [f"p{i}" for i in range(batch)],
        [3, 4][:batch],
        STEPS,
        guidance,
        embeddings(case, batch, seed),
        embeddings(case, batch, seed + 1),
        image=image,
    )


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_latents_match_the_pipeline(real_like, backend, batch, guidance):
    case = real_like
    engine = engine_for(case.folder.parent / backend)
    request = _request(case, batch, guidance)
    ours = engine.generate(request, NoCache(batch)).latents
    theirs = run_reference(
        case,
        request.seeds,
        STEPS,
        guidance,
        "latent",
        request.prompt_embeds,
        request.negative_prompt_embeds,
        image=IMAGE,
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_the_image_conditions_the_video(real_like):
    """Another image gives other latents (the conditioning is not dropped on the way)."""
    case = real_like
    engine = engine_for(case.folder.parent / "torch")
    first = engine.generate(_request(case, 1, 6.0), NoCache(1)).latents
    other = engine.generate(_request(case, 1, 6.0, image=reference_image(seed=1)), NoCache(1)).latents
    assert np.abs(first - other).max() > 1e-3


def test_a_sample_is_the_same_alone_or_in_a_batch(real_like, tmp_path):
    case = real_like
    engine = engine_for(_own_copy(case, tmp_path))
    steps = 8
    timesteps = np.asarray(engine.sampler(steps).timesteps, np.float64)
    table = SensitivityTable(timesteps[::-1].copy(), np.full(steps, 1.0), np.full(steps, 1e-3), meta={"source": "test"})
    for expert in range(engine.bundle.manifest.experts):
        engine.bundle.write_tables(table, expert=expert)
    knobs = {"eps_start": 0.02, "eps_main": 0.8, "max_reuse": 2}
    embeds, negative = embeddings(case, 2, 5), embeddings(case, 2, 6)
    request = GenerationParams(["a", "b"], [21, 22], steps, 6.0, embeds, negative, image=IMAGE)
    together = engine.generate(request, engine.policy("sencache", steps, 2, knobs))
    for b in range(2):
        alone = engine.generate(
            GenerationParams(["x"], [21 + b], steps, 6.0, embeds[b : b + 1], negative[b : b + 1], image=IMAGE),
            engine.policy("sencache", steps, 1, knobs),
        )
        assert alone.decisions[0] == together.decisions[b]
        np.testing.assert_allclose(alone.latents[0], together.latents[b], atol=1e-5, rtol=0)
    assert any("reuse" in d for d in together.decisions)


def test_a_missing_image_is_refused_before_any_work(real_like):
    engine = engine_for(real_like.folder.parent / "torch")
    with pytest.raises(BadInput, match="^image is missing: .* is an image-to-video model") as caught:
        engine.generate(_request(real_like, 1, 6.0, image=None), NoCache(1))
    assert caught.value.param == "image"


def test_calibration_and_sencache_on_an_image_to_video_bundle(real_like, tmp_path):
    """Calibration starts every trajectory from the image (the same draws as the run's) and gives a
    finite table, with which SenCache reuses steps of an image-to-video run; without an image
    calibration is refused naming it."""
    from sencache.calibration.calibrate import CalibrationPlan, calibrate

    engine = engine_for(_own_copy(real_like, tmp_path))
    with pytest.raises(BadInput, match="^image is missing"):
        calibrate(engine, CalibrationPlan(samples=1, steps=4), show_progress=False)
    manifest = engine.bundle.manifest
    steps = 4 * manifest.experts  # Wan 2.2 I2V: 999, 954, 900 with the first expert, 833, ... with the second
    calibration = calibrate(engine, CalibrationPlan(samples=2, steps=steps), show_progress=False, image=IMAGE)
    assert len(calibration.experts) == manifest.experts
    for expert, tables in enumerate(calibration.experts):  # each expert's tables from its own steps
        table = tables.sensitivity
        assert experts_of(table.timesteps, manifest.boundary) == [expert] * len(table.timesteps)
        assert len(table.timesteps) >= 2 and np.all(table.jx > 0) and np.all(table.jt > 0)
        engine.bundle.write_tables(table, tables.baselines, expert)
    knobs = {"eps_start": 10.0, "eps_main": 10.0, "max_reuse": 2}
    result = engine.generate(_request(real_like, 1, 6.0), engine.policy("sencache", STEPS, 1, knobs))
    assert "reuse" in result.decisions[0]
