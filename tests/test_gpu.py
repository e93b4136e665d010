"""Tests that need a CUDA device: they skip cleanly on the CPU machines of CI."""

import numpy as np
import pytest

from sencache.cli import main
from sencache.kernels.cuda_drift import CudaUnavailable, DeviceDrift, download, open_device, upload
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
    dx, da, dr = upload(x), upload(anchor), upload(np.array([0, 1, 0], np.uint8))
    drift = DeviceDrift(device, 3, per_sample, dtype)
    drift.enqueue(dx, da, dr, 3)
    np.testing.assert_array_equal(drift.result(), drift_reference(x, anchor, dtype))
    refreshed = download(da, anchor)
    np.testing.assert_array_equal(refreshed[1], x[1])
    np.testing.assert_array_equal(refreshed[[0, 2]], anchor[[0, 2]])
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
def test_tensorrt_bundle_runs_like_onnxruntime(device, ort_bundle, tmp_path):
    """The stage engines on this GPU against the same bundle in ONNX Runtime."""
    import importlib.util

    from conftest import engine_for
    from sencache.runtime.pipeline import Request
    from sencache.runtime.policy import NoCache

    sm = "SM" + device.arch.removeprefix("sm_")
    if importlib.util.find_spec("tensorrt"):
        extra = ["--backend", "tensorrt"]
    elif importlib.util.find_spec("tensorrt_rtx") and sm in ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121"):
        extra = ["--backend", "tensorrt-rtx", "--compute-capability", sm]
    else:
        pytest.skip(f"no TensorRT that builds for {sm} here")
    out = tmp_path / "trt"
    assert main(["build", "--model", "tiny-wan", "--max-batch", "3", "--out", str(out), *extra]) == 0
    request = Request(["one large white circle static on black"], [1], 8, 4.0)
    ours = engine_for(out).generate(request, NoCache(1)).latents
    reference = engine_for(ort_bundle).generate(request, NoCache(1)).latents
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-2
