"""Calibration prompts: given as a list or a file, the default per model, and the refusal of a
real model calibrated on the tiny vocabulary. Pure: no bundle is built."""

import json
from pathlib import Path

import pytest

from sencache.benchmarks.bench import evaluation_set
from sencache.calibration.calibrate import CalibrationPlan
from sencache.cli import _calibration_prompts, main, parser
from sencache.data.grammar import grammar_prompts
from sencache.data.prompts import (
    VIDEO_PROMPTS,
    calibration_prompts,
    check_prompts,
    default_prompts,
    in_tiny_vocabulary,
    read_prompts,
)
from sencache.engine_builder.builder import BuildOptions, build
from sencache.runtime.errors import BadInput

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TINY = "two small red circles static on black"


@pytest.mark.parametrize("model", ["tiny-wan", "tiny-cogvideox"])
def test_tiny_default_is_the_prompts_of_the_committed_results(model):
    """Same seed, same prompts: the committed tables and figures were measured on these."""
    report = json.loads((RESULTS / model / "report.json").read_text())
    assert default_prompts(True, 8, 1000) == report["calibration_prompts"]
    assert calibration_prompts(True, model, 8, 1000) == grammar_prompts(8, 1000)
    assert evaluation_set(len(report["prompts"]), None, None)[0] == report["prompts"]


def test_real_default_is_the_built_in_video_prompts_from_the_seed():
    video = read_prompts(VIDEO_PROMPTS)
    assert len(video) >= 8 and not any(in_tiny_vocabulary(p) for p in video)
    assert default_prompts(False, len(video), 0) == video
    assert default_prompts(False, 3, len(video) + 2) == video[2:5]
    assert default_prompts(False, 2, len(video) - 1) == [video[-1], video[0]]
    check_prompts(video, tiny=False, model="wan2.1-t2v-14b")


def test_prompts_from_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a red fox in the snow \n\n\nwaves at dusk\n")
    assert read_prompts(path) == ["a red fox in the snow", "waves at dusk"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(BadInput, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(BadInput, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_given_prompts_are_taken_in_turn():
    given = ["a cat on a sofa", "rain on a window"]
    assert calibration_prompts(False, "cogvideox", 5, 1000, given) == [*given, *given, given[0]]
    assert calibration_prompts(False, "cogvideox", 1, 1000, given) == given[:1]
    assert calibration_prompts(True, "tiny-wan", 2, 1000, [TINY]) == [TINY, TINY]


def test_a_real_model_refuses_the_tiny_vocabulary_unless_allowed():
    tiny_prompts = grammar_prompts(4, 77)
    with pytest.raises(
        BadInput,
        match=r"wan2.1-t2v-14b is a real model.*tiny models' 29-word vocabulary"
        r".*allow_tiny_vocabulary",
    ):
        calibration_prompts(False, "wan2.1-t2v-14b", 4, 1000, tiny_prompts)
    with pytest.raises(BadInput, match="real model"):
        check_prompts(["Red Circle"], tiny=False, model="ltx-video")
    assert (
        calibration_prompts(False, "wan2.1-t2v-14b", 4, 1000, tiny_prompts, allow_tiny_vocabulary=True) == tiny_prompts
    )
    check_prompts([TINY, "a red circle rolls down a hill"], tiny=False, model="wan2.1-t2v-14b")


def test_a_tiny_model_refuses_words_it_never_saw_and_blank_or_no_prompts():
    with pytest.raises(BadInput, match="outside the tiny model's vocabulary: a, dog"):
        check_prompts([TINY, "a dog"], tiny=True, model="tiny-wan")
    with pytest.raises(BadInput, match="at least one prompt"):
        calibration_prompts(True, "tiny-wan", 2, 1000, [])
    with pytest.raises(BadInput, match="blank"):
        check_prompts([TINY, "  "], tiny=False, model="cogvideox")


def test_plan_samples_default_to_the_prompts():
    assert CalibrationPlan().samples is None
    with pytest.raises(BadInput, match="samples must be in"):
        CalibrationPlan(samples=0)
    with pytest.raises(BadInput, match="^steps must be in"):
        CalibrationPlan(steps=1)


def test_cli_calibrate_reads_prompts_file_then_each_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a lighthouse in a storm\na bee on a flower\n")
    args = parser().parse_args(
        [
            "calibrate",
            "--engine",
            "b",
            "--prompts",
            str(path),
            "--prompt",
            "a red kite",
            "--prompt",
            "a river",
            "--allow-tiny-vocabulary",
        ]
    )
    assert args.samples is None and args.allow_tiny_vocabulary
    assert _calibration_prompts(args) == ["a lighthouse in a storm", "a bee on a flower", "a red kite", "a river"]
    assert _calibration_prompts(parser().parse_args(["calibrate", "--engine", "b", "--prompt", "x"])) == ["x"]
    assert _calibration_prompts(parser().parse_args(["calibrate", "--engine", "b"])) is None


def test_cli_calibrate_refuses_prompts_with_imported_tables(tmp_path, capsys):
    code = main(["calibrate", "--engine", str(tmp_path), "--from-bundle", str(tmp_path), "--prompt", "x"])
    assert code == 2 and "measure nothing" in capsys.readouterr().err


def test_fp8_prompts_are_checked_before_any_work(tmp_path):
    pytest.importorskip("modelopt.onnx.quantization")
    with pytest.raises(BadInput, match="outside the tiny model's vocabulary"):
        build(
            BuildOptions(model="tiny-wan", out=tmp_path / "b", precision="fp8", fp8_prompts=("a dog",)),
            log=lambda _: None,
        )
    with pytest.raises(BadInput, match="real model"):
        build(
            BuildOptions(model="wan2.1-t2v-1.3b", out=tmp_path / "b", precision="fp8", fp8_prompts=(TINY,)),
            log=lambda _: None,
        )
    assert not (tmp_path / "b").exists()
