"""Compile the drift kernel at run time with NVRTC (cuda.bindings.nvrtc); cache cubins on disk.

The cache key is the target architecture, the NVRTC version and the SHA-256 of the source and
options, so a changed kernel or toolkit never loads a stale cubin. Needs no GPU or driver:
compiling is the part the CPU machines of CI can check (registers and spills per entry point).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "drift_kernel.cu"
ENTRY_POINTS = ("drift_partial_f32", "drift_partial_f16", "drift_partial_bf16", "drift_finish")
THREADS = 256
"""Threads per block; must equal SENCACHE_THREADS in the source."""


class KernelBuildError(Exception):
    """NVRTC is missing, or rejected the architecture or the source."""


@dataclass(frozen=True)
class CompiledKernel:
    arch: str
    cubin: Path
    registers: dict[str, int]
    spills: dict[str, int]
    cached: bool


def cache_dir() -> Path:
    root = os.environ.get("SENCACHE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "sencache"
    )
    return Path(root) / "cubins"


def _check(result, what: str) -> None:
    from cuda.bindings import nvrtc

    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, message = nvrtc.nvrtcGetErrorString(result)
        raise KernelBuildError(f"{what}: {message.decode() if isinstance(message, bytes) else message}")


def _parse_ptxas(log: str) -> tuple[dict[str, int], dict[str, int]]:
    registers, spills, current = {}, {}, None
    for line in log.splitlines():
        match = re.search(r"Compiling entry function '(\w+)'", line)
        if match:
            current = match.group(1)
        match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match and current:
            spills[current] = int(match.group(1)) + int(match.group(2))
        match = re.search(r"Used (\d+) registers", line)
        if match and current:
            registers[current] = int(match.group(1))
    return registers, spills


def _replace(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename (kernels are a leaf: no runtime helpers)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def compile_drift_kernel(arch: str = "sm_90", use_cache: bool = True) -> CompiledKernel:
    """The cubin of the drift kernel for `arch` (e.g. sm_80, sm_90, sm_100), from cache or NVRTC."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise KernelBuildError("NVRTC is not installed: pip install cuda-bindings nvidia-cuda-nvrtc") from None
    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise KernelBuildError(f"architecture {arch!r} is not of the form sm_90")
    source = SOURCE.read_bytes()
    options = [f"--gpu-architecture={arch}", "--std=c++17", "--ptxas-options=-v", "-default-device"]
    result, major, minor = nvrtc.nvrtcVersion()
    _check(result, "nvrtcVersion")
    key = hashlib.sha256(source + " ".join(options).encode() + f"nvrtc{major}.{minor}".encode()).hexdigest()[:24]
    folder = cache_dir()
    cubin, info = folder / f"drift_{arch}_{key}.cubin", folder / f"drift_{arch}_{key}.json"
    if use_cache and cubin.is_file() and info.is_file():
        meta = json.loads(info.read_text())
        return CompiledKernel(arch, cubin, meta["registers"], meta["spills"], cached=True)

    result, program = nvrtc.nvrtcCreateProgram(source, b"drift_kernel.cu", 0, [], [])
    _check(result, "nvrtcCreateProgram")
    try:
        compiled = nvrtc.nvrtcCompileProgram(program, len(options), [o.encode() for o in options])[0]
        result, size = nvrtc.nvrtcGetProgramLogSize(program)
        log = bytearray(size)
        nvrtc.nvrtcGetProgramLog(program, log)
        text = log.decode(errors="replace").rstrip("\0")
        if compiled != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelBuildError(f"NVRTC could not compile the drift kernel for {arch}:\n{text}")
        result, size = nvrtc.nvrtcGetCUBINSize(program)
        _check(result, "nvrtcGetCUBINSize")
        binary = bytearray(size)
        _check(nvrtc.nvrtcGetCUBIN(program, binary)[0], "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    registers, spills = _parse_ptxas(text)
    missing = [e for e in ENTRY_POINTS if e not in registers]
    if missing:
        raise KernelBuildError(f"ptxas reported no registers for {', '.join(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    _replace(cubin, bytes(binary))
    _replace(info, json.dumps({"registers": registers, "spills": spills, "options": options}).encode())
    return CompiledKernel(arch, cubin, registers, spills, cached=False)
