"""TensorRT-RTX builds real engines from the bundle's validated ONNX on this GPU-less machine."""

import json
import shutil

import pytest

from conftest import rtx_build
from sencache.cli import main

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")

from sencache.engine_builder.tensorrt_build import build_engines  # noqa: E402


def test_tensorrt_rtx_builds_fp32_engines_for_every_stage(ort_bundle, tmp_path):
    folder = tmp_path / "rtx"
    shutil.copytree(ort_bundle, folder)
    record = build_engines(folder, ["head", "blocks", "tail"], 6, "tensorrt-rtx", "SM89", None, lambda _: None)
    for stage in ("head", "blocks", "tail"):
        assert (folder / f"{stage}.engine").stat().st_size > 100_000
    assert record["compute_capability"] == "SM89" and record["version"] == trt.__version__
    assert record["profiles"]["blocks"]["hidden"] == {"min": [1, 512, 128], "opt": [3, 512, 128], "max": [6, 512, 128]}
    assert "rope_cos" not in record["profiles"]["blocks"]


def test_tensorrt_rtx_without_target_or_runtime_is_bad_input(capsys, tmp_path, ort_bundle):
    assert main(["build", "--model", "tiny-wan", "--backend", "tensorrt-rtx", "--out", str(tmp_path / "b")]) == 2
    assert "--compute-capability" in capsys.readouterr().err
    assert (
        main(
            [
                "build",
                "--model",
                "tiny-wan",
                "--backend",
                "tensorrt-rtx",
                "--compute-capability",
                "SM90",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "SM89" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,precision",
    [
        ("tiny-wan", "fp16"),
        ("tiny-wan", "bf16"),
        ("tiny-cogvideox", "fp32"),
        ("tiny-cogvideox", "fp16"),
        ("tiny-cogvideox", "bf16"),
        ("tiny-ltx", "fp32"),
        ("tiny-ltx", "fp16"),
        ("tiny-ltx", "bf16"),
    ],
)
def test_tensorrt_rtx_builds_every_tiny_bundle(capsys, tmp_path, model, precision):
    out = tmp_path / "rtx"
    code = rtx_build(model, precision, out)
    assert code == 0, capsys.readouterr().err
    for stage in ("head", "blocks", "tail"):
        assert (out / f"{stage}.engine").stat().st_size > 50_000


@pytest.mark.slow
def test_bf16_bundles_are_validated_widened_and_estimated(capsys, tmp_path):
    """bf16 stages are checked in ONNX Runtime widened to fp32 (structure and weights) and the
    precision loss is estimated in PyTorch bf16; both figures land in the manifest."""
    import json

    out = tmp_path / "bf16"
    assert rtx_build("tiny-wan", "bf16", out) == 0
    validation = json.loads((out / "manifest.json").read_text())["validation"]
    assert validation["head"]["rel_l2"] < 1e-5 and validation["tail"]["rel_l2"] < 1e-5
    assert validation["blocks"]["rel_l2"] < 5e-3
    assert 1e-3 < validation["chain_vs_fp32"]["rel_l2"] < 3e-2


@pytest.mark.slow
def test_tensorrt_rtx_builds_a_real_preset_at_its_true_width_one_engine_per_group(tmp_path):
    """Wan 2.1 1.3B's true width (1536, 12 heads, text 512 x 4096) with two of its 30 blocks and
    dummy fp16 weights, 9x64x64, streamed one block per graph: the real-size path (dummy draw,
    export, validation, the PyTorch model freed, engines written without a second copy) compiles
    one engine per group, listed in order as the blocks stage's file and parts (the TensorRT
    backend runs them in turn). The whole 30-block model's fp16 engine and a streamed fp8 build
    are in benchmarks/results/real_size/ (minutes to build)."""
    out = tmp_path / "wan"
    argv = ["build", "--model", "wan2.1-t2v-1.3b", "--load-format", "dummy", "--layers", "2", "--group-blocks", "1"]
    argv += ["--backend", "tensorrt-rtx", "--compute-capability", "SM89", "--precision", "fp16"]
    assert main([*argv, "--frames", "9", "--height", "64", "--width", "64", "--max-batch", "1", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["num_layers"] == 2 and manifest["config"]["num_attention_heads"] == 12
    profiles = manifest["tensorrt"]["profiles"]
    assert set(profiles) == {"head", "blocks", "blocks.1", "tail"}
    assert profiles["blocks"]["hidden"]["max"] == [2, 48, 1536]
    assert profiles["head"]["text"]["max"] == [2, 512, 4096]
    blocks = manifest["stages"]["blocks"]
    assert (blocks["file"], blocks["parts"]) == ("blocks.engine", ["blocks.1.engine"])
    assert [g["blocks"] for g in manifest["validation"]["blocks_groups"]] == [[0, 1], [1, 2]]
    # one block of fp16 weights (about 88 MB) in each group's engine; the head holds the text projection
    for engine in ("blocks.engine", "blocks.1.engine"):
        assert (out / engine).stat().st_size > 80e6
    assert (out / "head.engine").stat().st_size > 20e6
    assert all(manifest["validation"][stage]["rel_l2"] < 5e-3 for stage in ("head", "blocks", "tail"))
