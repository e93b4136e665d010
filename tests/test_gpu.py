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
