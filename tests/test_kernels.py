"""The CUDA drift kernel: NVRTC and nvcc compile it for sm_80/90/100 without spills, and its NumPy
host reference (same blocking) matches a plain sum on odd sizes and every dtype."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sencache.kernels.host_reference import blocks_per_sample, drift_reference
from sencache.kernels.nvrtc_build import ENTRY_POINTS, KernelBuildError, compile_drift_kernel

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_100"])
def test_nvrtc_compiles_without_spills(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("SENCACHE_CACHE", str(tmp_path))
    kernel = compile_drift_kernel(arch)
    assert not kernel.cached and kernel.cubin.stat().st_size > 1000
    assert set(kernel.registers) == set(ENTRY_POINTS)
    assert all(0 < r <= 64 for r in kernel.registers.values())
    assert all(s == 0 for s in kernel.spills.values())
    again = compile_drift_kernel(arch)
    assert again.cached and again.cubin == kernel.cubin


def test_bad_architecture_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SENCACHE_CACHE", str(tmp_path))
    with pytest.raises(KernelBuildError):
        compile_drift_kernel("sm_1")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_nvcc_builds_the_c_launcher_for_three_architectures(tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (80, 90, 100)]
    done = subprocess.run(
        [
            NVCC,
            "-c",
            f"-I{KERNELS / 'include'}",
            f"-I{KERNELS}",
            *gencode,
            "-o",
            str(tmp_path / "drift.o"),
            str(KERNELS / "drift_launch.cu"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "drift.o").stat().st_size > 10_000


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 7), (3, 1001), (2, 4099), (2, 3, 5, 7, 11), (2, 600_001)])
def test_host_reference_matches_numpy(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape)
    a = x + 0.1 * rng.standard_normal(shape)
    if dtype == "bf16":
        xs, as_ = _bf16_bits(x), _bf16_bits(a)
        xf, af = (xs.astype(np.uint32) << 16).view(np.float32), (as_.astype(np.uint32) << 16).view(np.float32)
    else:
        np_dtype = np.float32 if dtype == "fp32" else np.float16
        xs, as_ = x.astype(np_dtype), a.astype(np_dtype)
        xf, af = xs.astype(np.float32), as_.astype(np.float32)
    expected = ((xf.astype(np.float64) - af) ** 2).reshape(shape[0], -1).sum(axis=1)
    np.testing.assert_allclose(drift_reference(xs, as_, dtype), expected, rtol=1e-5)


def test_blocking_depends_on_sizes_only():
    assert blocks_per_sample(7, 4) == 1
    assert blocks_per_sample(16 * 21 * 60 * 104, 2) == 512  # Wan 1.3B latent in fp16: 262080 vectors / 512
    assert blocks_per_sample(10**9, 4) == 1024
