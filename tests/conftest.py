"""Shared fixtures: tiny bundles built once per session (tiny-wan on ONNX Runtime and PyTorch,
tiny-cogvideox and tiny-ltx on ONNX Runtime)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from sencache.calibration.calibrate import CalibrationPlan, calibrate
from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.backends.base import open_backend
from sencache.runtime.bundle import DIGEST, MANIFEST, Bundle
from sencache.runtime.model import Model

torch.set_num_threads(1)


BUILDS = {
    "ort_bundle",
    "torch_bundle",
    "cogvideox_bundle",
    "ltx_bundle",
    "calibrated_bundle",
    "fp8_bundle",
    "real_like",
}
"""Fixtures that build (and calibrate) bundles: a test that needs one, directly or through another
fixture, is `slow`, so `pytest -m "not slow"` is the fast lane of pure and small tests."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BUILDS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ort_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-wan-ort"
    build(BuildOptions(model="tiny-wan", out=out, backend="onnxruntime", max_batch=3), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def torch_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-wan-torch"
    build(BuildOptions(model="tiny-wan", out=out, backend="torch", max_batch=3), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def cogvideox_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-cogvideox-ort"
    build(BuildOptions(model="tiny-cogvideox", out=out, backend="onnxruntime", max_batch=3), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def ltx_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-ltx-ort"
    build(BuildOptions(model="tiny-ltx", out=out, backend="onnxruntime", max_batch=3), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def calibrated_bundle(ort_bundle, tmp_path_factory) -> Path:
    """A copy of the ONNX bundle with a small measured sensitivity table."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-wan-calibrated"
    shutil.copytree(ort_bundle, out)
    bundle = Bundle.load(out)
    engine = Model(bundle, open_backend(bundle, threads=1))
    calibration = calibrate(engine, CalibrationPlan(samples=2, steps=8), show_progress=False)
    bundle.write_tables(calibration.sensitivity, calibration.baselines)
    return out


def engine_for(path: Path) -> Model:
    return Model.open(path, threads=1)


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
