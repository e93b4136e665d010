"""Small pure pieces: the tiny vocabulary, the drift reduction, PSNR, the prompt-following readers."""

import math

import numpy as np
import pytest

from sencache.benchmarks.metrics import psnr
from sencache.kernels.drift import drift_sumsq
from sencache.runtime.errors import BadInput
from sencache.runtime.tiny_grammar import MAX_TOKENS, tokenize
from sencache.runtime.tiny_text import TinyTextEncoder


def test_tokenize_pads_and_rejects_unknown_words():
    ids = tokenize("one small red circle static on black")
    assert len(ids) == MAX_TOKENS and ids[7:] == [0] * (MAX_TOKENS - 7)
    assert tokenize("") == [0] * MAX_TOKENS
    with pytest.raises(BadInput, match="dragon"):
        tokenize("one red dragon")
    with pytest.raises(BadInput):
        tokenize(" ".join(["red"] * (MAX_TOKENS + 1)))


def test_text_encoder_shape():
    out = TinyTextEncoder(dim=32).encode(["two large blue squares moving up fast on texture", ""])
    assert out.shape == (2, MAX_TOKENS, 32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_drift_sumsq_matches_direct_sum(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 7, 11)).astype(dtype)
    a = rng.standard_normal((3, 5, 7, 11)).astype(dtype)
    expected = [float(np.sum((x[b].astype(np.float64) - a[b].astype(np.float64)) ** 2)) for b in range(3)]
    np.testing.assert_allclose(drift_sumsq(x, a), expected, rtol=1e-12)


def test_psnr_known_values():
    a = np.zeros((2, 4, 4, 3))
    assert psnr(a, a) == math.inf
    assert psnr(a + 0.1, a) == pytest.approx(20.0)
    assert psnr(a + 0.01, a) == pytest.approx(40.0)


def test_prompt_following_readers_are_exact_on_the_training_clips():
    """The evaluator's colour and motion readers recover every prompt from the clips it drew."""
    from sencache.data.clips import render
    from sencache.engine_builder.tiny.evaluate import cases, read_colour, read_motion

    rng = np.random.default_rng(0)
    for spec in cases():
        clip = render(spec, rng)
        assert read_colour(clip) == spec.colour
        assert read_motion(clip) == (spec.direction or "static")


def test_widen_bf16_keeps_the_graph_and_its_values(tmp_path):
    """A bf16 graph (initializer, constant, cast) widened to fp32 computes the same function on
    the same bf16 values in ONNX Runtime, which has no bf16 CPU kernels."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from sencache.engine_builder.onnx_export import widen_bf16

    weights = np.array([0.1, -2.5, 3.3], np.float32)
    bits = (weights.view(np.uint32) >> 16).astype(np.uint16)
    rounded = (bits.astype(np.uint32) << 16).view(np.float32)
    w = helper.make_tensor("w", TensorProto.BFLOAT16, [3], bits.tobytes(), raw=True)
    c = helper.make_tensor("c", TensorProto.BFLOAT16, [], np.array([16087], np.uint16).tobytes(), raw=True)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
            helper.make_node("Constant", [], ["k"], value=c),
            helper.make_node("Mul", ["xb", "w"], ["y0"]),
            helper.make_node("Mul", ["y0", "k"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [3])],
        initializer=[w],
    )
    source, target = tmp_path / "b.onnx", tmp_path / "w.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(source))
    widen_bf16(source, target)
    x = np.array([1.0, 2.0, 3.0], np.float32)
    (got,) = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, x * rounded * np.float32(0.41992188), rtol=1e-6)
    assert got.dtype == np.float32
