"""Small pure pieces: the tiny vocabulary, the drift reduction, PSNR, atomic folders."""

import math

import numpy as np
import pytest

from sencache.benchmarks.metrics import psnr
from sencache.kernels.drift import drift_sumsq
from sencache.runtime.errors import BadInput
from sencache.runtime.files import staged_folder
from sencache.runtime.tiny_text import MAX_TOKENS, VOCABULARY, TinyTextEncoder, random_spec, tokenize


def test_tokenize_pads_and_rejects_unknown_words():
    ids = tokenize("one small red circle static on black")
    assert len(ids) == MAX_TOKENS and ids[7:] == [0] * (MAX_TOKENS - 7)
    assert tokenize("") == [0] * MAX_TOKENS
    with pytest.raises(BadInput, match="dragon"):
        tokenize("one red dragon")
    with pytest.raises(BadInput):
        tokenize(" ".join(["red"] * (MAX_TOKENS + 1)))


def test_every_grammar_prompt_is_in_the_vocabulary():
    rng = np.random.default_rng(0)
    for _ in range(200):
        assert all(w in VOCABULARY for w in random_spec(rng).prompt.split())


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


def test_staged_folder_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(target, "keep.txt") as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "keep.txt").read_text() == "old"
    with staged_folder(target, "keep.txt") as tmp:
        (tmp / "new.txt").write_text("whole")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_prompt_following_readers_are_exact_on_the_training_clips():
    """The evaluator's colour and motion readers recover every prompt from the clips it drew."""
    from sencache.engine_builder.tiny.clips import render
    from sencache.engine_builder.tiny.evaluate import cases, read_colour, read_motion

    rng = np.random.default_rng(0)
    for spec in cases():
        clip = render(spec, rng)
        assert read_colour(clip) == spec.colour
        assert read_motion(clip) == (spec.direction or "static")
