"""`sencache doctor`: what this machine has, and which backends and precisions work here."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import shutil
import subprocess
from typing import Any

from sencache.runtime.backends.registry import BACKENDS, Backend


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # a broken optional install counts as absent
        return False


def _gpus() -> tuple[list[str], str | None]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], None
    done = subprocess.run(
        [smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if done.returncode != 0:
        return [], None
    rows = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return rows, rows[0].split(",")[-1].strip() if rows else None


def _nvrtc() -> str | None:
    try:
        from cuda.bindings import nvrtc

        _, major, minor = nvrtc.nvrtcVersion()
        return f"{major}.{minor}"
    except Exception:  # missing library or bindings
        return None


def _build_line(backend: Backend, gpus: list[str], fp8: bool) -> list[str] | str:
    """What `backend` builds here: its precisions, or why it builds nothing."""
    if backend.engine_module is not None and not _importable(backend.engine_module):
        return f"not installed: {backend.install}"
    if backend.builds_on_gpu and not gpus:
        return "needs a GPU to build for"
    precisions = [p for p in backend.precisions if fp8 or p != "fp8"]
    return precisions + ([backend.build_note] if backend.build_note else [])


def report() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    gpus, driver = _gpus()
    providers = ort.get_available_providers()
    trt = _importable("tensorrt")
    trt_rtx = _importable("tensorrt_rtx")
    nvcc = shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))
    cuda_torch = torch.cuda.is_available()
    modelopt = _version("nvidia-modelopt") if _importable("modelopt") else None
    return {
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        "gpus": gpus or ["none"],
        "driver": driver,
        "torch": f"{torch.__version__} (CUDA {'available' if cuda_torch else 'not available'})",
        "onnxruntime": f"{ort.__version__}: {', '.join(providers)}",
        "tensorrt": _version("tensorrt") if trt else None,
        "tensorrt_rtx": (_version("tensorrt-rtx-cu13") or _version("tensorrt_rtx") or "installed") if trt_rtx else None,
        "nvrtc": _nvrtc(),
        "nvcc": nvcc,
        "modelopt": modelopt,
        "build": {name: _build_line(backend, gpus, modelopt is not None) for name, backend in BACKENDS.items()},
        "run": {
            "onnxruntime": "CUDA EP" if "CUDAExecutionProvider" in providers else "CPU EP",
            "torch": "CUDA (generate --device cuda), device-resident loop" if cuda_torch else "CPU",
            "tensorrt": (
                "stage engines and the device-resident loop on the GPU (unproven on hardware in CI)"
                if cuda_torch and (trt or trt_rtx)
                else "needs an NVIDIA GPU, a CUDA build of torch and TensorRT / TensorRT-RTX"
            ),
            "drift kernel": (
                "compile only (no GPU)" if not gpus else "compile; GPU launch by `sencache gpu-acceptance`"
            )
            if _nvrtc()
            else "unavailable: pip install 'sencache[cuda]'",
        },
    }


def print_report() -> None:
    for key, value in report().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:14s} {', '.join(v) if isinstance(v, list) else v}")
        elif isinstance(value, list):
            print(f"{key:16s} {'; '.join(value)}")
        else:
            print(f"{key:16s} {value if value is not None else 'not installed'}")
