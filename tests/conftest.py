"""Shared fixtures: tiny bundles built once per test run and shared by every xdist worker (tiny-wan
on ONNX Runtime, PyTorch and in FP8, tiny-cogvideox and tiny-ltx on ONNX Runtime, a calibrated
tiny-wan, and one as the demo builds it), and helpers that open and tamper with bundles."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from bundle_cache import BundleCache
from sencache.benchmarks.reference_pipelines import ReferenceCase, build_bundle, save_reference
from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.cli import main
from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.bundle import DIGEST, MANIFEST, Bundle
from sencache.runtime.model import Model

torch.set_num_threads(1)


BUILDS = {
    "bundle_cache",
    "ort_bundle",
    "torch_bundle",
    "cogvideox_bundle",
    "ltx_bundle",
    "calibrated_bundle",
    "demo_bundle",
    "fp8_bundle",
    "real_like",
    "torch_calibrated",
    "cogvideox_torch_calibrated",
    "ltx_torch_calibrated",
    "wan_i2v",
}
"""Fixtures that build (and calibrate) bundles: a test that needs one, directly or through another
fixture, is `slow`, so `pytest -m "not slow"` is the fast lane of pure and small tests."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BUILDS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def bundle_cache(tmp_path_factory) -> BundleCache:
    """The run's shared bundles: under the base folder all xdist workers of this run share."""
    base = tmp_path_factory.getbasetemp()
    return BundleCache((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "bundles")


def built(cache: BundleCache, **options) -> Path:
    """The shared bundle `build` makes with `options` (quietly)."""
    return cache.get("build", lambda out: build(BuildOptions(out=out, **options), log=lambda _: None), **options)


@pytest.fixture(scope="session")
def ort_bundle(bundle_cache) -> Path:
    return built(bundle_cache, model="tiny-wan", backend="onnxruntime", max_batch=3)


@pytest.fixture(scope="session")
def torch_bundle(bundle_cache) -> Path:
    return built(bundle_cache, model="tiny-wan", backend="torch", max_batch=3)


@pytest.fixture(scope="session")
def cogvideox_bundle(bundle_cache) -> Path:
    return built(bundle_cache, model="tiny-cogvideox", backend="onnxruntime", max_batch=3)


@pytest.fixture(scope="session")
def ltx_bundle(bundle_cache) -> Path:
    return built(bundle_cache, model="tiny-ltx", backend="onnxruntime", max_batch=3)


@pytest.fixture(scope="session")
def fp8_bundle(bundle_cache) -> Path:
    return built(bundle_cache, model="tiny-wan", precision="fp8", max_batch=2, fp8_samples=1)


def image_case(cache: BundleCache, model: str) -> ReferenceCase:
    """The tiny random image-to-video pipeline of `model` saved as a diffusers folder (`weights/`),
    with our PyTorch and ONNX Runtime bundles of it beside it (`torch/`, `onnxruntime/`), made once
    per run for every worker. Tests read them; one that changes a bundle copies it."""

    def make(out: Path) -> None:
        case = save_reference(model, out / "weights")
        for backend in ("torch", "onnxruntime"):
            build_bundle(case, out / backend, backend)
        (out / "case.json").write_text(json.dumps({"text": case.text, "size": case.size}))

    folder = cache.get("image-to-video", make, model=model)
    info = json.loads((folder / "case.json").read_text())
    return ReferenceCase(model, folder / "weights", tuple(info["text"]), tuple(info["size"]))


@pytest.fixture(scope="session")
def wan_i2v(bundle_cache) -> ReferenceCase:
    """Wan 2.1 I2V's tiny reference pipeline and our bundles of it (`image_case`)."""
    return image_case(bundle_cache, "wan2.1-i2v-14b-480p")


def _calibrate(source: Path, out: Path, plan: CalibrationPlan) -> None:
    shutil.copytree(source, out)
    bundle = Bundle.load(out)
    engine = Model.open(bundle, threads=1)
    calibration = calibrate(engine, plan, show_progress=False)
    bundle.write_tables(calibration.sensitivity, calibration.baselines)


@pytest.fixture(scope="session")
def calibrated_bundle(ort_bundle, bundle_cache) -> Path:
    """A copy of the ONNX bundle with a small measured sensitivity table."""
    plan = CalibrationPlan(samples=2, steps=8)
    return bundle_cache.get(
        "calibrated", lambda out: _calibrate(ort_bundle, out, plan), source=ort_bundle.name, plan=plan
    )


@pytest.fixture(scope="session")
def torch_calibrated(torch_bundle, bundle_cache) -> Path:
    """A copy of the PyTorch tiny-wan bundle with a small measured sensitivity table."""
    plan = CalibrationPlan(samples=2, steps=8)
    return bundle_cache.get(
        "calibrated", lambda out: _calibrate(torch_bundle, out, plan), source=torch_bundle.name, plan=plan
    )


@pytest.fixture(scope="session")
def cogvideox_torch_calibrated(bundle_cache) -> Path:
    """A PyTorch tiny-cogvideox bundle with a small measured sensitivity table."""
    source = built(bundle_cache, model="tiny-cogvideox", backend="torch", max_batch=3)
    plan = CalibrationPlan(samples=2, steps=8)
    return bundle_cache.get("calibrated", lambda out: _calibrate(source, out, plan), source=source.name, plan=plan)


@pytest.fixture(scope="session")
def ltx_torch_calibrated(bundle_cache) -> Path:
    """A PyTorch tiny-ltx bundle with a small measured sensitivity table."""
    source = built(bundle_cache, model="tiny-ltx", backend="torch", max_batch=3)
    plan = CalibrationPlan(samples=2, steps=8)
    return bundle_cache.get("calibrated", lambda out: _calibrate(source, out, plan), source=source.name, plan=plan)


@pytest.fixture(scope="session")
def demo_bundle(bundle_cache) -> Path:
    """tiny-wan as the demo builds it into runs/demo/tiny-wan (the build's defaults, a batch of 4),
    with a small measured sensitivity table in place of the demo's full one."""
    source = built(bundle_cache, model="tiny-wan")
    plan = CalibrationPlan(samples=2, steps=8)
    return bundle_cache.get("calibrated", lambda out: _calibrate(source, out, plan), source=source.name, plan=plan)


def engine_for(path: Path) -> Model:
    return Model.open(path, threads=1)


def rtx_build(model: str, precision: str, out: Path, *options: str) -> int:
    """`sencache build` of `model` at `precision` into `out` for TensorRT-RTX on SM89, batch 1, with
    further `options`: its exit code."""
    argv = ["build", "--model", model, "--backend", "tensorrt-rtx", "--precision", precision]
    return main([*argv, "--compute-capability", "SM89", *options, "--max-batch", "1", "--out", str(out)])


def reseal(folder: Path, edit) -> None:
    """Apply `edit` to the manifest and re-record its digest, as a consistent tamperer would."""
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    data = json.dumps(manifest).encode()
    (folder / MANIFEST).write_bytes(data)
    (folder / DIGEST).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n")


def relist(manifest: dict, folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
