"""FP8 E4M3 post-training quantization of the blocks with NVIDIA Model Optimizer: a real Q/DQ
graph, checked in ONNX Runtime against fp32, run by the engine, and built into TensorRT-RTX engines."""

import json

import numpy as np
import onnx
import pytest

from conftest import engine_for, rtx_build
from sencache.cli import main
from sencache.kernels.cuda_drift import CudaUnavailable, open_device
from sencache.runtime.bundle import Bundle
from sencache.runtime.cache import NoCache
from sencache.runtime.prediction import predict
from sencache.runtime.request import GenerationParams

pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt not installed (pip install 'sencache[fp8]')")

PROMPTS = ["one large white circle static on black", "two small red squares moving left fast on texture"]


def test_blocks_are_an_fp8_qdq_graph_checked_against_fp32(fp8_bundle):
    manifest = Bundle.load(fp8_bundle).manifest
    assert manifest.precision == "fp8" and manifest.backend == "onnxruntime"
    error = manifest.quantization["blocks_vs_fp32"]
    assert 1e-3 < error["rel_l2"] <= 0.15  # quantized for real, and within the build's limit
    graph = onnx.load(str(fp8_bundle / "blocks.onnx")).graph
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) >= 12  # q/k/v/o, cross-attention and feed-forward matmuls of 6 blocks
    zero_points = {i.name: i for i in graph.initializer}
    assert any(zero_points[n.input[2]].data_type == fp8 for n in quantizers if len(n.input) > 2)
    head = onnx.load(str(fp8_bundle / "head.onnx")).graph
    assert not any(n.op_type == "QuantizeLinear" for n in head.node)


def test_fp8_denoiser_stays_close_to_fp32_and_generates(fp8_bundle, ort_bundle):
    """One call (conditional branch) within 10% of fp32; a whole run is a finite video. (Guidance
    amplifies the per-call error about threefold and it compounds over the trajectory: FP8 videos
    follow the prompt but are not pixel-faithful to fp32 ones; `benchmarks/precision.py` measures
    by how much.)"""
    fp8, fp32 = engine_for(fp8_bundle), engine_for(ort_bundle)
    run = fp32.generate(GenerationParams(PROMPTS, [3, 4], 12, 4.0), NoCache(2), record=True)
    text, uncond = fp32.encode(PROMPTS), fp32.encode(["", ""])
    for k in (2, 6, 10):
        t = np.full(2, run.timesteps[k], np.float32)
        ours = predict(fp8, run.trajectory[k], t, text, uncond, 4.0).cond
        reference = predict(fp32, run.trajectory[k], t, text, uncond, 4.0).cond
        assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 0.1
    frames = fp8.decode(fp8.generate(GenerationParams(PROMPTS, [3, 4], 12, 4.0), NoCache(2)).latents)
    assert np.all(np.isfinite(frames)) and frames.std() > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-wan", "tiny-cogvideox", "tiny-ltx"])
def test_tensorrt_rtx_builds_fp8_engines(capsys, tmp_path, model):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed")
    out = tmp_path / "rtx"
    code = rtx_build(model, "fp8", out, "--fp8-samples", "1")
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt"]["compute_capability"] == "SM89"
    assert manifest["quantization"]["blocks_vs_fp32"]["rel_l2"] <= 0.15
    for stage in ("head", "blocks", "tail"):
        assert (out / f"{stage}.engine").stat().st_size > 50_000
    try:
        open_device()
    except CudaUnavailable:
        code = main(
            ["generate", "--engine", str(out), "--prompt", PROMPTS[0], "--steps", "2", "--out", str(tmp_path / "run")]
        )
        assert code == 2 and "need an NVIDIA GPU" in capsys.readouterr().err


def test_fp8_needs_an_onnx_backend(capsys, tmp_path):
    assert (
        main(["build", "--model", "tiny-wan", "--backend", "torch", "--precision", "fp8", "--out", str(tmp_path / "b")])
        == 2
    )
    assert "Q/DQ" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
