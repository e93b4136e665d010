"""Tests that need a CUDA device: they skip cleanly on the CPU machines of CI."""

import numpy as np
import pytest

from sencache.cli import main
from sencache.gpu_acceptance import counting_syncs, loop_backend
from sencache.kernels.cuda_drift import CudaUnavailable, DeviceDrift, open_device, upload
from sencache.kernels.host_reference import drift_reference


@pytest.fixture(scope="module")
def device():
    try:
        return open_device()
    except CudaUnavailable as e:
        pytest.skip(f"no CUDA device: {e}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("per_sample", [1, 7, 4099, 1 << 20])
def test_device_drift_matches_the_blocking_model(device, dtype, per_sample):
    from sencache.gpu_acceptance import random_input

    rng = np.random.default_rng(per_sample)
    x, anchor = random_input(dtype, (3, per_sample), rng), random_input(dtype, (3, per_sample), rng)
    drift = DeviceDrift(device, 3, per_sample, dtype)
    drift.enqueue(upload(x), upload(anchor), 3)
    np.testing.assert_array_equal(drift.result(), drift_reference(x, anchor, dtype))
    drift.close()


def test_gpu_acceptance_without_a_gpu_is_one_clear_line(capsys):
    try:
        open_device()
    except CudaUnavailable:
        assert main(["gpu-acceptance"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    else:
        pytest.skip("a GPU is present: the acceptance run itself is the check")


@pytest.mark.gpu
def test_tensorrt_bundle_runs_like_onnxruntime(device, request, tmp_path):
    """The stage engines on this GPU against the same bundle in ONNX Runtime."""
    from conftest import engine_for
    from sencache.runtime.cache import NoCache
    from sencache.runtime.request import GenerationParams

    backend, target = loop_backend(device.arch)
    if backend == "torch":
        pytest.skip(f"no TensorRT that builds for {device.arch} here")
    ort_bundle = request.getfixturevalue("ort_bundle")  # session-scoped: asked for only once TensorRT is here
    extra = ["--backend", backend, *(["--compute-capability", target] if target else [])]
    out = tmp_path / "trt"
    assert main(["build", "--model", "tiny-wan", "--max-batch", "3", "--out", str(out), *extra]) == 0
    run = GenerationParams(["one large white circle static on black"], [1], 8, 4.0)
    ours = engine_for(out).generate(run, NoCache(1)).latents
    reference = engine_for(ort_bundle).generate(run, NoCache(1)).latents
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "tensorrt"])
def test_device_loop_waits_only_on_the_drift_event(device, backend, tmp_path):
    """The cached loop on the GPU makes no PyTorch-visible host sync per step (the drift read-back
    goes through the driver's event wait), so a longer run syncs no more often than a short one.
    tiny-ltx, whose flow-matching Euler step is diffusers' own and sync-free on CUDA."""
    import torch

    from sencache.calibration.calibrate import CalibrationPlan, calibrate
    from sencache.runtime.cache import NoCache
    from sencache.runtime.model import Model
    from sencache.runtime.request import GenerationParams

    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    if backend == "tensorrt":
        backend, target = loop_backend(device.arch)
        if backend == "torch":
            pytest.skip(f"no TensorRT that builds for {device.arch} here")
        extra = ["--backend", backend, *(["--compute-capability", target] if target else [])]
    else:
        extra = ["--backend", "torch"]
    out = tmp_path / "bundle"
    assert main(["build", "--model", "tiny-ltx", "--max-batch", "2", "--out", str(out), *extra]) == 0
    engine = Model.open(out, device="cuda" if backend == "torch" else "cpu")
    bundle = engine.bundle
    assert engine.backend.device.type == "cuda"
    bundle.write_tables(calibrate(engine, CalibrationPlan(samples=2), show_progress=False).sensitivity)
    knobs = {"eps_start": 0.2, "eps_main": 0.4, "max_reuse": 3}
    prompts, seeds = (
        ["one large white circle static on black", "two small red squares moving left fast on black"],
        [1, 2],
    )
    short = counting_syncs(
        lambda: engine.generate(GenerationParams(prompts, seeds, 6, 4.0), engine.policy("sencache", 6, 2, knobs))
    )[1]
    long = counting_syncs(
        lambda: engine.generate(GenerationParams(prompts, seeds, 20, 4.0), engine.policy("sencache", 20, 2, knobs))
    )[1]
    assert long == short
    request = GenerationParams(prompts, seeds, 20, 4.0)
    cached = engine.generate(request, engine.policy("sencache", 20, 2, knobs))
    reference = engine.generate(request, NoCache(2))
    assert min(cached.nfe) < 20
    error = np.linalg.norm(cached.latents - reference.latents) / np.linalg.norm(reference.latents)
    assert error < 0.05  # 0.0034 with the PyTorch backend on the CPU
