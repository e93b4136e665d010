"""The bundled tiny image-to-video model (tiny-wan-i2v): its image inputs as the adapter encodes a
request's image, and calibration, the step engine and the bench end to end on it, each sample's
image carried by its own request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sencache.benchmarks.metrics import psnr
from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.data.clips import first_frame
from sencache.runtime.cache import NoCache
from sencache.runtime.errors import BadInput
from sencache.runtime.families import resolve
from sencache.runtime.families.base import Shapes
from sencache.runtime.model import Model
from sencache.runtime.request import GenerationParams
from sencache.runtime.stepping import StepEngine
from sencache.runtime.tiny_text import TinyTextEncoder

PROMPT = "one large red circle moving right slow on texture"
STEPS = 10


def test_a_tiny_image_is_the_first_frame_channels_and_its_pixel_patches():
    adapter, preset = resolve("tiny-wan-i2v")
    shapes = Shapes(preset.frames, preset.height, preset.width, 2)
    image = first_frame(PROMPT, 0)
    given = adapter.encode_image(image, [torch.Generator()] * 2, None, preset, shapes)
    rgb = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0)
    latent, embeds = given["image_latent"], given["image_embeds"]
    assert latent.shape == (2, 4, 8, 32, 32) and embeds.shape == (2, 64, 48)
    assert torch.equal(latent[:, 0, 0], torch.ones(2, 32, 32))  # the mask marks frame 0
    assert not latent[:, :, 1:].any()
    torch.testing.assert_close(latent[1, 1:, 0], rgb.permute(2, 0, 1))
    torch.testing.assert_close(embeds[1, 0], rgb[:4, :4].reshape(-1))
    torch.testing.assert_close(embeds[1, 9], rgb[4:8, 4:8].reshape(-1))  # patch row 1, column 1
    larger = np.asarray(Image.fromarray(image).resize((48, 64)))  # resized to the video's 32 x 32
    resized = adapter.encode_image(larger, [torch.Generator()], None, preset, shapes)["image_latent"]
    assert resized.shape == (1, 4, 8, 32, 32)


def test_tiny_text_is_padded_to_the_text_tokens_diffusers_splits_the_image_from():
    """diffusers' Wan attention takes the last 512 context tokens as text and the rest as image."""
    adapter, preset = resolve("tiny-wan-i2v")
    text = adapter.tiny_format.encode_text(TinyTextEncoder(32).eval(), [PROMPT, ""])
    assert text.shape == (2, *adapter.text_shape(preset)) == (2, 512, 32)
    assert text[:, :12].any() and not text[:, 12:].any()


def test_the_clips_command_writes_a_clips_first_frame(tmp_path):
    from sencache.data.clips import main

    main([PROMPT, "--seed", "4", "--out", str(tmp_path / "first.png")])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "first.png")), first_frame(PROMPT, 4))
    with pytest.raises(BadInput, match="word 1 'a' should be"):
        first_frame("a red circle", 0)


@pytest.fixture(scope="module")
def tiny_i2v(bundle_cache) -> Path:
    """The bundled tiny image-to-video model (ONNX Runtime), calibrated from one first frame."""
    from conftest import built

    bundle = built(bundle_cache, model="tiny-wan-i2v", backend="onnxruntime", max_batch=2)

    def calibrated(out: Path) -> None:
        import shutil

        shutil.copytree(bundle, out)
        engine = Model.open(out, threads=1)
        plan = CalibrationPlan(samples=2, steps=8)
        calibration = calibrate(engine, plan, [PROMPT], show_progress=False, image=first_frame(PROMPT, 1))
        engine.bundle.write_tables(calibration.sensitivity, calibration.baselines)

    return bundle_cache.get("tiny-wan-i2v-calibrated", calibrated, source=bundle.name)


def test_the_step_engine_takes_each_requests_image(tiny_i2v):
    """Two requests with their own images step together as each does alone; each video starts
    nearer its own image than the other's (the model follows the frame it is given; measured here:
    about 16 dB against 13.4) and SenCache skips steps."""
    engine = Model.open(tiny_i2v, threads=1)
    images = [first_frame(PROMPT, seed) for seed in (2, 3)]
    requests = [GenerationParams([PROMPT], [5], STEPS, 4.0, image=image) for image in images]
    alone = [engine.generate(request, engine.policy("sencache", STEPS, 1, {})) for request in requests]
    stepper = StepEngine(engine)
    ids = [stepper.submit(request, engine.policy("sencache", STEPS, 1, {})) for request in requests]
    while stepper.busy:
        stepper.step()
    together = [stepper.result(i) for i in ids]
    for i, (one, both) in enumerate(zip(alone, together, strict=True)):
        np.testing.assert_allclose(both.latents, one.latents, atol=1e-5)
        assert one.nfe[0] < STEPS
        start = engine.decode(one.latents)[0][0]
        assert psnr(start, images[i] / 255.0) > psnr(start, images[1 - i] / 255.0) + 1.0
    assert psnr(engine.decode(alone[0].latents)[0], engine.decode(alone[1].latents)[0]) < 25.0
    uncached = engine.generate(requests[0], NoCache(1))
    assert psnr(engine.decode(uncached.latents)[0], engine.decode(alone[0].latents)[0]) > 25.0
    with pytest.raises(BadInput, match="image is missing"):
        engine.generate(GenerationParams([PROMPT], [5], STEPS, 4.0), NoCache(1))


def test_the_bench_takes_each_samples_image_from_the_sample_set(tiny_i2v, tmp_path):
    """The bench on the tiny model: each sample's image (the first frame of a clip of its prompt)
    rides in its request; every rule skips steps and stays close to the uncached video."""
    from sencache.benchmarks.bench import BenchPlan, Runner, evaluation_images, evaluation_set, run_bench

    engine = Model.open(tiny_i2v, threads=1)
    prompts, seeds = evaluation_set(2, None, None)
    images, source = evaluation_images(engine, prompts, None)
    assert len(images) == 2 and not np.array_equal(images[0], images[1])
    methods = ("sencache", "teacache", "magcache", "fixed")
    plan = BenchPlan(methods, tuple(prompts), tuple(seeds), STEPS, 4.0, True, 1, images=images, image_source=source)
    report = run_bench(engine, plan, tmp_path / "bench", show_progress=False)
    assert report["images"]["source"] == source and len(report["images"]["sha256"]) == 2
    for method in methods:
        assert any(max(r["nfe"]) < STEPS and min(r["psnr"]) > 20 for r in report["runs"] if r["method"] == method)
    with pytest.raises(BadInput, match="2 prompts but 1 images"):
        BenchPlan(methods, tuple(prompts), tuple(seeds), STEPS, 4.0, True, 1, images=images[:1])
    Image.fromarray(images[0]).save(tmp_path / "first.png")  # one file for every sample: one request of both
    same, _ = evaluation_images(engine, prompts, [tmp_path / "first.png"])
    np.testing.assert_array_equal(same[1], images[0])
    assert (
        len(Runner(engine, BenchPlan(methods, tuple(prompts), tuple(seeds), STEPS, 4.0, True, images=same)).chunks) == 1
    )
